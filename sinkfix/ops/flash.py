"""Softmax attention that also returns the log-sum-exp, through a fused op where torch has one.

The PyTorch path of the sink-aware attention (``attention.py``) combines two partial softmaxes by
their log-sum-exps, so it needs an attention op that returns one without building the (Q, K) score
matrix:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (returns ``(out, logsumexp)``). At
  (1, 9, 512, 64) causal it runs as fast as ``scaled_dot_product_attention`` (3.5 vs 3.2 ms) with
  the log-sum-exp exact to 1e-6. Fewer key/value heads than query heads (GQA) are read natively
  where the op supports it, probed once at import (:func:`cpu_flash_native_gqa`); older torch
  releases do not: torch 2.6's op read key heads that do not exist for every query head past the
  first group (NaN or values 3 off in the probe), and its backward kernel wrote the key and value
  gradients past their buffers (the process aborted with "free(): invalid next size"). There the
  keys and values are repeated to the query heads before the op, as on CUDA.
* CUDA: ``aten._scaled_dot_product_efficient_attention`` with ``compute_log_sumexp=True``
  (arbitrary additive masks, fp32/fp16/bf16; k/v are repeated for GQA, which costs O(K) memory, not
  O(Q K)).
* anything else (or an op that refuses the inputs): the dense formula in fp32, which does build
  the scores.

Gradients (calibration) on the CPU go through the op's own backward kernel
(``aten._scaled_dot_product_flash_attention_for_cpu_backward``), which recomputes the scores block
by block and keeps nothing of size (Q, K). Torch's autograd formula for the op treats the
log-sum-exp as non-differentiable, but the sink-aware combine depends on it, so the gradient is
written here (:class:`_CpuFlashWithLse`): the backward kernel forms ``dS = P * (dP - delta)`` with
``delta_i = dO_i . O_i``, and a gradient ``g_i`` on ``lse_i`` adds ``g_i * P_ij`` to ``dS_ij``
(``d lse_i / d s_ij = P_ij``), i.e. ``delta_i -> delta_i - g_i``. The kernel computes delta itself
from the output it is given, and reads the output for nothing else, so in float32/64 it is given
``O_i - (g_i / ||dO_i||^2) dO_i`` instead of ``O_i`` (same gradients as fp64 autograd of the formula
to ~5e-7 relative at (1, 9, 511, 64)). Where that shift is not safe (reduced precision, or a row whose
output gradient is zero while its log-sum-exp has one) one zero feature is appended to q, k and v
(scores and values unchanged) with ``O = -g`` and ``dO = 1`` in that column, which widens every tile:
measured at (1, 9, 511, 64) causal, 2 threads, 16 ms per backward with the extra column against 11 ms
without; the blockwise dense recompute both replace (:mod:`sinkfix.ops.attention_grad`) took ~60 ms
per layer.

Both fused ops are private torch ops: they are wrapped here, feature-detected, and backed by the
dense fallback, which is always correct. They read each (query or key) row as D consecutive
elements: the CPU op passes the row stride to its matrix products as their leading dimension and
never reads the last dimension's stride, so a view whose last dimension is not contiguous
(``x[..., ::2]``, or a head-dim-major copy ``t.transpose(-1, -2).contiguous().transpose(-1, -2)``)
gave wrong outputs, NaN, or values read outside the tensor that changed from run to run (2.5-4.0
off, 3e13 once, with torch 2.13). Every call is therefore given q, k and v in row-major rows
(:func:`_rows_contiguous`: a copy only where a tensor is not; batch, head and sequence strides,
stride-0 (expanded) heads and batches included, are read as given).
"""

from __future__ import annotations

import warnings

import torch

from sinkfix.ops.reference import reference_sink_attention, visibility_mask

__all__ = ["flash_with_lse", "cpu_flash_available", "cpu_flash_native_gqa", "fused_lse_available", "fused_lse_backward_available"]

