"""Tiled flash-style forward of sink-aware attention (prefill and chunked prefill).

One program owns BLOCK_M query rows of one (batch, query head). Before the key loop it scores the
at most NS sink columns as one gathered key tile (one small q.K_S^T product); then it streams the
visible key tiles with an online softmax of the non-sink keys (``attention_common.attn_key_range``:
an unmasked main loop and a masked edge loop); in the epilogue it combines both parts with the
per-head beta and the zero-value extra logits (``attention_common.sink_combine``) and adds the
sink values as NS rank-1 updates. On Hopper the key loop reads k and v with bulk tensor copies.

Compile-time variants, each off by default (the others compile to the same code): HAS_STATS adds
the telemetry sums; HAS_HIDDEN (content-dependent sinks) splits the key loop's state by a
per-(batch, head) hidden-sink byte mask and applies ``attention_common.hidden_combine``, with its
own tiles (HIDDEN_CONFIGS: a second accumulator); LSE_ONLY stores the row lse alone (no v read,
no P.V), the stock pass that the column-mass kernel (``column_mass.py``) needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arguments import causal_offset_arg, check_hidden_beta, check_hidden_mask
from .attention_common import (
    cdiv,
    LOG2E,
    allocate_outputs,
    arch_family,
    check_sink_stats,
    attn_key_range,
    device_arch,
    hidden_combine,
    padded_head_dim,
    prepare_attention_launch,
    add_sink_values,
    check_block_sizes,
    sink_combine,
    sink_scores,
    softmax_stats,
    tma_descriptors,
)

__all__ = ["PREFILL_CONFIGS", "POINTER_FALLBACK_CONFIGS", "HIDDEN_CONFIGS", "prefill_config", "sink_attention_prefill"]


# -- kernel ---------------------------------------------------------------------------------------
@triton.jit
def _sink_attn_fwd(
    Q, K, V, Out, Lse, Mask, KeyOk, KeyRanges, SinkCols, Beta, ExtraLogits, KDesc, VDesc, SinkStats, Hidden,
    HiddenBeta,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_lz, stride_lh, stride_lm,
    stride_mz, stride_mh, stride_mm,
    stride_pz, stride_pn,
    stride_rz,
    stride_sz, stride_sn,
    stride_eh, stride_ee,
    num_heads, group, q_len, k_len, causal_offset, window, n_extra, n_extra_every_row,
    qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NS: tl.constexpr, NS_P2: tl.constexpr, SB: tl.constexpr, E_P2: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KEY_RANGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_BETA: tl.constexpr, HAS_EXTRA: tl.constexpr,
    UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr, HAS_STATS: tl.constexpr, HAS_HIDDEN: tl.constexpr,
    LSE_ONLY: tl.constexpr,
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
        # int64 row offsets: a long prompt's packed (Q, K / 32) mask can pass 2**31 words
        mask_rows = Mask + off_b * stride_mz + off_h * stride_mh + offs_m.to(tl.int64) * stride_mm
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
    if HAS_HIDDEN:  # content-dependent sinks: a contiguous (B, Hq, K) byte mask, one row per (b, h)
        hidden_row = Hidden + (off_b * num_heads + off_h) * k_len
    else:
        hidden_row = Hidden

    # -- the sink columns first, from a second load of the q tile (another cache policy, so the
    # two loads stay apart): this one dies here, the first reaches the key loop through shared
    # memory. Sharing one q between the sink tile's dot and the loop's kept q in registers through
    # the whole loop (hd 128 on sm_80: 255 registers instead of 180) --
    if NS > 0:
        q_sink = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0, cache_modifier=".cg")
        if UPCAST_DOT:
            q_sink = q_sink.to(tl.float32)
        s_s = sink_scores(
            q_sink, k_base, stride_kn, stride_kk, mask_rows, row_ok, q_pos, key_ok_row, stride_pn, sink_ptr,
            stride_sn, k_len, window, qk_scale, softcap_log2, offs_d, HEAD_DIM=HEAD_DIM, NS=NS, SB=SB,
            HAS_MASK=HAS_MASK, HAS_KEY_RANGE=HAS_KEY_RANGE, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW,
            HAS_SOFTCAP=HAS_SOFTCAP, UPCAST_DOT=UPCAST_DOT)

    # -- non-sink keys this row block can see --
    pos_first = start_m + causal_offset
    pos_last = tl.minimum(start_m + BLOCK_M, q_len) - 1 + causal_offset
    acc, l_i, m_i, acc_h, l_h, m_h = attn_key_range(
        q, KDesc, VDesc, k_base, v_base, off_b, off_kvh, stride_kn, stride_kk, stride_vn, stride_vk,
        mask_rows, row_ok, q_pos, key_ok_row, stride_pn, key_range_ptr, sink_ptr, stride_sn,
        0, k_len, pos_first, pos_last, k_len, window, qk_scale, softcap_log2, offs_n, offs_d, hidden_row,
        BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_MASK=HAS_MASK,
        HAS_KEY_RANGE=HAS_KEY_RANGE, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP,
        NS=NS, NS_P2=NS_P2, UPCAST_DOT=UPCAST_DOT, USE_TMA=USE_TMA, HAS_HIDDEN=HAS_HIDDEN, LSE_ONLY=LSE_ONLY)

    # -- epilogue: policy combine --
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
    if HAS_HIDDEN:
        # content-dependent sinks: N and H each under the loop's max of its own; S is the gathered sink tile
        beta_h = tl.load(HiddenBeta + off_h).to(tl.float32)
        if NS > 0:
            m_s, l_s, p_s = softmax_stats(s_s)
        else:
            m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_s = tl.zeros([BLOCK_M], tl.float32)
        c_n, c_h, c_s, lse = hidden_combine(m_i, l_i, m_h, l_h, m_s, l_s, beta, beta_h, extra_logits2, every_row,
                                            HAS_EXTRA=HAS_EXTRA)
        out = acc * c_n[:, None] + acc_h * c_h[:, None]
        if NS > 0:
            out = add_sink_values(out, p_s * c_s[:, None], v_base, stride_vn, stride_vk, sink_ptr, stride_sn, k_len,
                                  offs_d, HEAD_DIM=HEAD_DIM, NS=NS, SB=SB)
    elif NS > 0:
        m_s, l_s, p_s = softmax_stats(s_s)
        c_n, c_s, lse, sink_mass = sink_combine(m_i, l_i, m_s, l_s, beta, extra_logits2, every_row,
                                                HAS_EXTRA=HAS_EXTRA)
        # the sink weights go straight into the output: no second accumulator
        out = add_sink_values(acc * c_n[:, None], p_s * c_s[:, None], v_base, stride_vn, stride_vk, sink_ptr,
                              stride_sn, k_len, offs_d, HEAD_DIM=HEAD_DIM, NS=NS, SB=SB)
    else:
        m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
        c_n, c_s, lse, sink_mass = sink_combine(m_i, l_i, m_s, tl.zeros([BLOCK_M], tl.float32), beta, extra_logits2,
                                                every_row, HAS_EXTRA=HAS_EXTRA)
        out = acc * c_n[:, None]

    if not LSE_ONLY:  # (the row lse alone: Out is None)
        o_ptrs = Out + off_b * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + off_b * stride_lz + off_h * stride_lh + offs_m * stride_lm, lse, mask=row_ok)
    if HAS_STATS:
        # telemetry (docs/monitoring.md): the tile's rows that see a non-sink key (l_N > 0; rows
        # past Q are not rows) and their stock sink mass, summed in registers after the output tile
        # is stored, then one atomic add of the pair (mass, rows) into sink_stats[b, h] per program
        counted = row_ok & (l_i > 0)
        pair = tl.arange(0, 2)
        tile_mass = tl.sum(tl.where(counted, sink_mass, 0.0), 0)
        tile_sums = tl.where(pair == 0, tile_mass, tl.sum(counted.to(tl.float32), 0))
        tl.atomic_add(SinkStats + (off_b * num_heads + off_h) * 2 + pair, tile_sums, sem="relaxed")


# -- launcher -------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per arch family (80: Ampere and Ada, mma.sync; 90:
# Hopper, wgmma), padded head dim and input width. Starting points: the shapes published flash
# forwards in Triton use (128-row query tiles, 64-key tiles, 8 warps from hd 128 up), then changed
# until the AOT compile spills nothing and fits shared memory (benchmarks/kernel_audit.py; the
# numbers are in benchmarks/RESULTS.md). Not tuned on a GPU yet: ``benchmarks/bench_attention.py
# --sweep`` times a grid of tile shapes around the bf16 entries. A fixed table rather than
# triton.autotune: no tuning pause at the first forward of every new shape inside a model, and the
# same tiles (so the same rounding) on every run.
PREFILL_CONFIGS = {
    # (arch, BLOCK_D rounded up to 64, 16-bit input?): (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (90, 64, True): (128, 64, 4, 3),
    (90, 128, True): (128, 64, 8, 3),
    (90, 256, True): (64, 32, 8, 2),
    (80, 64, True): (128, 64, 8, 3),
    (80, 128, True): (128, 32, 8, 3),
    (80, 256, True): (64, 32, 8, 2),
    # fp32 runs the ieee dot on FMAs, which hold whole operand rows in registers: small tiles
    # (32 x 32 spilled at hd 128, 32 x 16 at hd 256; on sm_90 32 x 16 at hd 128 spills 784 / 724
    # bytes, 16 x 16 with 4 warps 8 / 8, with 8 warps nothing: 60 registers)
    (90, 64, False): (32, 16, 4, 2),
    (90, 128, False): (16, 16, 8, 2),
    (90, 256, False): (16, 16, 4, 2),
    (80, 64, False): (16, 16, 8, 2),  # 32 x 16 with 4 warps: 8 / 8 (padded), 16 / 16 (every feature)
    (80, 128, False): (32, 16, 4, 2),
    (80, 256, False): (16, 16, 4, 2),
}


# Hopper's pointer path (the fallback when k/v allow no tensor descriptor), where it differs from
# the bulk-copy config: at hd 64, 4 warps holding a 128 x 64 tile need 255 registers and spill
# 12 / 12 bytes on sm_90 without descriptors; 8 warps use 128 and spill nothing (kernel audit)
POINTER_FALLBACK_CONFIGS = {
    (90, 64, True): (128, 64, 8, 3),
}


# The content-dependent-sink variant (HAS_HIDDEN) keeps a second (BLOCK_M, BLOCK_D) fp32
# accumulator for the hidden sinks, which the tiles above have no registers for; where it differs,
# its config (kernel audit: no spills on sm_80 and sm_90, benchmarks/AUDIT.md)
HIDDEN_CONFIGS: dict[tuple[int, int, bool], tuple[int, int, int, int]] = {
    (80, 64, True): (64, 64, 8, 3),
    (80, 128, True): (64, 16, 8, 3),  # 64 x 32 spilled 4 / 4 bytes once H had a running max of its own
    (80, 256, True): (32, 32, 8, 2),
    (90, 64, True): (128, 64, 8, 3),
    (90, 256, True): (64, 16, 8, 2),
    (80, 64, False): (16, 16, 4, 2),
    (80, 128, False): (16, 16, 4, 2),  # the positional 32 x 16: 8 / 8 bytes, likewise
    (90, 64, False): (16, 16, 4, 2),  # 8 warps: 44 / 48 bytes, likewise
    (90, 256, False): (16, 16, 8, 2),
}


def _hidden_view(hidden, hidden_beta, q, k_len: int):
    """The hidden-sink mask as a contiguous uint8 (B, Hq, K) and its beta as fp32 (Hq,), or (None, None)."""
    if hidden is None and hidden_beta is None:
        return None, None
    batch, q_heads = q.shape[0], q.shape[1]
    if hidden is None or hidden_beta is None:
        raise ValueError("hidden and hidden_beta go together (the hidden-sink mask and its per-head scaling)")
    check_hidden_mask(hidden, batch, q_heads, k_len)
    if hidden.device != q.device:
        raise ValueError(f"hidden on {hidden.device}, q on {q.device}")
    check_hidden_beta(hidden_beta, q_heads)
    mask = hidden.contiguous()
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return mask, hidden_beta.to(device=q.device, dtype=torch.float32).contiguous()


def prefill_config(head_dim: int, dtype: torch.dtype, arch: int = 90,
                   bulk_copies: bool = True, hidden: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) that the launcher uses for this head dim and dtype
    on a GPU of compute capability ``arch`` (x10; see :func:`arch_family`); ``bulk_copies`` False:
    the config of the pointer path where k and v are read without tensor descriptors; ``hidden``:
    the content-dependent-sink variant (a second accumulator, :data:`HIDDEN_CONFIGS`)."""
    key = (arch_family(arch), max(64, padded_head_dim(head_dim)), dtype != torch.float32)
    if hidden and key in HIDDEN_CONFIGS:
        return HIDDEN_CONFIGS[key]
    if not bulk_copies and key in POINTER_FALLBACK_CONFIGS:
        return POINTER_FALLBACK_CONFIGS[key]
    return PREFILL_CONFIGS[key]


