"""What the monitor measures once per request, on the prompt: value drain and hidden sinks.

The fast path's statistics (``AttentionResult.sink_stats``) give the sink share of every row
exactly. The rest of the dormancy rule (docs/formulas.md, "Measuring") needs more:

* the **drain weight** of a key, ``w_j = clamp(1 - ||v_j|| / median_k ||v_k||, 0, 1)``: one norm
  per value vector of the call, computed on the prompt's call only (in a decode step the median
  would be over one new key); the sink's own value is cached and never changes, and the median is
  that of the prompt's keys for the rest of the request;
* the **hidden sinks** (ACT's criterion: a non-sink key whose mean attention over the rows that can
  see it exceeds 0.1), which need whole probability rows. Those are rebuilt from the call's own
  log-sum-exp for an evenly spaced sample of the prompt's query rows (64 by default): a
  ``(B, Hq, rows, K)`` block per layer, about 1/8 of the score matrix of a 512-token prompt, never
  the whole of it, and nothing at all in decode steps.

All of it stays on the device: no host read, no branch on tensor values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sinkfix.ops.reference import sink_key_mask, zero_value_lse

__all__ = ["PromptMeasures", "measure_prompt", "sampled_rows", "MIN_SAMPLED_VIEWERS"]

#: A key is judged only when at least this many sampled rows see it (or all of its viewers, for a
#: prompt short enough to be sampled whole): a mean over fewer is too noisy for ACT's threshold. On
#: SmolLM2 with 64 of 512 rows it took the hidden sinks found from 1369 to 1225 (exact: 1095) on six
#: windows, and changed no dormancy score.
MIN_SAMPLED_VIEWERS = 6

# exp(-87) = 1.6e-38 is the smallest fp32 normal number's neighbourhood: below it exp's result is
# subnormal, which the CPU kernels compute ~100x slower. exp(60) stays finite.
_EXP_FLOOR, _EXP_CEILING = -87.0, 60.0


class PromptMeasures(NamedTuple):
    """Per batch row and query head (B, Hq) unless noted."""

    drain_weight: torch.Tensor  # w of the first sink column: its weight in the dormancy score
    value_drain: torch.Tensor  # (B, Hkv) ||v_sink|| / median_j ||v_j||
    hidden_sinks: torch.Tensor  # hidden sinks found on the sampled rows
    hidden_part: torch.Tensor  # mean over sampled rows of sum_{j hidden} p_ij w_j (dormancy's hidden-sink part)


def sampled_rows(q_len: int, wanted: int, device) -> torch.Tensor:
    """``wanted`` evenly spaced query rows ending at the last one (all rows when Q <= wanted).
    A function of the shape only: the same rows every time for the same prompt length."""
    step = max(1, math.ceil(q_len / max(1, wanted)))
    return torch.arange(q_len - 1, -1, -step, device=device).flip(0)


def _visible_rows(call, rows: torch.Tensor, batch: int, k_len: int) -> torch.Tensor:
    """(B, 1, r, K) bool: which keys the sampled rows may see (upper-left causal without a mask)."""
    device = call.query.device
    if call.attn_mask is not None:
        return call.attn_mask.expand(batch, 1, call.attn_mask.shape[2], k_len)[:, :, rows]
    if call.causal:
        return (torch.arange(k_len, device=device)[None, :] <= rows[:, None]).expand(batch, 1, rows.numel(), k_len)
    return torch.ones(batch, 1, rows.numel(), k_len, dtype=torch.bool, device=device)


def _seen_by(call, batch: int, q_len: int, k_len: int) -> torch.Tensor:
    """(B, K) how many query rows of the call may see each key."""
    device = call.query.device
    if call.attn_mask is not None:
        return call.attn_mask.expand(batch, 1, q_len, k_len)[:, 0].sum(1)
    if call.causal:
        return (q_len - torch.arange(k_len, device=device)).clamp(min=0).expand(batch, k_len)
    return torch.full((batch, k_len), q_len, device=device)


def _value_weights(call, lay: "_Layout"):
    """Value norms' drain weights (B, Hkv, K), the sink's (B, Hkv) and the drain ratio (B, Hkv),
    with the median over the keys some row may see (padding and empty cache slots left out)."""
    norms = torch.linalg.vector_norm(call.value, dim=-1, dtype=torch.float32)  # (B, Hkv, K)
    median = torch.nanmedian(norms.masked_fill(lay.unseen, float("nan")), dim=-1).values
    weights = (1 - norms / median[..., None]).clamp(0, 1).nan_to_num(0)
    first = lay.first_sink.expand(-1, norms.shape[1], 1)  # (B, Hkv, 1)
    return weights, weights.gather(-1, first).squeeze(-1), norms.gather(-1, first).squeeze(-1) / median


def _sink_columns_mass(probs: torch.Tensor, sink_cols: torch.Tensor) -> torch.Tensor:
    """(B, Hq, r) mass on the sink columns: |S| gathered columns, not a pass over K."""
    batch, heads, rows, k_len = probs.shape
    valid = ((sink_cols >= 0) & (sink_cols < k_len))[:, None, None, :]
    index = sink_cols.clamp(0, k_len - 1)[:, None, None, :].expand(batch, heads, rows, -1)
    return (probs.gather(-1, index) * valid).sum(-1)


def _rows_dot(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, Hq, r): each probability row dotted with ``weights`` (B, 1|Hq, 1, K), as
    ``weights @ probs^T``. The same product written ``probs @ weights^T`` (a (r, K) by (K, 1) matrix
    product per head) took 222 us per call for a (1, 9, 64, 512) block on one CPU thread, this
    orientation 20 us: two such products per layer were a quarter of the prompt measures' time."""
    return torch.matmul(weights, probs.transpose(-1, -2)).squeeze(-2)


