"""What the prefill and the split-KV decode kernels share: named constants, the jit helpers of the
key loop and of the policy epilogue, and the launch preparation both launchers run.

Logits are kept in base 2 (scaled by log2(e)) so every exponential is one ``exp2``. The sink set S
never costs the key loop more than a column compare: sink columns are masked out of the running
state (m_i, l_i, acc), which therefore holds the non-sink part N only. The at most NS sink columns
are gathered into one extra key tile afterwards, and the two parts are combined with the per-head
beta and the zero-value extra logits by the formula of ``docs/formulas.md``. Splitting first and
combining last keeps l_N exact: no l_total - l_S cancellation when the sink takes nearly all the
mass, which is the common case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "LOG2E", "LN2", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "MAX_SINK_SLOTS", "AttentionLaunch", "prepare_attention_launch",
    "allocate_outputs", "padded_head_dim", "is_interpreted",
    "base2_logits", "load_key_tile", "attn_tiles", "attn_key_range", "sink_tile", "softmax_stats", "sink_combine",
]

# exp(x) = exp2(x * LOG2E); ln(x) = log2(x) * LN2. Module-level constants read inside @triton.jit
# functions must be tl.constexpr instances (an annotation is not enough for the compiler, although
# the interpreter accepts it).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# exp(-2|x|) = exp2(|x| * MINUS_2_LOG2E): the one transcendental of a softcap's tanh
MINUS_2_LOG2E = tl.constexpr(-2.8853900817779268)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SINK_SLOTS = 16
# tl.dot's smallest operand dimension: the sink columns are gathered into a tile at least this wide
MIN_DOT_DIM = 16


# -- key-loop helpers -----------------------------------------------------------------------------
@triton.jit
def base2_logits(qk, qk_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> base-2 logits. Without softcap qk_scale = scale * log2(e). With softcap
    qk_scale = scale / softcap and softcap_log2 = softcap * log2(e): s = softcap * tanh(qk * scale /
    softcap), tanh written with one exp2 of a non-positive argument so it never overflows."""
    if HAS_SOFTCAP:
        x = qk * qk_scale
        t = tl.math.exp2(tl.abs(x) * MINUS_2_LOG2E)  # exp(-2|x|)
        th = (1.0 - t) / (1.0 + t)
        return softcap_log2 * tl.where(x < 0, -th, th)
    else:
        return qk * qk_scale


