"""Content-dependent sinks on the PyTorch path, without the (B, H, Q, K) score matrix.

The rule and its fp64 reference are in :mod:`sinkfix.ops.content_reference`. The fast path makes
three passes of the fused attention op that returns a log-sum-exp (:mod:`sinkfix.ops.flash`):

1. **stock pass**: softmax attention over every visible key, in fp32: ``o_all`` and the row
   log-sum-exp ``lse_i`` over the real keys.
2. **column pass** (only when the sink set is decided): the mass each key receives,
   ``sum_{i sees j} exp(s_ij - lse_i)``, is a softmax-denominator with the roles of queries and
   keys swapped and a per-"key" bias ``-lse_i``. Appending one coordinate to each vector,
   ``x_j = [scale k_j, 1]`` and ``y_i = [q_i, -lse_i]``, turns it into the log-sum-exp of a plain
   attention call of the keys over the queries (``x_j . y_i = s_ij - lse_i``), so the fused op
   computes it tile by tile. In a plain causal window "row i sees key j" is ``i >= j``; reversing
   both axes turns that into the op's own causal rule, so no mask is built.
3. **rest pass**: attention over N (visible keys outside the positional set S and the hidden set
   H of each head). H differs per (batch, head); one more coordinate carries it:
   ``q'_i = [scale q_i, 1]``, ``k'_j = [k_j, bias_bhj]`` with ``bias = -1e30`` on S and H keys,
   so the per-head sink mask costs O(K) per head, not O(Q K).

The |S| positional columns are scored explicitly (Q x |S| per head), and the hidden part follows
by subtraction in normalised form, ``w_H o_H = o_all - w_N o_N - w_S o_S`` with
``w_X = exp(lse_X - lse_all)``: N and S are computed directly, so the subtraction never amplifies
an error (its absolute error is that of ``o_all``, ~1e-7 in fp32). The epilogue is the formula of
the reference.

Compared with the positional path (one pass), prefill costs three passes (docs/formulas.md gives
the FLOP count and the measured CPU time). Calls with at most ``FEW_ROWS`` query rows (decode
steps) compute the (B, Hq, Q, K) scores directly: with Q that small they are no bigger than the
keys, and a few small ops cost less than three passes.

On the Triton backend (:func:`content_sink_attention_triton`) the same three steps are kernels:
the prefill kernel's stock pass gives ``lse_i``, the column-mass kernel
(``sinkfix.kernels.column_mass``) the column statistics, and the prefill kernel's hidden-sink
variant (HAS_HIDDEN: a per-(batch, head) key mask, the hidden keys' mass kept apart under the same
running max) applies the rule in one pass with the reference's epilogue; only the decision
(threshold, keep-first) is a few torch ops over (B, Hq, K). Decode steps (at most ``FEW_ROWS``
rows) and differentiable calls stay on the PyTorch code below.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from sinkfix.kernels.arguments import (
    KERNEL_DTYPES, TORCH_DTYPES, attention_scale, causal_offset_arg, check_attention_arguments, check_hidden_beta,
    check_hidden_mask, check_key_padding, positive_number,
)
from sinkfix.ops.attention import distinct_sink_cols, fold_checked_key_padding
from sinkfix.ops.content_reference import (
    ColumnStats, column_stats_reference, decide_hidden_sinks, reference_content_sink_attention,
)
from sinkfix.ops.flash import cpu_flash_available, flash_with_lse, fused_lse_available
from sinkfix.ops.reference import sink_key_mask, visibility_mask, zero_value_lse

__all__ = ["ContentResult", "content_sink_attention", "content_sink_attention_torch", "content_sink_attention_triton",
           "column_stats_torch", "merge_column_stats", "check_content_arguments"]

# Added to the score of a key that must not count in the rest pass. Finite so that a row with no
# such key yields finite garbage (discarded by count), and small enough in magnitude that adding the
# visibility mask's finfo.min does not overflow (1e30 is below half an ulp of finfo.min).
_EXCLUDED = -1e30


class ContentResult(NamedTuple):
    out: torch.Tensor  # (B, Hq, Q, D) in q's dtype
    lse: torch.Tensor  # (B, Hq, Q) fp32, log(l_S + l_H + l_N)
    hidden: torch.Tensor  # (B, Hq, K) bool, the hidden sinks applied
    stats: ColumnStats | None  # this call's rows only, when asked for or when the set was decided


def merge_column_stats(prior: ColumnStats | None, new: ColumnStats) -> ColumnStats:
    """Column statistics of two disjoint sets of query rows; ``prior`` may cover fewer columns
    (the keys added since), which have received nothing from its rows."""
    if prior is None:
        return new
    pad = new.mass.shape[-1] - prior.mass.shape[-1]
    mass = torch.nn.functional.pad(prior.mass.to(new.mass.dtype), (0, pad)) + new.mass
    rows = torch.nn.functional.pad(prior.rows.to(new.rows.dtype), (0, pad)) + new.rows
    return ColumnStats(mass, rows)


def _plain(attn_mask, causal: bool, causal_offset: int, sliding_window, q_len: int, k_len: int) -> bool:
    simple_causal = causal and causal_offset == 0 and q_len == k_len
    return attn_mask is None and sliding_window is None and (simple_causal or not causal)


def _repeat(t: torch.Tensor, group: int) -> torch.Tensor:
    """kv heads -> query heads; expand + reshape (one copy) is ~3x faster than repeat_interleave on CPU."""
    if group == 1:
        return t
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


# Up to this many query rows (a decode step, a short verification chunk) the scores are computed
# directly: (B, Hq, Q, K) is then no bigger than the keys themselves, and a handful of small ops
# beats three fused passes (measured: 0.13 ms positional vs ~3-18 ms through the passes at K = 512
# on a loaded CPU, dominated by copying the keys per query head).
FEW_ROWS = 8


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _rest_shares(lse_s: torch.Tensor, lse_n: torch.Tensor, lse_all: torch.Tensor, w_h: torch.Tensor,
                 b_h: torch.Tensor, sees_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S's share of S and N, N's share, the mass S and N hold after the hidden sinks gave theirs):
    ``p_S / (p_S + p_N)``, ``p_N / (p_S + p_N)`` and ``p_S + p_N + (1 - beta_H) p_H``.

    The formula's ``g = 1 + (1 - beta_H) p_H / (p_S + p_N)`` is not formed: a hidden sink that
    out-scores every other key by more than fp32's exponent range (about 87 nats) leaves
    ``p_S + p_N`` zero or subnormal in shares of the whole row, and ``g`` became inf (inf and NaN
    outputs from a gap of about 92 nats on a tiny Llama). The shares within S and N come from their
    own log-sum-exps, which keep their range, and the mass is a sum of finite terms.

    In a row that sees no hidden key (``sees_h`` False) S and N are every key it sees: their mass is
    1, exactly, as the positional path has it. ``exp(lse_rest - lse_all)`` there compared two fp32
    log-sum-exps of the same keys from different ops, whose rounding grows with the scores: the
    sink's own row (it sees only S) was scaled by it, 3e-5 relative at a sink score of 140 with an
    empty hidden set, where docs/formulas.md leaves that row exactly as stock."""
    lse_rest = torch.logaddexp(lse_s, lse_n)  # -inf where the row sees neither
    rest = _finite(lse_rest)
    share_s = torch.where(torch.isfinite(lse_s), torch.exp(lse_s - rest), 0.0)
    share_n = torch.where(torch.isfinite(lse_n), torch.exp(lse_n - rest), 0.0)
    seen = torch.isfinite(lse_rest)
    rest_mass = torch.where(seen & sees_h, torch.exp(lse_rest - _finite(lse_all)), seen.float()) + (1 - b_h) * w_h
    return share_s, share_n, rest_mass