def sink_attention_prefill(
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
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | None = None,
    sink_stats: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    hidden_beta: torch.Tensor | None = None,
    lse_only: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Sink-aware attention forward, same semantics as ``reference_sink_attention``.

    Shape contract (any strides; nothing is copied except the small side tensors):
      q (B, Hq, Q, D): strides stride_qz, stride_qh, stride_qm, stride_qk
      k, v (B, Hkv, K, D): stride_kz, stride_kh, stride_kn, stride_kk (v likewise), Hq % Hkv == 0
      attn_mask bool, broadcastable to (B, 1|Hq, Q, K): an arbitrary pattern, bit-packed along K into
        int32 words once per launch (pack_mask_bits) and read by row: stride_mz, stride_mh, stride_mm
        (0 on broadcast dims)
      key_padding bool (B|1, K): keys every query row of a sequence may see (padding = False), read
        as uint8 (stride_pz, stride_pn) on the masked tiles only; ``key_ranges`` its int32 (B|1, 3)
        summary from ``key_padding_ranges`` (stride_rz; computed here when not given) tells which
        tiles need no mask. Combined with ``causal`` this is transformers' padded causal mask
        without a (Q, K) tensor
      sink_cols (B|1, NS) integer, -1 = unused, copied to int32: stride_sz, stride_sn
      beta (Hq,); extra_logits (Hq, E) and virtual_sink_logit (Hq,), copied to fp32 into one
        (Hq, E + 1) table: stride_eh, stride_ee
      out (B, Hq, Q, D) q.dtype: stride_oz, stride_oh, stride_om, stride_ok
      lse (B, Hq, Q) fp32: stride_lz, stride_lh, stride_lm
      sink_stats (B, Hq, 2) fp32, contiguous, optional: each program adds its query tile's sums
        (stock sink mass over the rows that see a non-sink key, and their count) at [b, h] with one
        atomic add (the HAS_STATS variant; see ``sinkfix.kernels.sink_attention_triton``)
      hidden (B, Hq, K) bool or uint8 and hidden_beta (Hq,), together or not at all: content-dependent
        (hidden) sinks, the HAS_HIDDEN variant; copied to a contiguous uint8 mask (read per key
        tile, one byte per key) and fp32. The output is then that of
        ``sinkfix.ops.content_reference.reference_content_sink_attention`` (a hidden flag on a
        positional sink column is ignored) and lse = log(l_S + l_H + l_N). Not with sink_stats
      lse_only: compute the row lse alone (the LSE_ONLY variant: no v tile read, no P.V product;
        the stock pass of content-dependent sinks); returns (None, lse). Not with a sink policy,
        zero-value logits, sink_stats or hidden sinks
    Returns (out, lse): lse = log(l_S + l_N) over real keys, -inf (and out = 0) where no key is
    visible. ``block_m`` etc. override the PREFILL_CONFIGS choice (tests, tuning sweeps);
    ``use_tma`` chooses the bulk-tensor-copy key loop (None: on Hopper when the strides allow it,
    see :func:`tma_descriptors`).
    """
    launch = prepare_attention_launch(
        q, k, v, attn_mask=attn_mask, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
        virtual_sink_logit=virtual_sink_logit, sliding_window=sliding_window, softcap=softcap, scale=scale,
        kernel=_sink_attn_fwd, key_padding=key_padding, key_ranges=key_ranges)
    out, lse = allocate_outputs(q, out, lse)
    check_sink_stats(sink_stats, q)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    hidden, hidden_beta = _hidden_view(hidden, hidden_beta, q, k_len)
    if lse_only and any(t is not None for t in (sink_cols, beta, extra_logits, virtual_sink_logit, sink_stats, hidden)):
        raise ValueError("lse_only computes the stock row lse: no sink policy, zero-value logits, sink_stats or "
                         "hidden sinks")
    if lse_only:
        out = None
    if hidden is not None and sink_stats is not None:
        raise ValueError("sink_stats (telemetry) is not computed together with a hidden-sink mask")
    check_block_sizes(block_m=block_m, block_n=block_n)
    if q_len == 0 or batch == 0 or q_heads == 0:
        return out, lse
    arch = device_arch(q.device)
    has_hidden = hidden is not None
    bm, bn, nw, ns = prefill_config(head_dim, q.dtype, arch, hidden=has_hidden)
    block_d = padded_head_dim(head_dim)
    k_desc, v_desc = tma_descriptors(k, v, block_n or bn, block_d, use_tma)
    if k_desc is None:
        bm, bn, nw, ns = prefill_config(head_dim, q.dtype, arch, bulk_copies=False, hidden=has_hidden)
    block_m, block_n = block_m or bm, block_n or bn
    grid = (cdiv(q_len, block_m), batch * q_heads)
    out_strides = (0, 0, 0, 0) if out is None else out.stride()
    _sink_attn_fwd[grid](
        q, k, v, out, lse, launch.mask, launch.key_padding, launch.key_ranges, launch.sink_cols, launch.beta,
        launch.extra_logits, k_desc, v_desc, sink_stats, hidden, hidden_beta,
        *q.stride(), *k.stride(), *v.stride(), *out_strides, *lse.stride(),
        *launch.mask_strides, *launch.key_padding_strides, launch.key_range_stride, *launch.sink_strides,
        *launch.extra_strides,
        q_heads, q_heads // kv_heads, q_len, k_len, causal_offset_arg(causal_offset), launch.window, launch.n_extra,
        launch.n_extra_every_row, launch.qk_scale, launch.softcap_log2,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        **launch.sink_constexprs, E_P2=launch.extra_width,
        HAS_MASK=launch.mask is not None, HAS_KEY_RANGE=launch.key_padding is not None, IS_CAUSAL=bool(causal),
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None, HAS_BETA=launch.beta is not None,
        HAS_EXTRA=launch.extra_logits is not None, UPCAST_DOT=launch.upcast_dot, USE_TMA=k_desc is not None,
        HAS_STATS=sink_stats is not None, HAS_HIDDEN=has_hidden, LSE_ONLY=bool(lse_only),
        num_warps=num_warps or nw, num_stages=num_stages or ns, enable_fp_fusion=True,
    )
    return out, lse
