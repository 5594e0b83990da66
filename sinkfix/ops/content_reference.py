"""fp64 reference of content-dependent sinks ("hidden sinks", the rule of ACT, Yu et al. 2024).

The written rule (docs/formulas.md, "Content-dependent sinks"), per batch row b and query head h:

1. **Column means.** With ``p_ij`` the stock softmax attention of row i over the *real* keys it
   may see (zero-value logits left out), key j's column mean is
   ``mean_j = sum_{i sees j} p_ij / n_j``, where ``n_j`` is the number of query rows that may see j.
2. **Candidates.** ``C = {j : n_j >= min_rows and mean_j > threshold}``.
3. **Keep first.** The first candidate (smallest key column) is kept. The hidden sinks are
   ``H = C - {first of C} - S`` (S: the positional sink set), in the heads the rule corrects.
4. **Correction.** For row i with real-key masses ``l_S, l_H, l_N`` (N: every other visible key)
   and zero-value mass ``l_V``, ``Z = l_S + l_H + l_N + l_V``. First the hidden sinks: their mass
   becomes ``beta_H l_H`` and the freed ``(1 - beta_H) l_H`` goes to S and N in proportion to their
   weights, a factor ``g = 1 + (1 - beta_H) l_H / (l_S + l_N)``. Then the positional rule of
   :func:`sinkfix.ops.reference.reference_sink_attention` on what S and N now hold::

       o = beta_H acc_H / Z + g * (beta_S acc_S + (l_N + (1 - beta_S) l_S) acc_N / l_N) / Z

   With ``beta_S = 1`` this is ACT's rule exactly (the kept first sink is one of the "other keys"
   and receives its share); with no hidden sinks it is the positional formula. Rows that see no key
   outside H keep ``beta_H = 1``; rows that see no key outside S keep ``beta_S = 1``. The policy's
   virtual sink logit counts in rows that see a key outside S (as in the positional formula).

Nothing here is fast: it materialises the (B, H, Q, K) scores on purpose.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sinkfix.ops.reference import masked_scores, share_within, shifted_exp, sink_key_mask

__all__ = ["ColumnStats", "column_stats_reference", "decide_hidden_sinks", "reference_content_sink_attention",
           "sink_candidates"]


class ColumnStats(NamedTuple):
    """Per key column: ``mass`` (B, Hq, K) the sum over the rows that see it of their stock
    attention on it; ``rows`` (B, K) how many query rows see it."""

    mass: torch.Tensor
    rows: torch.Tensor


def column_stats_reference(q, k, *, attn_mask=None, causal=False, causal_offset=0, sliding_window=None, scale=None,
                           softcap=None, compute_dtype=torch.float64) -> ColumnStats:
    """Step 1 of the rule, from the full score matrix (``compute_dtype``, fp64 by default)."""
    scores, visible = masked_scores(q, k, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset,
                                    sliding_window=sliding_window, scale=scale, softcap=softcap,
                                    compute_dtype=compute_dtype)
    sees_any = visible.any(-1, keepdim=True)
    probs = torch.softmax(torch.where(sees_any, scores, 0.0), dim=-1) * visible
    return ColumnStats(probs.sum(2), visible[:, 0].sum(1).to(compute_dtype))


def sink_candidates(stats: ColumnStats, *, threshold: float, min_rows: int) -> torch.Tensor:
    """Step 2: (B, Hq, K) bool, the columns whose mean attention is above ``threshold`` over at
    least ``min_rows`` rows."""
    rows = stats.rows[:, None, :]
    mean = stats.mass / rows.clamp(min=1)
    return (mean > threshold) & (rows >= min_rows) & (rows > 0)


def decide_hidden_sinks(stats: ColumnStats, is_sink: torch.Tensor | None, *, threshold: float, min_rows: int,
                        heads: torch.Tensor | None, kept_before: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 2-3: the hidden-sink mask (B, Hq, K) bool from column statistics. ``is_sink`` (B, K)
    is the positional sink set; ``heads`` (Hq,) bool the heads the rule corrects (None = all).
    ``kept_before`` (B, Hq) bool: the sequence has a candidate before these columns (keys a sliding
    window no longer shows), which is the one kept: then every candidate here is a hidden sink."""
    candidate = sink_candidates(stats, threshold=threshold, min_rows=min_rows)
    # argmax returns the first maximal index: the first candidate column of each (batch, head)
    first = candidate.to(torch.uint8).argmax(-1, keepdim=True)
    keep = torch.zeros_like(candidate).scatter_(-1, first, True)
    if kept_before is not None:
        keep = keep & ~kept_before.to(keep.device)[..., None]
    hidden = candidate & ~keep
    if is_sink is not None:
        hidden = hidden & ~is_sink[:, None, :].to(hidden.device)
    if heads is not None:
        hidden = hidden & heads.to(hidden.device).reshape(1, -1, 1)
    return hidden