def _few_rows(q, k, v, *, hidden, hidden_beta, visible, scale, sink_cols, beta, extra_logits, virtual_sink_logit,
              need_stats: bool):
    """The formula of the reference, in fp32, with query heads grouped by kv head (no key copies).
    ``visible`` (B, 1, Q, K) bool. Returns (out fp32, lse, stats or None)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    qg = q.float().reshape(batch, kv_heads, group * q_len, head_dim)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(scale).view(batch, q_heads, q_len, k_len)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - _finite(lse)[..., None])  # stock, real keys
    stats = ColumnStats(p.sum(2), visible[:, 0].sum(1).float()) if need_stats else None
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, None, :]
    in_h = visible & hidden[:, :, None, :]
    in_s = visible & is_sink
    in_n = visible & ~is_sink & ~hidden[:, :, None, :]
    w_h = (p * in_h).sum(-1)
    has_rest = (in_s | in_n).any(-1)
    has_n = in_n.any(-1)
    b_h = torch.where(has_rest, hidden_beta.float().reshape(1, -1, 1), 1.0)
    # beta None: a float32 one, not torch.where of two Python numbers (the default dtype, which may be float64)
    b_s = (torch.ones((), dtype=torch.float32, device=p.device) if beta is None
           else torch.where(has_n, beta.float().reshape(1, -1, 1), 1.0))
    # S and N under their own maxima (_rest_shares says why): their keys' weights are their shares of
    # the rest times the mass the rest holds after the hidden sinks gave theirs away
    lse_s = torch.logsumexp(scores.masked_fill(~in_s, float("-inf")), dim=-1)
    lse_n = torch.logsumexp(scores.masked_fill(~in_n, float("-inf")), dim=-1)
    share_s, share_n, rest_mass = _rest_shares(lse_s, lse_n, lse, w_h, b_h, in_h.any(-1))
    # each set's own keys only: a hidden key's exp(s_j - lse_N) would be inf, and inf * 0 is NaN
    within_s = torch.exp(scores.masked_fill(~in_s, float("-inf"))
                         - _finite(torch.logaddexp(lse_s, lse_n))[..., None])  # p_j / (p_S + p_N)
    within_n = torch.exp(scores.masked_fill(~in_n, float("-inf")) - _finite(lse_n)[..., None])  # p_j / p_N
    weights = (p * in_h * b_h[..., None] + within_s * (rest_mass * b_s)[..., None]
               + within_n * (rest_mass * (share_n + (1 - b_s) * share_s))[..., None])
    out = torch.matmul(weights.view(batch, kv_heads, group * q_len, k_len), v.float())
    out = out.view(batch, q_heads, q_len, head_dim)
    if extra_logits is not None or virtual_sink_logit is not None:
        lse_zero = zero_value_lse(extra_logits, virtual_sink_logit, (in_n | in_h).any(-1))
        out = out * torch.where(torch.isfinite(lse), torch.sigmoid(lse - lse_zero), 0.0)[..., None]
    return out, lse, stats


def column_stats_torch(q, k, lse, *, visible, plain_causal: bool, scale: float) -> ColumnStats:
    """Pass 2 (module docstring): q (B, Hq, Q, D), k (B, Hkv, K, D), lse (B, Hq, Q) stock row
    log-sum-exps over real keys (-inf for rows that see nothing); ``visible`` (B, 1, Q, K) bool or
    None for a plain layout (``plain_causal`` says which)."""
    batch, q_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    x = torch.cat([_repeat(k.float(), q_heads // k.shape[1]) * scale,
                   torch.ones(batch, q_heads, k_len, 1, dtype=torch.float32, device=q.device)], dim=-1)
    seen = torch.isfinite(lse)
    y = torch.cat([q.float(), torch.where(seen, -lse, 0.0).unsqueeze(-1)], dim=-1)
    dummy_v = torch.zeros_like(y)
    if visible is None:
        if plain_causal:
            _, lse_col = flash_with_lse(x.flip(2), y.flip(2), dummy_v, visible=None, is_causal=True, scale=1.0)
            lse_col = lse_col.float().flip(2)
            rows = torch.arange(q_len, 0, -1, device=q.device, dtype=torch.float32).expand(batch, k_len)
        else:
            _, lse_col = flash_with_lse(x, y, dummy_v, visible=None, is_causal=False, scale=1.0)
            lse_col = lse_col.float()
            rows = torch.full((batch, k_len), float(q_len), dtype=torch.float32, device=q.device)
    else:
        sees = visible & seen[:, :1, :, None]  # rows that see nothing contribute nothing
        by_key = sees.transpose(-1, -2)  # (B, 1, K, Q): key j "sees" the rows that see it
        _, lse_col = flash_with_lse(x, y, dummy_v, visible=by_key, is_causal=False, scale=1.0)
        rows = sees[:, 0].sum(1).float()
        lse_col = lse_col.float().masked_fill(rows[:, None, :] == 0, float("-inf"))
    return ColumnStats(torch.exp(lse_col), rows)


def _sink_part(q, k, v, visible_cols: torch.Tensor, sink_cols: torch.Tensor, scale: float):
    """The positional sink columns scored explicitly: (o_S (B, Hq, Q, D), lse_S (B, Hq, Q),
    count of visible sink keys (B, 1, Q)). ``visible_cols`` (B, 1, Q, NS) bool."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    cols = sink_cols.clamp(0, max(k_len - 1, 0)).long()
    index = cols[:, None, :, None].expand(batch, kv_heads, cols.shape[1], head_dim)
    group = q_heads // kv_heads
    k_s = _repeat(k.gather(2, index).float(), group)
    v_s = _repeat(v.gather(2, index).float(), group)
    s = torch.matmul(q.float(), k_s.transpose(-1, -2)).mul_(scale).masked_fill_(~visible_cols, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite(lse)[..., None])
    return torch.matmul(p, v_s), lse, visible_cols.sum(-1).float()