_CPU_FLASH_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_CUDA_EFFICIENT_OP = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the fused ops read it right: unit stride in the last dimension, and rows that do not
    overlap (a row stride of at least D where there is more than one row; measured with torch 2.13:
    a query whose row stride was 1 gave outputs 4.4 off, NaN in bf16, while row strides of D/2, D - 1,
    D + 3 and 0 in k or v, and stride-0 batch and head dims, were read right). Otherwise a contiguous
    copy, made by ``contiguous()``, which autograd differentiates (the gradient reaches the view)."""
    *_, rows, head_dim = t.shape
    if (t.stride(-1) == 1 or head_dim == 1) and (rows <= 1 or t.stride(-2) >= head_dim):
        return t
    return t.contiguous()


def _probe_cpu_flash(dtype: torch.dtype) -> bool:
    if _CPU_FLASH_OP is None:
        return False
    try:
        probe = torch.randn(1, 2, 3, 8, dtype=dtype)
        out, lse = _CPU_FLASH_OP(probe, probe, probe, 0.0, True)
        return out.shape == probe.shape and lse.shape == probe.shape[:3]
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _probe_cpu_flash_gqa() -> bool:
    """Whether the CPU op reads one key/value head for a group of query heads, checked by its numbers:
    the key/value passed is a one-head view of a two-head tensor, so an op that does not know GQA
    reads the second head inside that tensor (no read past an allocation) and its second query
    head's output differs from the one computed with the first head repeated. A shape check passed
    on torch 2.6, whose numbers were wrong."""
    if not _cpu_flash_ok.get(torch.float32):  # probed with the other dtypes just before: not run again
        return False
    try:
        probe = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(0))
        out, lse = _CPU_FLASH_OP(probe, probe[:, :1], probe[:, :1], 0.0, True)
        repeated = probe[:, :1].expand(1, 2, 3, 8).contiguous()
        want_out, want_lse = _CPU_FLASH_OP(probe, repeated, repeated, 0.0, True)
        return bool(torch.allclose(out, want_out, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# Probed once per dtype, the float dtypes at import: a plain dict that is already filled is a
# constant to dynamo, whereas a probe reached for the first time inside a compiled region would be
# traced into the graph (an lru_cache wrapper is ignored by dynamo, so it was traced every layer).
_PROBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_cpu_flash_ok: dict[torch.dtype, bool] = {dtype: _probe_cpu_flash(dtype) for dtype in _PROBED_DTYPES}
# GQA support came to the op's forward and backward kernels together; the backward is never probed
# with GQA (an op without it writes past its gradient buffers), so this one probe decides both
_CPU_FLASH_NATIVE_GQA = _probe_cpu_flash_gqa()


def _probed(table: dict[torch.dtype, bool], probe, dtype: torch.dtype) -> bool:
    """``table[dtype]``, probing once for a dtype the import did not probe."""
    known = table.get(dtype)
    if known is None:
        known = table[dtype] = probe(dtype)
    return known


def cpu_flash_available(dtype: torch.dtype) -> bool:
    """Whether the CPU flash op runs for ``dtype`` (probed once)."""
    return _probed(_cpu_flash_ok, _probe_cpu_flash, dtype)


def cpu_flash_native_gqa() -> bool:
    """Whether the CPU flash op takes fewer key/value heads than query heads itself (probed once at
    import); where it does not, :func:`flash_with_lse` repeats the keys and values first."""
    return _CPU_FLASH_NATIVE_GQA


def _repeat_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v with as many heads as q where the CPU op cannot read a group of query heads from one
    key/value head (under autograd the repeat's backward sums the group's gradients)."""
    group = q.shape[1] // k.shape[1]
    if group == 1 or _CPU_FLASH_NATIVE_GQA:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _probe_cpu_flash_backward(dtype: torch.dtype) -> bool:
    if _CPU_FLASH_BACKWARD_OP is None or not cpu_flash_available(dtype):
        return False
    try:
        probe = torch.randn(1, 2, 3, 8, dtype=dtype)
        kv = probe.flip(1)  # as many heads as the queries: see _CPU_FLASH_NATIVE_GQA
        out, lse = _CPU_FLASH_OP(probe, kv, kv, 0.0, True)
        grads = _CPU_FLASH_BACKWARD_OP(torch.ones_like(out), probe, kv, kv, out, lse, 0.0, True)
        return [g.shape for g in grads] == [probe.shape, kv.shape, kv.shape]
    except (RuntimeError, TypeError, NotImplementedError):
        return False


