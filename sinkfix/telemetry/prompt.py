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
from typing import Callable, NamedTuple, Sequence

import torch

from sinkfix.ops.reference import sink_key_mask, zero_value_lse

__all__ = ["PromptMeasures", "PromptBatch", "measure_prompt", "sampled_rows", "MIN_SAMPLED_VIEWERS", "BATCH_BYTES"]

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


class _Layout(NamedTuple):
    """What the measures need from the call's layout alone (mask, lengths, sink columns): the same
    for every layer of a forward that shares its mask, so a monitor computes it once per forward
    (about 25 of the ~60 small ops a layer's measures take)."""

    mask: torch.Tensor | None  # kept alive so that its id() is not reused while the layout is cached
    sink_cols: torch.Tensor  # (B, NS)
    seen_by: torch.Tensor  # (B, K) rows of the call that may see each key
    rows: torch.Tensor  # (r,) the sampled query rows
    visible: torch.Tensor  # (B|1, 1, r, K) bool, what the sampled rows may see
    is_sink: torch.Tensor  # (B, K) bool
    has_n: torch.Tensor  # (B|1, 1, r) bool, sampled rows that see a non-sink key
    sampled_seen: torch.Tensor  # (B|1, 1, K) sampled rows that see each key
    non_sink: torch.Tensor  # (B, 1, K, 1) fp32 indicator of the non-sink keys


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
    return _Layout(call.attn_mask, sink_cols, _seen_by(call, batch, q_len, k_len), rows, visible, is_sink,
                   (visible & ~is_sink[:, None, None, :]).any(-1), visible.sum(2),
                   (~is_sink).to(torch.float32)[:, None, :, None])


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


class _Sampled(NamedTuple):
    """What the measures keep of one attention call until its batch is measured: the sampled rows'
    queries and log-sum-exps, the value norms, and a reference to the keys (held by the KV cache
    anyway when there is one); never the whole query."""

    layer: int
    q_rows: torch.Tensor  # (B * Hkv, group * r, D) fp32, unscaled
    lse_rows: torch.Tensor  # (B, Hq, r) fp32, the call's own
    key: torch.Tensor  # (B, Hkv, K, D)
    norms: torch.Tensor  # (B, Hkv, K) fp32 value norms
    n_rows: torch.Tensor  # () the most rows any (batch row, head) of the call counted
    beta: torch.Tensor | None
    extra_logits: torch.Tensor | None
    virtual_sink_logit: torch.Tensor | None