def check_shared_mask(attn_mask: torch.Tensor | None) -> None:
    """ValueError for a mask with one plane per head: the rule counts, per key, the query rows that
    see it (one count per key, :class:`ColumnStats`), and the PyTorch path read head 0's plane for
    every head (2.43 off in a head whose plane hid the sink). A patched model's masks are shared."""
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] != 1:
        raise ValueError(f"content-dependent sinks take one mask for every head, (B|1, 1, Q, K); got a mask with "
                         f"{attn_mask.shape[1]} head planes, {tuple(attn_mask.shape)}")


def check_content_arguments(q, k, v, *, dtypes, hidden_beta, hidden, threshold, attn_mask, causal_offset,
                            sliding_window, scale, softcap, sink_cols, beta, extra_logits, virtual_sink_logit,
                            key_padding=None, key_ranges=None) -> None:
    """The argument checks of both content entries, made before any compute and before the Triton
    entry hands a call to the PyTorch code: the positional path's (shapes, dtypes among ``dtypes``,
    mask, sink columns, policy tensors, scale, softcap, window, causal offset; one message for one
    mistake, :mod:`sinkfix.kernels.arguments`), the key padding, the one mask for every head, and
    the hidden-sink arguments. Without them K = 0 killed the process (SIGFPE in the fused op),
    scale 0 gave NaN, a window of 0 zeros, causal_offset 2.5 ran as 2, and a wrong-shaped beta or
    hidden set failed inside a broadcast."""
    check_attention_arguments(q, k, v, dtypes=dtypes, attn_mask=attn_mask, sink_cols=sink_cols, beta=beta,
                              extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit, scale=scale,
                              softcap=softcap, sliding_window=sliding_window)
    causal_offset_arg(causal_offset)
    check_key_padding(key_padding, key_ranges, q.shape[0], k.shape[2], q.device)
    check_shared_mask(attn_mask)
    batch, q_heads, k_len = q.shape[0], q.shape[1], k.shape[2]
    check_hidden_beta(hidden_beta, q_heads)
    if hidden is not None:
        check_hidden_mask(hidden, batch, q_heads, k_len)
    elif threshold is None:
        raise ValueError("content-dependent sinks need either a hidden-sink mask (hidden) or a threshold to decide one")
    elif torch.compiler.is_compiling():
        pass  # traced by torch.compile(dynamic=True) the number is symbolic, and math.isfinite cannot trace
        # it (a graph break, an error under fullgraph); the policy that holds it checked it when built
    elif isinstance(threshold, bool) or not (
            (isinstance(threshold, numbers.Real) and math.isfinite(threshold))
            or (isinstance(threshold, torch.Tensor) and threshold.numel() == 1 and threshold.is_floating_point())):
        raise ValueError(f"threshold must be a finite number (the mean attention a hidden sink's column exceeds), "
                         f"got {threshold!r}")


