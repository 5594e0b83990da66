"""A minimal causal flash-attention forward: the yardstick of ``kernel_audit.py``.

No sinks, no masks, no window, no softcap, no policy: causal self-attention (Q == K) with GQA by
index, returning the output and the log-sum-exp. It is what the sink-aware prefill kernel's hot path
should cost, so the audit compiles it with the same tile configs and compares registers and
main-loop instructions. The structure is the one any flash forward has: the query tile stays in
registers, key tiles left of the diagonal band run without a mask, the few tiles on the diagonal
run with the causal compare, and scores are scaled only inside the exponent (``qk * qk_scale -
m_i`` is one fused multiply-add per score). Numerically checked under the interpreter in
``tests/kernels/test_kernel_audit.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["flash_attention_minimal"]


@triton.jit
def _kv_tile(desc, ptrs, coords, start_n, stride_n, in_bounds, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             ON_DIAGONAL: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:  # one bulk tensor copy; rows past the end arrive as zeros
        return desc.load([coords[0], coords[1], start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    if ON_DIAGONAL:
        return tl.load(ptrs + start_n * stride_n, mask=in_bounds[:, None], other=0.0)
    return tl.load(ptrs + start_n * stride_n)


@triton.jit
def _flash_tile(acc, l_i, m_i, q, k_desc, v_desc, coords, k_ptrs, v_ptrs, start_n, offs_m, offs_n, seq_len, qk_scale,
                stride_kn, stride_vn, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ON_DIAGONAL: tl.constexpr,
                USE_TMA: tl.constexpr):
    """One key tile of the online softmax. Off the diagonal every row sees every key of the tile."""
    in_bounds = (start_n + offs_n) < seq_len
    k = _kv_tile(k_desc, k_ptrs, coords, start_n, stride_kn, in_bounds, BLOCK_N, HEAD_DIM, ON_DIAGONAL, USE_TMA)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    if ON_DIAGONAL:
        qk = tl.where((start_n + offs_n)[None, :] <= offs_m[:, None], qk, float("-inf"))
    # the running max in base 2; column 0 <= every row's position keeps it finite
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _kv_tile(v_desc, v_ptrs, coords, start_n, stride_vn, in_bounds, BLOCK_N, HEAD_DIM, ON_DIAGONAL, USE_TMA)
    # rescale first and let the MMA accumulate into acc: no second (BLOCK_M, HEAD_DIM) tile
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def _flash_fwd(
    Q, K, V, Out, Lse, KDesc, VDesc,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_lz, stride_lh, stride_lm,
    num_heads, group, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    off_kvh = off_h // group

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=(offs_m < seq_len)[:, None], other=0.0)
    k_ptrs = K + off_b * stride_kz + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
    v_ptrs = V + off_b * stride_vz + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk
    coords = (off_b.to(tl.int32), off_kvh.to(tl.int32))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # -- tiles every row of the block sees whole: columns <= start_m --
    band = (start_m + 1) // BLOCK_N * BLOCK_N
    for start_n in range(0, band, BLOCK_N):
        acc, l_i, m_i = _flash_tile(acc, l_i, m_i, q, KDesc, VDesc, coords, k_ptrs, v_ptrs, start_n, offs_m, offs_n,
                                    seq_len, qk_scale, stride_kn, stride_vn, BLOCK_N, HEAD_DIM, False, USE_TMA)
    # -- the diagonal band: causal compare and the ragged end --
    for start_n in range(band, tl.minimum(start_m + BLOCK_M, seq_len), BLOCK_N):
        acc, l_i, m_i = _flash_tile(acc, l_i, m_i, q, KDesc, VDesc, coords, k_ptrs, v_ptrs, start_n, offs_m, offs_n,
                                    seq_len, qk_scale, stride_kn, stride_vn, BLOCK_N, HEAD_DIM, True, USE_TMA)

    out = acc / l_i[:, None]
    row_ok = offs_m < seq_len
    tl.store(Out + off_b * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + off_b * stride_lz + off_h * stride_lh + offs_m * stride_lm,
             (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)


def flash_attention_minimal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int, block_n: int,
                            num_warps: int, num_stages: int, use_tma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention, q (B, Hq, S, D), k/v (B, Hkv, S, D), D a power of 2 >= 16; returns
    (out (B, Hq, S, D), lse (B, Hq, S) fp32). The tile config is always given: this kernel has no
    table of its own, it is compiled with the sink-aware kernels' configs. ``use_tma`` reads k and v
    through (B, Hkv, S, D) tensor descriptors (bulk tensor copies on Hopper), as the sink-aware
    prefill kernel does there."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, q_heads, seq_len, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, q_heads, seq_len, dtype=torch.float32, device=q.device)
    qk_scale = head_dim ** -0.5 * 1.4426950408889634  # base-2 logits
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, head_dim]) if use_tma else None
             for t in (k, v)]
    grid = (triton.cdiv(seq_len, block_m), batch * q_heads)
    _flash_fwd[grid](
        q, k, v, out, lse, *descs, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        q_heads, q_heads // k.shape[1], seq_len, qk_scale,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=use_tma, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse
