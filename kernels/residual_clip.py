"""Fused residual-stream clipping: per-token L2 norm and rescale in one pass over the hidden state.

Each program loads whole token rows into registers, computes their fp32 L2 norms, and writes
``h * min(1, cap / ||h||)``. The cap is the per-sequence threshold, except at sink tokens: those are
exempt (cap = inf) or clamped to ``sink_norm`` (scaled down only, never up, never zeroed;
zeroing a sink's massive activations is known to destroy the model). In place, rows that are not
clipped are not written at all, which is most of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import SUPPORTED_DTYPES, cdiv, is_interpreted, next_power_of_2
from .arguments import check_residual_clip_arguments

__all__ = ["clip_config", "residual_clip_triton"]

_MAX_HIDDEN = 65536  # one row lives in registers (fp32): 64 K elements is 256 KB per program at most


# -- kernel ---------------------------------------------------------------------------------------
@triton.jit
def _residual_clip_kernel(
    X, Y, Thr, IsSink,
    stride_xz, stride_xs, stride_xd,
    stride_yz, stride_ys, stride_yd,
    stride_tz,
    stride_pz, stride_ps,
    n_tokens, seq_len, hidden, threshold, sink_norm,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    THR_TENSOR: tl.constexpr, HAS_SINKS: tl.constexpr, SINK_CLAMP: tl.constexpr,
    INPLACE: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok_ok = tok < n_tokens
    off_b = (tok // seq_len).to(tl.int64)
    off_s = (tok % seq_len).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = tok_ok[:, None] & (offs_d[None, :] < hidden)

    x = tl.load(X + off_b[:, None] * stride_xz + off_s[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                mask=io_mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    # -- cap per token: the sequence's threshold, or the sink rule --
    if THR_TENSOR:
        cap = tl.load(Thr + off_b * stride_tz, mask=tok_ok, other=float("inf")).to(tl.float32)
    else:
        cap = tl.full([BLOCK_R], threshold, tl.float32)
    if HAS_SINKS:
        is_sink = tl.load(IsSink + off_b * stride_pz + off_s * stride_ps, mask=tok_ok, other=0) != 0
        if SINK_CLAMP:
            cap = tl.where(is_sink, sink_norm, cap)
        else:
            cap = tl.where(is_sink, float("inf"), cap)
    clip = norm > cap
    factor = tl.where(clip, cap / tl.where(clip, norm, 1.0), 1.0)
    y = (x * factor[:, None]).to(Y.dtype.element_ty)
    y_ptrs = Y + off_b[:, None] * stride_yz + off_s[:, None] * stride_ys + offs_d[None, :] * stride_yd
    if INPLACE:
        tl.store(y_ptrs, y, mask=io_mask & clip[:, None])  # untouched rows are already right
    else:
        tl.store(y_ptrs, y, mask=io_mask)


# -- launcher -------------------------------------------------------------------------------------
def clip_config(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps). A row is padded to a power of 2; small rows are batched so a
    program moves at least ~8 K elements (bandwidth-bound op: fewer, fatter programs), and warps
    grow with the row so each thread holds at most ~32 fp32 values (no spills up to 65 K wide)."""
    block_d = next_power_of_2(max(hidden, 16))
    block_r = max(1, min(16, 8192 // block_d))
    num_warps = max(4, min(16, block_r * block_d // 1024))
    return block_r, block_d, num_warps


def residual_clip_triton(
    hidden: torch.Tensor,
    threshold: torch.Tensor | float,
    is_sink: torch.Tensor | None = None,
    sink_norm: float | None = None,
    *,
    inplace: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale down every token whose L2 norm exceeds its cap, in one pass over the hidden state;
    semantics of ``reference_residual_clip``.

    Shape contract (any strides):
      hidden (B, S, D) fp16/bf16/fp32: stride_xz, stride_xs, stride_xd; the result has the same
        shape and dtype (stride_yz, stride_ys, stride_yd) and is ``hidden`` itself when inplace
      threshold: a float (one absolute cap) or a (B,) tensor, per-sequence cap, inf = none: stride_tz.
        A tensor's values are not read on the host (that would wait for the GPU once per layer):
        they must be >= 0, as the caps sinkfix computes are (a negative cap flips the token's sign,
        a NaN one leaves it); a float is checked
      is_sink (B, S) bool, read as uint8: stride_pz, stride_ps; sink tokens are exempt when ``sink_norm`` is
        None, otherwise their norm is clamped to ``sink_norm`` (> 0: a sink is never zeroed)
      out: optional result buffer, hidden's shape and dtype, any strides (not with inplace)
    """
    check_residual_clip_arguments(hidden, threshold, is_sink, sink_norm)
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hidden must be fp16/bf16/fp32, got {hidden.dtype}")
    batch, seq_len, width = hidden.shape
    if width > _MAX_HIDDEN:
        raise ValueError(f"hidden size {width} above the supported {_MAX_HIDDEN}")
    interpreted = is_interpreted(_residual_clip_kernel)
    if interpreted and hidden.device.type != "cpu":
        raise ValueError("the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only")
    if not interpreted and hidden.device.type != "cuda":
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import), "
                         f"got {hidden.device}")

    thr_tensor, thr_scalar, thr_stride = None, 0.0, 0
    if isinstance(threshold, torch.Tensor) and threshold.dim() > 0:
        thr_tensor = threshold.to(device=hidden.device, dtype=torch.float32)
        thr_stride = thr_tensor.stride(0)
    else:
        thr_scalar = float(threshold)
    sinks, sink_strides = None, (0, 0)
    if is_sink is not None:
        sinks = is_sink.view(torch.uint8)
        sink_strides = sinks.stride()

    if inplace:
        if out is not None and out is not hidden:
            raise ValueError("out and inplace=True are exclusive")
        out = hidden
    elif out is None:
        out = torch.empty_like(hidden)
    elif out.shape != hidden.shape or out.dtype != hidden.dtype or out.device != hidden.device:
        raise ValueError(f"out must be {tuple(hidden.shape)} {hidden.dtype} on {hidden.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    n_tokens = batch * seq_len
    if n_tokens == 0 or width == 0:
        return out
    block_r, block_d, num_warps = clip_config(width)
    _residual_clip_kernel[(cdiv(n_tokens, block_r),)](
        hidden, out, thr_tensor, sinks,
        *hidden.stride(), *out.stride(), thr_stride, *sink_strides,
        n_tokens, seq_len, width, thr_scalar, 0.0 if sink_norm is None else float(sink_norm),
        BLOCK_R=block_r, BLOCK_D=block_d, THR_TENSOR=thr_tensor is not None,
        HAS_SINKS=sinks is not None, SINK_CLAMP=sink_norm is not None, INPLACE=inplace,
        num_warps=num_warps, num_stages=1, enable_fp_fusion=True,
    )
    return out