def content_sink_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    hidden_beta: torch.Tensor,
    hidden: torch.Tensor | None = None,
    threshold: float | None = None,
    min_rows: int = 1,
    heads: torch.Tensor | None = None,
    prior: ColumnStats | None = None,
    kept_before: torch.Tensor | None = None,
    need_stats: bool = False,
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
) -> ContentResult:
    """Attention with content-dependent sinks (the formula of
    :func:`~sinkfix.ops.content_reference.reference_content_sink_attention`).

    Either ``hidden`` (B, Hq, K) bool is given (a stored set: decode), or it is decided here from
    the column statistics of this call's rows merged with ``prior`` (earlier rows of the same
    sequences, e.g. previous prefill chunks) with ``threshold``, ``min_rows``, ``heads`` and
    ``kept_before`` (:func:`~sinkfix.ops.content_reference.decide_hidden_sinks`). ``hidden_beta`` (Hq,) is the
    hidden-sink scaling; the other arguments are those of
    :func:`sinkfix.ops.attention.sink_attention_torch` (``sink_cols`` (B, NS), -1 = absent).
    The returned ``stats`` are this call's rows only (merge them with :func:`merge_column_stats`).
    q, k, v fp16, bf16, fp32 or fp64 (computed in fp32); the arguments are checked as the
    positional path checks them (:func:`check_content_arguments`).
    """
    check_content_arguments(q, k, v, dtypes=TORCH_DTYPES, hidden_beta=hidden_beta, hidden=hidden, threshold=threshold,
                            attn_mask=attn_mask, causal_offset=causal_offset, sliding_window=sliding_window,
                            scale=scale, softcap=softcap, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
                            virtual_sink_logit=virtual_sink_logit)
    return _content_torch(q, k, v, hidden_beta=hidden_beta, hidden=hidden, threshold=threshold, min_rows=min_rows,
                          heads=heads, prior=prior, kept_before=kept_before, need_stats=need_stats,
                          attn_mask=attn_mask, causal=causal, causal_offset=causal_offset,
                          sliding_window=sliding_window, scale=scale, softcap=softcap, sink_cols=sink_cols, beta=beta,
                          extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit)


