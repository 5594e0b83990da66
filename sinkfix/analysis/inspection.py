"""Inspect a model's extreme tokens, per layer and head, and classify heads as active or dormant.

``sinkfix.inspect(model, tokenizer, texts)`` streams each text through the (patched) model in
windows and reports, per layer and head: the sink share on the first token and on detected hidden
sinks, the value drain ratio, the residual peak ratio (and the positions / tokens that reach it),
the hidden sinks found, and an active / dormant state. Given texts from two or more domains it
lists the heads whose state changes between domains (Guo et al. 2024 found a Llama-2-7B head
dormant on Wikipedia and active on GitHub code).

The dormancy rule
-----------------
A dormant head "parks" its attention on a sink whose value is drained, so the attention it spends
there buys (almost) nothing. For query row i of head h the **dormancy score** is the share of the
row's attention that is wasted that way::

    d_i = sum_{j in sinks} p_ij * w_j,      w_j = clamp(1 - ||v_j|| / median_k ||v_k||, 0, 1)

where ``sinks`` is the first-token sink set plus the hidden sinks that ACT's criterion finds for
this head in this sequence, p are the attention probabilities as the model is currently patched,
and ``v`` the (kv-head) value vectors of the same sequence. ``w_j`` is 0 for a key whose value is
as large as a typical token's (attention on it carries information) and tends to 1 as the value
vanishes. A row is **dormant** when ``d_i >= DORMANT_THRESHOLD`` (0.5: most of the attention is
wasted); a head's continuous score is the mean of ``d_i`` over the rows that see at least one
non-sink key, and the head is dormant on a text when that mean is >= the same threshold, so the
per-head and per-row rules agree (the report also gives the fraction of dormant rows).
The sink's own row (it sees only itself) is scored like any other row but left out of the
per-head means.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from sinkfix.analysis.metrics import (DORMANT_THRESHOLD, HIDDEN_SINK_THRESHOLD, ExtremeTokenMetrics,
                                      check_hidden_sink_threshold, observed_model)
from sinkfix.errors import UsageError, is_integer, is_real
from sinkfix.evaluate import MIN_TOKENS, model_device, model_label

__all__ = ["DORMANT_THRESHOLD", "InspectionReport", "inspect", "row_dormancy", "text_windows", "model_summary",
           "dormancy_flips", "check_flip_margin", "MAX_FLIP_MARGIN", "check_windows", "shortest_window", "MIN_TEXT_TOKENS"]


@torch.no_grad()
def row_dormancy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 hidden_sink_threshold: float | None = HIDDEN_SINK_THRESHOLD) -> torch.Tensor:
    """Per-row dormancy scores ``[L, B, Hq, S]`` (fp32, in [0, 1]) for one batch of sequences.

    input_ids (B, S); attention_mask (B, S), 1 = real token (None = no padding). The score is the
    one the module docstring defines; ``score >= DORMANT_THRESHOLD`` means the row is dormant.
    Padding rows (mask 0, left or right) score 0 and change no other row's score: each sequence is
    scored as it would be alone. ``hidden_sink_threshold`` is ACT's criterion, in (0, 1); None
    restricts the sink set to the first token(s).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    device = model_device(model)
    threshold = HIDDEN_SINK_THRESHOLD if hidden_sink_threshold is None else hidden_sink_threshold
    kwargs = dict(hidden_sink_threshold=threshold, keep_rows=True, keep_examples=False)
    with observed_model(model, kwargs, residual=False) as collector:
        if hidden_sink_threshold is None:
            # no key's mean attention exceeds infinity: the blockwise pass (which the per-row scores
            # need) runs with first-token sinks only; set past the collector's check, which refuses
            # thresholds outside (0, 1) from users
            collector.threshold = math.inf
        collector.begin_window(input_ids, attention_mask)
        extra = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
        model(input_ids=input_ids.to(device), use_cache=False, **extra)
    return torch.stack([rows[0] for rows in collector.rows])


