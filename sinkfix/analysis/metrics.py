"""Streaming extreme-token statistics, gathered inside the sinkfix attention path.

Text streams through the model one window at a time. An observer attached to the patched
attention layers (``PatchHandle.observing``) sees the post-RoPE q/k/v of every call and folds
them into running sums; forward hooks on the decoder layers do the same for the residual stream.
Nothing of size O(S^2) outlives one block of query rows, and ``output_attentions`` is never
requested, so windows of several thousand tokens fit in a laptop's memory.

Definitions (docs/formulas.md, "Measuring"), per attention layer l and query head h:

* **sink share** = mean over query rows that see at least one non-sink key (rows i >= 1 in a plain
  causal window) of the attention mass on the first-token sink set, *as the model is currently
  patched* (beta x the stock mass when a sink-scaling policy is active).
* **hidden sinks** (ACT's criterion): a key j outside the sink set whose mean attention over the
  query rows that can see it exceeds ``hidden_sink_threshold`` (0.1). Keys seen by fewer than
  ``min_queries`` rows (32, or a quarter of the sequence's rows that see a non-sink key when that is
  smaller) are not judged: near the end of a window the mean runs over a handful of rows and every
  local head would "sink" there.
* **value drain** of kv head g = ||v_sink|| / median_j ||v_j|| (the first sink column). Every median
  here (and in the monitor and the residual clip) is torch's: the lower of the two middle values
  for an even count.
* **residual peak** of a decoder layer = max_i ||h_i|| / median_i ||h_i|| of its output, and the
  position / token that reaches it.
* **dormancy** of a query row (the rule :mod:`sinkfix.analysis.inspection` documents): the share of
  the row's attention that lands on sink keys (first-token sinks and hidden sinks) *weighted by how
  drained their values are*, ``sum_{j in sinks} p_ij * clamp(1 - ||v_j|| / median_k ||v_k||, 0, 1)``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from sinkfix.errors import UsageError
from sinkfix.evaluate import model_device
from sinkfix.ops.reference import sink_key_mask, zero_value_lse

__all__ = [
    "DORMANT_THRESHOLD", "HIDDEN_SINK_THRESHOLD", "ExtremeTokenMetrics", "StreamingCollector", "check_hidden_sink_threshold",
    "check_count", "check_min_queries",
    "measure_extreme_tokens", "observed_model",
]

#: A row (and, on average, a head) is dormant when at least half of its attention is wasted on
#: drained sinks: "parks most of its attention on sinks whose values are drained".
DORMANT_THRESHOLD = 0.5
#: ACT's hidden-sink criterion (Yu et al. 2024): mean attention over the rows that can see the key.
HIDDEN_SINK_THRESHOLD = 0.1
_MIN_QUERIES = 32


def check_hidden_sink_threshold(value, name: str = "hidden_sink_threshold", error: type[Exception] = UsageError) -> float:
    """ACT's hidden-sink criterion as given by a user, checked: a finite number strictly between 0
    and 1 (a key's mean attention can never exceed a threshold >= 1, and every key exceeds one
    <= 0), else ``error`` naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
            or not 0.0 < float(value) < 1.0):
        raise error(f"{name} must be a number in (0, 1) (ACT: {HIDDEN_SINK_THRESHOLD}), got {value!r}")
    return float(value)