def _content_torch(q, k, v, *, hidden_beta, hidden, threshold, min_rows, heads, prior, kept_before, need_stats,
                   attn_mask, causal, causal_offset, sliding_window, scale, softcap, sink_cols, beta, extra_logits,
                   virtual_sink_logit) -> ContentResult:
    """:func:`content_sink_attention_torch` on checked arguments (its Triton twin hands calls here
    after making the same checks)."""
    batch, q_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    scale = attention_scale(scale, head_dim)
    softcap = None if softcap is None else positive_number("softcap", softcap)
    causal_offset = causal_offset_arg(causal_offset)
    if hidden is not None:  # a uint8 set (as the kernels take it) read as bool: ~ of a uint8 flips every bit
        hidden = hidden.to(device=q.device, dtype=torch.bool)
    if sink_cols is None:
        sink_cols = torch.full((batch, 1), -1, dtype=torch.long, device=q.device)
    else:
        # a set, as everywhere else: the fused path gathered a repeated column twice and subtracted it
        # twice from the visible count (2.8 off the reference with [[0, 0]])
        sink_cols = distinct_sink_cols(sink_cols)
    layout = dict(attn_mask=attn_mask, causal=causal, causal_offset=causal_offset, sliding_window=sliding_window)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)
    fused = cpu_flash_available(torch.float32) if q.is_cpu else fused_lse_available(q.device, torch.float32)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, beta, hidden_beta, extra_logits, virtual_sink_logit))
    if softcap is not None or not fused or grad:
        # the dense formula in fp32: differentiable, applies the softcap
        stats = None
        if hidden is None or need_stats:
            stats = column_stats_reference(q, k, **layout, scale=scale, softcap=softcap, compute_dtype=torch.float32)
        if hidden is None:
            hidden = decide_hidden_sinks(merge_column_stats(prior, stats), is_sink, threshold=threshold,
                                         min_rows=min_rows, heads=heads, kept_before=kept_before)
        out, _, lse = reference_content_sink_attention(
            q, k, v, hidden=hidden, hidden_beta=hidden_beta, **layout, scale=scale, softcap=softcap,
            sink_cols=sink_cols, beta=beta, extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit,
            compute_dtype=torch.float32)
        return ContentResult(out.to(q.dtype), lse.float(), hidden, stats)

    if q_len <= FEW_ROWS:
        visible = visibility_mask(batch, q_len, k_len, **layout, device=q.device)
        if hidden is not None:
            hidden = hidden & ~is_sink[:, None, :]
            out, lse, stats = _few_rows(q, k, v, hidden=hidden, hidden_beta=hidden_beta, visible=visible, scale=scale,
                                        sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
                                        virtual_sink_logit=virtual_sink_logit, need_stats=need_stats)
            return ContentResult(out.to(q.dtype), lse, hidden, stats)
        # deciding needs the stats before the correction: one stock pass first (a few rows, cheap)
        _, _, stats = _few_rows(q, k, v, hidden=torch.zeros(batch, q_heads, k_len, dtype=torch.bool, device=q.device),
                                hidden_beta=hidden_beta, visible=visible, scale=scale, sink_cols=sink_cols, beta=None,
                                extra_logits=None, virtual_sink_logit=None, need_stats=True)
        hidden = decide_hidden_sinks(merge_column_stats(prior, stats), is_sink, threshold=threshold,
                                     min_rows=min_rows, heads=heads, kept_before=kept_before)
        out, lse, _ = _few_rows(q, k, v, hidden=hidden, hidden_beta=hidden_beta, visible=visible, scale=scale,
                                sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
                                virtual_sink_logit=virtual_sink_logit, need_stats=False)
        return ContentResult(out.to(q.dtype), lse, hidden, stats)

    plain = _plain(attn_mask, causal, causal_offset, sliding_window, q_len, k_len)
    plain_causal = plain and causal
    visible = None if plain else visibility_mask(batch, q_len, k_len, **layout, device=q.device)
    q32, k32, v32 = q.float(), k.float(), v.float()

    # pass 1: stock attention over every visible key
    o_all, lse_all = flash_with_lse(q32, k32, v32, visible=visible, is_causal=plain_causal, scale=scale)
    lse_all = lse_all.float()
    if visible is None:
        n_visible = (torch.arange(1, q_len + 1, device=q.device, dtype=torch.float32) if plain_causal
                     else torch.full((q_len,), float(k_len), dtype=torch.float32, device=q.device)).expand(batch, 1, q_len)
    else:
        n_visible = visible.sum(-1).float()  # (B, 1, Q)
        lse_all = lse_all.masked_fill(n_visible == 0, float("-inf"))
        o_all = torch.where((n_visible > 0)[..., None], o_all, 0.0)

    # pass 2: the column statistics, and the decision
    stats = None
    if hidden is None or need_stats:
        stats = column_stats_torch(q32, k32, lse_all, visible=visible, plain_causal=plain_causal, scale=scale)
    if hidden is None:
        hidden = decide_hidden_sinks(merge_column_stats(prior, stats), is_sink, threshold=threshold,
                                     min_rows=min_rows, heads=heads, kept_before=kept_before)
    hidden = hidden & ~is_sink[:, None, :]

    # visible hidden keys per row, and the positional sink part
    hidden_f = hidden.float()
    if visible is None:
        n_hidden = hidden_f.cumsum(-1)[..., :q_len] if plain_causal else hidden_f.sum(-1, keepdim=True).expand(
            batch, q_heads, q_len)
        rows = torch.arange(q_len, device=q.device)[:, None]
        cols_visible = (sink_cols[:, None, :] >= 0) & (sink_cols[:, None, :] < k_len)
        if plain_causal:
            cols_visible = cols_visible & (sink_cols[:, None, :] <= rows)
        cols_visible = cols_visible.expand(batch, q_len, sink_cols.shape[1])[:, None]
    else:
        n_hidden = torch.einsum("bqk,bhk->bhq", visible[:, 0].float(), hidden_f)
        valid = (sink_cols >= 0) & (sink_cols < k_len)
        index = sink_cols.clamp(0, max(k_len - 1, 0)).long()[:, None, None, :].expand(batch, 1, q_len, -1)
        cols_visible = visible.gather(-1, index) & valid[:, None, None, :]
    o_s, lse_s, n_sink = _sink_part(q32, k32, v32, cols_visible, sink_cols, scale)
    n_rest = n_visible - n_sink - n_hidden  # keys in N per row, (B, Hq, Q)
    has_n = n_rest > 0

    # pass 3: the rest, with S and each head's H pushed out through one extra coordinate
    excluded = hidden | is_sink[:, None, :]
    q_ext = torch.cat([q32 * scale, torch.ones(batch, q_heads, q_len, 1, dtype=torch.float32, device=q.device)], dim=-1)
    k_ext = torch.cat([_repeat(k32, q_heads // k.shape[1]),
                       torch.where(excluded, _EXCLUDED, 0.0).float().unsqueeze(-1)], dim=-1)  # two scalars: the default dtype
    v_ext = torch.nn.functional.pad(_repeat(v32, q_heads // k.shape[1]), (0, 1))
    o_n, lse_n = flash_with_lse(q_ext, k_ext, v_ext, visible=visible, is_causal=plain_causal, scale=1.0)
    o_n = torch.where(has_n[..., None], o_n[..., :head_dim], 0.0)
    lse_n = torch.where(has_n, lse_n.float(), float("-inf"))

    # the epilogue, in shares of the real keys' mass
    finite_all = _finite(lse_all)
    w_n = torch.exp(lse_n - finite_all)
    w_s = torch.exp(lse_s - finite_all)
    sees_h = n_hidden > 0
    w_h = torch.where(sees_h, (1 - w_n - w_s).clamp(min=0), 0.0)
    o_h_part = torch.where(sees_h[..., None], o_all - w_n[..., None] * o_n - w_s[..., None] * o_s, 0.0)
    has_rest = (n_rest + n_sink) > 0
    b_h = torch.where(has_rest & sees_h, hidden_beta.float().reshape(1, -1, 1), 1.0)
    b_s = torch.ones((), dtype=torch.float32) if beta is None else beta.float().reshape(1, -1, 1)
    b_s = torch.where(has_n, b_s, 1.0)
    share_s, share_n, rest_mass = _rest_shares(lse_s, lse_n, lse_all, w_h, b_h, sees_h)
    out = (b_h[..., None] * o_h_part
           + rest_mass[..., None] * ((b_s * share_s)[..., None] * o_s + (share_n + (1 - b_s) * share_s)[..., None] * o_n))
    if extra_logits is not None or virtual_sink_logit is not None:
        lse_zero = zero_value_lse(extra_logits, virtual_sink_logit, (n_rest + n_hidden) > 0)
        keep = torch.where(torch.isfinite(lse_all), torch.sigmoid(lse_all - lse_zero), 0.0)
        out = out * keep[..., None]
    return ContentResult(out.to(q.dtype), lse_all, hidden, stats)


def content_sink_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    hidden_beta: torch.Tensor,
    hidden: torch.Tensor | None = None,
    threshold: float | None = None,
    min_rows: int = 1,
    heads: torch.Tensor | None = None,
    prior: ColumnStats | None = None,
    kept_before: torch.Tensor | None = None,
    need_stats: bool = False,
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
) -> ContentResult:
    """:func:`content_sink_attention_torch` on the Triton kernels (CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``). ``key_padding`` (B, K) bool and its ``key_ranges`` express a
    padded causal mask without a (Q, K) tensor, as for :func:`sinkfix.kernels.sink_attention_triton`.

    Prefill: a stock pass of the prefill kernel (its row lse), the column-mass kernel, the decision
    (torch ops over (B, Hq, K)), then one pass of the prefill kernel's hidden-sink variant. Calls
    with at most ``FEW_ROWS`` query rows (decode steps) and differentiable calls run the PyTorch
    path, the key padding folded into a mask."""
    from sinkfix.kernels.attention_prefill import sink_attention_prefill
    from sinkfix.kernels.column_mass import column_mass

    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (q, k, v, beta, hidden_beta, extra_logits, virtual_sink_logit))
    # every call is checked here, whichever code runs it: the few-rows and differentiable calls the
    # PyTorch code takes had no checks, so Q <= 8 accepted what Q > 8 refused (fp64 inputs, K = 0
    # with an IndexError, scale 0 with NaN). Differentiable calls run on the PyTorch path, which
    # takes fp64 as the positional path's gradient calls do; the others are the kernels' calls.
    check_content_arguments(q, k, v, dtypes=TORCH_DTYPES if grad else KERNEL_DTYPES, hidden_beta=hidden_beta,
                            hidden=hidden, threshold=threshold, attn_mask=attn_mask, causal_offset=causal_offset,
                            sliding_window=sliding_window, scale=scale, softcap=softcap, sink_cols=sink_cols, beta=beta,
                            extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit, key_padding=key_padding,
                            key_ranges=key_ranges)
    batch, q_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    if q_len <= FEW_ROWS or grad:
        return _content_torch(
            q, k, v, hidden_beta=hidden_beta, hidden=hidden, threshold=threshold, min_rows=min_rows, heads=heads,
            prior=prior, kept_before=kept_before, need_stats=need_stats,
            attn_mask=fold_checked_key_padding(q, k, v, attn_mask, key_padding, key_ranges), causal=causal,
            causal_offset=causal_offset, sliding_window=sliding_window, scale=scale, softcap=softcap,
            sink_cols=sink_cols, beta=beta, extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit)
    scale = attention_scale(scale, head_dim)
    softcap = None if softcap is None else positive_number("softcap", softcap)
    layout = dict(attn_mask=attn_mask, key_padding=key_padding, key_ranges=key_ranges, causal=causal,
                  causal_offset=causal_offset, sliding_window=sliding_window, scale=scale, softcap=softcap)
    if sink_cols is None:
        sink_cols = torch.full((batch, 1), -1, dtype=torch.long, device=q.device)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)
    stats = None
    if hidden is None or need_stats:
        # pass 1 (stock, every visible key): its row lse alone (no P.V); pass 2 the column masses
        _, lse_all = sink_attention_prefill(q, k, v, **layout, lse_only=True)
        mass, rows = column_mass(q, k, lse_all, **layout)
        stats = ColumnStats(mass, rows)
    if hidden is None:
        hidden = decide_hidden_sinks(merge_column_stats(prior, stats), is_sink, threshold=threshold,
                                     min_rows=min_rows, heads=heads, kept_before=kept_before)
    # read as bool, as the PyTorch path does: a uint8 set holding 2 gave 2 & 1 = 0 against the bool
    # ~is_sink, so the key stopped being hidden (0.575 off on a 12-token case) and came back as uint8
    hidden = hidden.to(device=q.device, dtype=torch.bool) & ~is_sink[:, None, :]
    # pass 3: the correction, hidden keys apart from the rest in one key loop
    out, lse = sink_attention_prefill(q, k, v, **layout, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
                                      virtual_sink_logit=virtual_sink_logit, hidden=hidden, hidden_beta=hidden_beta)
    return ContentResult(out, lse, hidden, stats)


