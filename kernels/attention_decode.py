"""Split-KV decode of sink-aware attention: a few query tokens against a long K.

Decoding is bound by reading K and V once. Two choices follow from that:
- one program serves all query heads of a GQA group (GROUP * Q rows packed into one tile), so each
  kv head is streamed once instead of GROUP times;
- the key axis is cut into NUM_SPLITS contiguous chunks so that even batch 1 with few kv heads keeps
  every SM busy. Each split writes its partial state (m, l, acc) of the non-sink keys to a fp32
  workspace; a second kernel merges the splits and applies the sink policy.

The sink set is masked out of every split (the tiles holding a sink column are masked tiles, as in
the prefill kernel) and its partial state is computed once, by one extra program per (batch, kv
head, row tile), into an extra workspace slot. So the sink is counted in exactly one place wherever
its column falls, no key loop holds the sink tile's registers, and the combine (beta, extra logits)
runs once, in the reduction kernel. The tile loop, the sink partial and the combine are the helpers
of ``attention_common``, shared with the prefill kernel, so the two paths share one definition of
the visibility rules and the policy math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arguments import causal_offset_arg
from .attention_common import (
    LOG2E,
    allocate_outputs,
    arch_family,
    check_sink_stats,
    attn_key_range,
    cdiv,
    device_arch,
    device_sm_count,
    next_power_of_2,
    padded_head_dim,
    prepare_attention_launch,
    check_block_sizes,
    add_sink_values,
    sink_combine,
    sink_scores,
    softmax_stats,
)

__all__ = ["DECODE_CONFIGS", "decode_config", "default_num_splits", "max_rows_per_tile", "sink_attention_decode"]


# -- kernels --------------------------------------------------------------------------------------
@triton.jit
def _sink_attn_decode_split(
    Q, K, V, Mask, KeyOk, KeyRanges, SinkCols, PartM, PartL, PartAcc,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_mz, stride_mh, stride_mm,
    stride_pz, stride_pn,
    stride_rz,
    stride_sz, stride_sn,
    num_kv_heads, group, q_len, k_len, causal_offset, window, n_rows, split_size, num_splits,
    qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NS: tl.constexpr, NS_P2: tl.constexpr, SB: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KEY_RANGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_r = tl.program_id(2)
    off_b = (pid_bh // num_kv_heads).to(tl.int64)
    off_kvh = (pid_bh % num_kv_heads).to(tl.int64)

    # -- rows: r = g * Q + i is query token i of query head kvh * GROUP + g --
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    off_i = rows % q_len
    off_h = off_kvh * group + rows // q_len
    q_pos = off_i + causal_offset
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = (Q + off_b * stride_qz + off_h[:, None] * stride_qh + off_i[:, None] * stride_qm
              + offs_d[None, :] * stride_qk)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kz + off_kvh * stride_kh
    v_base = V + off_b * stride_vz + off_kvh * stride_vh
    if HAS_MASK:
        mask_rows = Mask + off_b * stride_mz + off_h * stride_mh + off_i * stride_mm
    else:
        mask_rows = Mask
    if HAS_KEY_RANGE:
        key_ok_row = KeyOk + off_b * stride_pz
        key_range_ptr = KeyRanges + off_b * stride_rz
    else:
        key_ok_row = KeyOk
        key_range_ptr = KeyRanges
    if NS > 0:
        sink_ptr = SinkCols + off_b * stride_sz
    else:
        sink_ptr = SinkCols

    # -- workspace (B * Hkv, NUM_SPLITS + 1, n_rows[, HEAD_DIM]) fp32: one slot per split, and slot
    # NUM_SPLITS for the sink set; int32 offsets from one scalar base per program --
    slot_base = (pid_bh.to(tl.int64) * (num_splits + 1) + pid_s) * n_rows
    acc_offs = rows[:, None] * HEAD_DIM + offs_d[None, :]
    acc_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    if pid_s < num_splits:
        # -- this split's keys, cut to what the rows can see; the middle needs no rule checks --
        # (bounds from the first and last query token; the rows of one tile span all of them)
        pos_first = causal_offset
        pos_last = q_len - 1 + causal_offset
        acc, l_i, m_i, _acc_h, _l_h, _m_h = attn_key_range(
            q, None, None, k_base, v_base, off_b, off_kvh, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, row_ok, q_pos, key_ok_row, stride_pn, key_range_ptr, sink_ptr, stride_sn,
            pid_s * split_size, tl.minimum(pid_s * split_size + split_size, k_len), pos_first, pos_last,
            k_len, window, qk_scale, softcap_log2, offs_n, offs_d, None,
            BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_MASK=HAS_MASK,
            HAS_KEY_RANGE=HAS_KEY_RANGE, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP,
            NS=NS, NS_P2=NS_P2, UPCAST_DOT=UPCAST_DOT, USE_TMA=False, HAS_HIDDEN=False,
            LSE_ONLY=False)
    elif NS > 0:
        # -- one extra program per (b, kv head, row tile) computes the sink set's partial state: the
        # sink is counted here and nowhere else, and the key loop never holds the sink tile's values --
        s_s = sink_scores(
            q, k_base, stride_kn, stride_kk, mask_rows, row_ok, q_pos, key_ok_row, stride_pn, sink_ptr, stride_sn,
            k_len, window, qk_scale, softcap_log2, offs_d, HEAD_DIM=HEAD_DIM, NS=NS, SB=SB, HAS_MASK=HAS_MASK,
            HAS_KEY_RANGE=HAS_KEY_RANGE, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP,
            UPCAST_DOT=UPCAST_DOT)
        m_i, l_i, p_s = softmax_stats(s_s)
        acc = add_sink_values(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), p_s, v_base, stride_vn, stride_vk, sink_ptr,
                              stride_sn, k_len, offs_d, HEAD_DIM=HEAD_DIM, NS=NS, SB=SB)
    else:  # no sink set: the grid has no such program; the branch only gives the stores their values
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tl.store(PartM + slot_base + rows, m_i, mask=row_ok)
    tl.store(PartL + slot_base + rows, l_i, mask=row_ok)
    tl.store(PartAcc + slot_base * HEAD_DIM + acc_offs, acc, mask=acc_mask)


@triton.jit
def _sink_attn_decode_reduce(
    PartM, PartL, PartAcc, Out, Lse, Beta, ExtraLogits, SinkStats,
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_lz, stride_lh, stride_lm,
    stride_eh, stride_ee,
    num_kv_heads, group, q_len, n_rows, num_splits, n_extra, n_extra_every_row,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, E_P2: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_BETA: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_STATS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    off_b = (pid_bh // num_kv_heads).to(tl.int64)
    off_kvh = (pid_bh % num_kv_heads).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    off_i = rows % q_len
    off_h = off_kvh * group + rows // q_len
    offs_d = tl.arange(0, BLOCK_D)
    acc_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    # -- merge the non-sink partial states of all splits (online, any number of splits) --
    base = pid_bh.to(tl.int64) * (num_splits + 1) * n_rows + rows
    m_n = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_n = tl.zeros([BLOCK_R], tl.float32)
    acc_n = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        slot = base + s * n_rows
        m_p = tl.load(PartM + slot, mask=row_ok, other=float("-inf"))
        l_p = tl.load(PartL + slot, mask=row_ok, other=0.0)
        acc_p = tl.load(PartAcc + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=acc_mask, other=0.0)
        m_new = tl.maximum(m_n, m_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_n = tl.math.exp2(m_n - m_safe)
        a_p = tl.math.exp2(m_p - m_safe)
        l_n = l_n * a_n + l_p * a_p
        acc_n = acc_n * a_n[:, None] + acc_p * a_p[:, None]
        m_n = m_new
    if HAS_SINKS:
        slot = base + num_splits * n_rows
        m_s = tl.load(PartM + slot, mask=row_ok, other=float("-inf"))
        l_s = tl.load(PartL + slot, mask=row_ok, other=0.0)
        acc_s = tl.load(PartAcc + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=acc_mask, other=0.0)
    else:
        m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_R], tl.float32)
        acc_s = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

    # -- policy combine, per row's head --
    if HAS_BETA:
        beta = tl.load(Beta + off_h, mask=row_ok, other=1.0).to(tl.float32)
    else:
        beta = 1.0
    if HAS_EXTRA:
        offs_e = tl.arange(0, E_P2)
        extra_logits2 = tl.load(ExtraLogits + off_h[:, None] * stride_eh + offs_e[None, :] * stride_ee,
                                mask=row_ok[:, None] & (offs_e[None, :] < n_extra),
                                other=float("-inf")).to(tl.float32) * LOG2E
        every_row = offs_e[None, :] < n_extra_every_row
    else:
        extra_logits2 = 0.0
        every_row = 0
    c_n, c_s, lse, sink_mass = sink_combine(m_n, l_n, m_s, l_s, beta, extra_logits2, every_row, HAS_EXTRA=HAS_EXTRA)
    out = acc_n * c_n[:, None] + acc_s * c_s[:, None]

    o_ptrs = (Out + off_b * stride_oz + off_h[:, None] * stride_oh + off_i[:, None] * stride_om
              + offs_d[None, :] * stride_ok)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=acc_mask)
    tl.store(Lse + off_b * stride_lz + off_h * stride_lh + off_i * stride_lm, lse, mask=row_ok)
    if HAS_STATS:
        # telemetry (docs/monitoring.md): per row that sees a non-sink key (merged l_N > 0), its
        # stock sink mass and 1 added at sink_stats[b, h] of the row's head (the rows of one tile
        # belong to several heads of the group; a decode call has a few rows)
        pair = tl.arange(0, 2)
        stats_ptrs = SinkStats + ((off_b * num_kv_heads * group + off_h) * 2)[:, None] + pair[None, :]
        row_sums = tl.where(pair[None, :] == 0, sink_mass[:, None], 1.0)
        tl.atomic_add(stats_ptrs, row_sums, mask=(row_ok & (l_n > 0))[:, None], sem="relaxed")


# -- launcher -------------------------------------------------------------------------------------
# Key tile per arch family, padded head dim and input width. A 64 x 128 bf16 K tile is 16 KB; the
# stages are chosen so that at least two split programs fit on an SM (their shared memory and
# registers, benchmarks/kernel_audit.py), which is what default_num_splits counts on: three
# stages on Hopper's 228 KB, two on Ampere's 164 KB (three took 91 KB at 64 rows, one program).
# hd 256 halves the tile, fp32 halves it again. Query tiles hold GROUP * Q rows, at least 16
# (tl.dot's minimum), at most 64 at hd 128.
DECODE_CONFIGS = {
    # (arch, BLOCK_D rounded up to 64, 16-bit input?): (BLOCK_N, num_warps, num_stages)
    (90, 64, True): (64, 4, 3),
    (90, 128, True): (64, 4, 3),
    (90, 256, True): (32, 4, 2),
    (90, 64, False): (32, 4, 2),
    (90, 128, False): (16, 4, 2),  # 32 keys per tile spill 588 / 476 bytes on sm_90, 16 none
    (90, 256, False): (16, 8, 2),  # 4 warps: 128 registers and 28 / 44 bytes of spills (hot path)
    (80, 64, True): (64, 4, 2),
    (80, 128, True): (64, 4, 2),
    (80, 256, True): (32, 4, 2),
    (80, 64, False): (32, 4, 2),
    (80, 128, False): (32, 4, 2),
    (80, 256, False): (16, 4, 2),
}
# rows x BLOCK_D of the query tile: 16-bit 128 rows at hd 64, 64 at hd 128, 32 at 256; fp32 (its ieee
# dot holds whole operand rows in registers) 32, 16, 16
_MAX_TILE_ELEMS = {True: 64 * 128, False: 16 * 128}
_REDUCE_ROWS = 16            # rows per reduction program: 16 x 256 fp32 acc stays in registers
# A split should stream at least this many keys: below it the partial-state write and the extra
# reduction pass (n_rows * D * 4 bytes per split) stop being small next to the K/V bytes read.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 128


def decode_config(head_dim: int, dtype: torch.dtype, arch: int = 90) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel for this head dim and dtype on a GPU of
    compute capability ``arch`` (x10)."""
    return DECODE_CONFIGS[(arch_family(arch), max(64, padded_head_dim(head_dim)), dtype != torch.float32)]


