"""Tiled flash-style forward of sink-aware attention (prefill and chunked prefill).

One program owns BLOCK_M query rows of one (batch, query head) and streams the visible key tiles
with an online softmax. The sink set S never costs the inner loop more than a column compare: sink
columns are masked out of the running state (m_i, l_i, acc), which therefore holds the non-sink
part N only. In the epilogue the at most NS sink columns are gathered into one extra 16-column key
tile (one small q.K_S^T and one P_S.V_S product), and the two parts are combined with the per-head
beta and the zero-value extra logits by the formula of ``sinkfix/ops/reference.py``. Splitting
first and combining last keeps l_N exact: no l_total - l_S cancellation when the sink takes nearly
all the mass, which is the common case.

Logits are kept in base 2 (scaled by log2(e)) so the loop uses exp2. The helpers above the kernel
are shared with the split-KV decode kernel (attention_decode.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_MAX_SINK_SLOTS = 16


# -- inner-loop helpers ---------------------------------------------------------------------------
@triton.jit
def _logits2(qk, qk_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> base-2 logits. Without softcap qk_scale = scale * log2(e). With softcap
    qk_scale = scale / softcap and softcap_log2 = softcap * log2(e): s = softcap * tanh(qk * scale /
    softcap), tanh written with one exp2 of a non-positive argument so it never overflows."""
    if HAS_SOFTCAP:
        x = qk * qk_scale
        t = tl.math.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|)
        th = (1.0 - t) / (1.0 + t)
        return softcap_log2 * tl.where(x < 0, -th, th)
    else:
        return qk * qk_scale