# -- windows ------------------------------------------------------------------------------------
# The fewest text tokens a window can have: the metrics are taken over the rows that see a key
# besides the sink, and the first text token is the sink when a window has no BOS token. The same
# number as the shortest text tokenize() accepts (one token that sees another).
MIN_TEXT_TOKENS = MIN_TOKENS


def shortest_window(bos: bool) -> int:
    """The shortest window: :data:`MIN_TEXT_TOKENS` text tokens, after the BOS token when ``bos``."""
    return MIN_TEXT_TOKENS + int(bool(bos))


def check_windows(seq_len, bos: bool, max_tokens, *, flags: bool = False) -> None:
    """``seq_len`` and ``max_tokens`` checked before any text is tokenized or any model runs: each an
    integer, the window long enough for :data:`MIN_TEXT_TOKENS` text tokens, and ``max_tokens``
    (None: no limit) at least that many, else a :class:`UsageError` naming the argument (its
    command-line flag when ``flags``). A ``max_tokens`` below one window is allowed: the text then
    makes one shorter window, as a short text does; a slice ``ids[:max_tokens]`` with 0 or a negative
    count would instead measure 1-token windows or nearly the whole text."""
    names = ("--seq-len", "--max-tokens", "--no-bos") if flags else ("seq_len", "max_tokens", "bos=False")
    shortest = shortest_window(bos)
    if not is_integer(seq_len) or seq_len < shortest:
        where = f"the BOS token and {MIN_TEXT_TOKENS} text tokens; {MIN_TEXT_TOKENS} with {names[2]}" if bos \
            else f"{MIN_TEXT_TOKENS} text tokens"
        raise UsageError(f"{names[0]} must be an integer >= {shortest} ({where}), got {seq_len!r}")
    if max_tokens is not None and (not is_integer(max_tokens) or max_tokens < MIN_TEXT_TOKENS):
        raise UsageError(f"{names[1]} must be {'' if flags else 'None or '}an integer >= {MIN_TEXT_TOKENS} (the text "
                         f"tokens used per text; a window needs {MIN_TEXT_TOKENS}), got {max_tokens!r}")


def text_windows(tokenizer, text: str, *, seq_len: int = 512, bos: bool = True,
                 max_tokens: int | None = 4096, name: str | None = None) -> list[torch.Tensor]:
    """Cut ``text`` into non-overlapping 1-D windows of ``seq_len`` tokens (BOS first when ``bos``),
    from at most ``max_tokens`` text tokens (None: all); see :func:`check_windows` for the bounds. A
    text under :data:`MIN_TEXT_TOKENS` tokens is a :class:`UsageError` naming it (``name``)."""
    from sinkfix.evaluate import bos_token_id, tokenize

    check_windows(seq_len, bos, max_tokens)
    ids = tokenize(tokenizer, text, name=name)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos_id = bos_token_id(tokenizer) if bos else None
    body = seq_len - (bos_id is not None)
    out = []
    for start in range(0, ids.numel(), body):
        chunk = ids[start : start + body]
        if chunk.numel() < min(body, 16):  # a short tail adds noise, not information
            continue
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id], dtype=chunk.dtype), chunk])
        out.append(chunk)
    if not out:
        out.append(ids if bos_id is None else torch.cat([torch.tensor([bos_id], dtype=ids.dtype), ids]))
    return out


def _check_positions(model: nn.Module, longest: int, seq_len: int) -> None:
    """Refuse windows longer than the positions the model's config states, before any forward: past
    them GPT-2 raised an IndexError from its position table and a RoPE model ran on garbage silently."""
    from sinkfix.evaluate import check_positions

    config = getattr(model, "config", None)
    if config is not None:
        check_positions(longest, config, f"seq_len {seq_len}: window length", model_summary(model)["name"])