def max_rows_per_tile(block_d: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Query rows per split-kernel program: the q tile and the fp32 accumulator stay in registers."""
    return max(16, _MAX_TILE_ELEMS[dtype != torch.float32] // block_d)


def _empty_workspace(bh: int, slots: int, n_rows: int, head_dim: int, device) -> tuple[torch.Tensor, ...]:
    """fp32 partial states (m, l, acc). Every slot that the reduction reads is written first."""
    return (
        torch.empty(bh, slots, n_rows, dtype=torch.float32, device=device),
        torch.empty(bh, slots, n_rows, dtype=torch.float32, device=device),
        torch.empty(bh, slots, n_rows, head_dim, dtype=torch.float32, device=device),
    )


def default_num_splits(batch: int, kv_heads: int, row_tiles: int, k_len: int, device: torch.device) -> int:
    """Splits so that the split kernel launches about two programs per SM (each streams its chunk
    of K/V at full bandwidth and two per SM hide the tail), but no split gets fewer than
    _MIN_KEYS_PER_SPLIT keys. Two programs do fit on an SM with every DECODE_CONFIGS entry
    (registers and shared memory, checked by the kernel audit's budget test). On the CPU
    interpreter the H100's 132 SMs stand in."""
    want = cdiv(2 * device_sm_count(device), max(1, batch * kv_heads * row_tiles))
    return max(1, min(want, k_len // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def sink_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_cols: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    extra_logits: torch.Tensor | None = None,
    virtual_sink_logit: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    sink_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV sink-aware attention, same semantics as ``reference_sink_attention``; meant for
    Q of 1 to a few tokens and long K (any Q is correct, large Q is just slow).

    Shape contract (any strides for q, k, v, mask, out; nothing large is copied):
      q (B, Hq, Q, D): stride_qz, stride_qh, stride_qm, stride_qk
      k, v (B, Hkv, K, D): stride_kz, stride_kh, stride_kn, stride_kk (v likewise), Hq % Hkv == 0
      attn_mask bool, broadcastable to (B, 1|Hq, Q, K): an arbitrary pattern, bit-packed along K into
        int32 words once per launch (pack_mask_bits) and read by row: stride_mz, stride_mh, stride_mm
        (0 on broadcast dims)
      key_padding bool (B|1, K) and its key_ranges (B|1, 3): as for the prefill launcher
      sink_cols (B|1, NS) integer, -1 = unused: stride_sz, stride_sn
      beta (Hq,); extra_logits (Hq, E) and virtual_sink_logit (Hq,) as one (Hq, E + 1) table: stride_eh, stride_ee
      out (B, Hq, Q, D) q.dtype: stride_oz, stride_oh, stride_om, stride_ok; lse (B, Hq, Q) fp32
      workspace (B * Hkv, num_splits + 1, GROUP * Q[, D]) fp32, contiguous, allocated here
      sink_stats (B, Hq, 2) fp32, contiguous, optional: the reduction kernel adds, per query row
        that sees a non-sink key, its stock sink mass and 1 at [b, h] (its HAS_STATS variant; the
        split kernel is the same either way)
    ``num_splits`` overrides :func:`default_num_splits` (it is capped so no split is empty).
    """
    launch = prepare_attention_launch(
        q, k, v, attn_mask=attn_mask, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
        virtual_sink_logit=virtual_sink_logit, sliding_window=sliding_window, softcap=softcap, scale=scale,
        kernel=_sink_attn_decode_split, key_padding=key_padding, key_ranges=key_ranges)
    out, lse = allocate_outputs(q, out, lse)
    check_sink_stats(sink_stats, q)
    check_block_sizes(block_n=block_n)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_len == 0 or batch == 0 or q_heads == 0:
        return out, lse
    group = q_heads // kv_heads
    n_rows = group * q_len
    block_d = padded_head_dim(head_dim)
    bn, nw, ns = decode_config(head_dim, q.dtype, device_arch(q.device))
    block_n, num_warps, num_stages = block_n or bn, num_warps or nw, num_stages or ns
    block_m = max(16, min(max_rows_per_tile(block_d, q.dtype), next_power_of_2(n_rows)))
    row_tiles = cdiv(n_rows, block_m)
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, row_tiles, k_len, q.device)
    # whole tiles per split; recount so the last split is not empty
    split_size = cdiv(cdiv(max(k_len, 1), max(1, int(num_splits))), block_n) * block_n
    num_splits = max(1, cdiv(k_len, split_size))

    part_m, part_l, part_acc = _empty_workspace(batch * kv_heads, num_splits + 1, n_rows, head_dim, q.device)
    # one more program per (b, kv head, row tile) for the sink set's partial state
    _sink_attn_decode_split[(num_splits + (launch.n_sinks > 0), batch * kv_heads, row_tiles)](
        q, k, v, launch.mask, launch.key_padding, launch.key_ranges, launch.sink_cols, part_m, part_l, part_acc,
        *q.stride(), *k.stride(), *v.stride(), *launch.mask_strides, *launch.key_padding_strides,
        launch.key_range_stride, *launch.sink_strides,
        kv_heads, group, q_len, k_len, causal_offset_arg(causal_offset), launch.window, n_rows, split_size, num_splits,
        launch.qk_scale, launch.softcap_log2,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **launch.sink_constexprs,
        HAS_MASK=launch.mask is not None, HAS_KEY_RANGE=launch.key_padding is not None, IS_CAUSAL=bool(causal),
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None, UPCAST_DOT=launch.upcast_dot,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
    )
    block_r = min(_REDUCE_ROWS, next_power_of_2(n_rows))
    _sink_attn_decode_reduce[(batch * kv_heads, cdiv(n_rows, block_r))](
        part_m, part_l, part_acc, out, lse, launch.beta, launch.extra_logits, sink_stats,
        *out.stride(), *lse.stride(), *launch.extra_strides,
        kv_heads, group, q_len, n_rows, num_splits, launch.n_extra, launch.n_extra_every_row,
        HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d, E_P2=launch.extra_width,
        HAS_SINKS=launch.n_sinks > 0, HAS_BETA=launch.beta is not None,
        HAS_EXTRA=launch.extra_logits is not None, HAS_STATS=sink_stats is not None,
        num_warps=4, num_stages=1, enable_fp_fusion=True,
    )
    return out, lse