def _capture(call, lay: _Layout) -> _Sampled:
    q = call.query
    batch, q_heads, _, dim = q.shape
    kv_heads = call.key.shape[1]
    r = lay.rows.numel()
    q_rows = q.index_select(2, lay.rows).float().reshape(batch * kv_heads, (q_heads // kv_heads) * r, dim)
    return _Sampled(call.layer, q_rows, call.result.lse.index_select(2, lay.rows).float(), call.key,
                    torch.linalg.vector_norm(call.value, dim=-1, dtype=torch.float32),
                    call.result.sink_stats[..., 1].amax(), call.beta, call.extra_logits, call.virtual_sink_logit)


def _real_probabilities(items: Sequence[_Sampled], lay: _Layout, scale: float, softcap: float | None) -> torch.Tensor:
    """(n, B, Hq, r, K) fp32 ``exp(s_ij - lse_i)`` of the sampled rows of n calls with the same
    layout and shapes, 0 where a row may not look: the stock softmax over the real keys, rebuilt
    from each call's own log-sum-exp. One ``baddbmm`` per call into a shared buffer, the rest once.

    The exponent is clamped to [_EXP_FLOOR, _EXP_CEILING] before ``exp_`` and the keys a row may not
    see are zeroed after it, instead of adding a -inf bias: on CPU, ``exp`` of an argument whose
    result is subnormal (below ~-87.3) or of -inf takes a slow path (a 3 x 192 x 512 block took
    2.0 ms with the bias, 0.5 ms clamped, one thread), and a sink-dominated head puts most of its
    keys there. A clamped probability is ``exp(-87) = 1.6e-38`` instead of a smaller one."""
    first = items[0]
    batch, kv_heads, k_len, dim = first.key.shape
    q_heads, r = first.lse_rows.shape[1], first.lse_rows.shape[2]
    n, bh, gr = len(items), first.q_rows.shape[0], first.q_rows.shape[1]
    lse = torch.stack([it.lse_rows for it in items])
    # a padding row's log-sum-exp is garbage; it sees nothing anyway
    neg_lse = torch.where(torch.isfinite(lse), lse, 0.0).neg_().view(n, bh, gr, 1)
    scores = first.q_rows.new_empty(n, bh, gr, k_len)
    for i, it in enumerate(items):
        keys = it.key.float().reshape(bh, k_len, dim).transpose(1, 2)
        if softcap is None:
            torch.baddbmm(neg_lse[i], it.q_rows, keys, alpha=scale, out=scores[i])
        else:
            torch.bmm(it.q_rows, keys, out=scores[i])
    if softcap is not None:
        scores = scores.mul_(scale / softcap).tanh_().mul_(softcap).add_(neg_lse)
    # the ceiling only matters for keys the row may not see (a later key can score far above the
    # row's log-sum-exp): their exp must stay finite for the zeroing product below
    probs = scores.clamp_(min=_EXP_FLOOR, max=_EXP_CEILING).exp_().view(n, batch, q_heads, r, k_len)
    return probs.mul_(lay.visible)


def _value_weights(norms: torch.Tensor, sink_cols: torch.Tensor, seen_by: torch.Tensor):
    """From value norms (n, B, Hkv, K): drain weights (n, B, Hkv, K), the sink's (n, B, Hkv) and the
    drain ratio (n, B, Hkv), with the median over the keys some row may see (padding and empty cache
    slots left out)."""
    median = torch.nanmedian(norms.masked_fill((seen_by == 0)[:, None, :], float("nan")), dim=-1).values
    weights = (1 - norms / median[..., None]).clamp(0, 1).nan_to_num(0)
    first = sink_cols[:, :1].clamp(min=0)[:, None, :].expand(*norms.shape[:-1], 1)  # (n, B, Hkv, 1)
    return weights, weights.gather(-1, first).squeeze(-1), norms.gather(-1, first).squeeze(-1) / median


def _sink_columns_mass(probs: torch.Tensor, sink_cols: torch.Tensor) -> torch.Tensor:
    """(n, B, Hq, r) mass on the sink columns: |S| gathered columns, not a pass over K."""
    k_len = probs.shape[-1]
    valid = ((sink_cols >= 0) & (sink_cols < k_len))[:, None, None, :]
    index = sink_cols.clamp(0, k_len - 1)[:, None, None, :].expand(*probs.shape[:-1], -1)
    return (probs.gather(-1, index) * valid).sum(-1)


def _stacked(values: list[torch.Tensor | None], fill: float, like: torch.Tensor) -> torch.Tensor | None:
    """The calls' per-head parameters stacked (n, ...), ``fill`` for a call without; None when no call has one."""
    if all(v is None for v in values):
        return None
    return torch.stack([torch.full_like(like, fill) if v is None else v.to(like) for v in values])


def _row_factors(items: Sequence[_Sampled], probs: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """(n, B, Hq, r): what turns a row's stock probability of a non-sink key into the one the call
    applied: the share the zero-value logits leave, times beta's redistribution
    ``(p_N + (1 - beta) p_S) / p_N`` (docs/formulas.md). Sink columns are not needed downstream."""
    lse = torch.stack([it.lse_rows for it in items])
    minus_inf = torch.full_like(lse[0], float("-inf"))
    zeros = [zero_value_lse(it.extra_logits, it.virtual_sink_logit, lay.has_n) for it in items]
    zero = _stacked([None if z is None else z.expand_as(minus_inf) for z in zeros], float("-inf"), minus_inf)
    # no zero-value logit: exp(-inf) = 0 mass, sigmoid(+inf) = 1 exactly
    keep = torch.ones_like(lse) if zero is None else torch.sigmoid(lse - zero)
    heads = lse.shape[2]
    beta = _stacked([it.beta for it in items], 1.0, torch.ones(heads, device=lse.device))
    if beta is None:
        return keep
    p_s = _sink_columns_mass(probs, lay.sink_cols)
    # p_N summed over the non-sink keys themselves, never as 1 - p_S: in a row whose sink takes
    # almost everything (p_S = 1 - 1e-8 is common in SmolLM2) the difference cancels to 0 in fp32
    # and the factor below blew up to 1e29 (seen as dormancy scores of 1e19)
    p_n = torch.matmul(probs, lay.non_sink).squeeze(-1).clamp(min=1e-30)
    beta = torch.where(lay.has_n, beta.float()[:, None, :, None], 1.0)
    return keep * (p_n + (1 - beta) * p_s) / p_n


def _measure(items: Sequence[_Sampled], lay: _Layout, scale: float, softcap: float | None, *, threshold: float,
             min_queries: int) -> PromptMeasures:
    """The measures of n calls with one layout and the same shapes, stacked (n, ...)."""
    group = items[0].lse_rows.shape[1] // items[0].key.shape[1]
    weights, sink_weight, drain = _value_weights(torch.stack([it.norms for it in items]), lay.sink_cols, lay.seen_by)
    probs = _real_probabilities(items, lay, scale, softcap)
    # a padding row's log-sum-exp is not a number (it sees no key): its factor would turn the
    # sums below into NaN for the whole batch row, so rows without a non-sink key count as 0
    factors = torch.where(lay.has_n, _row_factors(items, probs, lay), 0.0)  # (n, B, Hq, r)
    # ACT's criterion on the sampled rows; keys seen by too few rows of the whole call are not
    # judged (inspect's rule: min(min_queries, a quarter of the rows), so late keys never "sink")
    n_rows = torch.stack([it.n_rows for it in items]).view(-1, 1, 1)
    min_q = torch.clamp(torch.div(n_rows, 4, rounding_mode="floor"), min=1, max=min_queries)  # (n, 1, 1)
    mean_att = torch.matmul(factors[..., None, :], probs).squeeze(-2) / lay.sampled_seen.clamp(min=1)  # (n, B, Hq, K)
    judged = (lay.seen_by >= min_q) & ~lay.is_sink  # (n, B, K)
    enough = lay.sampled_seen >= torch.clamp(min_q, max=MIN_SAMPLED_VIEWERS)[..., None]  # (n, B|1, 1, K)
    hidden = (mean_att > threshold) & judged[:, :, None, :] & enough
    col_weight = weights.repeat_interleave(group, dim=2)  # (n, B, Hq, K)
    part = factors * torch.matmul(probs, (hidden * col_weight)[..., None]).squeeze(-1)  # (n, B, Hq, r)
    counted = lay.has_n.float()
    hidden_part = (part * counted).sum(-1) / counted.sum(-1).clamp(min=1)
    return PromptMeasures(sink_weight.repeat_interleave(group, dim=2), drain, hidden.sum(-1).float(), hidden_part)


def measure_prompt(call, *, rows_wanted: int, threshold: float, min_queries: int,
                   layouts: dict | None = None) -> PromptMeasures:
    """The drain weights and the sampled hidden-sink estimates of one attention call of the prompt
    (what :class:`PromptBatch` computes for several calls at once). ``layouts``: a dict the caller
    keeps for one forward, so that calls with the same layout share its tensors."""
    lay = _cached_layout(call, rows_wanted, layouts)
    stacked = _measure([_capture(call, lay)], lay, call.scale, call.softcap, threshold=threshold,
                       min_queries=min_queries)
    return PromptMeasures(*(t[0] for t in stacked))


#: The most memory one batch's probability block may take (n x B x Hq x rows x K fp32); a larger
#: batch is measured in parts. A 512-token SmolLM2 prompt with 64 rows takes 1.2 MB per layer.
BATCH_BYTES = 64 << 20


class PromptBatch:
    """The prompt's attention calls of one forward, measured together.

    Each call keeps its sampled rows (:func:`_capture`: a handful of ops); calls with the same layout
    and shapes are then measured at once (:func:`_measure`), so that the ~60 small operations of
    the estimate run once per batch instead of once per layer (on SmolLM2, 30 layers, one thread,
    they were about half of the estimate's time). ``flush`` measures what is pending and hands the
    stacked result to ``deliver(layers, measures, rows)``; a call of another layout, or one that would
    take the batch past ``BATCH_BYTES``, flushes first. The caller flushes at the end of the forward.
    """

    def __init__(self, deliver: Callable[[list[int], PromptMeasures, torch.Tensor], None], *, rows_wanted: int,
                 threshold: float, min_queries: int, max_bytes: int = BATCH_BYTES) -> None:
        self.deliver, self.rows_wanted, self.threshold, self.min_queries = deliver, rows_wanted, threshold, min_queries
        self.max_bytes = max_bytes
        self.layouts: dict = {}
        self._pending: list[_Sampled] = []
        self._rows: list[torch.Tensor] = []
        self._key: tuple | None = None
        self._lay: _Layout | None = None
        self._bytes = 0

    def new_forward(self) -> None:
        self.flush()
        self.layouts = {}

    def discard(self) -> None:
        """Drop what is pending without measuring it (a new request after an interrupted one)."""
        self._pending, self._rows, self._key, self._lay, self._bytes = [], [], None, None, 0
        self.layouts = {}

    def add(self, call) -> None:
        lay = _cached_layout(call, self.rows_wanted, self.layouts)
        batch, q_heads = call.query.shape[:2]
        size = 4 * batch * q_heads * lay.rows.numel() * call.key.shape[2]
        key = (id(lay), tuple(call.query.shape), tuple(call.key.shape), tuple(call.value.shape), call.scale,
               call.softcap, call.query.device)
        if self._pending and (key != self._key or self._bytes + size > self.max_bytes):
            self.flush()
        self._key, self._lay = key, lay
        self._pending.append(_capture(call, lay))
        self._rows.append(call.result.sink_stats[..., 1])
        self._bytes += size

    def flush(self) -> None:
        if not self._pending:
            return
        items, rows, lay, key = self._pending, self._rows, self._lay, self._key
        self._pending, self._rows, self._key, self._lay, self._bytes = [], [], None, None, 0  # before deliver may raise
        scale, softcap = key[4], key[5]
        measures = _measure(items, lay, scale, softcap, threshold=self.threshold, min_queries=self.min_queries)
        self.deliver([it.layer for it in items], measures, torch.stack(rows))