_cpu_flash_backward_ok: dict[torch.dtype, bool] = {dtype: _probe_cpu_flash_backward(dtype) for dtype in _PROBED_DTYPES}


def fused_lse_backward_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`flash_with_lse` is differentiable in both outputs through a fused backward
    kernel here (CPU only, probed once per dtype); elsewhere a gradient call needs the dense formula."""
    return device.type == "cpu" and _probed(_cpu_flash_backward_ok, _probe_cpu_flash_backward, dtype)


class _CpuFlashWithLse(torch.autograd.Function):
    """The CPU flash op, differentiable in ``out`` and ``lse`` (module docstring: the lse gradient
    enters the backward kernel's delta term through a shifted output, or one appended zero feature)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, is_causal: bool, scale: float):
        out, lse = _CPU_FLASH_OP(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        # q, k, v were saved as the forward got them (rows contiguous, flash_with_lse); the output
        # gradient may arrive as any view, and the output given is computed from it and ``out``
        grad_out = grad_out.contiguous()
        given = out if grad_lse is None else _shifted_output(out, grad_out, grad_lse)
        head_dim = q.shape[-1]
        widened = given is None  # the fallback: the lse gradient rides on one appended zero feature
        if widened:
            q, k, v = (torch.nn.functional.pad(t, (0, 1)) for t in (q, k, v))
            given = torch.cat([out, -grad_lse.to(out.dtype).unsqueeze(-1)], dim=-1)
            grad_out = torch.nn.functional.pad(grad_out, (0, 1), value=1.0)
        # the kernel reads the output it is given row by row as well (``delta_i = dO_i . O_i``)
        grads = _CPU_FLASH_BACKWARD_OP(grad_out, q, k, v, _rows_contiguous(given), lse, 0.0, ctx.is_causal,
                                       attn_mask=bias, scale=ctx.scale)
        if widened:
            grads = tuple(g[..., :head_dim] for g in grads)
        return (*grads, None, None, None)


# Below this squared norm of a row's output gradient the shifted output could overflow (|shift| is at
# most |g| / ||dO||, so at most |g| * 1e10 here); such a call takes the appended-feature route.
_MIN_GRAD_NORM_SQUARED = 1e-20


def _shifted_output(out: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> torch.Tensor | None:
    """``out - (g_i / ||dO_i||^2) dO_i``: the output that makes the kernel's ``delta_i = dO_i . O_i``
    come out as ``delta_i - g_i``, so the lse gradient enters without the appended feature (which
    widens every tile of the backward kernel: 16 vs 11 ms at (1, 9, 511, 64), 2 threads). The
    kernel reads the output only through that product. Float32/64 only (a reduced-precision output
    would round the shift into the stored values), and None when a row with a gradient on its
    log-sum-exp has a (near) zero output gradient."""
    if out.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        # while a compiled graph's backward is traced, the choice below would be a host read of a
        # traced value ("Could not guard on data-dependent expression" under fullgraph=True): the
        # appended feature, right for every input, is traced instead
        return None
    norm_squared = grad_out.square().sum(-1)
    if bool(((norm_squared < _MIN_GRAD_NORM_SQUARED) & (grad_lse != 0)).any()):
        return None
    shift = grad_lse.to(out.dtype) / norm_squared.clamp(min=_MIN_GRAD_NORM_SQUARED)
    return out - shift.unsqueeze(-1) * grad_out


def fused_lse_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`flash_with_lse` has a fused op for this device and dtype (else it is dense).
    On CUDA a call whose head sizes the op refuses still falls back to the dense formula, alone."""
    if device.type == "cpu":
        return cpu_flash_available(dtype)
    return device.type == "cuda" and _CUDA_EFFICIENT_OP is not None


# The CUDA op's kernels are chosen by dtype and by the alignment of the head sizes (an odd width,
# such as the column statistics' D + 1 features in content_attention.py, has no fp32 kernel on an
# H200: "cutlassF: no kernel found to launch!"), so a refusal is remembered for that kind of input
# alone: one odd-width call must not send every later call of the same dtype to the dense formula.
_refused: set[tuple[torch.dtype, int, int]] = set()


def _input_kind(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.dtype, int, int]:
    return q.dtype, q.shape[-1], v.shape[-1]


#: The CUDA op wants every stride of its additive mask but the last aligned to 16 bytes ("attn_bias
#: is not correctly aligned (strideB) ... should be a multiple of 8": a (B, 1, Q, K) mask with
#: K = 1023 was refused in bf16 and fp16 on an H200). Rows padded to 16 elements are aligned for
#: every dtype, as torch's own scaled_dot_product_attention pads them.
_BIAS_ALIGN = 16


def _additive(visible: torch.Tensor | None, dtype: torch.dtype, align: int = 1) -> torch.Tensor | None:
    """The additive mask of ``visible`` (0 where seen, finfo.min elsewhere), as a view into rows
    padded to a multiple of ``align`` elements. finfo.min rather than -inf: a row with nothing
    visible must not turn into NaN inside the op."""
    if visible is None:
        return None
    *lead, k_len = visible.shape
    padded = -(-k_len // align) * align
    bias = torch.zeros(*lead, padded, dtype=dtype, device=visible.device)[..., :k_len]
    return bias.masked_fill_(~visible, torch.finfo(dtype).min)


def _cuda_efficient(q, k, v, visible, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    kind = _input_kind(q, v)
    if kind in _refused:
        return None
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    bias = _additive(visible, q.dtype, _BIAS_ALIGN)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        out, lse, _, _ = _CUDA_EFFICIENT_OP(q, k, v, bias, True, 0.0, is_causal, scale=scale)
    except (RuntimeError, NotImplementedError) as exc:
        _refused.add(kind)
        warnings.warn(f"fused attention with log-sum-exp refused {q.dtype} inputs of head size {kind[1]} on CUDA "
                      f"({exc}); using the dense formula for them, which materialises the scores", stacklevel=3)
        return None
    return out, lse[..., : q.shape[2]].float()  # the op pads the query axis of the log-sum-exp


def flash_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning ``(out, lse)``: out (B, Hq, Q, D) in q's dtype, lse (B, Hq, Q).

    k, v (B, Hkv, K, D) with Hq % Hkv == 0. ``visible`` is a bool (B, 1, Q, K) mask or None;
    ``is_causal`` is upper-left aligned. Rows with no visible key return garbage that the caller
    must discard (it knows which rows those are).

    Differentiable in both outputs: through :class:`_CpuFlashWithLse` where
    :func:`fused_lse_backward_available`, else through the dense formula (never through a fused op
    whose autograd formula would drop the log-sum-exp's gradient).
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and fused_lse_backward_available(q.device, q.dtype):
        # the copies (where needed) are made under autograd: the backward kernel gets the same rows
        k, v = _repeat_kv_heads(q, k, v)
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        return _CpuFlashWithLse.apply(q, k, v, _additive(visible, q.dtype), is_causal, scale)
    # is_cpu / is_cuda, not device.type: the latter builds a string per call, a few microseconds when
    # it runs cold between a decode step's layers
    if q.is_cpu and cpu_flash_available(q.dtype) and not grad:
        k, v = _repeat_kv_heads(q, k, v)
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        return _CPU_FLASH_OP(q, k, v, 0.0, is_causal, attn_mask=_additive(visible, q.dtype), scale=scale)
    if q.is_cuda and _CUDA_EFFICIENT_OP is not None and not grad:  # fused_lse_available's CUDA test
        # (the CUDA op refuses a last dimension that is not contiguous, and a refusal would send every
        # later call of the same dtype and head size to the dense formula; not measured on a GPU)
        fused = _cuda_efficient(_rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v), visible, is_causal,
                                scale)
        if fused is not None:
            return fused
    if visible is None and is_causal:
        visible = visibility_mask(q.shape[0], q.shape[2], k.shape[2], causal=True, device=q.device)
    out, _, lse = reference_sink_attention(q, k, v, attn_mask=visible, scale=scale, compute_dtype=torch.float32)
    return out.to(q.dtype), lse