# The Triton content path is no custom op yet: traced by dynamo it failed deep inside the trace
# (fullgraph: "_patched_getfile"; otherwise, under the interpreter, a KeyError on torch.uint64). Kept
# out of the graph instead: a graph break that runs it eagerly, and with fullgraph=True an error
# that says why and what to do.
def _kept_out_of_graphs(fn, reason: str):
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # torch < 2.8 takes no reason (the package supports torch >= 2.4)
        return torch.compiler.disable(fn)


_content_triton_eager = _kept_out_of_graphs(
    content_sink_attention_triton,
    "content-dependent sinks on backend='triton' run eagerly (their kernels are no custom op yet): "
    "compile with sinkfix.patch(..., backend='torch') for one graph, or compile without fullgraph")


def content_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "torch",
                           key_padding: torch.Tensor | None = None, key_ranges: torch.Tensor | None = None,
                           **kwargs) -> ContentResult:
    """Content-dependent sinks on ``backend`` ("torch" or "triton", as a patched model resolved
    it): :func:`content_sink_attention_triton` or :func:`content_sink_attention_torch` (which reads
    a key padding as a (B, 1, 1, K) mask)."""
    if backend == "triton":
        return _content_triton_eager(q, k, v, key_padding=key_padding, key_ranges=key_ranges, **kwargs)
    kwargs["attn_mask"] = fold_checked_key_padding(q, k, v, kwargs.get("attn_mask"), key_padding, key_ranges)
    return content_sink_attention_torch(q, k, v, **kwargs)