@triton.jit
def _attn_tiles(
    acc, l_i, m_i,                      # running state of the non-sink keys N
    q,                                  # (BLOCK_M, BLOCK_D) query tile, input dtype
    k_base, v_base,                     # k[b, kvh, 0, 0], v[b, kvh, 0, 0]
    stride_kn, stride_kk, stride_vn, stride_vk,
    mask_rows, stride_mn,               # (BLOCK_M,) pointers to attn_mask[b, h, i, 0]
    row_ok, q_pos,                      # (BLOCK_M,) row < Q; i + causal_offset
    sinks,                              # (NS_P2,) sink columns, -1 = unused slot
    start, end, k_len, window,
    qk_scale, softcap_log2,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Key tiles [start, end) step BLOCK_N. MASKED = False only for tiles that every row sees whole
    (inside the causal/window band and below K) when no dense mask is given: no bounds or rule
    checks there, only the sink column compare."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        # -- load k --
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kk
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        # -- compute qk --
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        qk = _logits2(qk, qk_scale, softcap_log2, HAS_SOFTCAP)
        # -- visibility: rules, dense mask, and the sink columns (handled in the epilogue) --
        if MASKED:
            vis = (cols[None, :] < k_len) & row_ok[:, None]
            if IS_CAUSAL:
                vis = vis & (cols[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                vis = vis & (cols[None, :] > q_pos[:, None] - window)
            if HAS_MASK:
                mvals = tl.load(mask_rows[:, None] + cols[None, :] * stride_mn, mask=vis, other=0)
                vis = vis & (mvals != 0)
            if HAS_SINKS:
                is_sink = tl.max((cols[:, None] == sinks[None, :]).to(tl.int32), axis=1)
                vis = vis & (is_sink == 0)[None, :]
            qk = tl.where(vis, qk, float("-inf"))
        elif HAS_SINKS:
            is_sink = tl.max((cols[:, None] == sinks[None, :]).to(tl.int32), axis=1)
            qk = tl.where((is_sink == 0)[None, :], qk, float("-inf"))
        # -- online softmax update; m_safe keeps rows that have seen nothing at exp2(-inf) = 0 --
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- load v, update acc --
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vk
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(v_ptrs)
        p = p.to(v.dtype)  # P.V runs in the input precision, like every flash forward
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_key_range(
    q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
    mask_rows, stride_mn, row_ok, q_pos, sinks,
    lo, hi,                             # key range this program owns, before the causal/window cut
    pos_first, pos_last,                # causal positions of its first and last query row
    k_len, window, qk_scale, softcap_log2, offs_n, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Online softmax of the non-sink keys in [lo, hi): returns (acc, l_i, m_i) from a fresh state.

    Shared by the prefill kernel (one row block, all keys) and the decode split kernel (all rows,
    one key split). Without a dense mask the range is swept in three passes: leading tiles cut by
    the window, tiles every row sees whole (no rule checks), trailing tiles on the causal diagonal
    and the ragged end of K. A dense mask is read on every tile anyway: one masked pass.
    """
    full_lo = lo
    full_hi = hi
    if IS_CAUSAL:
        hi = tl.minimum(hi, pos_last + 1)
        full_hi = tl.minimum(full_hi, pos_first + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos_first - window + 1)
        full_lo = tl.maximum(full_lo, pos_last - window + 1)
    lo = tl.minimum(lo, k_len) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), hi)
    full_hi = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N, full_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_MASK:
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sinks, lo, hi, k_len, window, qk_scale, softcap_log2,
            offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, True, True, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_SINKS, UPCAST_DOT)
    else:
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sinks, lo, full_lo, k_len, window, qk_scale, softcap_log2,
            offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, True, False, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_SINKS, UPCAST_DOT)
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sinks, full_lo, full_hi, k_len, window, qk_scale,
            softcap_log2, offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, False, False, IS_CAUSAL,
            HAS_WINDOW, HAS_SOFTCAP, HAS_SINKS, UPCAST_DOT)
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sinks, full_hi, hi, k_len, window, qk_scale, softcap_log2,
            offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, True, False, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_SINKS, UPCAST_DOT)
    return acc, l_i, m_i


@triton.jit
def _sink_tile(
    q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
    mask_rows, stride_mn, row_ok, q_pos,
    sink_ptr, stride_sn,                # sink_cols[b, 0]
    k_len, window, qk_scale, softcap_log2, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The sink columns as one gathered key tile of SB >= 16 columns (tl.dot's minimum): returns
    their base-2 logits (BLOCK_M, SB), -inf where not visible, and their values (SB, BLOCK_D).
    Same visibility rules as the loop; unused slots, columns outside [0, K) and a column listed a
    second time are dropped (the reference builds a boolean set)."""
    offs_t = tl.arange(0, SB)
    cols = tl.load(sink_ptr + offs_t * stride_sn, mask=offs_t < NS, other=-1)
    earlier = (cols[:, None] == cols[None, :]) & (offs_t[None, :] < offs_t[:, None])
    dup = tl.max(earlier.to(tl.int32), axis=1)
    fresh = (cols >= 0) & (cols < k_len) & (dup == 0)
    cols = tl.where(fresh, cols, 0)
    kv_mask = fresh[:, None] & (offs_d[None, :] < HEAD_DIM)
    k_s = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kk, mask=kv_mask, other=0.0)
    v_s = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vk, mask=kv_mask, other=0.0)
    if UPCAST_DOT:
        k_s = k_s.to(tl.float32)
    s = _logits2(tl.dot(q, tl.trans(k_s), input_precision="ieee"), qk_scale, softcap_log2, HAS_SOFTCAP)
    vis = fresh[None, :] & row_ok[:, None]
    if IS_CAUSAL:
        vis = vis & (cols[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        vis = vis & (cols[None, :] > q_pos[:, None] - window)
    if HAS_MASK:
        vis = vis & (tl.load(mask_rows[:, None] + cols[None, :] * stride_mn, mask=vis, other=0) != 0)
    return tl.where(vis, s, float("-inf")), v_s


@triton.jit
def _softmax_stats(s):
    """Row max (base 2) and sum of 2^(s - max) of a logit tile; (-inf, 0) for rows with nothing."""
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s - m_safe[:, None])
    return m, tl.sum(p, 1), p


@triton.jit
def _sink_combine(m_n, l_n, m_s, l_s, beta, extra2, every_row, HAS_EXTRA: tl.constexpr):
    """Epilogue of every policy, as coefficients: out = c_n * acc_N + c_s * acc_S where acc_N, l_N
    are relative to m_n and acc_S, l_S to m_s (base-2 maxima; extra2 = zero-value logits in base 2,
    -inf unused, shape (rows or 1, E_P2); ``every_row`` (1, E_P2) marks the ones every row counts
    (s_aux); the others (the virtual sink logit) count only where l_N > 0). Returns (c_n, c_s, lse
    in natural log).

        Z = l_S + l_N + sum_e 2^extra2_e        (rescaled to the shared max m)
        o = beta * acc_S / Z + (acc_N / l_N) * (l_N + (1 - beta) l_S) / Z    if l_N > 0
        o = acc_S / Z                                                        otherwise

    Each l is >= 1 when nonzero (its own max contributes 2^0), so 1 / l_N cannot overflow;
    (l_N + (1 - beta) l_S) / Z <= 1, and Z overflowing (a huge extra logit) correctly gives 0.
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
        z = z + tl.sum(tl.where(counted, tl.math.exp2(extra2 - m_safe[:, None]), 0.0), 1)
    inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
    b = tl.where(has_n, beta, 1.0)  # rows that see only the sink stay untouched
    c_n = tl.where(has_n, (ln + (1.0 - b) * ls) * inv_z / tl.where(has_n, l_n, 1.0), 0.0)
    c_s = b * a_s * inv_z
    l_tot = ln + ls
    lse = tl.where(l_tot > 0, (m_safe + tl.math.log2(tl.where(l_tot > 0, l_tot, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    return c_n, c_s, lse


# -- kernel ---------------------------------------------------------------------------------------
@triton.jit
def _sink_attn_fwd(
    Q, K, V, Out, Lse, Mask, Sinks, Beta, Extra,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_lz, stride_lh, stride_lm,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_sz, stride_sn,
    stride_eh, stride_ee,
    num_heads, group, q_len, k_len, causal_offset, window, n_extra, n_extra_every_row,
    qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NS: tl.constexpr, NS_P2: tl.constexpr, SB: tl.constexpr, E_P2: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_BETA: tl.constexpr, HAS_EXTRA: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    off_kvh = off_h // group  # GQA by index arithmetic, never a repeated k/v

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q_pos = offs_m + causal_offset

    q_ptrs = Q + off_b * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kz + off_kvh * stride_kh
    v_base = V + off_b * stride_vz + off_kvh * stride_vh
    # absent optional tensors arrive as None: only touch them under their flag
    if HAS_MASK:
        # int64 rows: a dense (Q, K) mask passes 2**31 elements at Q = K = 46k
        mask_rows = Mask + off_b * stride_mz + off_h * stride_mh + offs_m.to(tl.int64) * stride_mm
    else:
        mask_rows = Mask
    if NS > 0:
        sink_ptr = Sinks + off_b * stride_sz
        offs_s = tl.arange(0, NS_P2)
        sinks = tl.load(sink_ptr + offs_s * stride_sn, mask=offs_s < NS, other=-1)
    else:
        sink_ptr = Sinks
        sinks = 0

    # -- non-sink keys this row block can see --
    pos_first = start_m + causal_offset
    pos_last = tl.minimum(start_m + BLOCK_M, q_len) - 1 + causal_offset
    acc, l_i, m_i = _attn_key_range(
        q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, mask_rows, stride_mn, row_ok, q_pos,
        sinks, 0, k_len, pos_first, pos_last, k_len, window, qk_scale, softcap_log2, offs_n, offs_d,
        BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, NS > 0, UPCAST_DOT)

    # -- epilogue: sink tile, policy combine --
    if HAS_BETA:
        beta = tl.load(Beta + off_h).to(tl.float32)
    else:
        beta = 1.0
    if HAS_EXTRA:
        offs_e = tl.arange(0, E_P2)
        extra2 = tl.load(Extra + off_h * stride_eh + offs_e[None, :] * stride_ee,
                         mask=offs_e[None, :] < n_extra, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        every_row = offs_e[None, :] < n_extra_every_row
    else:
        extra2 = 0.0
        every_row = 0
    if NS > 0:
        s_s, v_s = _sink_tile(
            q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, mask_rows, stride_mn,
            row_ok, q_pos, sink_ptr, stride_sn, k_len, window, qk_scale, softcap_log2, offs_d,
            HEAD_DIM, BLOCK_D, NS, SB, HAS_MASK, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST_DOT)
        m_s, l_s, p_s = _softmax_stats(s_s)
        c_n, c_s, lse = _sink_combine(m_i, l_i, m_s, l_s, beta, extra2, every_row, HAS_EXTRA)
        # the sink weights go into the P.V product directly: no second accumulator
        p_s = (p_s * c_s[:, None]).to(v_s.dtype)
        if UPCAST_DOT:
            p_s = p_s.to(tl.float32)
            v_s = v_s.to(tl.float32)
        out = acc * c_n[:, None] + tl.dot(p_s, v_s, input_precision="ieee")
    else:
        m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
        c_n, c_s, lse = _sink_combine(m_i, l_i, m_s, tl.zeros([BLOCK_M], tl.float32), beta, extra2, every_row,
                                      HAS_EXTRA)
        out = acc * c_n[:, None]

    o_ptrs = Out + off_b * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + off_b * stride_lz + off_h * stride_lh + offs_m * stride_lm, lse, mask=row_ok)


# -- launcher -------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim and input width. Starting points
# taken from the shapes that published flash-attention forwards in Triton use on A100/H100 (128-row
# query tiles, 64-key tiles, 8 warps from hd 128 up), then shrunk until the AOT compile for sm_80
# and sm_90 fits shared memory with headroom (numbers in benchmarks/RESULTS.md). Not tuned on a GPU
# yet: ``benchmarks/bench_attention.py --sweep`` times a grid of tile shapes around the bf16 entries.
# A fixed table rather than triton.autotune: no tuning pause at the first forward of every new
# shape inside a model, and the same tiles (so the same rounding) on every run.
PREFILL_CONFIGS = {
    # (BLOCK_D rounded up to 64, 16-bit input?): (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (64, True): (128, 64, 4, 3),
    (128, True): (128, 64, 8, 3),
    (256, True): (64, 32, 4, 2),
    # fp32 tiles are twice as wide in shared memory and use the slower ieee dot: halve the tiles
    (64, False): (64, 32, 4, 2),
    (128, False): (64, 32, 4, 2),
    (256, False): (32, 32, 4, 2),
}


def prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) that the launcher uses for this head dim and dtype."""
    return PREFILL_CONFIGS[(max(64, _block_d(head_dim)), dtype != torch.float32)]


def _is_interpreted(kernel) -> bool:
    """True when triton decorated this kernel for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; non-power-of-2 head dims run padded with masked loads
    return max(16, triton.next_power_of_2(head_dim))


def _prepare(q, k, v, attn_mask, sink_cols, beta, extra_logits, virtual_logit, sliding_window, softcap, scale,
             kernel):
    """Validate the arguments shared by the prefill and decode launchers; normalise the small
    side tensors (int32 sink columns, fp32 beta; extra logits and the virtual logit as one fp32
    (Hq, E) table whose first ``n_extra_every_row`` columns every row counts) and the mask's
    broadcast strides."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = q.device
    if k.device != device or v.device != device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if _is_interpreted(kernel):
        if device.type != "cpu":
            raise ValueError("the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only")
    elif device.type != "cuda":
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import), got {device}")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    kv_heads, k_len = k.shape[1], k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} not a multiple of kv heads {kv_heads}")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} not supported (1..{_MAX_HEAD_DIM})")
    # batch and head offsets are int64 in the kernels, offsets inside one head's (S, D) are int32
    for name, t in (("q", q), ("k", k), ("v", v)):
        if (t.shape[2] - 1) * abs(t.stride(2)) + (head_dim - 1) * abs(t.stride(3)) >= 2 ** 31:
            raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()}: one head spans more than "
                             "2**31 elements, beyond the kernels' int32 in-head offsets")
    if sliding_window is not None and int(sliding_window) != sliding_window:
        raise ValueError(f"sliding_window must be an int, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, got {softcap!r}")
    scale = head_dim ** -0.5 if scale is None else float(scale)

    mask, mask_strides = None, (0, 0, 0, 0)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be bool (True = attend), got {attn_mask.dtype}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask on {attn_mask.device}, q on {device}")
        want = (batch, q_heads, q_len, k_len)
        if attn_mask.dim() != 4 or any(s not in (1, w) for s, w in zip(attn_mask.shape, want)):
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to (B, 1|Hq, Q, K) = {want}")
        mask = attn_mask.view(torch.uint8)  # same bytes; triton reads it as 0/1
        # a broadcast dimension is read with stride 0 whatever stride torch keeps for a size-1 dim
        mask_strides = tuple(0 if s == 1 else st for s, st in zip(attn_mask.shape, attn_mask.stride()))

    sinks, n_sinks = None, 0
    if sink_cols is not None:
        if sink_cols.dtype.is_floating_point or sink_cols.dtype == torch.bool or sink_cols.dim() != 2:
            raise ValueError(f"sink_cols must be an integer (B, NS) tensor, got {sink_cols.dtype} "
                             f"{tuple(sink_cols.shape)}")
        if sink_cols.shape[0] not in (1, batch):
            raise ValueError(f"sink_cols batch {sink_cols.shape[0]} does not match q batch {batch}")
        if sink_cols.shape[1] > _MAX_SINK_SLOTS:
            raise ValueError(f"at most {_MAX_SINK_SLOTS} sink slots, got {sink_cols.shape[1]}")
        n_sinks = sink_cols.shape[1]
        if n_sinks:
            # a column index >= 2**31 cannot be a key column of a supported K; clamp before int32
            sinks = sink_cols.to(device=device).clamp(-1, 2**31 - 1).to(torch.int32).contiguous()
    sink_strides = (0 if sinks is None or sinks.shape[0] == 1 else sinks.stride(0), 1)

    if beta is not None:
        if beta.shape != (q_heads,):
            raise ValueError(f"beta must have shape (Hq,) = ({q_heads},), got {tuple(beta.shape)}")
        beta = beta.to(device=device, dtype=torch.float32).contiguous()
    zero_value = []
    if extra_logits is not None:
        if extra_logits.dim() != 2 or extra_logits.shape[0] != q_heads:
            raise ValueError(f"extra_logits must have shape (Hq, E) = ({q_heads}, E), got {tuple(extra_logits.shape)}")
        zero_value.append(extra_logits.to(device=device, dtype=torch.float32))
    n_extra_every_row = zero_value[0].shape[1] if zero_value else 0
    if virtual_logit is not None:
        if virtual_logit.shape != (q_heads,):
            raise ValueError(f"virtual_logit must have shape (Hq,) = ({q_heads},), got {tuple(virtual_logit.shape)}")
        zero_value.append(virtual_logit.to(device=device, dtype=torch.float32)[:, None])
    extra = torch.cat(zero_value, dim=1).contiguous() if zero_value else None
    n_extra = 0 if extra is None else extra.shape[1]
    if not n_extra:
        extra = None

    if softcap is None:
        qk_scale, softcap_log2 = scale * math.log2(math.e), 1.0
    else:
        qk_scale, softcap_log2 = scale / float(softcap), float(softcap) * math.log2(math.e)
    return dict(
        mask=mask, mask_strides=mask_strides, sinks=sinks, n_sinks=n_sinks, sink_strides=sink_strides,
        beta=beta, extra=extra, n_extra=n_extra, n_extra_every_row=n_extra_every_row, qk_scale=qk_scale,
        softcap_log2=softcap_log2,
        window=0 if sliding_window is None else int(sliding_window),
        # triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits
        # (triton-lang/triton#11584, not supported upstream): there, and only there, bf16 tiles are
        # upcast to fp32 before tl.dot (exact products, fp32 accumulation, P still rounded to bf16),
        # which is the arithmetic of the tensor-core path. Compiled kernels never take this branch.
        upcast_dot=_is_interpreted(kernel) and q.dtype == torch.bfloat16,
    )


