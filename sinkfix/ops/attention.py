"""Sink-aware attention on PyTorch, and the dispatch between the PyTorch path and the Triton kernels.

The PyTorch path uses the split formulation (docs/formulas.md) so that it never materialises the
(B, H, Q, K) score matrix unless the caller asks for the probabilities:

* the non-sink part (keys N) goes through a fused attention op that also returns the log-sum-exp
  (:mod:`sinkfix.ops.flash`);
* the sink part (a handful of key columns S) is computed explicitly: Q x |S| scores per head;
* the two are combined by their log-sum-exps. With ``p`` the sink's share of the real keys' mass,
  ``p = sigmoid(lse_S - lse_N)``, the policy output is ``lerp(o_N, o_S, beta * p)`` times the share
  the zero-value logits leave, ``sigmoid(lse_real - lse_zero)``: a handful of element-wise ops per
  row, no cancellation when the sink takes nearly all the mass (``o_N`` comes from its own
  normalised pass).

Every choice that depends on the policy (identity or not) or on the layout (a plain causal window
whose sink is key column 0) is made from ``None`` arguments, flags and shapes, never from tensor
values: the path has no host synchronisation, so it neither stalls a GPU nor breaks a compiled
graph. The fast paths run inside one ``torch.library`` custom op (``sinkfix::sink_attention``,
:mod:`sinkfix.ops.custom_ops`), opaque and shape-known to ``torch.compile``.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch

from sinkfix.errors import BackendUnavailableError, UsageError
from sinkfix.kernels.arguments import (
    TORCH_DTYPES, attention_scale, causal_offset_arg, check_key_padding, check_qkv_shapes, positive_number,
)
from sinkfix.kernels.arguments import check_attention_arguments as check_shared_arguments
from sinkfix.ops.flash import cpu_flash_available, flash_with_lse, fused_lse_available, fused_lse_backward_available
from sinkfix.ops.reference import reference_sink_attention, sink_key_mask, visibility_mask, zero_value_lse

__all__ = ["AttentionResult", "sink_stats", "first_column_row_mass", "sink_attention", "sink_attention_torch",
           "flash_with_lse", "cpu_flash_available", "resolve_backend", "BACKENDS", "check_attention_arguments",
           "fold_key_padding", "fold_checked_key_padding"]


class AttentionResult(NamedTuple):
    out: torch.Tensor  # (B, Hq, Q, D), input dtype
    lse: torch.Tensor | None  # (B, Hq, Q) fp32, log(l_S + l_N) over real keys
    sink_mass: torch.Tensor | None  # (B, Hq, Q) fp32, stock softmax mass on the sink set (before correction)
    probs: torch.Tensor | None  # (B, Hq, Q, K) corrected probabilities, only when asked for
    # (B, Hq, 2) fp32, only when asked for (need_sink_stats): [..., 0] the sink mass before sink
    # scaling (as ``sink_mass``) summed over the rows that see a non-sink key, [..., 1] the number of
    # those rows. What serving-time telemetry accumulates (docs/monitoring.md); see sink_stats().
    sink_stats: torch.Tensor | None = None


def sink_stats(row_mass: torch.Tensor, has_n: torch.Tensor | None) -> torch.Tensor:
    """Pack per-row sink masses (B, Hq, Q) into the (B, Hq, 2) statistics of AttentionResult.

    ``has_n`` (bool, broadcastable to (B, Hq, Q)) marks the rows that see a non-sink key; None
    means every row does (known from the layout). Rows outside it are left out of both sums, and
    whatever they hold (a garbage log-sum-exp of a row that sees nothing) never reaches the sum.
    """
    if has_n is None:
        # one op instead of full + stack: a decode step is made of small ops (docs/inference.md);
        # with one query row (a decode step) the row is its own sum, so the pad is the only op
        rows = row_mass.shape[-1]
        summed = row_mass if rows == 1 else row_mass.sum(-1, keepdim=True)
        if torch.compiler.is_compiling():
            # the count as a tensor: float() of a traced prompt's symbolic row count fixed the graph
            # to that length (a monitored identity without a mask compiled once per prompt length)
            return torch.cat((summed, torch.ones_like(summed).mul_(rows)), dim=-1)
        return torch.nn.functional.pad(summed, (0, 1), value=float(rows))
    has_n = has_n.expand_as(row_mass)
    mass = torch.where(has_n, row_mass, 0.0).sum(-1)
    return torch.stack((mass, has_n.sum(-1).to(mass.dtype)), dim=-1)


def first_column_row_mass(q: torch.Tensor, k0: torch.Tensor, lse: torch.Tensor,
                          scale: float | torch.Tensor) -> torch.Tensor:
    """Plain softmax's mass on key column 0 of single query rows, from their log-sum-exp alone:
    ``exp(scale * <q, k_0> - lse)``, fp32.

    q (..., Hq, D), k0 (..., Hkv, D) the sink key of each row's kv head (Hq % Hkv == 0), lse
    (..., Hq), ``scale`` a float or a tensor broadcastable to (..., Hq). Any leading shape: a
    monitor computes a decode step's rows of every layer at once, (L, B, ...), with one product
    (docs/monitoring.md: per layer the same few ops cost more in Python set-up than in arithmetic).
    """
    *lead, q_heads, head_dim = q.shape
    kv_heads = k0.shape[-2]
    if q_heads % kv_heads or tuple(k0.shape[:-2]) != tuple(lead) or tuple(lse.shape) != (*lead, q_heads):
        raise ValueError(f"first_column_row_mass: q {tuple(q.shape)}, k0 {tuple(k0.shape)} and lse "
                         f"{tuple(lse.shape)} do not describe the same rows")
    group = q_heads // kv_heads
    q32 = _fp32(q)
    if isinstance(scale, torch.Tensor):  # per-row scales go into the queries, one multiply
        q32 = q32 * scale.to(torch.float32).expand(*lead, q_heads)[..., None]
        scale = 1.0
    q_grouped = q32.reshape(-1, group, head_dim)
    k_col = _fp32(k0).reshape(-1, head_dim, 1)
    logit = torch.baddbmm(_fp32(lse).reshape(-1, group, 1), q_grouped, k_col, beta=-1, alpha=scale)
    return logit.exp_().view(*lead, q_heads)


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Layout(NamedTuple):
    """Which keys each query row sees: the arguments of :func:`visibility_mask`."""

    attn_mask: torch.Tensor | None
    causal: bool
    causal_offset: int
    sliding_window: int | None

    def is_plain(self, q_len: int, k_len: int) -> bool:
        """No mask and no window, and either full attention or causal with Q == K: the flash op's
        own ``is_causal`` (upper-left) expresses it, no mask needs to be built."""
        simple_causal = self.causal and self.causal_offset == 0 and q_len == k_len
        return self.attn_mask is None and self.sliding_window is None and (simple_causal or not self.causal)

    def visible(self, batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
        return visibility_mask(batch, q_len, k_len, **self._asdict(), device=device)


# -- the dense path (probabilities, gradients, softcap, no fused op) ------------------------------
def _dense_path(q, k, v, layout: _Layout, scale, softcap, sink_cols, beta, extra_logits, virtual_sink_logit,
                return_probs: bool, need_sink_mass: bool, need_sink_stats: bool = False) -> AttentionResult:
    """The reference formula in fp32 (fp64 for fp64 inputs): differentiable, returns probabilities."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    common = dict(**layout._asdict(), scale=scale, softcap=softcap, sink_cols=sink_cols, extra_logits=extra_logits,
                  virtual_sink_logit=virtual_sink_logit, compute_dtype=compute)
    out, probs, lse = reference_sink_attention(q, k, v, beta=beta, **common)
    sink_mass = stats = None
    if need_sink_mass or need_sink_stats:
        # the mass on the sink set before sink scaling (zero-value logits counted, as in the split
        # path), recomputed with beta = 1
        _, p_stock, _ = reference_sink_attention(q, k, v, **common)
        is_sink = sink_key_mask(sink_cols, q.shape[0], k.shape[2], q.device)[:, None, None, :]
        sink_mass = (p_stock * is_sink).sum(-1).float()
        if need_sink_stats:
            visible = layout.visible(q.shape[0], q.shape[2], k.shape[2], q.device)
            stats = sink_stats(sink_mass, (visible & ~is_sink).any(-1))
    return AttentionResult(out.to(q.dtype), lse.float(), sink_mass if need_sink_mass else None,
                           probs if return_probs else None, stats)


