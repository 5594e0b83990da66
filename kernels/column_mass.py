"""Column-mass kernel: per key, the stock attention mass it receives from the query rows that see it.

Content-dependent sinks (ACT's criterion, ``docs/formulas.md``, "Content-dependent sinks") judge a
key j by its column mean ``sum_{i sees j} p_ij / n_j``. With the row log-sum-exp ``lse_i`` of a
stock pass, ``p_ij = exp(s_ij - lse_i)``: no row normalisation is left to do, so the column sums
need no online softmax. One program owns BLOCK_N keys of one (batch, query head), keeps their k
tile, and streams the query tiles that may see them (in a causal layout: from the diagonal to the
end; a window also cuts the end), adding ``exp2(s2_ij - lse2_i)`` over the visible (row, key)
pairs and counting the visible rows. Nothing of size (Q, K) is written: the outputs are (B, Hq, K)
masses and (B, K) row counts, fp32.

Visibility follows the prefill kernel's rules exactly (``attention_common.tile_visibility``):
causal with a chunk offset, sliding window, per-sequence key padding, a bit-packed dense mask.
Rows that see nothing have ``lse = -inf`` and no visible key, so they add nothing. Per (row, key)
the cost is one q.k product, one FMA and one exp2: ``2 Q K' D`` FLOPs for K' visible keys per row,
half a positional pass (no P.V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arguments import causal_offset_arg
from .attention_common import (
    cdiv,
    LOG2E,
    arch_family,
    check_block_sizes,
    device_arch,
    padded_head_dim,
    prepare_attention_launch,
    softcap_logits,
    tile_visibility,
)

__all__ = ["COLUMN_MASS_CONFIGS", "column_mass_config", "column_mass"]


@triton.jit
def _column_mass_kernel(
    Q, K, Lse, Mass, Rows, Mask, KeyOk, KeyRanges,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_lz, stride_lh, stride_lm,
    stride_mz, stride_mh, stride_mm,
    stride_pz, stride_pn,
    stride_rz,
    num_heads, group, q_len, k_len, causal_offset, window,
    qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KEY_RANGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    off_kvh = off_h // group  # GQA by index arithmetic

    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    col_ok = cols < k_len

    k_ptrs = K + off_b * stride_kz + off_kvh * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kk
    k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST_DOT:
        k = k.to(tl.float32)
    kt = tl.trans(k)

    if HAS_KEY_RANGE:
        key_ok_row = KeyOk + off_b * stride_pz
        # a key tile wholly outside the sequence's real keys [first, end) is seen by nobody
        first = tl.load(KeyRanges + off_b * stride_rz)
        end = tl.load(KeyRanges + off_b * stride_rz + 1)
    else:
        key_ok_row = KeyOk
    if HAS_MASK:
        mask_base = Mask + off_b * stride_mz + off_h * stride_mh
    else:
        mask_base = Mask

    # the query rows that may see a key of this tile: row i sees key j (causal) iff j <= i + offset,
    # and (window) iff j > i + offset - window
    lo = 0
    hi = q_len
    if IS_CAUSAL:
        lo = tl.maximum(start_n - causal_offset, 0)
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - causal_offset + window)
    if HAS_KEY_RANGE:
        hi = tl.where((start_n + BLOCK_N > first) & (start_n < end), hi, 0)
    lo = tl.minimum(lo, q_len) // BLOCK_M * BLOCK_M
    hi = tl.maximum(hi, lo)

    # per-element running sums, reduced over the rows once after the loop: a reduction per tile
    # would cross warps (shuffles and shared memory) on every query tile
    mass_tile = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    rows_tile = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    q_base = Q + off_b * stride_qz + off_h * stride_qh
    lse_base = Lse + off_b * stride_lz + off_h * stride_lh
    for start_m in tl.range(lo, hi, BLOCK_M):
        m_idx = start_m + offs_m
        row_ok = m_idx < q_len
        q = tl.load(q_base + m_idx[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
        # base-2 lse; rows that see nothing (-inf) or lie past Q get +inf so their exp2 is 0
        # even before the visibility mask (no inf - inf)
        lse2 = tl.load(lse_base + m_idx * stride_lm, mask=row_ok, other=float("inf")) * LOG2E
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        qk = tl.dot(q, kt, input_precision="ieee")
        if HAS_SOFTCAP:
            s2 = softcap_logits(qk, qk_scale, softcap_log2)
        else:
            s2 = qk * qk_scale
        if HAS_MASK:
            mask_rows = mask_base + m_idx.to(tl.int64) * stride_mm
        else:
            mask_rows = mask_base
        vis = tile_visibility(start_n, offs_n, m_idx + causal_offset, k_len, window, mask_rows, row_ok, key_ok_row,
                              stride_pn, None, 0, BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW,
                              HAS_MASK=HAS_MASK, HAS_KEY_RANGE=HAS_KEY_RANGE, NS=0)
        vis = vis & row_ok[:, None]
        mass_tile += tl.where(vis, tl.math.exp2(s2 - lse2[:, None]), 0.0)
        rows_tile += vis.to(tl.float32)

    mass = tl.sum(mass_tile, 0)
    rows = tl.sum(rows_tile, 0)
    out_off = off_b * num_heads * k_len + off_h * k_len + cols
    tl.store(Mass + out_off, mass, mask=col_ok)
    # the row count does not depend on the head (the reference reads head 0 of the mask): head 0 writes it
    if off_h == 0:
        tl.store(Rows + off_b * k_len + cols, rows, mask=col_ok)


# (BLOCK_M query rows streamed, BLOCK_N keys held, num_warps, num_stages) per arch family, padded
# head dim and input width. The key tile stays in registers for the whole loop and only a
# (BLOCK_M, BLOCK_N) score tile is live besides it (no accumulator of width D): the shapes of the
# prefill kernel's score tiles, checked for spills by benchmarks/kernel_audit.py.
COLUMN_MASS_CONFIGS = {
    (90, 64, True): (64, 64, 4, 3),
    (90, 128, True): (64, 64, 4, 3),
    (90, 256, True): (32, 64, 4, 2),
    (80, 64, True): (64, 64, 4, 3),
    (80, 128, True): (64, 64, 4, 3),
    (80, 256, True): (32, 64, 4, 2),
    (90, 64, False): (32, 16, 4, 2),
    (90, 128, False): (16, 16, 4, 2),
    (90, 256, False): (16, 16, 4, 2),
    (80, 64, False): (32, 16, 4, 2),
    (80, 128, False): (16, 16, 4, 2),
    (80, 256, False): (16, 16, 4, 2),
}


def column_mass_config(head_dim: int, dtype: torch.dtype, arch: int = 90) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the column-mass kernel on compute capability ``arch``."""
    return COLUMN_MASS_CONFIGS[(arch_family(arch), max(64, padded_head_dim(head_dim)), dtype != torch.float32)]


