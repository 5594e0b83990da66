"""fp64 reference of sinkfix's sink-aware attention: the written formula, nothing clever.

This is the single source of truth that the PyTorch path, the Triton kernels, the tests and the
benchmarks are all compared against. It materialises the full (B, H, Q, K) score matrix on
purpose: clarity over speed.

The formula (``docs/formulas.md`` derives it; README "Policies"). For one query row i and head h, split the
visible keys into the sink set S and the rest N, and let a_h be the extra zero-value logits
(the model's learned ``s_aux``, counted in every row, and the policy's virtual sink logit b_h,
counted only in rows that see a non-sink key; both optional)::

    l_S = sum_{j in S} e^{s_ij}      acc_S = sum_{j in S} e^{s_ij} v_j
    l_N = sum_{j in N} e^{s_ij}      acc_N = sum_{j in N} e^{s_ij} v_j
    l_V = sum_a e^{a} + [N not empty] e^{b_h}      (zero value vector)
    Z   = l_S + l_N + l_V

    o = beta * acc_S / Z + (l_N + (1 - beta) * l_S) / Z * acc_N / l_N      if N is not empty
    o = acc_S / Z                                                         if N is empty

beta = 1 is plain softmax (identity); beta = 0 drops the sink and renormalises over N. The mass
of the zero-value logits is never redistributed. A row that sees only sink keys (the sink's own row)
is left as the stock model computes it: neither beta nor ``virtual_sink_logit`` touches it, because that
row is the sink token's own representation, which every later layer reads (rescaling it wrecks the
model, docs/formulas.md; without BOS, exempting it from the virtual logit raised the calibrated SmolLM2
profile's validation perplexity gain from 1.61% to 2.12%). A policy that wants the virtual logit in
that row too passes it in ``extra_logits`` instead. Rows where the sink is not visible (masked,
evicted by a sliding window) have l_S = 0 and are plain softmax. Rows that see no key at all
return zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["visibility_mask", "sink_key_mask", "zero_value_lse", "share_within", "MaskedScores", "masked_scores",
           "shifted_exp", "reference_sink_attention", "reference_residual_clip"]


def visibility_mask(
    batch: int,
    q_len: int,
    k_len: int,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean (B, 1|H, Q, K) mask, True = query row may attend to key column.

    ``attn_mask`` (True = attend) is combined with a causal rule ``j <= i + causal_offset``
    (``causal_offset = 0`` is transformers' upper-left alignment, ``K - Q`` bottom-right) and an
    optional sliding window ``j > i + causal_offset - sliding_window``.
    """
    rows = torch.arange(q_len, device=device)[:, None] + causal_offset
    cols = torch.arange(k_len, device=device)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        visible &= cols <= rows
    if sliding_window is not None:
        visible &= cols > rows - sliding_window
    visible = visible.expand(batch, 1, q_len, k_len)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be bool (True = attend), got {attn_mask.dtype}")
        visible = visible & attn_mask
    return visible


def sink_key_mask(sink_cols: torch.Tensor | None, batch: int, k_len: int, device) -> torch.Tensor:
    """(B, K) bool: key column j of batch b is a sink. ``sink_cols`` is (B, NS), -1 = unused slot."""
    if sink_cols is None:
        return torch.zeros(batch, k_len, dtype=torch.bool, device=device)
    # one comparison per slot: no boolean-mask indexing, so no host synchronisation and no
    # data-dependent shape (the compiler keeps it in one graph); -1 and out-of-range match nothing
    cols = sink_cols.to(device=device, dtype=torch.long)
    keys = torch.arange(k_len, device=device)
    return (cols[:, :, None] == keys[None, None, :]).any(1).expand(batch, k_len)