def _real_probabilities(call, rows: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """(B, Hq, r, K) fp32 ``exp(s_ij - lse_i)`` of the sampled rows, 0 where a row may not look:
    the stock softmax over the real keys, rebuilt from the call's own log-sum-exp.

    The exponent is clamped to [_EXP_FLOOR, _EXP_CEILING] before ``exp_`` and the keys a row may not
    see are zeroed after it, instead of adding a -inf bias: on CPU, ``exp`` of an argument whose
    result is subnormal (below ~-87.3) or of -inf takes a slow path (a 3 x 192 x 512 block took
    2.0 ms with the bias, 0.5 ms clamped, one thread), and a sink-dominated head puts most of its
    keys there. A clamped probability is ``exp(-87) = 1.6e-38`` instead of a smaller one."""
    q, k = call.query, call.key
    batch, q_heads, _, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group, r = q_heads // kv_heads, rows.numel()
    lse = call.result.lse[:, :, rows].float()
    lse = torch.where(torch.isfinite(lse), lse, 0.0)  # a padding row's is garbage; it sees nothing anyway
    neg_lse = lse.neg().view(batch * kv_heads, group * r, 1)
    q_rows = q[:, :, rows].float().mul_(call.scale).reshape(batch * kv_heads, group * r, dim)
    keys = k.float().reshape(batch * kv_heads, k_len, dim).transpose(1, 2)
    if call.softcap is None:
        scores = torch.baddbmm(neg_lse, q_rows, keys)
    else:
        scores = torch.bmm(q_rows, keys)
        scores = call.softcap * torch.tanh(scores / call.softcap) + neg_lse
    # the ceiling only matters for keys the row may not see (a later key can score far above the
    # row's log-sum-exp): their exp must stay finite for the zeroing product below
    probs = scores.clamp_(min=_EXP_FLOOR, max=_EXP_CEILING).exp_().view(batch, q_heads, r, k_len)
    return probs.mul_(visible)


def _row_factors(call, probs: torch.Tensor, lay: "_Layout") -> torch.Tensor:
    """(B, Hq, r): what turns a row's stock probability of a non-sink key into the one the call
    applied: the share the zero-value logits leave, times beta's redistribution
    ``(p_N + (1 - beta) p_S) / p_N`` (docs/formulas.md). Sink columns are not needed downstream."""
    lse = call.result.lse[:, :, lay.rows].float()
    zero = zero_value_lse(call.extra_logits, call.virtual_sink_logit, lay.has_n)
    keep = torch.ones_like(lse) if zero is None else torch.sigmoid(lse - zero)
    if call.beta is None:
        return keep
    p_s = _sink_columns_mass(probs, lay.sink_cols)
    # p_N summed over the non-sink keys themselves, never as 1 - p_S: in a row whose sink takes
    # almost everything (p_S = 1 - 1e-8 is common in SmolLM2) the difference cancels to 0 in fp32
    # and the factor below blew up to 1e29 (seen as dormancy scores of 1e19)
    p_n = _rows_dot(probs, lay.non_sink.transpose(-1, -2)).clamp(min=1e-30)
    beta = torch.where(lay.has_n, call.beta.float()[None, :, None], 1.0)
    return keep * (p_n + (1 - beta) * p_s) / p_n


class _Layout(NamedTuple):
    """What the measures need from the call's layout alone (mask, lengths, sink columns): the same
    for every layer of a forward that shares its mask, so a monitor computes it once per forward
    (the small operations that depend on the layout alone, not on the layer's tensors)."""

    mask: torch.Tensor | None  # kept alive so that its id() is not reused while the layout is cached
    sink_cols: torch.Tensor  # (B, NS)
    seen_by: torch.Tensor  # (B, K) rows of the call that may see each key
    rows: torch.Tensor  # (r,) the sampled query rows
    visible: torch.Tensor  # (B|1, 1, r, K) bool, what the sampled rows may see
    is_sink: torch.Tensor  # (B, K) bool
    has_n: torch.Tensor  # (B|1, 1, r) bool, sampled rows that see a non-sink key
    sampled_seen: torch.Tensor  # (B|1, 1, K) sampled rows that see each key
    non_sink: torch.Tensor  # (B, 1, K, 1) fp32 indicator of the non-sink keys
    unseen: torch.Tensor  # (B, 1, K) bool, keys no row of the call may see (left out of the value median)
    first_sink: torch.Tensor  # (B, 1, 1) long, the first sink column (clamped to a valid index)


def _layout(call, rows_wanted: int) -> _Layout:
    q = call.query
    batch, _, q_len, _ = q.shape
    k_len = call.key.shape[2]
    sink_cols = call.sink_cols
    if sink_cols is None:  # the layout put the sink at key column 0 of every row
        sink_cols = torch.zeros(batch, 1, dtype=torch.long, device=q.device)
    rows = sampled_rows(q_len, rows_wanted, q.device)
    visible = _visible_rows(call, rows, batch, k_len)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)
    seen_by = _seen_by(call, batch, q_len, k_len)
    return _Layout(call.attn_mask, sink_cols, seen_by, rows, visible, is_sink,
                   (visible & ~is_sink[:, None, None, :]).any(-1), visible.sum(2),
                   (~is_sink).to(torch.float32)[:, None, :, None], (seen_by == 0)[:, None, :],
                   sink_cols[:, :1].clamp(min=0)[:, None, :])


