"""Tiled flash-style forward of sink-aware attention (prefill and chunked prefill).

One program owns BLOCK_M query rows of one (batch, query head) and streams the visible key tiles
with an online softmax of the non-sink keys (``attention_common.attn_key_range``). In the epilogue
the at most NS sink columns are gathered into one extra 16-column key tile (one small q.K_S^T and
one P_S.V_S product), and the two parts are combined with the per-head beta and the zero-value
extra logits (``attention_common.sink_combine``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (
    LOG2E,
    allocate_outputs,
    attn_key_range,
    padded_head_dim,
    prepare_attention_launch,
    sink_combine,
    sink_tile,
    softmax_stats,
)

__all__ = ["PREFILL_CONFIGS", "prefill_config", "sink_attention_prefill"]


# -- kernel ---------------------------------------------------------------------------------------
@triton.jit
def _sink_attn_fwd(
    Q, K, V, Out, Lse, Mask, SinkCols, Beta, ExtraLogits,
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
        sink_ptr = SinkCols + off_b * stride_sz
        offs_s = tl.arange(0, NS_P2)
        sink_cols = tl.load(sink_ptr + offs_s * stride_sn, mask=offs_s < NS, other=-1)
    else:
        sink_ptr = SinkCols
        sink_cols = 0

    # -- non-sink keys this row block can see --
    pos_first = start_m + causal_offset
    pos_last = tl.minimum(start_m + BLOCK_M, q_len) - 1 + causal_offset
    acc, l_i, m_i = attn_key_range(
        q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, mask_rows, stride_mn, row_ok, q_pos,
        sink_cols, 0, k_len, pos_first, pos_last, k_len, window, qk_scale, softcap_log2, offs_n, offs_d,
        BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_MASK=HAS_MASK,
        IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, HAS_SINKS=NS > 0,
        UPCAST_DOT=UPCAST_DOT)

    # -- epilogue: sink tile, policy combine --
    if HAS_BETA:
        beta = tl.load(Beta + off_h).to(tl.float32)
    else:
        beta = 1.0
    if HAS_EXTRA:
        offs_e = tl.arange(0, E_P2)
        extra_logits2 = tl.load(ExtraLogits + off_h * stride_eh + offs_e[None, :] * stride_ee,
                                mask=offs_e[None, :] < n_extra, other=float("-inf")).to(tl.float32) * LOG2E
        every_row = offs_e[None, :] < n_extra_every_row
    else:
        extra_logits2 = 0.0
        every_row = 0
    if NS > 0:
        s_s, v_s = sink_tile(
            q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, mask_rows, stride_mn,
            row_ok, q_pos, sink_ptr, stride_sn, k_len, window, qk_scale, softcap_log2, offs_d,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, NS=NS, SB=SB, HAS_MASK=HAS_MASK, IS_CAUSAL=IS_CAUSAL,
            HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP, UPCAST_DOT=UPCAST_DOT)
        m_s, l_s, p_s = softmax_stats(s_s)
        c_n, c_s, lse = sink_combine(m_i, l_i, m_s, l_s, beta, extra_logits2, every_row, HAS_EXTRA=HAS_EXTRA)
        # the sink weights go into the P.V product directly: no second accumulator
        p_s = (p_s * c_s[:, None]).to(v_s.dtype)
        if UPCAST_DOT:
            p_s = p_s.to(tl.float32)
            v_s = v_s.to(tl.float32)
        out = acc * c_n[:, None] + tl.dot(p_s, v_s, input_precision="ieee")
    else:
        m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
        c_n, c_s, lse = sink_combine(m_i, l_i, m_s, tl.zeros([BLOCK_M], tl.float32), beta, extra_logits2, every_row,
                                     HAS_EXTRA=HAS_EXTRA)
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
    return PREFILL_CONFIGS[(max(64, padded_head_dim(head_dim)), dtype != torch.float32)]


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
    virtual_sink_logit: torch.Tensor | None = None,
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
      beta (Hq,); extra_logits (Hq, E) and virtual_sink_logit (Hq,), copied to fp32 into one
        (Hq, E + 1) table: stride_eh, stride_ee
      out (B, Hq, Q, D) q.dtype: stride_oz, stride_oh, stride_om, stride_ok
      lse (B, Hq, Q) fp32: stride_lz, stride_lh, stride_lm
    Returns (out, lse): lse = log(l_S + l_N) over real keys, -inf (and out = 0) where no key is
    visible. ``block_m`` etc. override the PREFILL_CONFIGS choice (tests, tuning sweeps).
    """
    launch = prepare_attention_launch(
        q, k, v, attn_mask=attn_mask, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
        virtual_sink_logit=virtual_sink_logit, sliding_window=sliding_window, softcap=softcap, scale=scale,
        kernel=_sink_attn_fwd)
    out, lse = allocate_outputs(q, out, lse)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_len == 0 or batch == 0 or q_heads == 0:
        return out, lse
    bm, bn, nw, ns = prefill_config(head_dim, q.dtype)
    block_m, block_n = block_m or bm, block_n or bn
    grid = (triton.cdiv(q_len, block_m), batch * q_heads)
    _sink_attn_fwd[grid](
        q, k, v, out, lse, launch.mask, launch.sink_cols, launch.beta, launch.extra_logits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *launch.mask_strides, *launch.sink_strides, *launch.extra_strides,
        q_heads, q_heads // kv_heads, q_len, k_len, int(causal_offset), launch.window, launch.n_extra,
        launch.n_extra_every_row, launch.qk_scale, launch.softcap_log2,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_head_dim(head_dim),
        **launch.sink_constexprs, E_P2=launch.extra_width,
        HAS_MASK=launch.mask is not None, IS_CAUSAL=bool(causal), HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None, HAS_BETA=launch.beta is not None,
        HAS_EXTRA=launch.extra_logits is not None, UPCAST_DOT=launch.upcast_dot,
        num_warps=num_warps or nw, num_stages=num_stages or ns, enable_fp_fusion=True,
    )
    return out, lse