def _outputs(q, out, lse):
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


def sink_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_cols: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    extra_logits: torch.Tensor | None = None,
    virtual_logit: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink-aware attention forward, same semantics as ``reference_sink_attention``.

    Shape contract (any strides; nothing is copied except the small side tensors):
      q (B, Hq, Q, D): strides stride_qz, stride_qh, stride_qm, stride_qk
      k, v (B, Hkv, K, D): stride_kz, stride_kh, stride_kn, stride_kk (v likewise), Hq % Hkv == 0
      attn_mask bool, broadcastable to (B, 1|Hq, Q, K): stride_mz, stride_mh, stride_mm, stride_mn
        (0 on broadcast dims), read as uint8 through a view
      sink_cols (B|1, NS) integer, -1 = unused, copied to int32: stride_sz, stride_sn
      beta (Hq,); extra_logits (Hq, E) and virtual_logit (Hq,), copied to fp32 into one (Hq, E + 1)
        table: stride_eh, stride_ee
      out (B, Hq, Q, D) q.dtype: stride_oz, stride_oh, stride_om, stride_ok
      lse (B, Hq, Q) fp32: stride_lz, stride_lh, stride_lm
    Returns (out, lse): lse = log(l_S + l_N) over real keys, -inf (and out = 0) where no key is
    visible. ``block_m`` etc. override the PREFILL_CONFIGS choice (tests, tuning sweeps).
    """
    meta = _prepare(q, k, v, attn_mask, sink_cols, beta, extra_logits, virtual_logit, sliding_window, softcap,
                    scale, _sink_attn_fwd)
    out, lse = _outputs(q, out, lse)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_len == 0 or batch == 0 or q_heads == 0:
        return out, lse
    block_d = _block_d(head_dim)
    bm, bn, nw, ns = prefill_config(head_dim, q.dtype)
    block_m, block_n = block_m or bm, block_n or bn
    num_warps, num_stages = num_warps or nw, num_stages or ns
    sm = meta["mask_strides"]
    grid = (triton.cdiv(q_len, block_m), batch * q_heads)
    _sink_attn_fwd[grid](
        q, k, v, out, lse, meta["mask"], meta["sinks"], meta["beta"], meta["extra"],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *sm, *meta["sink_strides"],
        *(meta["extra"].stride() if meta["extra"] is not None else (0, 0)),
        q_heads, q_heads // kv_heads, q_len, k_len, int(causal_offset), meta["window"], meta["n_extra"],
        meta["n_extra_every_row"], meta["qk_scale"], meta["softcap_log2"],
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        NS=meta["n_sinks"], NS_P2=triton.next_power_of_2(max(meta["n_sinks"], 1)),
        SB=max(16, triton.next_power_of_2(meta["n_sinks"])),
        E_P2=triton.next_power_of_2(max(meta["n_extra"], 1)),
        HAS_MASK=meta["mask"] is not None, IS_CAUSAL=bool(causal), HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None, HAS_BETA=meta["beta"] is not None,
        HAS_EXTRA=meta["extra"] is not None, UPCAST_DOT=meta["upcast_dot"],
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
    )
    return out, lse