def model_summary(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return {
        "name": model_label(model),
        "architecture": type(model).__name__,
        "num_layers": getattr(text, "num_hidden_layers", None),
        "num_heads": getattr(text, "num_attention_heads", None),
        "num_kv_heads": getattr(text, "num_key_value_heads", None),
    }


def _dormant_or_null(dormant: torch.Tensor, dormancy: torch.Tensor) -> list:
    """[L][Hq] of True / False, None where the dormancy is undefined (NaN)."""
    return [[None if undefined else bool(flag) for flag, undefined in zip(row_flags, row_undefined)]
            for row_flags, row_undefined in zip(dormant.tolist(), dormancy.isnan().tolist())]


# -- report -------------------------------------------------------------------------------------
@dataclass
class InspectionReport:
    """What :func:`inspect` returns: per-domain metrics, head states and the heads that flip."""

    model: dict
    protocol: dict
    domains: dict[str, ExtremeTokenMetrics]
    flips: list[dict] = field(default_factory=list)
    token_strings: dict[int, str] = field(default_factory=dict)
    #: per domain and layer, every (position, token id) -> windows whose residual maximum sat there,
    #: and every hidden-sink token id -> (head, window) hits: what :attr:`overall` combines exactly
    #: (the per-domain metrics keep only their top entries). Empty for a report built by hand.
    peak_counts: dict[str, list[Counter]] = field(default_factory=dict, repr=False)
    hidden_token_counts: dict[str, list[Counter]] = field(default_factory=dict, repr=False)

    @property
    def overall(self) -> ExtremeTokenMetrics:
        """Token-weighted mean of the per-domain metrics (the only domain when there is one), per entry
        over the domains where it is defined (NaN where none is)."""
        items = list(self.domains.values())
        if len(items) == 1:
            return items[0]
        weights = [m.tokens for m in items]
        total = float(sum(weights))

        def avg(name):
            ts = [getattr(m, name) for m in items]
            if any(t is None for t in ts):
                return None
            # over the domains where each entry is defined, with their weights: a plain weighted sum
            # made one domain's undefined value (a 3-token text under n_sink=4) every entry's
            stacked = torch.stack([t.double() for t in ts])  # (D, ...)
            share = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (stacked.ndim - 1))) / total
            defined = ~torch.isnan(stacked)
            weight = (share * defined).sum(0)
            mean = (stacked.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf) * share).sum(0) / weight
            return torch.where(weight > 0, mean, float("nan")).to(ts[0].dtype)

        first = items[0]
        positions, tokens, position_counts = self._combined_peaks()
        return ExtremeTokenMetrics(
            sink_share=avg("sink_share"), value_drain=avg("value_drain"), residual_peak=avg("residual_peak"),
            # where the residual maximum sat most often over every domain's windows, not the first domain's
            peak_positions=positions, peak_tokens=tokens,
            hidden_sink_share=avg("hidden_sink_share"), hidden_sink_rate=avg("hidden_sink_rate"),
            dormancy=avg("dormancy"), dormant_fraction=avg("dormant_fraction"),
            hidden_sink_tokens=self._combined_hidden_tokens(), peak_position_counts=position_counts,
            residual_norms=first.residual_norms, value_norms=first.value_norms, example_ids=first.example_ids,
            windows=sum(m.windows for m in items), tokens=int(total),
            hidden_sink_threshold=first.hidden_sink_threshold,
        )

    def _combined_peaks(self) -> tuple[list[int], list[int], list[dict[int, int]]]:
        """Per layer, over every domain: the (position, token) where the residual maximum sat in the
        most windows (as each domain's own is chosen), and the top 5 positions with their windows."""
        items = list(self.domains.values())
        layers = len(items[0].peak_positions)
        if set(self.peak_counts) == set(self.domains):
            pairs = [sum((self.peak_counts[d][layer] for d in self.domains), Counter()) for layer in range(layers)]
        else:
            # a report without the full counts: each domain's own peak, weighted by its windows there
            pairs = [Counter() for _ in range(layers)]
            for m in items:
                for layer in range(layers):
                    position = m.peak_positions[layer]
                    if position >= 0:
                        windows = m.peak_position_counts[layer].get(position, 1) if m.peak_position_counts else 1
                        pairs[layer][(position, m.peak_tokens[layer])] += windows
        positions, tokens, position_counts = [], [], []
        for counts in pairs:
            (position, token), _ = counts.most_common(1)[0] if counts else ((-1, -1), 0)
            positions.append(position)
            tokens.append(token)
            by_position = Counter()
            for (p, _token), n in counts.items():
                by_position[p] += n
            position_counts.append(dict(by_position.most_common(5)))
        return positions, tokens, position_counts

    def _combined_hidden_tokens(self) -> list[dict[int, int]]:
        """Per layer, the hidden-sink tokens of every domain together (the top 10, as per domain)."""
        if set(self.hidden_token_counts) == set(self.domains):
            per_domain = [self.hidden_token_counts[d] for d in self.domains]
        else:
            per_domain = [[Counter(c) for c in m.hidden_sink_tokens] for m in self.domains.values()]
        layers = max((len(c) for c in per_domain), default=0)
        return [dict(sum((c[layer] for c in per_domain if layer < len(c)), Counter()).most_common(10))
                for layer in range(layers)]

    def dormant(self, domain: str | None = None) -> torch.Tensor:
        """[L, Hq] bool: head is dormant (mean row score >= DORMANT_THRESHOLD) on ``domain`` (or overall).

        A head whose dormancy is undefined there (NaN: no row saw a non-sink key) is False here without
        being active: ``dormancy.isnan()`` tells those apart (report.json writes them as null)."""
        metrics = self.overall if domain is None else self.domains[domain]
        if metrics.dormancy is None:
            # inspect() always measures it; a report built from metrics collected with
            # hidden_sink_threshold=None (measure_extreme_tokens' cheap path) has none
            raise UsageError("dormancy was not measured: the metrics were collected without hidden-sink "
                             "detection (hidden_sink_threshold=None)")
        return metrics.dormancy >= DORMANT_THRESHOLD

    def sink_layers(self, threshold: float = 0.4) -> list[int]:
        """Layers where at least one head puts >= ``threshold`` of its attention on the sink tokens."""
        share = self.overall.sink_share.nan_to_num(0)
        return [int(layer) for layer in torch.nonzero(share.amax(1) >= threshold).flatten()]

    def peak_layers(self, top: int = 3) -> list[int]:
        """The ``top`` layers with the largest residual peak ratio."""
        peak = self.overall.residual_peak.nan_to_num(0)
        return sorted(torch.argsort(peak, descending=True)[:top].tolist())

    def token(self, token_id: int) -> str:
        return self.token_strings.get(int(token_id), str(token_id))

    def to_dict(self) -> dict:
        return {
            "format": "sinkfix-inspection",
            "version": 1,
            "model": self.model,
            "protocol": self.protocol,
            "rule": {
                "dormancy": "mean over the rows that see a non-sink key of sum_{j in sinks} p_ij * "
                            "clamp(1 - ||v_j||/median||v||, 0, 1)",
                "dormant_threshold": DORMANT_THRESHOLD,
                "hidden_sink": "mean attention over the rows that can see the key > hidden_sink_threshold",
            },
            "domains": {name: m.to_dict() for name, m in self.domains.items()},
            # null where the dormancy is undefined: false said "active" for a head no row measured
            "dormant": {name: _dormant_or_null(self.dormant(name), self.domains[name].dormancy)
                        for name in self.domains if self.domains[name].dormancy is not None},
            "sink_layers": self.sink_layers(),
            "peak_layers": self.peak_layers(),
            "flips": self.flips,
            "tokens": {str(k): v for k, v in sorted(self.token_strings.items())},
        }

    def save_json(self, path: str | Path) -> Path:
        from sinkfix.files import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))