def zero_value_lse(
    extra_logits: torch.Tensor | None, virtual_sink_logit: torch.Tensor | None, sees_non_sink: torch.Tensor
) -> torch.Tensor | None:
    """log of the zero-value mass l_V per row, in fp32, for paths that combine log-sum-exps: the
    ``extra_logits`` (Hq, E) in every row, ``virtual_sink_logit`` (Hq,) where ``sees_non_sink`` (bool,
    broadcastable to (B, Hq, Q)) holds. Shape (1|B, Hq, 1|Q); None when there is neither."""
    lse = None
    if extra_logits is not None:
        lse = torch.logsumexp(extra_logits.float(), dim=-1)[None, :, None]
    if virtual_sink_logit is not None:
        virtual = virtual_sink_logit.float().to(sees_non_sink.device)[None, :, None]
        virtual = torch.where(sees_non_sink, virtual, float("-inf"))
        lse = virtual if lse is None else torch.logaddexp(lse.to(virtual.device), virtual)
    return lse


def share_within(scores: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Each member key's share of the members' mass in its row, ``e_j / sum_{i in member} e_i``,
    under the members' own maximum (one term is 1, so a set far below the row's maximum keeps its
    range); 0 outside ``member`` and in rows without a member. ``scores`` (..., K) with -inf where
    a key is not seen, ``member`` a bool mask broadcastable to it."""
    masked = scores.masked_fill(~member, float("-inf"))
    top = masked.amax(-1, keepdim=True)
    e = torch.exp(masked - torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach())
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


class MaskedScores(NamedTuple):
    """``scores`` (B, Hq, Q, K) in the compute dtype, -inf where a key is not seen; ``visible``
    the (B, Hq, Q, K) bool mask of the keys each row may see."""

    scores: torch.Tensor
    visible: torch.Tensor


def masked_scores(q, k, *, attn_mask=None, causal=False, causal_offset=0, sliding_window=None, scale=None,
                  softcap=None, compute_dtype=torch.float64) -> MaskedScores:
    """The attention scores of q (B, Hq, Q, D) against k (B, Hkv, K, D) as the formulas write them:
    scaled, soft-capped, query head h reading kv head h // (Hq // Hkv), unseen keys at -inf
    (masking before exp keeps gradients finite: exp of a large unseen score would overflow)."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} not a multiple of kv heads {kv_heads}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = k.to(compute_dtype).repeat_interleave(q_heads // kv_heads, dim=1)
    scores = (q.to(compute_dtype) @ keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visibility_mask(batch, q_len, k_len, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset,
                              sliding_window=sliding_window, device=q.device).expand(batch, q_heads, q_len, k_len)
    return MaskedScores(scores.masked_fill(~visible, float("-inf")), visible)


def shifted_exp(scores: torch.Tensor, extra_logits: torch.Tensor | None, virtual_sink_logit: torch.Tensor | None,
                *, virtual_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e, l_V)``: e^(s - m) for every key and the zero-value mass l_V under the same row maximum m
    (over the keys and the zero-value logits): ``extra_logits`` (Hq, E) in every row,
    ``virtual_sink_logit`` (Hq,) in the rows where ``virtual_rows`` (B, Hq, Q, 1) holds."""
    batch, q_heads, q_len, _ = scores.shape
    row_max = scores.amax(-1, keepdim=True)
    zero_value = []
    if extra_logits is not None:
        zero_value.append(extra_logits.to(device=scores.device, dtype=scores.dtype)[None, :, None, :])
    if virtual_sink_logit is not None:
        virtual = virtual_sink_logit.to(device=scores.device, dtype=scores.dtype).reshape(1, q_heads, 1, 1)
        zero_value.append(torch.where(virtual_rows, virtual, torch.full_like(virtual, float("-inf"))))
    extra = None
    if zero_value:
        extra = torch.cat([t.expand(batch, q_heads, q_len, t.shape[-1]) for t in zero_value], dim=-1)
        row_max = torch.maximum(row_max, extra.amax(-1, keepdim=True))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)
    l_v = torch.zeros_like(row_max) if extra is None else torch.exp(extra - row_max).sum(-1, keepdim=True)
    return e, l_v


def reference_sink_attention(
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
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sink-aware attention, computed in ``compute_dtype`` (fp64 by default).

    With ``compute_dtype=torch.float32`` the same code is the dense PyTorch path (it is
    differentiable, and it is the "same-dtype PyTorch implementation" of the tolerance rule).

    Shapes: q (B, Hq, Q, D); k, v (B, Hkv, K, D) with Hq % Hkv == 0 (query head h reads kv head
    h // (Hq // Hkv)); ``sink_cols`` (B, NS) long, -1 for unused slots; ``beta`` (Hq,) in [0, 1];
    ``extra_logits`` (Hq, E): E zero-value logits per head counted in every row (the model's
    learned ``s_aux``), -inf entries are ignored; ``virtual_sink_logit`` (Hq,): the policy's virtual
    sink logit, counted only in rows that see at least one non-sink key.

    Returns ``(out, probs, lse)``: out (B, Hq, Q, D) in ``compute_dtype``; probs (B, Hq, Q, K) the corrected
    attention probabilities (rows sum to 1 minus the zero-value mass); lse (B, Hq, Q) =
    log(l_S + l_N), the log-sum-exp over real keys only (-inf where nothing is visible).
    """
    scored = masked_scores(q, k, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset,
                           sliding_window=sliding_window, scale=scale, softcap=softcap, compute_dtype=compute_dtype)
    scores, visible = scored.scores, scored.visible
    batch, q_heads, q_len, k_len = scores.shape
    cd = compute_dtype
    v64 = v.to(cd).repeat_interleave(q_heads // v.shape[1], dim=1)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, None, :]
    in_s = visible & is_sink
    in_n = visible & ~is_sink
    e, l_v = shifted_exp(scores, extra_logits, virtual_sink_logit, virtual_rows=in_n.any(-1, keepdim=True))
    l_s = (e * in_s).sum(-1, keepdim=True)
    l_n = (e * in_n).sum(-1, keepdim=True)
    z = l_s + l_n + l_v

    if beta is None:
        beta = torch.ones(q_heads, dtype=cd, device=q.device)
    b = beta.to(device=q.device, dtype=cd)[None, :, None, None]
    # Whether a row sees a non-sink key is a fact of the mask, not of l_N > 0: under the row's
    # shared maximum l_N underflows once the sink out-scores the other keys by ~100 nats in fp32
    # (~745 in fp64), and such rows then ignored beta (an output 5.3 off at a gap of 110).
    has_n = in_n.any(-1, keepdim=True)
    b = torch.where(has_n, b, torch.ones_like(b))  # sink-only rows stay untouched
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    p_sink = b * e * in_s / safe_z
    # the non-sink keys' share of their own mass, times the mass the row gives them, p_N + (1 - beta) p_S
    p_rest = (l_n + (1 - b) * l_s) / safe_z * share_within(scores, in_n)
    probs = p_sink + p_rest
    out = probs @ v64
    # over the real keys under their own maximum: a large zero-value logit in row_max made
    # log(l_S + l_N) underflow to -inf (a virtual logit of 120 in fp32)
    lse = torch.logsumexp(scores, dim=-1)
    return out, probs, lse


def reference_residual_clip(
    hidden: torch.Tensor,
    threshold: torch.Tensor,
    is_sink: torch.Tensor | None = None,
    sink_norm: float | None = None,
) -> torch.Tensor:
    """fp64 reference of residual clipping.

    hidden (B, S, D); threshold (B,) per-sequence L2-norm cap (inf = no cap); is_sink (B, S) bool,
    the tokens of the sink set. Each non-sink token whose L2 norm exceeds the threshold is scaled down to it.
    Sink tokens are exempt when ``sink_norm`` is None, otherwise their norm is clamped to
    ``sink_norm`` (scaled down only, never up, never zeroed).
    """
    h64 = hidden.double()
    norms = h64.norm(dim=-1)
    cap = threshold.double().to(hidden.device)[:, None].expand_as(norms)
    if is_sink is not None:
        sink_cap = torch.full_like(cap, float("inf") if sink_norm is None else float(sink_norm))
        cap = torch.where(is_sink.to(hidden.device), sink_cap, cap)
    factor = torch.where(norms > cap, cap / norms, torch.ones_like(norms))
    return h64 * factor[..., None]