@triton.jit
def load_key_tile(ptrs, cols, k_len, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of k or v at key columns ``cols``. Bounds are checked only where
    needed: the key axis in MASKED tiles, the head dim when it is padded."""
    if MASKED:
        return tl.load(ptrs, mask=(cols[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def attn_tiles(
    acc, l_i, m_i,                      # running state of the non-sink keys N
    q,                                  # (BLOCK_M, BLOCK_D) query tile, input dtype
    k_base, v_base,                     # k[b, kvh, 0, 0], v[b, kvh, 0, 0]
    stride_kn, stride_kk, stride_vn, stride_vk,
    mask_rows, stride_mn,               # (BLOCK_M,) pointers to attn_mask[b, h, i, 0]
    row_ok, q_pos,                      # (BLOCK_M,) row < Q; i + causal_offset
    sink_cols,                          # (NS_P2,) sink columns, -1 = unused slot
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
        k = load_key_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kk, cols, k_len, offs_d,
                          HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASKED=MASKED)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        # -- compute qk --
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        qk = base2_logits(qk, qk_scale, softcap_log2, HAS_SOFTCAP=HAS_SOFTCAP)
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
                is_sink = tl.max((cols[:, None] == sink_cols[None, :]).to(tl.int32), axis=1)
                vis = vis & (is_sink == 0)[None, :]
            qk = tl.where(vis, qk, float("-inf"))
        elif HAS_SINKS:
            is_sink = tl.max((cols[:, None] == sink_cols[None, :]).to(tl.int32), axis=1)
            qk = tl.where((is_sink == 0)[None, :], qk, float("-inf"))
        # -- online softmax update; m_safe keeps rows that have seen nothing at exp2(-inf) = 0 --
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- load v, update acc --
        v = load_key_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vk, cols, k_len, offs_d,
                          HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASKED=MASKED)
        p = p.to(v.dtype)  # P.V runs in the input precision, like every flash forward
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_key_range(
    q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
    mask_rows, stride_mn, row_ok, q_pos, sink_cols,
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
        acc, l_i, m_i = attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sink_cols, lo, hi, k_len, window, qk_scale, softcap_log2,
            offs_n, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=True, HAS_MASK=True,
            IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, HAS_SINKS=HAS_SINKS,
            UPCAST_DOT=UPCAST_DOT)
    else:
        # leading tiles cut by the window
        acc, l_i, m_i = attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sink_cols, lo, full_lo, k_len, window, qk_scale, softcap_log2,
            offs_n, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=True, HAS_MASK=False,
            IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, HAS_SINKS=HAS_SINKS,
            UPCAST_DOT=UPCAST_DOT)
        # tiles every row sees whole: no rule checks
        acc, l_i, m_i = attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sink_cols, full_lo, full_hi, k_len, window, qk_scale,
            softcap_log2, offs_n, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=False,
            HAS_MASK=False, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP,
            HAS_SINKS=HAS_SINKS, UPCAST_DOT=UPCAST_DOT)
        # the causal diagonal and the ragged end of K
        acc, l_i, m_i = attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
            mask_rows, stride_mn, row_ok, q_pos, sink_cols, full_hi, hi, k_len, window, qk_scale, softcap_log2,
            offs_n, offs_d, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=True, HAS_MASK=False,
            IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, HAS_SINKS=HAS_SINKS,
            UPCAST_DOT=UPCAST_DOT)
    return acc, l_i, m_i


# -- epilogue helpers -----------------------------------------------------------------------------
@triton.jit
def sink_tile(
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
    s = base2_logits(tl.dot(q, tl.trans(k_s), input_precision="ieee"), qk_scale, softcap_log2,
                     HAS_SOFTCAP=HAS_SOFTCAP)
    vis = fresh[None, :] & row_ok[:, None]
    if IS_CAUSAL:
        vis = vis & (cols[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        vis = vis & (cols[None, :] > q_pos[:, None] - window)
    if HAS_MASK:
        vis = vis & (tl.load(mask_rows[:, None] + cols[None, :] * stride_mn, mask=vis, other=0) != 0)
    return tl.where(vis, s, float("-inf")), v_s


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
    c_s, lse in natural log).

        Z = l_S + l_N + sum_e 2^extra_logits2_e        (rescaled to the shared max m)
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
        z = z + tl.sum(tl.where(counted, tl.math.exp2(extra_logits2 - m_safe[:, None]), 0.0), 1)
    inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
    b = tl.where(has_n, beta, 1.0)  # rows that see only the sink stay untouched
    c_n = tl.where(has_n, (ln + (1.0 - b) * ls) * inv_z / tl.where(has_n, l_n, 1.0), 0.0)
    c_s = b * a_s * inv_z
    l_tot = ln + ls
    lse = tl.where(l_tot > 0, (m_safe + tl.math.log2(tl.where(l_tot > 0, l_tot, 1.0))) * LN2, float("-inf"))
    return c_n, c_s, lse


# -- launch preparation ---------------------------------------------------------------------------
def is_interpreted(kernel) -> bool:
    """True when triton decorated this kernel for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: tl.dot needs every dimension >= 16; non-power-of-2 head dims run padded with masked loads."""
    return max(MIN_DOT_DIM, triton.next_power_of_2(head_dim))


@dataclass(frozen=True)
class AttentionLaunch:
    """The normalised side arguments of one attention launch (what both launchers pass on).

    ``mask`` is the bool mask viewed as uint8 with its broadcast strides (0 on size-1 dims);
    ``sink_cols`` int32 (B|1, NS); ``beta`` fp32 (Hq,); ``extra_logits`` one fp32 (Hq, E) table of
    zero-value logits whose first ``n_extra_every_row`` columns count in every row (the model's
    s_aux) and the rest (the virtual sink logit) only in rows that see a non-sink key.
    """

    mask: torch.Tensor | None
    mask_strides: tuple[int, int, int, int]
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
        return dict(NS=ns, NS_P2=triton.next_power_of_2(max(ns, 1)), SB=max(MIN_DOT_DIM, triton.next_power_of_2(ns)))

    @property
    def extra_width(self) -> int:
        """E_P2: the zero-value logit table padded to a power of 2."""
        return triton.next_power_of_2(max(self.n_extra, 1))


def _check_qkv(q, k, v, kernel) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = q.device
    if k.device != device or v.device != device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if is_interpreted(kernel):
        if device.type != "cpu":
            raise ValueError("the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only")
    elif device.type != "cuda":
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import), got {device}")
    batch, q_heads, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} not a multiple of kv heads {kv_heads}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} not supported (1..{MAX_HEAD_DIM})")
    # batch and head offsets are int64 in the kernels, offsets inside one head's (S, D) are int32
    for name, t in (("q", q), ("k", k), ("v", v)):
        if (t.shape[2] - 1) * abs(t.stride(2)) + (head_dim - 1) * abs(t.stride(3)) >= 2 ** 31:
            raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()}: one head spans more than "
                             "2**31 elements, beyond the kernels' int32 in-head offsets")


def _mask_view(attn_mask, q, k) -> tuple[torch.Tensor | None, tuple[int, int, int, int]]:
    if attn_mask is None:
        return None, (0, 0, 0, 0)
    batch, q_heads, q_len, _ = q.shape
    want = (batch, q_heads, q_len, k.shape[2])
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be bool (True = attend), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask on {attn_mask.device}, q on {q.device}")
    if attn_mask.dim() != 4 or any(s not in (1, w) for s, w in zip(attn_mask.shape, want)):
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to (B, 1|Hq, Q, K) = {want}")
    # same bytes, read as 0/1; a broadcast dimension is read with stride 0 whatever stride torch
    # keeps for a size-1 dim
    strides = tuple(0 if s == 1 else st for s, st in zip(attn_mask.shape, attn_mask.stride()))
    return attn_mask.view(torch.uint8), strides


def _sink_cols_int32(sink_cols, batch: int, device) -> tuple[torch.Tensor | None, tuple[int, int]]:
    if sink_cols is None:
        return None, (0, 1)
    if sink_cols.dtype.is_floating_point or sink_cols.dtype == torch.bool or sink_cols.dim() != 2:
        raise ValueError(f"sink_cols must be an integer (B, NS) tensor, got {sink_cols.dtype} {tuple(sink_cols.shape)}")
    if sink_cols.shape[0] not in (1, batch):
        raise ValueError(f"sink_cols batch {sink_cols.shape[0]} does not match q batch {batch}")
    if sink_cols.shape[1] > MAX_SINK_SLOTS:
        raise ValueError(f"at most {MAX_SINK_SLOTS} sink slots, got {sink_cols.shape[1]}")
    if sink_cols.shape[1] == 0:
        return None, (0, 1)
    # a column index >= 2**31 cannot be a key column of a supported K; clamp before int32
    cols = sink_cols.to(device=device).clamp(-1, 2**31 - 1).to(torch.int32).contiguous()
    return cols, (0 if cols.shape[0] == 1 else cols.stride(0), 1)


def _zero_value_table(extra_logits, virtual_sink_logit, q_heads: int, device) -> tuple[torch.Tensor | None, int]:
    """One fp32 (Hq, E) table: the every-row logits first, then the virtual sink logit."""
    columns = []
    if extra_logits is not None:
        if extra_logits.dim() != 2 or extra_logits.shape[0] != q_heads:
            raise ValueError(f"extra_logits must have shape (Hq, E) = ({q_heads}, E), got {tuple(extra_logits.shape)}")
        columns.append(extra_logits.to(device=device, dtype=torch.float32))
    every_row = columns[0].shape[1] if columns else 0
    if virtual_sink_logit is not None:
        if virtual_sink_logit.shape != (q_heads,):
            raise ValueError(f"virtual_sink_logit must have shape (Hq,) = ({q_heads},), got "
                             f"{tuple(virtual_sink_logit.shape)}")
        columns.append(virtual_sink_logit.to(device=device, dtype=torch.float32)[:, None])
    table = torch.cat(columns, dim=1).contiguous() if columns else None
    if table is not None and table.shape[1] == 0:
        table = None
    return table, every_row


def prepare_attention_launch(q, k, v, *, attn_mask, sink_cols, beta, extra_logits, virtual_sink_logit,
                             sliding_window, softcap, scale, kernel) -> AttentionLaunch:
    """Validate the arguments shared by the prefill and decode launchers and normalise the small
    side tensors (see :class:`AttentionLaunch`). ``kernel`` tells whether this process interprets."""
    _check_qkv(q, k, v, kernel)
    batch, q_heads, _, head_dim = q.shape
    if sliding_window is not None and int(sliding_window) != sliding_window:
        raise ValueError(f"sliding_window must be an int, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, got {softcap!r}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    mask, mask_strides = _mask_view(attn_mask, q, k)
    sinks, sink_strides = _sink_cols_int32(sink_cols, batch, q.device)
    if beta is not None:
        if beta.shape != (q_heads,):
            raise ValueError(f"beta must have shape (Hq,) = ({q_heads},), got {tuple(beta.shape)}")
        beta = beta.to(device=q.device, dtype=torch.float32).contiguous()
    table, every_row = _zero_value_table(extra_logits, virtual_sink_logit, q_heads, q.device)
    if softcap is None:
        qk_scale, softcap_log2 = scale * math.log2(math.e), 1.0
    else:
        qk_scale, softcap_log2 = scale / float(softcap), float(softcap) * math.log2(math.e)
    return AttentionLaunch(
        mask=mask, mask_strides=mask_strides, sink_cols=sinks, sink_strides=sink_strides, beta=beta,
        extra_logits=table, n_extra_every_row=every_row, qk_scale=qk_scale, softcap_log2=softcap_log2,
        window=0 if sliding_window is None else int(sliding_window),
        # triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits
        # (triton-lang/triton#11584, not supported upstream): there, and only there, bf16 tiles are
        # upcast to fp32 before tl.dot (exact products, fp32 accumulation, P still rounded to bf16),
        # which is the arithmetic of the tensor-core path. Compiled kernels never take this branch.
        upcast_dot=is_interpreted(kernel) and q.dtype == torch.bfloat16,
    )


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