#: Dormancy scores lie in [0, 1] and a head flips when it is at least ``margin`` above the threshold on
#: one domain and at least ``margin`` below it on another: a margin this large could be met only by
#: scores of exactly 1 and 0, a larger one never.
MAX_FLIP_MARGIN = min(DORMANT_THRESHOLD, 1.0 - DORMANT_THRESHOLD)


def check_flip_margin(margin, name: str = "flip_margin", error: type[Exception] = UsageError) -> float:
    """The flip margin, checked: a number in [0, :data:`MAX_FLIP_MARGIN`); anything else raises
    ``error`` (a negative margin would list heads that are never dormant, or never active, as
    flips; NaN would list none)."""
    if not is_real(margin) or not 0.0 <= margin < MAX_FLIP_MARGIN:
        raise error(f"{name} must be a number in [0, {MAX_FLIP_MARGIN:g}) (dormancy scores lie in [0, 1], the "
                    f"dormant threshold is {DORMANT_THRESHOLD:g}), got {margin!r}")
    return float(margin)


def _domain_flips(domains: Mapping[str, ExtremeTokenMetrics], margin: float) -> list[dict]:
    return dormancy_flips({n: m.dormancy for n, m in domains.items() if m.dormancy is not None}, margin)


def dormancy_flips(dormancy: Mapping[str, torch.Tensor], margin: float) -> list[dict]:
    """Heads dormant on one domain and active on another, each side at least ``margin`` from the
    threshold (inclusive on both sides: a score of threshold + margin counts as dormant, one of
    threshold - margin as active; with a margin of 0 active is below the threshold, as
    :meth:`InspectionReport.dormant` has it). ``dormancy``: domain -> [L, H] mean row dormancy
    scores (NaN = no such head, or undefined on that domain: no row saw a non-sink key). A domain
    where a head's score is undefined is in neither list; the others still decide the flip."""
    names = list(dormancy)
    if len(names) < 2:
        return []
    scores = torch.stack([dormancy[n] for n in names])  # (D, L, H)
    flips = []
    L, H = scores.shape[1:]
    dormant = lambda v: v >= DORMANT_THRESHOLD + margin  # noqa: E731
    # "at least margin below": inclusive as the dormant side is (0.55 vs 0.45 with a margin of 0.05
    # was no flip, 0.56 vs 0.44 was); and below the threshold itself, so a margin of 0 does not count
    # a head at exactly 0.5 on both domains as dormant on one and active on the other
    active = lambda v: v < DORMANT_THRESHOLD and v <= DORMANT_THRESHOLD - margin  # noqa: E731
    for layer in range(L):
        for head in range(H):
            s = scores[:, layer, head]
            pairs = [(n, v) for n, v in zip(names, s.tolist()) if not math.isnan(v)]
            if len(pairs) < 2:
                continue
            values = [v for _, v in pairs]
            if dormant(max(values)) and active(min(values)):
                flips.append({
                    "layer": layer, "head": head,
                    # the domains that clear the margin on their side; one inside the band is in neither list
                    "dormant_on": [n for n, v in pairs if dormant(v)],
                    "active_on": [n for n, v in pairs if active(v)],
                    "scores": {n: round(float(v), 4) for n, v in pairs},
                    "delta": round(float(max(values) - min(values)), 4),
                })
    return sorted(flips, key=lambda f: -f["delta"])