def reference_content_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    hidden: torch.Tensor,
    hidden_beta: torch.Tensor,
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
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4 for a given hidden-sink mask ``hidden`` (B, Hq, K) bool and ``hidden_beta`` (Hq,).
    Other arguments and the return value ``(out, probs, lse)`` as
    :func:`sinkfix.ops.reference.reference_sink_attention`; ``lse`` = log(l_S + l_H + l_N)."""
    scored = masked_scores(q, k, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset,
                           sliding_window=sliding_window, scale=scale, softcap=softcap, compute_dtype=compute_dtype)
    scores, visible = scored.scores, scored.visible
    batch, q_heads, q_len, k_len = scores.shape
    cd = compute_dtype
    v64 = v.to(cd).repeat_interleave(q_heads // v.shape[1], dim=1)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, None, :]
    is_hidden = hidden.to(q.device)[:, :, None, :] & ~is_sink
    in_s = visible & is_sink
    in_h = visible & is_hidden
    in_n = visible & ~is_sink & ~is_hidden
    e, l_v = shifted_exp(scores, extra_logits, virtual_sink_logit, virtual_rows=(in_n | in_h).any(-1, keepdim=True))
    l_s = (e * in_s).sum(-1, keepdim=True)
    l_h = (e * in_h).sum(-1, keepdim=True)
    l_n = (e * in_n).sum(-1, keepdim=True)
    z = l_s + l_h + l_n + l_v
    safe_z = torch.where(z > 0, z, torch.ones_like(z))

    ones = torch.ones(1, q_heads, 1, 1, dtype=cd, device=q.device)
    b_s = ones if beta is None else beta.to(device=q.device, dtype=cd).reshape(1, q_heads, 1, 1)
    b_h = hidden_beta.to(device=q.device, dtype=cd).reshape(1, q_heads, 1, 1)
    # Which keys a row sees is a fact of the mask, not of l > 0 (as in reference_sink_attention):
    # under the row's shared maximum l_N underflows once a sink out-scores the other keys by ~745
    # nats in fp64 (~100 in fp32), and such rows then ignored beta_S (2.66 off at a gap of 800 in
    # fp64, 110 in fp32); l_S + l_N likewise once a hidden sink does, and such rows ignored beta_H.
    in_rest = in_s | in_n  # what receives the hidden sinks' freed mass
    has_rest = in_rest.any(-1, keepdim=True)
    b_h = torch.where(has_rest, b_h, torch.ones_like(b_h))  # rows that see only hidden sinks stay stock
    has_n = in_n.any(-1, keepdim=True)
    b_s = torch.where(has_n, b_s, torch.ones_like(b_s))  # rows that see only sinks keep their sink mass

    # S and N hold (l_S + l_N + (1 - beta_H) l_H) / Z = g (l_S + l_N) / Z between them, shared as
    # their own weights say; then the positional rule inside it: S keeps beta_S of its share and N
    # takes the rest, spread over N in proportion to its weights (each under its own maximum)
    rest_mass = (l_s + l_n + (1 - b_h) * l_h) / safe_z
    within_rest = share_within(scores, in_rest)
    share_s = (within_rest * in_s).sum(-1, keepdim=True)
    share_n = (within_rest * in_n).sum(-1, keepdim=True)
    probs = (b_h * e * in_h / safe_z + rest_mass * b_s * within_rest * in_s
             + rest_mass * (share_n + (1 - b_s) * share_s) * share_within(scores, in_n))
    out = probs @ v64
    # over the real keys under their own maximum: a large zero-value logit in row_max made
    # log(l_S + l_H + l_N) underflow to -inf (a virtual logit of 120 in fp32)
    lse = torch.logsumexp(scores, dim=-1)
    return out, probs, lse