def check_count(value, name: str, error: type[Exception] = UsageError, what: str = "") -> int:
    """``value`` as an int >= 1 (an integral number, not a bool), else ``error`` naming ``name``
    (``what``: the message's note after "an integer >= 1")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"{name} must be an integer >= 1{what}, got {value!r}")
    return int(value)


def check_min_queries(value, name: str = "min_queries", error: type[Exception] = UsageError) -> int:
    """The fewest query rows a key must be seen by to be judged a hidden sink, checked: an integer
    >= 1 (not a bool), else ``error`` naming ``name``. NaN switched hidden-sink detection off without
    a word (no count is >= NaN) and 0, -5 or 2.5 acted as 1."""
    return check_count(value, name, error, f" (default {_MIN_QUERIES})")


# Score-block budget in elements: (B, Hq, rows, K) fp32 blocks of ~16M elements (64 MB) keep the
# peak memory flat in the window length (a 4096-token window on SmolLM2 uses 9 x 455 x 4096 blocks).
_BLOCK_ELEMENTS = 16 * 1024 * 1024


@dataclass
class ExtremeTokenMetrics:
    """Extreme-token statistics of a model over a set of windows.

    Per-head tensors are ``[L, Hq]`` (``[L, Hkv]`` for value drain), fp64, NaN where a layer has
    fewer heads than the widest layer; ``sink_share`` and ``value_drain`` are NaN (undefined) where
    the sink set held no key of any window (``n_sink=0`` and no extra sink position inside the
    window). ``dormancy``, ``dormant_fraction``, ``hidden_sink_share`` and ``hidden_sink_rate`` are
    None when hidden-sink detection was switched off.
    """

    sink_share: torch.Tensor  # [L, Hq] mean over the rows that see a non-sink key of the (corrected) mass on the sink set
    value_drain: torch.Tensor  # [L, Hkv] ||v_sink|| / median_j ||v_j||, averaged over windows
    residual_peak: torch.Tensor  # [L] max_i ||h_i|| / median_i ||h_i|| after each decoder layer, averaged over windows
    peak_positions: list[int]  # [L] most frequent position of the residual maximum
    peak_tokens: list[int]  # [L] the token id at that position most often (-1 = unknown)
    hidden_sink_share: torch.Tensor | None = None  # [L, Hq] mean over rows of the mass on hidden sinks
    hidden_sink_rate: torch.Tensor | None = None  # [L, Hq] hidden sinks per sequence
    dormancy: torch.Tensor | None = None  # [L, Hq] mean over the rows that see a non-sink key of the row dormancy score
    dormant_fraction: torch.Tensor | None = None  # [L, Hq] share of those rows with score >= DORMANT_THRESHOLD
    hidden_sink_tokens: list[dict[int, int]] = field(default_factory=list)  # [L] token id -> (head, window) hits
    peak_position_counts: list[dict[int, int]] = field(default_factory=list)  # [L] position -> windows
    residual_norms: list[list[float]] = field(default_factory=list)  # [L][S] first window, for figures
    value_norms: list[list[list[float]]] = field(default_factory=list)  # [L][Hkv][S] first window
    example_ids: list[int] = field(default_factory=list)  # [S] token ids of the first window
    windows: int = 0
    tokens: int = 0
    hidden_sink_threshold: float | None = HIDDEN_SINK_THRESHOLD
    dormant_threshold: float = DORMANT_THRESHOLD

    @property
    def num_layers(self) -> int:
        return int(self.sink_share.shape[0])

    def to_dict(self) -> dict:
        """JSON-ready dictionary (tensors as nested lists, NaN as None)."""

        def conv(x):
            if x is None:
                return None
            if isinstance(x, torch.Tensor):
                return conv(x.tolist())
            if isinstance(x, float):
                return None if not math.isfinite(x) else round(x, 6)
            if isinstance(x, dict):
                return {str(k): conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            return x

        return {
            "sink_share": conv(self.sink_share),
            "value_drain": conv(self.value_drain),
            "residual_peak": conv(self.residual_peak),
            "peak_positions": list(self.peak_positions),
            "peak_tokens": list(self.peak_tokens),
            "hidden_sink_share": conv(self.hidden_sink_share),
            "hidden_sink_rate": conv(self.hidden_sink_rate),
            "dormancy": conv(self.dormancy),
            "dormant_fraction": conv(self.dormant_fraction),
            "hidden_sink_tokens": conv(self.hidden_sink_tokens),
            "peak_position_counts": conv(self.peak_position_counts),
            "windows": self.windows,
            "tokens": self.tokens,
            "hidden_sink_threshold": self.hidden_sink_threshold,
            "dormant_threshold": self.dormant_threshold,
        }


@dataclass
class _RowPass:
    """What the blockwise pass over query rows leaves behind, per (B, Hq, Q) unless noted."""

    col_sum: torch.Tensor  # (B, Hq, K) sum over rows of the corrected probabilities
    seen_by: torch.Tensor  # (B, K) rows that may see each key
    m: torch.Tensor  # row max used for the exponentials (zero-value logits included)
    z: torch.Tensor  # row normaliser relative to m
    fac_s: torch.Tensor  # multiplier of sink columns (beta on corrected rows)
    fac_n: torch.Tensor  # multiplier of the other columns
    share: torch.Tensor  # corrected mass on the sink set
    has_n: torch.Tensor  # (B, Q) rows that see a non-sink key


def _corrected_rows(call, q: torch.Tensor, k: torch.Tensor, sink_cols: torch.Tensor, is_sink: torch.Tensor,
                    beta: torch.Tensor | None, rows_real: torch.Tensor | None = None) -> _RowPass:
    """Stock probabilities, corrected as the call patched them, in blocks of query rows: nothing
    of size (Q, K) outlives one block (_BLOCK_ELEMENTS). ``rows_real`` (B, Q): the query rows that
    are real tokens (None: all); a padding row is given no visible key, so it counts for nothing."""
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    g = Hq // Hkv
    dev = q.device
    extra_logits = None if call.extra_logits is None else call.extra_logits.detach().to(dev)
    virtual = None if call.virtual_sink_logit is None else call.virtual_sink_logit.detach().to(dev)
    block = max(1, min(Q, _BLOCK_ELEMENTS // max(1, B * Hq * K)))
    out = _RowPass(
        col_sum=torch.zeros(B, Hq, K, device=dev), seen_by=torch.zeros(B, K, device=dev),
        m=torch.empty(B, Hq, Q, device=dev), z=torch.empty(B, Hq, Q, device=dev),
        fac_s=torch.ones(B, Hq, Q, device=dev), fac_n=torch.ones(B, Hq, Q, device=dev),
        share=torch.empty(B, Hq, Q, device=dev), has_n=torch.empty(B, Q, dtype=torch.bool, device=dev),
    )
    qg = q.reshape(B, Hkv, g, Q, D)
    k_t = k.transpose(-1, -2)  # (B, Hkv, D, K)
    n_s = sink_cols.shape[1]
    s_idx = sink_cols.clamp(0, K - 1)[:, None, None, :]
    s_valid = ((sink_cols >= 0) & (sink_cols < K))[:, None, None, :]
    sink_b = is_sink[:, None, None, :]
    not_sink = (~is_sink).to(q.dtype)[:, None, :, None]  # (B, 1, K, 1)
    for r0 in range(0, Q, block):
        r1 = min(Q, r0 + block)
        c = r1 - r0
        vis = StreamingCollector._visible(call, r0, r1, B, K, dev)  # (B, 1, c, K)
        if rows_real is not None:
            vis = vis & rows_real[:, None, r0:r1, None]
        # one batched GEMM per kv head group: (B, Hkv, g*c, D) @ (B, Hkv, D, K)
        s = torch.matmul(qg[:, :, :, r0:r1].reshape(B, Hkv, g * c, D), k_t).reshape(B, Hq, c, K)
        s.mul_(call.scale)
        if call.softcap is not None:
            s = call.softcap * torch.tanh(s / call.softcap)
        s.masked_fill_(~vis, float("-inf"))
        hn = (vis & ~sink_b).any(-1)[:, 0]  # (B, c)
        lse_v = zero_value_lse(extra_logits, virtual, hn[:, None, :])  # (1|B, Hq, 1|c)
        m = s.amax(-1)
        if lse_v is not None:
            m = torch.maximum(m, lse_v)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = s.sub_(m[..., None]).exp_()  # in place: s is not needed any more
        l_all = e.sum(-1)
        l_s = (e.gather(-1, s_idx.expand(B, Hq, c, n_s)) * s_valid).sum(-1)
        # l_N summed over the non-sink keys themselves, never as l_all - l_s: where the sink takes
        # almost everything (l_N / l_S ~ 1e-8 in SmolLM2) the difference cancels to 0 in fp32, the
        # factor below fell back to 1 and the mass beta frees from the sink was never redistributed
        # (a hidden sink of mean corrected attention 0.130 read as 0.026, missed)
        l_n = torch.matmul(e, not_sink).squeeze(-1)
        z = l_all + (torch.exp(lse_v - m) if lse_v is not None else 0.0)
        z = torch.where(z > 0, z, torch.ones_like(z))
        p_s, p_n = l_s / z, l_n / z
        fs = torch.ones_like(p_s)
        fn = torch.ones_like(p_s)
        if beta is not None:
            b = torch.where(hn[:, None, :], beta[None, :, None], torch.ones_like(p_s))
            fs = b
            fn = torch.where(p_n > 0, (p_n + (1 - b) * p_s) / p_n.clamp(min=1e-30), torch.ones_like(p_n))
            e.mul_(torch.where(sink_b, fs[..., None], fn[..., None]))  # corrected, still unnormalised
        out.col_sum += torch.matmul((1.0 / z)[:, :, None, :], e).squeeze(2)  # sum_i p_ij, one GEMV per head
        out.seen_by += vis[:, 0].sum(1)
        out.has_n[:, r0:r1] = hn
        out.m[:, :, r0:r1], out.z[:, :, r0:r1] = m, z
        out.fac_s[:, :, r0:r1], out.fac_n[:, :, r0:r1] = fs, fn
        out.share[:, :, r0:r1] = p_s * fs
        del e, s
    return out


class StreamingCollector:
    """Running sums of extreme-token statistics; feed it with :meth:`observe` and :meth:`residual_hook`.

    Call :meth:`begin_window` with the (B, S) input ids (and the attention mask of a padded batch:
    padding rows, left or right, then count for nothing) before each forward pass.
    ``hidden_sink_threshold`` is ACT's criterion in (0, 1) (None: no hidden-sink detection) and
    ``min_queries`` an integer >= 1; anything else is a :class:`UsageError`. With
    ``keep_rows=True`` the per-row dormancy scores of every window are kept (``rows[l]`` is a list
    of (B, Hq, S) tensors), which :func:`sinkfix.analysis.inspection.row_dormancy` returns.
    """

    def __init__(self, num_layers: int, num_heads: Sequence[int], *,
                 hidden_sink_threshold: float | None = HIDDEN_SINK_THRESHOLD, min_queries: int = _MIN_QUERIES,
                 keep_rows: bool = False, keep_examples: bool = True) -> None:
        # checked as inspect checks them: a threshold of 0 or below made every judged key a hidden sink
        # (248 in one 40-token window of a tiny Llama), one of 1 or above (or NaN) none, silently
        self.threshold = None if hidden_sink_threshold is None else check_hidden_sink_threshold(hidden_sink_threshold)
        self.min_queries = check_min_queries(min_queries)
        self.L = num_layers
        self.H = max(num_heads) if num_heads else 0
        self.num_heads = list(num_heads)
        self.keep_rows = keep_rows
        self.keep_examples = keep_examples
        f64 = dict(dtype=torch.float64)
        L, H = self.L, self.H
        self.sink_sum = torch.zeros(L, H, **f64)
        self.hidden_share_sum = torch.zeros(L, H, **f64)
        self.hidden_count = torch.zeros(L, H, **f64)
        self.dormancy_sum = torch.zeros(L, H, **f64)
        self.dormant_rows = torch.zeros(L, H, **f64)
        self.rows_seen = torch.zeros(L, **f64)  # rows that see a non-sink key
        self.sink_rows_seen = torch.zeros(L, **f64)  # those of them in a sequence with a sink in the window
        self.seqs_seen = torch.zeros(L, **f64)
        self.drain_sum: list[torch.Tensor | None] = [None] * L
        self.drain_count = torch.zeros(L, **f64)
        self.peak_sum = torch.zeros(L, **f64)
        self.peak_count = torch.zeros(L, **f64)
        self.peak_pos: list[Counter] = [Counter() for _ in range(L)]
        self.peak_tok: list[Counter] = [Counter() for _ in range(L)]  # (position, token id) -> windows
        self.hidden_tok: list[Counter] = [Counter() for _ in range(L)]
        self.residual_norms: list[list[float]] = [[] for _ in range(L)]
        self.value_norms: list[list[list[float]]] = [[] for _ in range(L)]
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.example_ids: list[int] = []
        self.windows = 0
        self.tokens = 0
        self._ids: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self._first_window = True

    # -- driving ------------------------------------------------------------------------------
    def begin_window(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """input_ids (B, S); attention_mask (B, S) with 1 = real token (None = no padding)."""
        if self.windows > 0:
            self._first_window = False
        self._ids = input_ids.detach().cpu()
        self._real = None if attention_mask is None else attention_mask.detach().cpu().bool()
        self.windows += input_ids.shape[0]
        self.tokens += int(input_ids.numel() if attention_mask is None else attention_mask.sum())
        if self._first_window and self.keep_examples:
            self.example_ids = self._ids[0].tolist()

    # -- residual stream ----------------------------------------------------------------------
    def residual_hook(self, layer: int):
        def hook(module: nn.Module, args, output) -> None:
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            with torch.no_grad():
                norms = hidden.detach().float().norm(dim=-1).cpu()  # (B, S)
            real = torch.ones_like(norms, dtype=torch.bool) if self._real is None else self._real
            if real.shape != norms.shape:  # e.g. a cached decode step: nothing to compare
                return
            median = torch.nanmedian(norms.masked_fill(~real, float("nan")), dim=-1).values
            peak, pos = norms.masked_fill(~real, float("-inf")).max(dim=-1)
            ratio = (peak / median).double()
            ok = torch.isfinite(ratio)
            self.peak_sum[layer] += ratio[ok].sum()
            self.peak_count[layer] += int(ok.sum())
            for b in torch.nonzero(ok).flatten().tolist():
                p = int(pos[b])
                self.peak_pos[layer][p] += 1
                token = int(self._ids[b, p]) if self._ids is not None and self._ids.shape == norms.shape else -1
                self.peak_tok[layer][(p, token)] += 1  # pairs: the reported token sits at the reported position
            if self._first_window and self.keep_examples:
                self.residual_norms[layer] = norms[0].tolist()

        return hook

    # -- attention ----------------------------------------------------------------------------
    def observe(self, call) -> None:
        """Fold one :class:`sinkfix.patch.AttentionCall` into the running sums."""
        with torch.no_grad():
            self._observe(call)

    def _observe(self, call) -> None:
        layer = call.layer
        q = call.query.detach().float()
        k = call.key.detach().float()
        v = call.value.detach().float()
        B, Hq, Q, _ = q.shape
        K = k.shape[2]
        dev = q.device
        sink_cols = call.sink_cols
        if sink_cols is None:
            sink_cols = torch.zeros(B, 1, dtype=torch.long, device=dev)
        is_sink = sink_key_mask(sink_cols, B, K, dev)  # (B, K)
        has_sink = is_sink.any(-1)  # (B,) an empty sink set (n_sink=0) has no share or drain to speak of
        beta = None if call.beta is None else call.beta.detach().to(device=dev, dtype=torch.float32)
        # A query row counts only where its own mask entry is 1: the attention mask hides padding
        # *keys*, so a right-padding row still sees the real keys before it and was measured as a
        # real row (sink share 0.014 off, 1.5 more hidden sinks per sequence, dormancy 0.011 off,
        # its own dormancy score up to 0.109 on a tiny Llama).
        rows_real = self._rows_real(B, Q, K, dev)
        vnorm, median_v = self._value_drain(layer, call, v, sink_cols, has_sink)

        if self.threshold is None and call.result.sink_mass is not None:
            # cheap path: the attention op already returned the stock sink mass of every row
            has_n = self._rows_with_nonsink(call, is_sink, B, Q, K, dev, rows_real)  # (B, Q)
            share = call.result.sink_mass.detach().float()  # (B, Hq, Q) before sink scaling
            if beta is not None:
                share = share * beta[None, :, None]
            self._add_rows(layer, share, has_n, has_sink, Hq)
            return

        rows = _corrected_rows(call, q, k, sink_cols, is_sink, beta, rows_real)
        self._add_rows(layer, rows.share, rows.has_n, has_sink, Hq)
        hidden = self._hidden_sinks(layer, rows, is_sink, K)
        self._row_dormancy(layer, call, q, k, rows, is_sink, hidden, vnorm, median_v, rows_real)

    def _value_drain(self, layer: int, call, v: torch.Tensor, sink_cols: torch.Tensor, has_sink: torch.Tensor):
        """Fold ||v_sink|| / median_j ||v_j|| (first sink column in the window, per kv head) of the
        sequences that have one; returns the value norms (B, Hkv, K) and their median over real keys (B, Hkv)."""
        B, Hkv, K, _ = v.shape
        Q = call.query.shape[2]
        vnorm = v.norm(dim=-1)
        key_real = self._key_real(call, B, Q, K, v.device)  # (B, K)
        if self._real is not None and self._real.shape == (B, K):  # a padding key is no key, whatever the mask
            key_real = key_real & self._real.to(v.device)
        median_v = torch.nanmedian(vnorm.masked_fill(~key_real[:, None, :], float("nan")), dim=-1).values
        if self.drain_sum[layer] is None:
            self.drain_sum[layer] = torch.zeros(Hkv, dtype=torch.float64)
        if sink_cols.shape[1]:
            # the first slot that names a key of this window: -1 (unused) and positions beyond it name none
            in_window = (sink_cols >= 0) & (sink_cols < K)
            first = sink_cols.gather(1, in_window.to(torch.int8).argmax(1, keepdim=True)).clamp(0, K - 1)
            v_sink = vnorm.gather(2, first[:, None].expand(B, Hkv, 1)).squeeze(-1)
            drain = (v_sink / median_v).double().cpu()[has_sink.cpu()]  # (B', Hkv)
            self.drain_sum[layer] += drain.nan_to_num(0).sum(0)
            self.drain_count[layer] += drain.shape[0]
        if self._first_window and self.keep_examples:
            self.value_norms[layer] = vnorm[0].cpu().tolist()
        return vnorm, median_v

    def _hidden_sinks(self, layer: int, rows: "_RowPass", is_sink: torch.Tensor, K: int) -> torch.Tensor:
        """ACT's criterion on the column masses of the blockwise pass: (B, Hq, K) bool."""
        Hq = rows.col_sum.shape[1]
        # Each sequence's own limit: a short sequence left-padded into a batch with a long one is
        # judged as it would be alone (the batch's longest took 24 instead of 4 for a 20-token one).
        n_rows = rows.has_n.sum(-1, keepdim=True)  # (B, 1)
        min_q = (n_rows // 4).clamp(min=1, max=self.min_queries)
        mean_att = rows.col_sum / rows.seen_by.clamp(min=1)[:, None, :]
        hidden = (mean_att > self.threshold) & (rows.seen_by >= min_q)[:, None, :] & ~is_sink[:, None, :]
        self.hidden_count[layer, :Hq] += hidden.sum(-1).sum(0).double().cpu()
        self.seqs_seen[layer] += hidden.shape[0]
        if hidden.any() and self._ids is not None and self._ids.shape[-1] == K:
            bs, _, js = torch.nonzero(hidden.cpu(), as_tuple=True)
            self.hidden_tok[layer].update(self._ids[bs, js].tolist())
        return hidden

    def _row_dormancy(self, layer: int, call, q, k, rows: "_RowPass", is_sink, hidden, vnorm, median_v,
                      rows_real: torch.Tensor | None = None) -> None:
        """Attention on sink columns (first-token and hidden) weighted by how drained their values
        are, per row; only the few candidate columns are scored again."""
        B, Hq, Q, _ = q.shape
        Hkv, K = k.shape[1], k.shape[2]
        g = Hq // Hkv
        dev = q.device
        weight = (1 - vnorm / median_v[..., None]).clamp(0, 1).nan_to_num(0)  # (B, Hkv, K)
        weight = weight.repeat_interleave(g, dim=1)  # (B, Hq, K)
        cand = is_sink[:, None, :] | hidden
        cols = torch.nonzero(cand.any(1).any(0)).flatten()  # union over batch and heads, a few columns
        if cols.numel():
            qg = q.reshape(B, Hkv, g, Q, -1)
            s_u = torch.einsum("bhgqd,bhud->bhgqu", qg, k[:, :, cols]).reshape(B, Hq, Q, -1) * call.scale
            if call.softcap is not None:
                s_u = call.softcap * torch.tanh(s_u / call.softcap)
            vis_u = self._visible_cols(call, cols, B, Q, K, dev)  # (B, 1, Q, U)
            if rows_real is not None:  # a padding row scores 0, right padding as left
                vis_u = vis_u & rows_real[:, None, :, None]
            p_u = (torch.exp(s_u - rows.m[..., None]) / rows.z[..., None]).masked_fill(~vis_u, 0.0)
            sink_u = is_sink[:, cols][:, None, None, :]
            p_u = p_u * torch.where(sink_u, rows.fac_s[..., None], rows.fac_n[..., None])
            hidden_mass = (p_u * hidden[:, :, cols][:, :, None, :]).sum(-1)
            score = (p_u * (cand[:, :, cols] * weight[:, :, cols])[:, :, None, :]).sum(-1)  # (B, Hq, Q)
        else:
            hidden_mass = torch.zeros(B, Hq, Q, device=dev)
            score = torch.zeros(B, Hq, Q, device=dev)
        w = rows.has_n[:, None, :].to(score.dtype)
        self.hidden_share_sum[layer, :Hq] += (hidden_mass * w).sum((0, 2)).double().cpu()
        self.dormancy_sum[layer, :Hq] += (score * w).sum((0, 2)).double().cpu()
        self.dormant_rows[layer, :Hq] += ((score >= DORMANT_THRESHOLD) * w).sum((0, 2)).double().cpu()
        if self.keep_rows:
            self.rows[layer].append(score.cpu())

    # -- helpers ------------------------------------------------------------------------------
    def _rows_real(self, B: int, Q: int, K: int, dev) -> torch.Tensor | None:
        """(B, Q) query rows that are real tokens by the window's attention mask (begin_window), or
        None when there is no mask or it does not describe this call's rows. The mask covers the
        keys; the Q query rows are its last Q positions (all of them in a window's forward)."""
        real = self._real
        if real is None or real.ndim != 2 or real.shape[0] != B or real.shape[1] not in (Q, K) or real.shape[1] < Q:
            return None
        return real[:, real.shape[1] - Q:].to(dev)

    def _add_rows(self, layer: int, share: torch.Tensor, has_n: torch.Tensor, has_sink: torch.Tensor, Hq: int) -> None:
        counted = has_n & has_sink[:, None]
        self.sink_sum[layer, :Hq] += (share * counted[:, None, :].to(share.dtype)).sum((0, 2)).double().cpu()
        self.sink_rows_seen[layer] += float(counted.sum())
        self.rows_seen[layer] += float(has_n.sum())

    @staticmethod
    def _visible(call, r0: int, r1: int, B: int, K: int, dev) -> torch.Tensor:
        """(B, 1, r1-r0, K) bool visibility of query rows r0..r1 (upper-left causal when no mask)."""
        if call.attn_mask is not None:
            return call.attn_mask[:, :, r0:r1].expand(B, 1, r1 - r0, K)
        if call.causal:
            rows = torch.arange(r0, r1, device=dev)[:, None]
            return (torch.arange(K, device=dev)[None, :] <= rows).expand(B, 1, r1 - r0, K)
        return torch.ones(B, 1, r1 - r0, K, dtype=torch.bool, device=dev)

    @staticmethod
    def _visible_cols(call, cols: torch.Tensor, B: int, Q: int, K: int, dev) -> torch.Tensor:
        if call.attn_mask is not None:
            return call.attn_mask.expand(B, 1, Q, K)[..., cols]
        if call.causal:
            return (cols[None, :] <= torch.arange(Q, device=dev)[:, None]).expand(B, 1, Q, cols.numel())
        return torch.ones(B, 1, Q, cols.numel(), dtype=torch.bool, device=dev)

    @staticmethod
    def _key_real(call, B: int, Q: int, K: int, dev) -> torch.Tensor:
        """(B, K) keys that at least one query row may see (excludes left padding)."""
        if call.attn_mask is not None:
            return call.attn_mask.expand(B, 1, Q, K)[:, 0].any(1)
        return torch.ones(B, K, dtype=torch.bool, device=dev)

    @staticmethod
    def _rows_with_nonsink(call, is_sink: torch.Tensor, B: int, Q: int, K: int, dev,
                           rows_real: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Q) rows that see at least one key outside the sink set (and are real, by ``rows_real``)."""
        if call.attn_mask is not None:
            has_n = (call.attn_mask.expand(B, 1, Q, K)[:, 0] & ~is_sink[:, None, :]).any(-1)
        elif call.causal:
            has_n = ((~is_sink).cumsum(-1) > 0)[:, :Q]
        else:
            has_n = (~is_sink).any(-1, keepdim=True).expand(B, Q)
        return has_n if rows_real is None else has_n & rows_real

    # -- result -------------------------------------------------------------------------------
    def result(self) -> ExtremeTokenMetrics:
        nan = float("nan")
        # A layer where no row saw a key outside the sink set (a sink set as long as the text) has no
        # defined share or dormancy: NaN, reported as null / "-", not 0 (which read as "active").
        rows = torch.where(self.rows_seen > 0, self.rows_seen, torch.full_like(self.rows_seen, nan))[:, None]
        # likewise a layer whose sink set was empty in every window: no sink share, not a share of 0
        sink_rows = torch.where(self.sink_rows_seen > 0, self.sink_rows_seen,
                                torch.full_like(self.sink_rows_seen, nan))[:, None]
        mask = torch.zeros(self.L, self.H, dtype=torch.bool)
        for layer, h in enumerate(self.num_heads):
            mask[layer, :h] = True
        per_head = lambda t: t.masked_fill(~mask, nan)  # noqa: E731
        hkv = max((d.numel() for d in self.drain_sum if d is not None), default=0)
        drain = torch.full((self.L, hkv), nan, dtype=torch.float64)
        for layer, d in enumerate(self.drain_sum):
            if d is not None and self.drain_count[layer] > 0:
                drain[layer, : d.numel()] = d / self.drain_count[layer]
        peak = torch.where(self.peak_count > 0, self.peak_sum / self.peak_count.clamp(min=1),
                           torch.full_like(self.peak_sum, nan))
        heavy = self.threshold is not None and bool((self.seqs_seen > 0).any())
        return ExtremeTokenMetrics(
            sink_share=per_head(self.sink_sum / sink_rows),
            value_drain=drain,
            residual_peak=peak,
            peak_positions=[c.most_common(1)[0][0][0] if c else -1 for c in self.peak_tok],
            peak_tokens=[c.most_common(1)[0][0][1] if c else -1 for c in self.peak_tok],
            hidden_sink_share=per_head(self.hidden_share_sum / rows) if heavy else None,
            hidden_sink_rate=per_head(self.hidden_count / self.seqs_seen.clamp(min=1)[:, None]) if heavy else None,
            dormancy=per_head(self.dormancy_sum / rows) if heavy else None,
            dormant_fraction=per_head(self.dormant_rows / rows) if heavy else None,
            hidden_sink_tokens=[dict(c.most_common(10)) for c in self.hidden_tok],
            peak_position_counts=[dict(c.most_common(5)) for c in self.peak_pos],
            residual_norms=self.residual_norms,
            value_norms=self.value_norms,
            example_ids=self.example_ids,
            windows=self.windows,
            tokens=self.tokens,
            hidden_sink_threshold=self.threshold,
        )


@contextlib.contextmanager
def observed_model(model: nn.Module, collector_kwargs: dict | None = None, *,
                   residual: bool = True) -> Iterator[StreamingCollector]:
    """Attach a :class:`StreamingCollector` to ``model`` for the duration of the block.

    An unpatched model is patched with the identity policy and restored afterwards (bit-exactly);
    an already patched model keeps its policy (statistics are then those of the corrected model).
    """
    from sinkfix.patch import PatchHandle, patch
    from sinkfix.policy import Policy

    handle = PatchHandle.of(model)
    own = handle is None
    if own:
        handle = patch(model, Policy())
    hooks = []
    try:
        collector = StreamingCollector(handle.num_layers, handle.num_heads(), **(collector_kwargs or {}))
        if residual:
            for layer, module in enumerate(handle.decoder_layers()):
                if module is not None:
                    hooks.append(module.register_forward_hook(collector.residual_hook(layer)))
        with handle.observing(collector.observe):
            yield collector
    finally:
        for hook in hooks:
            hook.remove()
        if own:
            handle.remove()


@torch.no_grad()
def measure_extreme_tokens(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    *,
    hidden_sink_threshold: float | None = HIDDEN_SINK_THRESHOLD,
    min_queries: int = _MIN_QUERIES,
    progress=None,
) -> ExtremeTokenMetrics:
    """Sink share, value drain, residual peak (and hidden sinks and dormancy) over ``windows``.

    ``windows`` are 1-D input-id tensors, run one at a time (no padding). The model is measured as
    it is currently patched; an unpatched model is temporarily patched with the identity policy.
    ``hidden_sink_threshold=None`` skips the blockwise attention pass (hidden sinks, dormancy) and
    reads the sink share off the attention kernel's own sink mass: about the cost of a plain forward.
    A threshold outside (0, 1) or a ``min_queries`` that is not an integer >= 1 is a :class:`UsageError`.
    ``progress`` is called with 1 after each window.
    """
    if not len(windows):
        raise ValueError("measure_extreme_tokens needs at least one window")
    if hidden_sink_threshold is not None:  # before the model is patched (the collector checks them too)
        check_hidden_sink_threshold(hidden_sink_threshold)
    check_min_queries(min_queries)
    device = model_device(model)
    kwargs = dict(hidden_sink_threshold=hidden_sink_threshold, min_queries=min_queries)
    with observed_model(model, kwargs) as collector:
        for ids in windows:
            ids = torch.as_tensor(ids).reshape(1, -1)
            collector.begin_window(ids)
            model(input_ids=ids.to(device), use_cache=False)
            if progress is not None:
                progress(1)
    return collector.result()