@torch.no_grad()
def inspect(
    model: nn.Module,
    tokenizer,
    texts: str | Sequence[str] | Mapping[str, str],
    *,
    seq_len: int = 512,
    bos: bool = True,
    max_tokens: int | None = 4096,
    hidden_sink_threshold: float = HIDDEN_SINK_THRESHOLD,
    flip_margin: float = 0.05,
    progress: bool = True,
) -> InspectionReport:
    """Extreme-token report of ``model`` on ``texts``, per layer and head, and per domain.

    ``texts`` is one string, a list of strings (domains ``text0``, ``text1``, ...) or a mapping
    domain name -> text. Each text is cut into non-overlapping windows of ``seq_len`` tokens (a BOS
    token first when ``bos``), at most ``max_tokens`` text tokens per domain, and streamed through
    the model as it is currently patched. ``flip_margin``: a head counts as flipping between two
    domains when its dormancy score is at least this far above the threshold on one and below it
    on the other (scores closer to the threshold than that are noise on a few thousand tokens; a
    score exactly ``flip_margin`` away counts, on either side).
    """
    check_hidden_sink_threshold(hidden_sink_threshold)
    check_windows(seq_len, bos, max_tokens)
    flip_margin = check_flip_margin(flip_margin)
    if isinstance(texts, str):
        texts = {"text": texts}
    elif not isinstance(texts, Mapping):
        texts = {f"text{i}": t for i, t in enumerate(texts)}
    if not texts:
        raise UsageError("inspect needs at least one text")
    windows = {name: text_windows(tokenizer, text, seq_len=seq_len, bos=bos, max_tokens=max_tokens, name=name)
               for name, text in texts.items()}
    longest = {name: max(w.numel() for w in wins) for name, wins in windows.items()}
    _check_positions(model, max(longest.values()), seq_len)
    # a text shorter than one window is measured on the one short window it gives: a 2-token file beside a
    # license text became a 3-token window where every token was a "hidden sink", with 64 spurious flips
    # between the two texts, under a header saying 512-token windows
    short = {name: tokens for name, tokens in longest.items() if tokens < seq_len}
    for name, tokens in short.items():
        warnings.warn(f"text {name!r} gives one window of {tokens} tokens, shorter than the {seq_len}-token windows "
                      f"asked: its numbers rest on {tokens - int(bos)} rows, and its flips against texts of full "
                      "windows reflect the length as much as the text", stacklevel=3)  # past torch.no_grad's wrapper
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(w) for w in windows.values()), desc="inspect", unit="window")
    device = model_device(model)
    domains: dict[str, ExtremeTokenMetrics] = {}
    peak_counts: dict[str, list[Counter]] = {}
    hidden_token_counts: dict[str, list[Counter]] = {}
    try:
        for name, wins in windows.items():
            with observed_model(model, dict(hidden_sink_threshold=hidden_sink_threshold)) as collector:
                for ids in wins:
                    ids = ids.reshape(1, -1)
                    collector.begin_window(ids)
                    model(input_ids=ids.to(device), use_cache=False)
                    if bar is not None:
                        bar.update(1)
            domains[name] = collector.result()
            peak_counts[name] = [Counter(c) for c in collector.peak_tok]
            hidden_token_counts[name] = [Counter(c) for c in collector.hidden_tok]
    finally:
        if bar is not None:
            bar.close()

    from sinkfix.patch import PatchHandle

    handle = PatchHandle.of(model)
    protocol = {
        "seq_len": seq_len, "bos": bos, "max_tokens": max_tokens, "stride": seq_len - int(bos),
        "hidden_sink_threshold": hidden_sink_threshold, "dormant_threshold": DORMANT_THRESHOLD,
        "flip_margin": flip_margin,
        "policy": handle.policy.describe() if handle is not None else "identity (unpatched)",
    }
    if short:
        protocol["short_texts"] = short  # text -> tokens of its one window, shorter than seq_len
    report = InspectionReport(model_summary(model), protocol, domains, _domain_flips(domains, flip_margin), {},
                              peak_counts, hidden_token_counts)
    ids_to_decode: set[int] = set()
    # the combined metrics' tokens too: the overall peak can sit on a token no domain's own peak has
    for metrics in [*domains.values(), *([report.overall] if len(domains) > 1 else [])]:
        ids_to_decode.update(t for t in metrics.peak_tokens if t >= 0)
        for counts in metrics.hidden_sink_tokens:
            ids_to_decode.update(counts)
    for token_id in ids_to_decode:
        try:
            report.token_strings[token_id] = tokenizer.decode([token_id])
        except Exception:  # a tokenizer without decode support: keep the id
            report.token_strings[token_id] = str(token_id)
    return report
