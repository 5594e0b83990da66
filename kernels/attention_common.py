"""What the prefill and the split-KV decode kernels share: named constants, the jit helpers of the
key loop and of the policy epilogue, and the launch preparation both launchers run.

Logits are kept in base 2 (scaled by log2(e)) so every exponential is one ``exp2``, and the scale is
applied after the row max, inside the exponent. The key loop has two parts: the tiles every row
sees whole run without any compare (the main loop: the instructions of a plain flash kernel), the
edge tiles (window, key padding, a sink column, the causal diagonal, the ragged end, or every tile
with a dense mask) run masked. The sink set S is masked out of the running state (m_i, l_i, acc),
which therefore holds the non-sink part N only; sinks are usually the first real keys, so they cost
one masked tile. The at most NS sink columns are gathered into one extra key tile of their own, and
the two parts are combined with the per-head beta and the zero-value extra logits by the formula
of ``docs/formulas.md``. Splitting first and combining last keeps l_N exact: no l_total - l_S
cancellation when the sink takes nearly all the mass, which is the common case.

Masks never arrive as a byte per score: transformers' padded causal masks come as per-sequence key
padding with ranges (``masks.key_padding_ranges``), an arbitrary mask bit-packed
(``masks.pack_mask_bits``). On Hopper the prefill loop reads k and v through tensor descriptors
(bulk tensor copies, ``tma_descriptors``). ``benchmarks/kernel_audit.py`` checks what the compiler
makes of all this for sm_80 and sm_90 (docs/testing.md, "Kernel efficiency").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .arguments import (
    KERNEL_DTYPES, attention_scale, check_attn_mask, check_key_padding, check_policy_tensors, check_qkv_dtypes,
    check_qkv_shapes, check_sink_cols, check_sliding_window, positive_number,
)
from .masks import key_padding_ranges, pack_mask_bits

__all__ = [
    "LOG2E", "LN2", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "MAX_SINK_SLOTS", "AttentionLaunch", "prepare_attention_launch",
    "allocate_outputs", "check_block_sizes", "check_sink_stats", "padded_head_dim", "is_interpreted", "arch_family",
    "device_arch", "fast_reciprocal", "softcap_logits", "load_kv_tile", "tile_visibility", "attn_tile",
    "attn_key_range",
    "sink_scores", "add_sink_values", "softmax_stats", "sink_combine", "hidden_combine", "key_padding_ranges",
    "pack_mask_bits", "tma_descriptors", "cdiv", "next_power_of_2", "device_sm_count",
]

# exp(x) = exp2(x * LOG2E); ln(x) = log2(x) * LN2. Module-level constants read inside @triton.jit
# functions must be tl.constexpr instances (an annotation is not enough for the compiler, although
# the interpreter accepts it).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# exp(-2|x|) = exp2(|x| * MINUS_2_LOG2E): the one transcendental of a softcap's tanh
MINUS_2_LOG2E = tl.constexpr(-2.8853900817779268)

SUPPORTED_DTYPES = KERNEL_DTYPES
MAX_HEAD_DIM = 256
MAX_SINK_SLOTS = 16
# tl.dot's smallest operand dimension: the sink columns are gathered into a tile at least this
# wide, head dims below it run padded
MIN_DOT_DIM = 16


# -- host-side integer helpers ---------------------------------------------------------------------
# triton.cdiv and triton.next_power_of_2 are constexpr functions: called from host code each goes
# through triton's JIT wrapper, 1.9-2.6 us a call (triton 3.6 and 3.9, one CPU thread) against
# 0.01-0.03 us for the same integer arithmetic in Python. A decode launch made 13 such calls, about
# 30 us of host time per attention call, which a batch-1 decode step pays in every layer.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints (host code; kernels use ``tl.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, 0 for n = 0 (as ``triton.next_power_of_2``); host code."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# -- key-loop helpers -----------------------------------------------------------------------------
@triton.jit
def fast_reciprocal(a):
    """1 / a for a in [1, 2] with FMAs only, to about 4e-8 relative (below fp32's half ulp): a
    linear start (error at most 1/17), one cubic step, one Newton step. No MUFU: the softcap's
    tanh then costs exactly one transcendental (its exp2) per score, not two."""
    y = 1.411764705882353 - 0.47058823529411764 * a  # 24/17 - 8/17 a: |1 - a y| <= 1/17 on [1, 2]
    e = 1.0 - a * y
    y = y + y * (e + e * e)
    return y + y * (1.0 - a * y)


@triton.jit
def softcap_logits(qk, qk_scale, softcap_log2):
    """Raw q.k -> base-2 logits softcap * tanh(qk * scale / softcap) * log2(e), with qk_scale =
    scale / softcap and softcap_log2 = softcap * log2(e); tanh(|x|) = (1 - t) / (1 + t) with
    t = exp(-2|x|) in (0, 1], one exp2 of a non-positive argument, so it never overflows."""
    x = qk * qk_scale
    t = tl.math.exp2(tl.abs(x) * MINUS_2_LOG2E)
    th = (1.0 - t) * fast_reciprocal(1.0 + t)
    return softcap_log2 * tl.where(x < 0, -th, th)


@triton.jit
def load_kv_tile(src, base, off_b, off_kvh, start_n, offs_n, offs_d, stride_n, stride_d, k_len,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of k or v at key columns start_n + offs_n.
    USE_TMA: one bulk tensor copy through the (B, Hkv, K, D) descriptor ``src``; rows past K and
    head-dim columns past D arrive as zeros. Otherwise pointers from ``base`` = k[b, kvh, 0, 0],
    bounds checked only where needed: the key axis in MASKED tiles, the head dim when it is padded."""
    if USE_TMA:
        return src.load([off_b.to(tl.int32), off_kvh.to(tl.int32), start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    # the tile's pointers as loop-invariant ones plus one scalar offset per tile, as a plain flash
    # kernel has them: each address is then one wide multiply-add in the key loop. Forming the
    # column index first ((start_n + offs_n) * stride_n) cost a multiply and a 64-bit
    # sign-extending add per address: sm_90's pointer path at hd 256 ran 476 SASS per tile
    # against the yardstick's 411, now 403 (kernel audit; it also removed fp32 spills at hd 256 on
    # sm_80)
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d + start_n * stride_n
    if MASKED:
        cols = start_n + offs_n
        return tl.load(ptrs, mask=(cols[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def tile_visibility(start_n, offs_n, q_pos, k_len, window, mask_rows, row_ok, key_ok_row, stride_pn,
                    sink_ptr, stride_sn, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_KEY_RANGE: tl.constexpr, NS: tl.constexpr):
    """Which (row, column) pairs of a masked tile count in the online softmax of N: the key axis,
    the causal and window rules, the sequence's key padding, the dense mask, and never a sink
    column (the sink set is added in the epilogue). The causal rule and the end of K are one
    compare per score (against min(position, K - 1) per row, as cheap as a plain causal mask);
    column-only terms are built only when there are any.

    The column indices are formed here, after the q.k product, as ``start_n | offs_n``: equal to
    start_n + offs_n since start_n is a multiple of the power-of-2 BLOCK_N, but an OR chain lets
    LLVM fold each lane's column into one base plus a constant, where the sum was vectorised
    into one register per column (16 more registers at 128 x 64 on sm_90: 168 instead of 158)."""
    cols = start_n | offs_n
    if IS_CAUSAL:
        vis = cols[None, :] <= tl.minimum(q_pos, k_len - 1)[:, None]
    else:
        vis = (cols < k_len)[None, :]
    if HAS_WINDOW:
        vis = vis & (cols[None, :] > q_pos[:, None] - window)
    if HAS_KEY_RANGE or NS > 0:
        col_ok = cols < k_len
        if HAS_KEY_RANGE:
            col_ok = tl.load(key_ok_row + cols * stride_pn, mask=col_ok, other=0) != 0
        for s in tl.static_range(NS):
            col_ok = col_ok & (cols != tl.load(sink_ptr + s * stride_sn))
        vis = vis & col_ok[None, :]
    if HAS_MASK:
        # the bit-packed mask (pack_mask_bits): per row, BLOCK_N / 32 words of this tile, loaded
        # as row vectors (the layout of m_i and l_i), so the (BLOCK_M, BLOCK_N) scores never
        # change layout to meet a mask tile; 4 bytes per 32 scores instead of 32
        word = tl.load(mask_rows + (start_n >> 5), mask=row_ok, other=0)[:, None]
        for j in tl.static_range(1, BLOCK_N // 32):
            w_j = tl.load(mask_rows + (start_n >> 5) + j, mask=row_ok, other=0)
            word = tl.where((offs_n >> 5)[None, :] == j, w_j[:, None], word)
        vis = vis & (((word >> (cols & 31)[None, :]) & 1) != 0)
    return vis


@triton.jit
def attn_tile(
    acc, l_i, m_i,                      # running state of the non-sink keys N
    q,                                  # (BLOCK_M, BLOCK_D) query tile, input dtype (fp32 with UPCAST_DOT)
    K, V, k_base, v_base, off_b, off_kvh, stride_kn, stride_kk, stride_vn, stride_vk,
    mask_rows, row_ok, key_ok_row, stride_pn, sink_ptr, stride_sn,
    q_pos, start_n, k_len, window, qk_scale, softcap_log2, offs_n, offs_d,
    acc_h, l_h, m_h, hidden_row,        # hidden sinks' running state, and Hidden[b, h, 0] (HAS_HIDDEN)
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KEY_RANGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NS: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_HIDDEN: tl.constexpr, LSE_ONLY: tl.constexpr,
):
    """One key tile of the online softmax. Unmasked tiles (MASKED = False) are seen whole by every
    row and contain no sink: no compare at all, and every row max is finite. The scale is applied
    after the row max, inside the exponent (``qk * qk_scale - m``: one FMA and one exp2 per score),
    and the P.V product accumulates into the rescaled ``acc`` (no second accumulator tile).

    HAS_HIDDEN (content-dependent sinks): the tile's keys marked in the per-(batch, head) byte mask
    ``hidden_row`` go to a second state (``acc_h``, ``l_h``) under a running max of their own
    (``m_h``); the rest stays in (acc, l_i, m_i). One max for both let a hidden sink that out-scores
    every other key by more than fp32's exponent range (about 87 nats) flush l_N to zero or a
    subnormal: the output was NaN, or the hidden sink went unscaled. The mask is per key, not per
    score: one byte load per key of the tile, one exp2 per score with the key's own max, and a second
    P.V product. Without the flag ``acc_h``, ``l_h`` and ``m_h`` pass through untouched (the compiler
    drops them: the other variants compile to the same code).

    LSE_ONLY: only the row statistics (m_i, l_i): no v tile is read and no P.V product is made
    (the stock pass that content-dependent sinks need for their column masses)."""
    k = load_kv_tile(K, k_base, off_b, off_kvh, start_n, offs_n, offs_d, stride_kn, stride_kk, k_len,
                     HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=MASKED, USE_TMA=USE_TMA)
    if UPCAST_DOT:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    if HAS_SOFTCAP:
        qk = softcap_logits(qk, qk_scale, softcap_log2)
        scale = 1.0
    else:
        scale = qk_scale
    if MASKED:
        vis = tile_visibility(start_n, offs_n, q_pos, k_len, window, mask_rows, row_ok, key_ok_row, stride_pn,
                              sink_ptr, stride_sn, BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW,
                              HAS_MASK=HAS_MASK, HAS_KEY_RANGE=HAS_KEY_RANGE, NS=NS)
        qk = tl.where(vis, qk, float("-inf"))
    if HAS_HIDDEN:
        cols_h = start_n + offs_n
        if MASKED:
            is_h = tl.load(hidden_row + cols_h, mask=cols_h < k_len, other=0) != 0
        else:
            is_h = tl.load(hidden_row + cols_h) != 0
        # N and H under maxima of their own; a tile may hold no key of either (a max of -inf)
        m_new = tl.maximum(m_i, tl.max(tl.where(is_h[None, :], float("-inf"), qk), 1) * scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        m_h_new = tl.maximum(m_h, tl.max(tl.where(is_h[None, :], qk, float("-inf")), 1) * scale)
        m_h_use = tl.where(m_h_new == float("-inf"), 0.0, m_h_new)
        p = tl.math.exp2(qk * scale - tl.where(is_h[None, :], m_h_use[:, None], m_use[:, None]))
        p_h = tl.where(is_h[None, :], p, 0.0)
        p = tl.where(is_h[None, :], 0.0, p)
        alpha_h = tl.math.exp2(m_h - m_h_use)
        l_h = l_h * alpha_h + tl.sum(p_h, 1)
        m_h = m_h_new
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing stay at 0
        else:
            m_use = m_new
        p = tl.math.exp2(qk * scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if not LSE_ONLY:
        v = load_kv_tile(V, v_base, off_b, off_kvh, start_n, offs_n, offs_d, stride_vn, stride_vk, k_len,
                         HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=MASKED, USE_TMA=USE_TMA)
        p = p.to(v.dtype)  # P.V runs in the input precision, like every flash forward
        if HAS_HIDDEN:
            p_h = p_h.to(v.dtype)
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
            if HAS_HIDDEN:
                p_h = p_h.to(tl.float32)
        if HAS_HIDDEN:
            acc_h = tl.dot(p_h, v, acc_h * alpha_h[:, None], input_precision="ieee")
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new, acc_h, l_h, m_h


@triton.jit
def attn_key_range(
    q, K, V, k_base, v_base, off_b, off_kvh, stride_kn, stride_kk, stride_vn, stride_vk,
    mask_rows, row_ok, q_pos,
    key_ok_row, stride_pn, key_range_ptr,  # KeyOk[b, 0] and KeyRanges[b, 0] (first, end, holes)
    sink_ptr, stride_sn,
    lo, hi,                             # key range this program owns, before any rule cuts it
    pos_first, pos_last,                # causal positions of its first and last query row
    k_len, window, qk_scale, softcap_log2, offs_n, offs_d,
    hidden_row,                         # Hidden[b, h, 0] (HAS_HIDDEN), else None
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KEY_RANGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NS: tl.constexpr, NS_P2: tl.constexpr, UPCAST_DOT: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_HIDDEN: tl.constexpr, LSE_ONLY: tl.constexpr,
):
    """Online softmax of the non-sink keys in [lo, hi): returns (acc, l_i, m_i, acc_h, l_h, m_h) from
    a fresh state; with HAS_HIDDEN the keys of the per-head hidden-sink mask are kept in (acc_h, l_h)
    under their own max m_h (``attn_tile``), otherwise those three are placeholders.

    Shared by the prefill kernel (one row block, all keys) and the decode split kernel (all rows,
    one key split). Two loops over whole key tiles: the tiles every row sees whole and that hold no
    sink column run unmasked ([full_lo, full_hi)); the rest — cut by the window or the sequence's
    first real key, holding a sink, on the causal diagonal, past the sequence's last real key or
    the ragged end of K — run in one masked loop. A dense mask or a key padding with holes makes
    every tile masked. Sinks are usually the first real keys, so they cost one masked tile; a sink
    far to the right makes every tile before it masked (correct, slower).
    """
    full_lo = lo
    full_hi = hi
    if HAS_KEY_RANGE:  # the sequence's real keys: a contiguous [first, end) unless it has holes
        first = tl.load(key_range_ptr)
        end = tl.load(key_range_ptr + 1)
        lo = tl.maximum(lo, first)
        hi = tl.minimum(hi, end)
        full_lo = tl.maximum(full_lo, first)
        full_hi = tl.where(tl.load(key_range_ptr + 2) != 0, full_lo, tl.minimum(full_hi, end))
    if IS_CAUSAL:
        hi = tl.minimum(hi, pos_last + 1)
        full_hi = tl.minimum(full_hi, pos_first + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos_first - window + 1)
        full_lo = tl.maximum(full_lo, pos_last - window + 1)
    if HAS_MASK:
        full_hi = full_lo
    # lo is aligned down to a tile start; it never falls below the range the program owns, whose
    # start (0 or a decode split's) is a multiple of BLOCK_N. An empty range ends as hi == lo.
    hi = tl.minimum(hi, k_len)
    lo = tl.minimum(tl.maximum(lo, 0), k_len) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), hi)
    full_hi = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N, full_lo), hi)
    if NS > 0:  # tiles holding a sink column move to the masked loop
        offs_s = tl.arange(0, NS_P2)
        sinks = tl.load(sink_ptr + offs_s * stride_sn, mask=offs_s < NS, other=-1)
        inside = (sinks >= full_lo) & (sinks < full_hi)
        full_lo = tl.minimum(tl.maximum(full_lo, tl.max(tl.where(inside, (sinks // BLOCK_N + 1) * BLOCK_N, 0), 0)),
                             hi)
        full_hi = tl.maximum(full_hi, full_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_HIDDEN:
        acc_h = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        l_h = tl.zeros([BLOCK_M], tl.float32)
        m_h = tl.full([BLOCK_M], float("-inf"), tl.float32)
    else:  # placeholders the loops pass through unchanged
        acc_h = tl.zeros([1], tl.float32)
        l_h = tl.zeros([1], tl.float32)
        m_h = tl.zeros([1], tl.float32)
    # the loops count tiles: start_n = tile * BLOCK_N is a multiple of BLOCK_N (tile_visibility)
    # tiles every row sees whole: no compare, the main loop (none with a dense mask)
    if not HAS_MASK:
        for tile in tl.range(full_lo // BLOCK_N, full_hi // BLOCK_N):
            acc, l_i, m_i, acc_h, l_h, m_h = attn_tile(
                acc, l_i, m_i, q, K, V, k_base, v_base, off_b, off_kvh, stride_kn, stride_kk, stride_vn, stride_vk,
                mask_rows, row_ok, key_ok_row, stride_pn, sink_ptr, stride_sn, q_pos, tile * BLOCK_N, k_len,
                window, qk_scale, softcap_log2, offs_n, offs_d, acc_h, l_h, m_h, hidden_row, HEAD_DIM=HEAD_DIM,
                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=False, HAS_MASK=HAS_MASK, HAS_KEY_RANGE=HAS_KEY_RANGE,
                IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, NS=NS, UPCAST_DOT=UPCAST_DOT,
                USE_TMA=USE_TMA, HAS_HIDDEN=HAS_HIDDEN, LSE_ONLY=LSE_ONLY)
    # the edges: [lo, full_lo) then [full_hi, hi), one loop; without a window, key padding, sinks
    # or a dense mask nothing is cut on the left (lo == full_lo) and the loop is a plain range.
    # full_lo is a tile start, or hi when no tile is unmasked: the leading count rounds up.
    HAS_LEAD: tl.constexpr = HAS_WINDOW or HAS_KEY_RANGE or NS > 0 or HAS_MASK
    if HAS_LEAD:
        n_lead = (full_lo - lo + BLOCK_N - 1) // BLOCK_N
    else:
        n_lead = 0
    n_masked = n_lead + (hi - full_hi + BLOCK_N - 1) // BLOCK_N
    for t in tl.range(0, n_masked):
        if HAS_LEAD:
            tile = tl.where(t < n_lead, lo // BLOCK_N + t, full_hi // BLOCK_N + t - n_lead)
        else:
            tile = full_hi // BLOCK_N + t
        acc, l_i, m_i, acc_h, l_h, m_h = attn_tile(
            acc, l_i, m_i, q, K, V, k_base, v_base, off_b, off_kvh, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, row_ok, key_ok_row, stride_pn, sink_ptr, stride_sn, q_pos, tile * BLOCK_N, k_len,
            window, qk_scale, softcap_log2, offs_n, offs_d, acc_h, l_h, m_h, hidden_row, HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=True, HAS_MASK=HAS_MASK, HAS_KEY_RANGE=HAS_KEY_RANGE,
            IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, NS=NS, UPCAST_DOT=UPCAST_DOT,
            USE_TMA=USE_TMA, HAS_HIDDEN=HAS_HIDDEN, LSE_ONLY=LSE_ONLY)
    return acc, l_i, m_i, acc_h, l_h, m_h


# -- epilogue helpers -----------------------------------------------------------------------------
@triton.jit
def sink_scores(
    q, k_base, stride_kn, stride_kk, mask_rows, row_ok, q_pos, key_ok_row, stride_pn,
    sink_ptr, stride_sn,                # sink_cols[b, 0]
    k_len, window, qk_scale, softcap_log2, offs_d,
    HEAD_DIM: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Base-2 logits (BLOCK_M, SB) of the sink columns gathered into one key tile of SB >= 16
    columns (tl.dot's minimum), -inf where a row does not see the column by the loop's rules, and
    for unused slots, columns outside [0, K) or in the key padding, and a column listed a second
    time (the reference builds a boolean set).

    16-bit inputs take one tl.dot. fp32 inputs, whose ieee dot runs on FMAs with whole operand rows
    in registers (255 registers and spills at hd 128 for this small product alone), take one
    q.k dot product per sink slot instead: a multiply and a row sum."""
    offs_t = tl.arange(0, SB)
    cols = tl.load(sink_ptr + offs_t * stride_sn, mask=offs_t < NS, other=-1)
    earlier = (cols[:, None] == cols[None, :]) & (offs_t[None, :] < offs_t[:, None])
    fresh = (cols >= 0) & (cols < k_len) & (tl.max(earlier.to(tl.int32), axis=1) == 0)
    if HAS_KEY_RANGE:
        fresh = fresh & (tl.load(key_ok_row + cols * stride_pn, mask=fresh, other=0) != 0)
    cols = tl.where(fresh, cols, 0)
    if k_base.dtype.element_ty == tl.float32:
        s = tl.zeros([q.shape[0], SB], tl.float32)
        for slot in tl.static_range(NS):
            col = tl.sum(tl.where(offs_t == slot, cols, 0))
            k_row = tl.load(k_base + col * stride_kn + offs_d * stride_kk, mask=offs_d < HEAD_DIM, other=0.0)
            s = tl.where(offs_t[None, :] == slot, tl.sum(q * k_row[None, :], axis=1)[:, None], s)
    else:
        k_s = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                      mask=fresh[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if UPCAST_DOT:
            k_s = k_s.to(tl.float32)
        s = tl.dot(q, tl.trans(k_s), input_precision="ieee")
    if HAS_SOFTCAP:
        s = softcap_logits(s, qk_scale, softcap_log2)
    else:
        s = s * qk_scale
    vis = fresh[None, :] & row_ok[:, None]
    if IS_CAUSAL:
        vis = vis & (cols[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        vis = vis & (cols[None, :] > q_pos[:, None] - window)
    if HAS_MASK:
        word = tl.load(mask_rows[:, None] + (cols >> 5)[None, :], mask=vis, other=0)
        vis = vis & (((word >> (cols & 31)[None, :]) & 1) != 0)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def add_sink_values(out, p_s, v_base, stride_vn, stride_vk, sink_ptr, stride_sn, k_len, offs_d,
                    HEAD_DIM: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr):
    """out + sum over the sink slots of p_s[:, slot] * v[col_slot, :] (p_s: BLOCK_M x SB, the
    weights of sink_scores' columns): NS rank-1 updates in fp32, no second accumulator and no sink
    values to keep (unused, invisible and repeated slots have p = 0)."""
    offs_s = tl.arange(0, SB)
    cols = tl.load(sink_ptr + offs_s * stride_sn, mask=offs_s < NS, other=-1)
    for slot in tl.static_range(NS):
        col = tl.sum(tl.where(offs_s == slot, cols, 0))
        ok = (col >= 0) & (col < k_len)
        v_row = tl.load(v_base + tl.where(ok, col, 0) * stride_vn + offs_d * stride_vk,
                        mask=offs_d < tl.where(ok, HEAD_DIM, 0), other=0.0).to(tl.float32)
        weight = tl.sum(tl.where(offs_s[None, :] == slot, p_s, 0.0), axis=1)
        out = out + weight[:, None] * v_row[None, :]
    return out


@triton.jit
def softmax_stats(s):
    """Row max (base 2) and sum of 2^(s - max) of a logit tile; (-inf, 0) for rows with nothing."""
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s - m_safe[:, None])
    return m, tl.sum(p, 1), p


@triton.jit
def sink_combine(m_n, l_n, m_s, l_s, beta, extra_logits2, every_row, HAS_EXTRA: tl.constexpr):
    """Epilogue of every policy, as coefficients: out = c_n * acc_N + c_s * acc_S where acc_N, l_N
    are relative to m_n and acc_S, l_S to m_s (base-2 maxima; extra_logits2 = zero-value logits in
    base 2, -inf unused, shape (rows or 1, E_P2); ``every_row`` (1, E_P2) marks the ones every row
    counts (s_aux); the others (the virtual sink logit) count only where l_N > 0). Returns (c_n,
    c_s, lse in natural log, stock sink mass).

        Z = l_S + l_N + sum_e 2^extra_logits2_e        (rescaled to the shared max m)
        o = beta * acc_S / Z + (acc_N / l_N) * (l_N + (1 - beta) l_S) / Z    if l_N > 0
        o = acc_S / Z                                                        otherwise

    Each l is >= 1 when nonzero (its own max contributes 2^0), so 1 / l_N cannot overflow;
    (l_N + (1 - beta) l_S) / Z <= 1, and Z overflowing (a huge extra logit) correctly gives 0.

    The stock sink mass ``l_S / Z`` (before sink scaling, zero-value logits counted: p_S * keep of
    docs/monitoring.md) is what the statistics variants (HAS_STATS) sum over the rows with l_N > 0;
    where nothing uses it the compiler removes it (the other variants compile to the same PTX).
    """
    m = tl.maximum(m_n, m_s)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    a_n = tl.math.exp2(m_n - m_safe)
    a_s = tl.math.exp2(m_s - m_safe)
    ln = l_n * a_n
    ls = l_s * a_s
    z = ln + ls
    has_n = l_n > 0
    if HAS_EXTRA:
        counted = every_row | has_n[:, None]  # sink-only rows stay untouched by the virtual logit
        z = z + tl.sum(tl.where(counted, tl.math.exp2(extra_logits2 - m_safe[:, None]), 0.0), 1)
    inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
    b = tl.where(has_n, beta, 1.0)  # rows that see only the sink stay untouched
    c_n = tl.where(has_n, (ln + (1.0 - b) * ls) * inv_z / tl.where(has_n, l_n, 1.0), 0.0)
    c_s = b * a_s * inv_z
    l_tot = ln + ls
    lse = tl.where(l_tot > 0, (m_safe + tl.math.log2(tl.where(l_tot > 0, l_tot, 1.0))) * LN2, float("-inf"))
    return c_n, c_s, lse, ls * inv_z


@triton.jit
def hidden_combine(m_n, l_n, m_h, l_h, m_s, l_s, beta, beta_h, extra_logits2, every_row, HAS_EXTRA: tl.constexpr):
    """Epilogue with content-dependent (hidden) sinks, as coefficients: out = c_n * acc_N +
    c_h * acc_H + c_s * acc_S, where acc_N, l_N are relative to m_n, acc_H, l_H to m_h and acc_S,
    l_S to m_s (base-2 maxima; zero-value logits as in :func:`sink_combine`, the virtual one counted
    where a key outside S is seen). Returns (c_n, c_h, c_s, lse in natural log). The formula of
    ``docs/formulas.md`` ("Content-dependent sinks", the reference
    ``sinkfix.ops.content_reference.reference_content_sink_attention``)::

        Z = l_S + l_H + l_N + sum_e 2^extra_e          (rescaled to the shared max)
        g = 1 + (1 - beta_H) l_H / (l_S + l_N)
        o = beta_H acc_H / Z + g * (beta_S acc_S + (l_N + (1 - beta_S) l_S) acc_N / l_N) / Z

    beta_H = 1 in rows that see no key outside H, beta_S = 1 in rows that see no key in N. Every
    l is >= 1 where nonzero (its own max counts 2^0), so whether a row sees N, H or S is exact
    however far one part out-scores another. The mass that S and N share (``rest``) is taken
    relative to their own larger max, where it is >= 1: relative to a hidden sink that out-scores
    them by more than fp32's range it would be 0, and the freed mass ``(1 - beta_H) l_H`` would find
    no key to go to. With rest_r = l_S' + l_N' at max(m_n, m_s)::

        g (l_N + (1 - beta_S) l_S) / Z = share_N (rest + (1 - beta_H) l_H) / Z,
        share_N = (l_N' + (1 - beta_S) l_S') / rest_r
        g a_S = a_S + (1 - beta_H) l_H 2^(m_s - m_r) / rest_r"""
    m_r = tl.maximum(m_n, m_s)  # the max of what receives the hidden sinks' freed mass
    m = tl.maximum(m_r, m_h)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    m_r_safe = tl.where(m_r == float("-inf"), 0.0, m_r)
    a_n = tl.math.exp2(m_n - m_safe)
    a_h = tl.math.exp2(m_h - m_safe)
    a_s = tl.math.exp2(m_s - m_safe)
    ln = l_n * a_n
    lh = l_h * a_h
    ls = l_s * a_s
    l_tot = ln + lh + ls
    z = l_tot
    has_n = l_n > 0
    if HAS_EXTRA:
        counted = every_row | ((l_n > 0) | (l_h > 0))[:, None]  # the virtual logit: rows that see a key outside S
        z = z + tl.sum(tl.where(counted, tl.math.exp2(extra_logits2 - m_safe[:, None]), 0.0), 1)
    inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
    ln_r = l_n * tl.math.exp2(m_n - m_r_safe)  # S and N at their own max: rest_r >= 1 where either is seen
    ls_r = l_s * tl.math.exp2(m_s - m_r_safe)
    rest_r = ln_r + ls_r
    has_rest = rest_r > 0
    inv_rest_r = tl.where(has_rest, 1.0 / tl.where(has_rest, rest_r, 1.0), 0.0)
    bh = tl.where(has_rest, beta_h, 1.0)
    b = tl.where(has_n, beta, 1.0)
    freed = (1.0 - bh) * lh  # the hidden sinks' freed mass, at the shared max
    share_n = (ln_r + (1.0 - b) * ls_r) * inv_rest_r
    c_n = tl.where(has_n, share_n * (ln + ls + freed) * inv_z / tl.where(has_n, l_n, 1.0), 0.0)
    c_h = bh * a_h * inv_z
    c_s = b * (a_s + freed * tl.math.exp2(m_s - m_r_safe) * inv_rest_r) * inv_z
    lse = tl.where(l_tot > 0, (m_safe + tl.math.log2(tl.where(l_tot > 0, l_tot, 1.0))) * LN2, float("-inf"))
    return c_n, c_h, c_s, lse


# -- launch preparation ---------------------------------------------------------------------------
def is_interpreted(kernel) -> bool:
    """True when triton decorated this kernel for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def arch_family(arch: int) -> int:
    """The config-table key of a compute capability (x10): 80 for Ampere and Ada (mma.sync, 164 KB
    of shared memory per SM on A100), 90 for Hopper and later (wgmma, 228 KB)."""
    return 80 if arch < 90 else 90


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> tuple[int, int]:
    """(compute capability x10, SM count) of CUDA device ``index``: asked once per process (the
    properties of a device do not change), not on every launch."""
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor, props.multi_processor_count


def device_arch(device: torch.device) -> int:
    """Compute capability x10 of a CUDA device; 90 elsewhere (the interpreter runs Hopper's tiles)."""
    if device.type != "cuda":
        return 90
    return _cuda_properties(_cuda_index(device))[0]


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 elsewhere (an H100's count stands in for the
    interpreter)."""
    if device.type != "cuda":
        return 132
    return _cuda_properties(_cuda_index(device))[1]


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: tl.dot needs every dimension >= 16; non-power-of-2 head dims run padded with masked loads."""
    return max(MIN_DOT_DIM, next_power_of_2(head_dim))


@dataclass(frozen=True)
class AttentionLaunch:
    """The normalised side arguments of one attention launch (what both launchers pass on).

    ``mask`` is the bool mask bit-packed along K (:func:`pack_mask_bits`) with its broadcast
    strides (0 on size-1 dims);
    ``key_padding`` the (B|1, K) bool key mask viewed as uint8 and ``key_ranges`` its int32
    (B|1, 3) summary (first real key, end, has holes: :func:`key_padding_ranges`);
    ``sink_cols`` int32 (B|1, NS); ``beta`` fp32 (Hq,); ``extra_logits`` one fp32 (Hq, E) table of
    zero-value logits whose first ``n_extra_every_row`` columns count in every row (the model's
    s_aux) and the rest (the virtual sink logit) only in rows that see a non-sink key.
    """

    mask: torch.Tensor | None
    mask_strides: tuple[int, int, int]
    key_padding: torch.Tensor | None
    key_padding_strides: tuple[int, int]
    key_ranges: torch.Tensor | None
    key_range_stride: int
    sink_cols: torch.Tensor | None
    sink_strides: tuple[int, int]
    beta: torch.Tensor | None
    extra_logits: torch.Tensor | None
    n_extra_every_row: int
    qk_scale: float
    softcap_log2: float
    window: int
    upcast_dot: bool

    @property
    def n_sinks(self) -> int:
        return 0 if self.sink_cols is None else self.sink_cols.shape[1]

    @property
    def n_extra(self) -> int:
        return 0 if self.extra_logits is None else self.extra_logits.shape[1]

    @property
    def extra_strides(self) -> tuple[int, int]:
        return (0, 0) if self.extra_logits is None else tuple(self.extra_logits.stride())

    @property
    def sink_constexprs(self) -> dict[str, int]:
        """NS, its power-of-2 padding NS_P2, and SB, the width of the gathered sink tile."""
        ns = self.n_sinks
        return dict(NS=ns, NS_P2=next_power_of_2(max(ns, 1)), SB=max(MIN_DOT_DIM, next_power_of_2(ns)))

    @property
    def extra_width(self) -> int:
        """E_P2: the zero-value logit table padded to a power of 2."""
        return next_power_of_2(max(self.n_extra, 1))


def _check_qkv(q, k, v, kernel) -> None:
    check_qkv_shapes(q, k, v)
    check_qkv_dtypes(q, k, v, SUPPORTED_DTYPES)
    device = q.device
    if is_interpreted(kernel):
        if device.type != "cpu":
            raise ValueError("the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only")
    elif device.type != "cuda":
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import), got {device}")
    head_dim = q.shape[3]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} not supported (1..{MAX_HEAD_DIM})")
    # batch and head offsets are int64 in the kernels, offsets inside one head's (S, D) are int32
    for name, t in (("q", q), ("k", k), ("v", v)):
        if (t.shape[2] - 1) * abs(t.stride(2)) + (head_dim - 1) * abs(t.stride(3)) >= 2 ** 31:
            raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()}: one head spans more than "
                             "2**31 elements, beyond the kernels' int32 in-head offsets")


def _mask_view(attn_mask, q, k) -> tuple[torch.Tensor | None, tuple[int, int, int]]:
    if attn_mask is None:
        return None, (0, 0, 0)
    check_attn_mask(attn_mask, q, k)
    # a dimension broadcast by stride 0 (an expanded mask) is packed once and read with stride 0
    for dim in range(3):
        if attn_mask.stride(dim) == 0:
            attn_mask = attn_mask.narrow(dim, 0, 1)
    packed = pack_mask_bits(attn_mask)
    strides = tuple(0 if n == 1 else st for n, st in zip(packed.shape[:3], packed.stride()[:3]))
    return packed, strides


def _key_padding_view(key_padding, key_ranges, batch: int, k_len: int, device):
    check_key_padding(key_padding, key_ranges, batch, k_len, device)
    if key_padding is None:
        return None, (0, 0), None, 0
    if key_ranges is None:
        key_ranges = key_padding_ranges(key_padding)
    padding_strides = tuple(0 if n == 1 else st for n, st in zip(key_padding.shape, key_padding.stride()))
    range_stride = 0 if key_ranges.shape[0] == 1 else key_ranges.stride(0)
    return key_padding.view(torch.uint8), padding_strides, key_ranges, range_stride


def _sink_cols_int32(sink_cols, batch: int, device) -> tuple[torch.Tensor | None, tuple[int, int]]:
    if sink_cols is None:
        return None, (0, 1)
    check_sink_cols(sink_cols, batch)
    if sink_cols.shape[1] > MAX_SINK_SLOTS:
        raise ValueError(f"at most {MAX_SINK_SLOTS} sink slots, got {sink_cols.shape[1]}")
    if sink_cols.shape[1] == 0:
        return None, (0, 1)
    cols = sink_cols.to(device=device)
    if cols.dtype in (torch.int8, torch.int16, torch.uint8):  # every value fits int32: nothing to clamp
        cols = cols.to(torch.int32)  # (the clamp below raised for them: -1 and 2**31 - 1 do not fit)
    elif cols.dtype != torch.int32:
        # a column index >= 2**31 cannot be a key column of a supported K; clamp before int32 (int32
        # columns need no clamp: the kernels count every negative column as absent)
        cols = cols.clamp(-1, 2**31 - 1).to(torch.int32)
    cols = cols.contiguous()
    return cols, (0 if cols.shape[0] == 1 else cols.stride(0), 1)


def _zero_value_table(extra_logits, virtual_sink_logit, q_heads: int, device) -> tuple[torch.Tensor | None, int]:
    """One fp32 (Hq, E) table: the every-row logits first, then the virtual sink logit."""
    check_policy_tensors(q_heads, extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit)
    columns = []
    if extra_logits is not None:
        columns.append(extra_logits.to(device=device, dtype=torch.float32))
    every_row = columns[0].shape[1] if columns else 0
    if virtual_sink_logit is not None:
        columns.append(virtual_sink_logit.to(device=device, dtype=torch.float32)[:, None])
    if len(columns) > 1:
        table = torch.cat(columns, dim=1)
    else:  # one source (the usual case): its own (Hq, E) view, no copy
        table = columns[0].contiguous() if columns else None
    if table is not None and table.shape[1] == 0:
        table = None
    return table, every_row


def prepare_attention_launch(q, k, v, *, attn_mask, sink_cols, beta, extra_logits, virtual_sink_logit,
                             sliding_window, softcap, scale, kernel, key_padding=None,
                             key_ranges=None) -> AttentionLaunch:
    """Validate the arguments shared by the prefill and decode launchers and normalise the small
    side tensors (see :class:`AttentionLaunch`). ``kernel`` tells whether this process interprets.
    Shapes, dtypes and plain numbers are checked; the values inside tensors are not (beta in
    [0, 1], finite logits): reading them would wait for the GPU at every call, and
    :class:`sinkfix.Policy` checks them once, when a policy is written."""
    _check_qkv(q, k, v, kernel)
    batch, q_heads, _, head_dim = q.shape
    check_sliding_window(sliding_window)
    softcap = None if softcap is None else positive_number("softcap", softcap)
    # the kernels take the row max before scaling (max(qk) * scale): exact for scale > 0 only
    scale = attention_scale(scale, head_dim)
    mask, mask_strides = _mask_view(attn_mask, q, k)
    padding, padding_strides, ranges, range_stride = _key_padding_view(key_padding, key_ranges, batch, k.shape[2],
                                                                       q.device)
    sinks, sink_strides = _sink_cols_int32(sink_cols, batch, q.device)
    check_policy_tensors(q_heads, beta=beta)
    if beta is not None:
        beta = beta.to(device=q.device, dtype=torch.float32).contiguous()
    table, every_row = _zero_value_table(extra_logits, virtual_sink_logit, q_heads, q.device)
    if softcap is None:
        qk_scale, softcap_log2 = scale * math.log2(math.e), 1.0
    else:
        qk_scale, softcap_log2 = scale / float(softcap), float(softcap) * math.log2(math.e)
    return AttentionLaunch(
        mask=mask, mask_strides=mask_strides, key_padding=padding, key_padding_strides=padding_strides,
        key_ranges=ranges, key_range_stride=range_stride, sink_cols=sinks, sink_strides=sink_strides, beta=beta,
        extra_logits=table, n_extra_every_row=every_row, qk_scale=qk_scale, softcap_log2=softcap_log2,
        window=0 if sliding_window is None else int(sliding_window),
        # triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits
        # (triton-lang/triton#11584, not supported upstream): there, and only there, bf16 tiles are
        # upcast to fp32 before tl.dot (exact products, fp32 accumulation, P still rounded to bf16),
        # which is the arithmetic of the tensor-core path. Compiled kernels never take this branch.
        upcast_dot=is_interpreted(kernel) and q.dtype == torch.bfloat16,
    )


def check_block_sizes(**sizes) -> None:
    """ValueError for a tile-size override (``block_m=``, ``block_n=``; tests, tuning sweeps) that
    is not a power of 2 >= 16: ``tl.arange`` needs a power of 2 and ``tl.dot`` 16 (the decode
    launcher failed deep in the interpreter on block_n=24: "arange's range must be a power of 2")."""
    for name, size in sizes.items():
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 16
                                 or size & (size - 1)):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {size!r}")


def check_sink_stats(sink_stats, q) -> None:
    """The optional statistics output: fp32 (B, Hq, 2), contiguous (the kernels address it as
    ``(b * Hq + h) * 2``, no strides passed), on q's device. The kernels add into it."""
    if sink_stats is None:
        return
    want = (q.shape[0], q.shape[1], 2)
    if (not isinstance(sink_stats, torch.Tensor) or tuple(sink_stats.shape) != want
            or sink_stats.dtype != torch.float32 or not sink_stats.is_contiguous()):
        raise ValueError(f"sink_stats must be a contiguous fp32 tensor of shape (B, Hq, 2) = {want}, got "
                         f"{getattr(sink_stats, 'dtype', type(sink_stats))} {tuple(getattr(sink_stats, 'shape', ()))}")
    if sink_stats.device != q.device:
        raise ValueError(f"sink_stats on {sink_stats.device}, q on {q.device}")


def allocate_outputs(q, out, lse) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Q, D) in q's dtype and lse (B, Hq, Q) fp32; fresh ones unless given. A fresh out
    is a (B, Hq, Q, D) view of (B, Q, Hq, D) memory, so transformers' ``out.transpose(1, 2)`` is
    already contiguous."""
    batch, q_heads, q_len, head_dim = q.shape
    if out is None:
        out = torch.empty(batch, q_len, q_heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} "
                         f"{out.device}")
    if lse is None:
        lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    elif lse.shape != (batch, q_heads, q_len) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be ({batch}, {q_heads}, {q_len}) fp32 on {q.device}, got {tuple(lse.shape)} "
                         f"{lse.dtype}")
    return out, lse


def tma_descriptors(k, v, block_n: int, block_d: int, use_tma: bool | None):
    """(k, v) TensorDescriptors of whole (B, Hkv, K, D) tiles of (1, 1, BLOCK_N, BLOCK_D) for the
    bulk-tensor-copy key loop, or (None, None) for the pointer path. ``use_tma`` None means: on
    Hopper (compute capability 9.x) with 16-bit inputs whenever the tensors allow a descriptor
    (16-byte aligned base and strides, unit last stride); True forces it where they allow it (the
    interpreter runs descriptors too), False never."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if use_tma is False:
        return None, None
    if use_tma is None and not (k.is_cuda and device_arch(k.device) // 10 == 9
                                and k.dtype in (torch.float16, torch.bfloat16)):
        return None, None
    size = k.element_size()
    for t in (k, v):
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:3]):
            if use_tma:
                raise ValueError(f"use_tma=True needs 16-byte aligned k/v with unit last stride, got strides "
                                 f"{t.stride()}")
            return None, None
    block = [1, 1, block_n, block_d]
    return (TensorDescriptor(k, list(k.shape), list(k.stride()), block),
            TensorDescriptor(v, list(v.shape), list(v.stride()), block))