def column_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column statistics of stock attention: ``(mass, rows)``.

    q (B, Hq, Q, D), k (B, Hkv, K, D) (any strides, GQA by index), ``lse`` (B, Hq, Q) fp32, the
    stock row log-sum-exp over the real keys each row sees (natural log, -inf for a row that sees
    nothing; what the prefill kernel returns). Mask arguments, ``scale`` and ``softcap`` as
    :func:`sinkfix.kernels.attention_prefill.sink_attention_prefill`. Returns ``mass`` (B, Hq, K)
    fp32, ``sum_{i sees j} exp(s_ij - lse_i)``, and ``rows`` (B, K) fp32, how many query rows see
    key j (head 0's count where a dense mask differs per head), as
    :func:`sinkfix.ops.content_reference.column_stats_reference` defines them.
    """
    launch = prepare_attention_launch(
        q, k, k, attn_mask=attn_mask, sink_cols=None, beta=None, extra_logits=None, virtual_sink_logit=None,
        sliding_window=sliding_window, softcap=softcap, scale=scale, kernel=_column_mass_kernel,
        key_padding=key_padding, key_ranges=key_ranges)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (batch, q_heads, q_len) \
            or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be an fp32 ({batch}, {q_heads}, {q_len}) tensor on {q.device}, got "
                         f"{getattr(lse, 'dtype', type(lse))} {tuple(getattr(lse, 'shape', ()))}")
    check_block_sizes(block_m=block_m, block_n=block_n)
    mass = torch.empty(batch, q_heads, k_len, dtype=torch.float32, device=q.device)
    rows = torch.empty(batch, k_len, dtype=torch.float32, device=q.device)
    if k_len == 0 or batch == 0 or q_heads == 0:
        return mass, rows
    bm, bn, nw, ns = column_mass_config(head_dim, q.dtype, device_arch(q.device))
    block_m, block_n = block_m or bm, block_n or bn
    grid = (cdiv(k_len, block_n), batch * q_heads)
    _column_mass_kernel[grid](
        q, k, lse, mass, rows, launch.mask, launch.key_padding, launch.key_ranges,
        *q.stride(), *k.stride(), *lse.stride(),
        *launch.mask_strides, *launch.key_padding_strides, launch.key_range_stride,
        q_heads, q_heads // kv_heads, q_len, k_len, causal_offset_arg(causal_offset), launch.window,
        launch.qk_scale, launch.softcap_log2,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_head_dim(head_dim),
        HAS_MASK=launch.mask is not None, HAS_KEY_RANGE=launch.key_padding is not None, IS_CAUSAL=bool(causal),
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None, UPCAST_DOT=launch.upcast_dot,
        num_warps=num_warps or nw, num_stages=num_stages or ns, enable_fp_fusion=True,
    )
    return mass, rows