# -- the split path -------------------------------------------------------------------------------
class _Part(NamedTuple):
    """Softmax attention over one set of keys: ``out`` normalised over them (B, Hq, Q, D|1),
    ``lse`` (B, Hq, Q) fp32, -inf for rows that see none of them (``out`` is finite there)."""

    out: torch.Tensor
    lse: torch.Tensor


def _repeat_heads(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _first_column_parts(q, k, v, layout: _Layout, scale: float) -> tuple[_Part, _Part, bool]:
    """Sink = key column 0 of every row, no mask: the non-sink part is one flash call on the keys
    from column 1 on (causal rows 1.. keep upper-left alignment, row 0 sees only the sink), the sink
    part one q.k_0 dot per row. The flag says whether every row sees a non-sink key (known from
    the layout: full attention over K >= 2 keys, e.g. a decode step), which spares the epilogue
    its per-row guards."""
    q_heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
    group = q_heads // k.shape[1]
    # split() rather than slicing: under autograd each slice's backward fills a zero tensor of the
    # whole input and adds into it, split's backward is one cat (calibration: ~0.1 s of fills per
    # step on SmolLM2 at 512 tokens)
    k0, k_rest = k.split((1, k_len - 1), dim=2)
    v0, v_rest = v.split((1, k_len - 1), dim=2)
    k0 = _repeat_heads(k0, group)  # (B, Hq, 1, D): one key row per head, tiny
    v0 = _repeat_heads(v0, group)
    s0 = torch.matmul(q, k0.transpose(-1, -2)).squeeze(-1).float().mul_(scale)  # (B, Hq, Q)
    sink = _Part(v0, s0)
    first_row = 1 if layout.causal else 0
    if k_len < 2 or q_len <= first_row:
        return _Part(torch.zeros_like(q), torch.full_like(s0, float("-inf"))), sink, False
    q_rest = q.split((first_row, q_len - first_row), dim=2)[1] if first_row else q
    o, lse = flash_with_lse(q_rest, k_rest, v_rest, visible=None, is_causal=layout.causal, scale=scale)
    if not first_row:
        return _Part(o, lse.float()), sink, True
    o = torch.cat([torch.zeros_like(q[:, :, :1]), o], dim=2)
    lse = torch.cat([torch.full_like(s0[:, :, :1], float("-inf")), lse.float()], dim=2)
    return _Part(o, lse), sink, False


def distinct_sink_cols(sink_cols: torch.Tensor) -> torch.Tensor:
    """``sink_cols`` (B, NS) with a column listed again in its row replaced by -1 (absent): the sink
    set is a set (the reference's mask, the kernels), and gathering a column twice counted its mass
    twice (0.18 off the reference with ``[[2, 2]]`` and beta 0.5)."""
    slots = sink_cols.shape[1]
    if slots < 2:
        return sink_cols
    earlier = torch.ones(slots, slots, dtype=torch.bool, device=sink_cols.device).tril(-1)
    repeated = ((sink_cols[:, :, None] == sink_cols[:, None, :]) & earlier & (sink_cols[:, :, None] >= 0)).any(-1)
    return sink_cols.masked_fill(repeated, -1)


def _sink_scores(q, k, visible: torch.Tensor, sink_cols: torch.Tensor | None, scale: float, v=None):
    """The sink columns gathered and scored explicitly: scores (B, Hq, Q, NS) fp32, -inf where a
    row may not see the column, and the columns' values (B, Hq, NS, D) fp32 when ``v`` is given
    (|S| key rows per head: tiny)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if sink_cols is None:
        sink_cols = torch.full((batch, 1), -1, dtype=torch.long, device=q.device)
    cols = sink_cols.clamp(0, max(k_len - 1, 0)).long()
    valid = (sink_cols >= 0) & (sink_cols < k_len)
    # every head the mask has: with head 0's view, a head that may not see a sink counted it (0.39 off
    # at beta 1 on a (B, Hq, Q, K) mask)
    visible = visible.expand(batch, -1, q_len, k_len)
    sink_visible = visible.gather(-1, cols[:, None, None, :].expand(batch, visible.shape[1], q_len, cols.shape[1]))
    sink_visible = sink_visible & valid[:, None, None, :]
    gather_idx = cols[:, None, :, None].expand(batch, kv_heads, cols.shape[1], head_dim)
    k_s = _repeat_heads(k.gather(2, gather_idx), q_heads // kv_heads).float()
    v_s = None if v is None else _repeat_heads(v.gather(2, gather_idx), q_heads // kv_heads).float()
    s_s = torch.matmul(q.float(), k_s.transpose(-1, -2)).mul_(scale).masked_fill_(~sink_visible, float("-inf"))
    return s_s, v_s


def _general_parts(q, k, v, layout: _Layout, scale: float, sink_cols: torch.Tensor | None) -> tuple[_Part, _Part]:
    """Any mask, window or sink set: the non-sink part through the fused op with a mask, the sink
    columns gathered and scored explicitly."""
    batch, q_len, k_len = q.shape[0], q.shape[2], k.shape[2]
    visible = layout.visible(batch, q_len, k_len, q.device)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, None, :]
    visible_n = visible & ~is_sink
    has_n = visible_n.any(-1)
    o_n, lse_n = flash_with_lse(q, k, v, visible=visible_n, is_causal=False, scale=scale)
    non_sink = _Part(torch.where(has_n[..., None], o_n, 0), lse_n.float().masked_fill(~has_n, float("-inf")))
    s_s, v_s = _sink_scores(q, k, visible, sink_cols, scale, v)
    lse_s = torch.logsumexp(s_s, dim=-1)
    seen = torch.isfinite(lse_s)
    p_s = torch.exp(s_s - torch.where(seen, lse_s, 0)[..., None])  # 0 where the sink is not visible
    return non_sink, _Part(torch.matmul(p_s, v_s), lse_s)


def _combine(non_sink: _Part, sink: _Part, beta, extra_logits, virtual_sink_logit, dtype,
             every_row_sees_n: bool = False) -> tuple[torch.Tensor, ...]:
    """The policy epilogue (docs/formulas.md) from the two normalised parts. Returns (out, lse,
    stock sink share of the real keys' mass, share kept by the zero-value logits or None)."""
    lse_real = torch.logaddexp(non_sink.lse, sink.lse)  # log(l_S + l_N)
    if every_row_sees_n:
        has_n = True
        p_s = torch.sigmoid(sink.lse - non_sink.lse)
        weight = p_s if beta is None else p_s * beta.reshape(-1, 1)
    else:
        # rows that see only the sink (lse_N = -inf) keep beta = 1 and get share 1
        has_n = torch.isfinite(non_sink.lse)
        p_s = torch.where(has_n, torch.sigmoid(sink.lse - non_sink.lse), 1.0)
        weight = p_s if beta is None else torch.where(has_n, beta.reshape(-1, 1), 1.0) * p_s
    out = torch.lerp(non_sink.out.to(weight.dtype), sink.out.to(weight.dtype).expand_as(non_sink.out),
                     weight.unsqueeze(-1))
    keep = None
    if extra_logits is not None or virtual_sink_logit is not None:
        sees_n = torch.ones((), dtype=torch.bool, device=out.device) if has_n is True else has_n
        lse_zero = zero_value_lse(extra_logits, virtual_sink_logit, sees_n)
        keep = torch.sigmoid(lse_real - lse_zero)
        if has_n is not True:  # rows that see no key at all
            keep = torch.where(torch.isfinite(lse_real), keep, 0.0)
        out = out * keep.unsqueeze(-1)
    return out.to(dtype), lse_real, p_s, keep


def _sink_first_every_row(q, k, v, scale: float, beta, extra_logits, virtual_sink_logit,
                          need_sink_stats: bool = False) -> AttentionResult:
    """The decode step (and any plain full-attention call over K >= 2 keys): the sink is key column
    0, every query row also sees keys 1.., so no row needs a guard. The same formula as
    :func:`_combine`, in as few kernels as the formula allows (a decode step is made of small ops,
    so their count is its cost): one fused attention over keys 1.., one batched ``baddbmm`` giving
    ``x = s_0 - lse_N`` per row, then ``p = sigmoid(x)``, ``lse = lse_N + softplus(x)`` and
    ``out = lerp(o_N, v_0, beta * p)``. Query heads are grouped by kv head with views, so the sink's
    key and value rows are never repeated."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    # split() rather than tensor indexing: a multi-slice __getitem__ costs several microseconds of
    # Python per call, and a decode step makes these calls in every layer
    k0, k_rest = k.split((1, k_len - 1), dim=2)
    v0, v_rest = v.split((1, k_len - 1), dim=2)
    o_n, lse_n = flash_with_lse(q, k_rest, v_rest, visible=None, is_causal=False, scale=scale)
    lse_n = _fp32(lse_n).reshape(batch * kv_heads, group * q_len, 1)
    # x = scale * q.k_0 - lse_N, one call: baddbmm(input, q, k_0, beta=-1, alpha=scale)
    q_grouped = _fp32(q.reshape(batch * kv_heads, group * q_len, head_dim))
    k0 = _fp32(k0.reshape(batch * kv_heads, 1, head_dim)).transpose(1, 2)
    x = torch.baddbmm(lse_n, q_grouped, k0, beta=-1, alpha=scale).view(batch, kv_heads, group, q_len)
    lse = torch.nn.functional.softplus(x).add_(lse_n.view(batch, kv_heads, group, q_len))
    p = torch.sigmoid(x)  # the sink's share of the real keys' mass
    weight = p
    if beta is not None:  # in place unless the statistics still need p
        # (sigmoid's backward reads p, so autograd also needs the copy)
        # float32 beta, as in every epilogue (docs/formulas.md, "Precision"): a float64 model's
        # float64 beta made this product float64, which lerp refused next to float32 values
        beta32 = _fp32(beta).view(1, kv_heads, group, 1)
        weight = p * beta32 if need_sink_stats or p.requires_grad else p.mul_(beta32)
    o_n = o_n.reshape(batch, kv_heads, group, q_len, head_dim)  # a view for the CPU op's contiguous output
    v0 = v0.unsqueeze(2)  # (B, Hkv, 1, 1, D): broadcast over the group's rows
    out = torch.lerp(_fp32(o_n), _fp32(v0), weight.unsqueeze(-1))
    keep = None
    if extra_logits is not None or virtual_sink_logit is not None:
        # zero-value logits counted in every row (every row sees a non-sink key here)
        lse_zero = None if extra_logits is None else torch.logsumexp(_fp32(extra_logits), dim=-1)
        if virtual_sink_logit is not None:
            virtual = _fp32(virtual_sink_logit)
            lse_zero = virtual if lse_zero is None else torch.logaddexp(lse_zero, virtual)
        keep = torch.sigmoid(lse - lse_zero.view(1, kv_heads, group, 1))
        out = out.mul_(keep.unsqueeze(-1))
    stats = None
    if need_sink_stats:
        stats = sink_stats((p if keep is None else p * keep).reshape(batch, q_heads, q_len), None)
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    return AttentionResult(out.view(batch, q_heads, q_len, head_dim), lse.view(batch, q_heads, q_len), None, None,
                           stats)


def _sink_first_causal(q, k, v, scale: float, beta, extra_logits, virtual_sink_logit,
                       need_sink_stats: bool = False) -> AttentionResult:
    """Causal prefill (Q == K >= 2, no mask) with the sink at key column 0, in eager mode without
    autograd. Row 0 sees only the sink (its output is the sink's value, beta does not apply), rows
    1.. see the sink and keys 1..i, so the formula of :func:`_combine` needs no per-row guard there.
    The output is written once, straight into a (B, Q, Hq, D) buffer, the layout transformers
    takes back (the CPU flash op follows the query's layout, which is that one in transformers'
    attention layers, so the identity's output is not copied either):
    rows 1.. by one ``lerp``, row 0 by one copy of the sink's value. :func:`_first_column_parts` +
    :func:`_combine` (kept for autograd and compiled graphs, where inductor fuses them) pad the
    flash output with a zero row, guard every row and copy the result to that layout again: three
    more passes over a (B, Hq, Q, D) tensor per layer."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    k0, k_rest = k.split((1, k_len - 1), dim=2)
    v0, v_rest = v.split((1, k_len - 1), dim=2)
    q_rest = q.split((1, q_len - 1), dim=2)[1]
    o_n, lse_n = flash_with_lse(q_rest, k_rest, v_rest, visible=None, is_causal=True, scale=scale)
    # s_0 = scale * q.k_0 for every row, query heads grouped by kv head (k_0 is never repeated)
    q_grouped = _fp32(q.reshape(batch * kv_heads, group * q_len, head_dim))
    k0_t = _fp32(k0.reshape(batch * kv_heads, 1, head_dim)).transpose(1, 2)
    s0 = torch.bmm(q_grouped, k0_t).view(batch, q_heads, q_len).mul_(scale)
    s0_first, s0_rest = s0.split((1, q_len - 1), dim=2)
    lse_n = _fp32(lse_n)
    x = s0_rest - lse_n  # (B, Hq, Q-1): log(l_S / l_N)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    lse[:, :, :1] = s0_first  # row 0: only the sink, log l_S
    torch.add(lse_n, torch.nn.functional.softplus(x), out=lse[:, :, 1:])
    p = torch.sigmoid(x)  # the sink's share of the real keys' mass
    weight = p if beta is None else p * _fp32(beta).view(1, q_heads, 1)  # lerp's weight must match out's dtype
    v0_heads = _fp32(_repeat_heads(v0, group))  # (B, Hq, 1, D), tiny
    out = torch.empty(batch, q_len, q_heads, head_dim, dtype=torch.float32, device=q.device).transpose(1, 2)
    out_first, out_rest = out.split((1, q_len - 1), dim=2)
    out_first.copy_(v0_heads)
    torch.lerp(_fp32(o_n), v0_heads, weight.unsqueeze(-1), out=out_rest)
    keep = None
    if extra_logits is not None or virtual_sink_logit is not None:
        # rows 1.. count the extra logits and the virtual logit, row 0 only the extra logits
        # (the virtual logit is counted where a row sees a non-sink key)
        sees_n = torch.ones((), dtype=torch.bool, device=q.device)
        keep = torch.sigmoid(lse[:, :, 1:] - zero_value_lse(extra_logits, virtual_sink_logit, sees_n))
        out_rest.mul_(keep.unsqueeze(-1))
        if extra_logits is not None:
            first_zero = zero_value_lse(extra_logits, None, sees_n)  # (1, Hq, 1)
            out_first.mul_(torch.sigmoid(s0_first - first_zero).unsqueeze(-1))
    stats = None
    if need_sink_stats:  # over rows 1.., the ones that see a non-sink key
        stats = sink_stats(p if keep is None else p * keep, None)
    if out.dtype != q.dtype:
        out = out.to(q.dtype)  # keeps the (B, Q, Hq, D) layout
    return AttentionResult(out, lse, None, None, stats)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without the call when it is fp32 already (a no-op call still costs microseconds)."""
    return t if t.dtype == torch.float32 else t.float()


def _identity_stats(q, k, lse, layout: _Layout, visible, sink_cols, first_column_sink: bool,
                    scale: float) -> torch.Tensor:
    """Sink statistics of plain softmax from its log-sum-exp alone: a row's sink mass is
    ``exp(s_sink - lse)``, so only the |S| sink columns are scored again (no second pass over the
    keys). With the first-column sink of a plain layout that is one product per call."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if first_column_sink and visible is None:
        if k_len < 2:  # every row sees only the sink: no row is counted
            return q.new_zeros(batch, q_heads, 2, dtype=torch.float32)
        group = q_heads // kv_heads
        first_row = 1 if layout.causal else 0  # a causal window's row 0 sees only the sink
        if q_len == 1 and not layout.causal:
            # a decode step: grouping its one query row by kv head is a view, not a copy, and one
            # baddbmm took 11 us where the einsum below took 20 (its Python set-up), per layer
            row_mass = first_column_row_mass(q[:, :, 0], k[:, :, 0], lse[..., 0], scale)
            return sink_stats(row_mass[..., None], None)
        # s_0 - lse per row: an einsum over the queries as they are (transformers hands them over
        # as a transposed view) with the sink key repeated per query head, instead of grouping the
        # queries by kv head, which copies them: 56-59 against 77 us per SmolLM2 layer at 512
        # tokens, one thread
        k0 = _fp32(k[:, :, 0]).repeat_interleave(group, dim=1)  # (B, Hq, D), tiny
        x = torch.einsum("bhqd,bhd->bhq", _fp32(q[:, :, first_row:]), k0).mul_(scale)
        return sink_stats(x.sub_(_fp32(lse[:, :, first_row:])).exp_(), None)
    if visible is None:
        visible = layout.visible(batch, q_len, k_len, q.device)
    if first_column_sink:
        sink_cols = torch.zeros(batch, 1, dtype=torch.long, device=q.device)
    s_s, _ = _sink_scores(q, k, visible, sink_cols, scale)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, None, :]
    row_mass = torch.exp(s_s - lse.float()[..., None]).sum(-1)
    return sink_stats(row_mass, (visible & ~is_sink).any(-1))


def _split_path(q, k, v, layout: _Layout, scale: float, sink_cols, first_column_sink: bool, beta, extra_logits,
                virtual_sink_logit, need_sink_mass: bool, need_sink_stats: bool, grad: bool) -> AttentionResult:
    """``grad``: whether autograd records the call (the caller's :func:`_needs_autograd`)."""
    batch, _, q_len, _ = q.shape
    identity = beta is None and extra_logits is None and virtual_sink_logit is None
    plain = layout.is_plain(q_len, k.shape[2])
    if identity and not need_sink_mass:
        # plain softmax: one fused call, nothing else (plus the sink columns for the statistics)
        visible = None if plain else layout.visible(batch, q_len, k.shape[2], q.device)
        out, lse = flash_with_lse(q, k, v, visible=visible, is_causal=plain and layout.causal, scale=scale)
        stats = None
        if need_sink_stats:  # from the fused op's lse, finite in a row that sees nothing (exp(-inf - lse) = 0)
            stats = _identity_stats(q, k, lse, layout, visible, sink_cols, first_column_sink, scale)
        lse = lse.float()
        if not plain:  # a row that sees nothing: output 0 and lse -inf, as every other path gives them
            seen = visible.any(-1)
            out = torch.where(seen[..., None], out, 0)
            lse = lse.masked_fill(~seen, float("-inf"))
        return AttentionResult(out, lse, None, None, stats)
    every_row_sees_n = False
    if first_column_sink and plain and not layout.causal and k.shape[2] >= 2 and not need_sink_mass:
        return _sink_first_every_row(q, k, v, scale, beta, extra_logits, virtual_sink_logit, need_sink_stats)
    if (first_column_sink and plain and layout.causal and q_len >= 2 and not need_sink_mass and not grad
            and not torch.compiler.is_compiling()):
        return _sink_first_causal(q, k, v, scale, beta, extra_logits, virtual_sink_logit, need_sink_stats)
    if first_column_sink and plain:
        non_sink, sink, every_row_sees_n = _first_column_parts(q, k, v, layout, scale)
    else:
        if first_column_sink:
            sink_cols = torch.zeros(batch, 1, dtype=torch.long, device=q.device)
        non_sink, sink = _general_parts(q, k, v, layout, scale, sink_cols)
    out, lse, p_s, keep = _combine(non_sink, sink, beta, extra_logits, virtual_sink_logit, q.dtype, every_row_sees_n)
    sink_mass = stats = None
    if need_sink_mass:  # the stock mass on the sink set, zero-value logits counted
        sink_mass = torch.where(torch.isfinite(sink.lse), p_s, 0.0) * (1.0 if keep is None else keep)
    if need_sink_stats:  # the same mass summed over the rows that see a non-sink key (p_s = 0 where S is unseen)
        row_mass = p_s if keep is None else p_s * keep
        stats = sink_stats(row_mass, None if every_row_sees_n else torch.isfinite(non_sink.lse))
    return AttentionResult(out, lse, sink_mass, None, stats)


def check_attention_arguments(q, k, v, *, attn_mask=None, sink_cols=None, beta=None, extra_logits=None,
                              virtual_sink_logit=None, scale=None, softcap=None,
                              sliding_window=None) -> tuple[float, float | None]:
    """ValueError / TypeError for arguments the PyTorch path would fail on with an internal error, or
    run on silently (softcap 0 makes every score 0, a scale of 0 every row uniform, a window of 0
    every row empty, integer q/k/v truncated outputs): the checks of the Triton launchers
    (:func:`sinkfix.kernels.arguments.check_attention_arguments`, one message for one mistake), with
    float64 inputs allowed. Shapes and Python numbers only: it never reads a tensor's values (no
    device sync per call), so NaN or inf inside beta or the logits are the caller's to check; a
    Policy checks its own at construction. Returns (scale, softcap) as floats, the scale defaulted."""
    return check_shared_arguments(q, k, v, dtypes=TORCH_DTYPES, attn_mask=attn_mask, sink_cols=sink_cols, beta=beta,
                           extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit, scale=scale,
                           softcap=softcap, sliding_window=sliding_window)


def sink_attention_torch(
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
    first_column_sink: bool = False,
    beta: torch.Tensor | None = None,
    extra_logits: torch.Tensor | None = None,
    virtual_sink_logit: torch.Tensor | None = None,
    return_probs: bool = False,
    need_sink_mass: bool = False,
    need_sink_stats: bool = False,
) -> AttentionResult:
    """Sink-aware attention, PyTorch path. Same semantics and arguments as
    :func:`sinkfix.ops.reference.reference_sink_attention` (read its docstring for the formula),
    plus ``first_column_sink``: the sink set is key column 0 of every row (``sink_cols`` is then
    ignored), which the caller knows from its layout without looking at tensor values.

    ``beta=None`` means 1 everywhere: pass None, not a tensor of ones, for the identity to take the
    one-op path (the path never inspects tensor values). The arguments are checked as the Triton
    launchers check them (:func:`check_attention_arguments`): q, k, v of one dtype among fp16,
    bf16, fp32 and fp64 (the kernels: not fp64), ``attn_mask`` a 4-D bool mask broadcastable to
    (B, 1|Hq, Q, K), any strides for q, k and v. Falls back to the dense formula (which
    materialises the scores) when the probabilities are requested, with ``softcap`` (the fused ops
    cannot apply it), on devices without a fused op, and when gradients are needed where the fused
    op has no backward kernel (:func:`sinkfix.ops.flash.fused_lse_backward_available`; on the CPU
    autograd runs through the split path, whose only (Q, K)-sized work is inside the fused op).

    ``need_sink_stats`` adds :attr:`AttentionResult.sink_stats`, computed from what the path
    computes anyway (the sink term and the log-sum-exps): never the (B, H, Q, K) matrix, never a
    second pass over the keys.
    """
    # the checks convert the two numbers once (converting them again cost microseconds per decode call)
    scale, softcap = check_attention_arguments(
        q, k, v, attn_mask=attn_mask, sink_cols=None if first_column_sink else sink_cols, beta=beta,
        extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit, scale=scale, softcap=softcap,
        sliding_window=sliding_window)
    layout = _Layout(attn_mask, causal, causal_offset_arg(causal_offset), sliding_window)
    if sink_cols is not None and not first_column_sink:
        sink_cols = distinct_sink_cols(sink_cols)
    fused = cpu_flash_available(q.dtype) if q.is_cpu else fused_lse_available(q.device, q.dtype)
    grad = _needs_autograd(q, k, v, beta, extra_logits, virtual_sink_logit)
    if (return_probs or softcap is not None or not fused
            or (grad and not fused_lse_backward_available(q.device, q.dtype))):
        if first_column_sink:
            sink_cols = torch.zeros(q.shape[0], 1, dtype=torch.long, device=q.device)
        return _dense_path(q, k, v, layout, scale, softcap, sink_cols, beta, extra_logits, virtual_sink_logit,
                           return_probs, need_sink_mass, need_sink_stats)
    return _split_path(q, k, v, layout, scale, sink_cols, first_column_sink, beta, extra_logits, virtual_sink_logit,
                       need_sink_mass, need_sink_stats, grad)


# -- dispatch -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map a requested backend to the one that will run on ``device`` for tensors of ``dtype`` (None:
    not known yet, as for a per-call "auto"). The kernels take fp16, bf16 and fp32: with a float64
    model "auto" runs the PyTorch path and "triton" is refused here, at ``patch()``, not in the
    middle of the first forward pass with a batch of more than one row."""
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    from sinkfix import kernels
    from sinkfix.kernels.arguments import KERNEL_DTYPES

    usable = kernels.triton_available() and (device.type == "cuda" or interpreter)
    if backend == "triton":
        if not usable:
            reason = kernels.triton_unusable_reason()
            raise BackendUnavailableError(
                f"backend='triton' needs triton>={'.'.join(map(str, kernels.TRITON_MIN_VERSION))} (pip install "
                "'sinkfix[triton]') and a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"
                + ("" if reason is None else f"; here {reason}") + "; use backend='torch' or 'auto' on this machine"
            )
        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise BackendUnavailableError(
                f"backend='triton' runs float16, bfloat16 and float32 models, this one is {dtype}; use "
                "backend='torch' (or 'auto', which picks it for this model)")
        return "triton"
    return "triton" if usable and device.type == "cuda" and dtype in (None, *KERNEL_DTYPES) else "torch"


def fold_key_padding(attn_mask: torch.Tensor | None, key_padding: torch.Tensor | None) -> torch.Tensor | None:
    """``attn_mask`` with a (B, K) key padding (True = a real key) folded in as a (B, 1, 1, K) mask:
    how every path but the Triton kernels reads padding. Unchecked: see :func:`fold_checked_key_padding`."""
    if key_padding is None:
        return attn_mask
    padding = key_padding[:, None, None, :]
    return padding if attn_mask is None else attn_mask & padding


def fold_checked_key_padding(q, k, v, attn_mask: torch.Tensor | None, key_padding: torch.Tensor | None,
                             key_ranges: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`fold_key_padding` after the checks the Triton launchers make of ``key_padding`` and
    ``key_ranges`` (:func:`sinkfix.kernels.arguments.check_key_padding`): the PyTorch path ignored
    ``key_ranges`` without ``key_padding``, and a padding of the wrong shape failed inside a
    broadcast or inside the fused op ("Attention mask dim in {2, 4}"). The folded mask itself is
    checked where each path starts."""
    if key_padding is None and key_ranges is None:
        return attn_mask
    check_qkv_shapes(q, k, v)  # the padding is checked against q's batch and k's length
    check_key_padding(key_padding, key_ranges, q.shape[0], k.shape[2], q.device)
    return fold_key_padding(attn_mask, key_padding)


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    attn_mask: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_cols: torch.Tensor | None = None,
    first_column_sink: bool = False,
    beta: torch.Tensor | None = None,
    extra_logits: torch.Tensor | None = None,
    virtual_sink_logit: torch.Tensor | None = None,
    return_probs: bool = False,
    need_sink_mass: bool = False,
    need_sink_stats: bool = False,
) -> AttentionResult:
    """Sink-aware attention on ``backend``; arguments of :func:`sink_attention_torch`, plus
    ``key_padding`` (B, K) bool (True = a real key; combined with the other mask arguments) and its
    ``key_ranges`` (``sinkfix.kernels.masks.key_padding_ranges``), which reach the Triton kernels as
    they are (no dense mask loaded); every other path reads the padding as a (B, 1, 1, K) mask.

    The inference path (no probabilities, no per-row statistics, no gradients) is one call of the
    custom op ``torch.ops.sinkfix.sink_attention`` on either backend; with ``need_sink_stats`` (the
    cheap (B, Hq, 2) sums of serving-time telemetry) it is one call of its variant
    ``torch.ops.sinkfix.sink_attention_stats``. Probabilities and per-row statistics for observers
    come from the PyTorch path in Python; gradients (calibration) from autograd through the split
    path where the fused op has a backward kernel (CPU), else from
    :mod:`sinkfix.ops.attention_grad`; neither keeps a layer's (B, H, Q, K) scores alive.
    """
    # Arguments are checked once per call, where each path starts (sink_attention_torch, the Triton
    # launchers' prepare_attention_launch), and below only for the autograd path that has neither:
    # checked here as well, they ran twice per layer call on the eager PyTorch path.
    # A patched model passes the backend patch() resolved; only "auto" is resolved per call.
    chosen = backend if backend in ("torch", "triton") else resolve_backend(backend, q.device)
    causal_offset = causal_offset_arg(causal_offset)  # every path: 2.5 ran as 2 on both backends
    if chosen == "triton" and return_probs:
        _warn_once("output_attentions: attention probabilities are computed on the PyTorch path (slower, "
                   "materialises the scores); the Triton kernels never build them")
    # a Python float for the custom ops' schema (a one-value tensor is read once, as the launchers
    # read it); a head dim of 0 was a ZeroDivisionError here, before any check
    scale = attention_scale(scale, q.shape[-1])
    if softcap is not None:
        softcap = positive_number("softcap", softcap)  # torch.tensor(3.) was refused by one backend only
    grad = _needs_autograd(q, k, v, beta, extra_logits, virtual_sink_logit)
    if (key_padding is not None or key_ranges is not None) and (chosen != "triton" or return_probs
                                                                 or need_sink_mass or grad):
        attn_mask = fold_checked_key_padding(q, k, v, attn_mask, key_padding, key_ranges)
        key_padding = key_ranges = None
    split_grad = grad and softcap is None and fused_lse_backward_available(q.device, q.dtype)
    if grad and not (return_probs or need_sink_mass or need_sink_stats or split_grad):
        from sinkfix.ops.attention_grad import sink_attention_with_grad

        check_attention_arguments(q, k, v, attn_mask=attn_mask, sink_cols=None if first_column_sink else sink_cols,
                                  beta=beta, extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit,
                                  scale=scale, softcap=softcap, sliding_window=sliding_window)
        if first_column_sink:
            sink_cols = torch.zeros(q.shape[0], 1, dtype=torch.long, device=q.device)
        out, lse = sink_attention_with_grad(
            q, k, v, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset, sliding_window=sliding_window,
            scale=scale, softcap=softcap, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
            virtual_sink_logit=virtual_sink_logit)
        return AttentionResult(out, lse, None, None)
    if return_probs or need_sink_mass or grad:
        return sink_attention_torch(
            q, k, v, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset, sliding_window=sliding_window,
            scale=scale, softcap=softcap, sink_cols=sink_cols, first_column_sink=first_column_sink, beta=beta,
            extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit, return_probs=return_probs,
            need_sink_mass=need_sink_mass, need_sink_stats=need_sink_stats)
    from sinkfix.ops import custom_ops

    # Compiled on the Triton backend: one opaque, shape-known call (dynamo cannot trace a kernel
    # launcher). Compiled on the PyTorch backend on CPU: traced op by op, so inductor fuses the
    # combine's small element-wise ops into one kernel around the fused attention op instead of
    # running them one by one inside an opaque call. Eager: the function itself, without the
    # dispatcher's round trip through a Python custom op (~55 us per call on CPU, 30 calls per token).
    opaque = torch.compiler.is_compiling() and not (chosen == "torch" and q.device.type == "cpu")
    args = (q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits, virtual_sink_logit, causal,
            causal_offset, sliding_window, scale, softcap, first_column_sink, chosen)
    if need_sink_stats:  # the kernels' statistics variants on the Triton backend, the split path otherwise
        op = custom_ops.sink_attention_stats_op if opaque else custom_ops.sink_attention_stats_impl
        out, lse, stats = op(*args)
        return AttentionResult(out.transpose(1, 2), lse, None, None, stats)
    out, lse = custom_ops.sink_attention_op(*args) if opaque else custom_ops.sink_attention_impl(*args)
    return AttentionResult(out.transpose(1, 2), lse, None, None)