def _cached_layout(call, rows_wanted: int, layouts: dict | None) -> _Layout:
    """The call's layout, from ``layouts`` when a call of the same forward had the same one. Calls
    whose sink columns were located per call (padding, explicit sink positions) are not cached:
    telling whether two such tensors agree would read them on the host."""
    if layouts is None or call.sink_cols is not None:
        return _layout(call, rows_wanted)
    key = (None if call.attn_mask is None else id(call.attn_mask), call.causal, tuple(call.query.shape[:1]),
           call.query.shape[2], call.key.shape[2], rows_wanted)
    if key not in layouts:
        layouts[key] = _layout(call, rows_wanted)
    return layouts[key]


def measure_prompt(call, *, rows_wanted: int, threshold: float, min_queries: int,
                   layouts: dict | None = None) -> PromptMeasures:
    """The drain weights and the sampled hidden-sink estimates of one attention call of the prompt.
    ``layouts``: a dict the caller keeps for one forward, so that layers with the same layout share
    its tensors."""
    q, k = call.query, call.key
    q_heads = q.shape[1]
    group = q_heads // k.shape[1]
    lay = _cached_layout(call, rows_wanted, layouts)
    weights, sink_weight, drain = _value_weights(call, lay)
    probs = _real_probabilities(call, lay.rows, lay.visible)
    # a padding row's log-sum-exp is not a number (it sees no key): its factor would turn the
    # sums below into NaN for the whole batch row, so rows without a non-sink key count as 0
    factors = torch.where(lay.has_n, _row_factors(call, probs, lay), 0.0)  # (B, Hq, r)
    # ACT's criterion on the sampled rows; keys seen by too few rows of the whole call are not
    # judged (inspect's rule: min(min_queries, a quarter of the rows), so late keys never "sink")
    n_rows = call.result.sink_stats[..., 1].amax()
    min_q = torch.clamp(torch.div(n_rows, 4, rounding_mode="floor"), min=1, max=min_queries)
    mean_att = torch.matmul(factors[..., None, :], probs).squeeze(-2) / lay.sampled_seen.clamp(min=1)  # (B, Hq, K)
    judged = (lay.seen_by >= min_q) & ~lay.is_sink  # (B, K)
    enough = lay.sampled_seen >= torch.clamp(min_q, max=MIN_SAMPLED_VIEWERS)
    hidden = (mean_att > threshold) & judged[:, None, :] & enough
    col_weight = weights.repeat_interleave(group, dim=1)  # (B, Hq, K)
    part = factors * _rows_dot(probs, (hidden * col_weight)[..., None, :])  # (B, Hq, r)
    counted = lay.has_n.float()
    hidden_part = (part * counted).sum(-1) / counted.sum(-1).clamp(min=1)
    return PromptMeasures(sink_weight.repeat_interleave(group, dim=1), drain, hidden.sum(-1).float(), hidden_part)
