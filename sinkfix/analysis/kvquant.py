"""KV-cache quantization with and without sink protection: perplexity of full / quantized / protected.

Protocol (docs/caches.md): each sequence (``seq_len`` tokens, BOS first when the protocol has one) is
fed through the cache in chunks of ``chunk`` tokens, as a chunked prefill: every token attends to
the cache's (quantized) past and, in full precision, to the tokens of its own chunk before it. Every
token after the first is scored. Variants, per bit width:

* **full**: transformers' ``DynamicCache`` (full precision);
* **quantized**: transformers' ``QuantizedCache`` with the same backend, bit width, per-token groups
  and residual length; for models it refuses (any sliding-window layer: Gemma2/3), ``SinkCache`` with
  no sinks, which quantizes exactly as ``QuantizedCache`` does (tests/test_caches_quantized.py) and
  also quantizes the sliding layers' windows;
* **sink_protected**: ``SinkCache(n_sink, window=None, bits)``: the same, with each row's first
  ``n_sink`` tokens kept in full precision;
* **hidden_protected** (optional): the same, plus the hidden sinks the model's attention finds
  (:mod:`sinkfix.analysis.hidden_sinks`) kept in full precision.

``recovered`` = (quantized - protected) / (quantized - full): the share of the perplexity lost to
quantization that protecting the sinks wins back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sinkfix.caches import SinkCache
from sinkfix.caches.feed import cache_keyword
from sinkfix.caches.quantize import backend_axis
from sinkfix.errors import UsageError
from sinkfix.evaluate import model_device

__all__ = ["QuantRow", "sequence_nll", "make_cache", "measure_kvquant", "recovered_share"]

VARIANTS = ("full", "quantized", "sink_protected")
HIDDEN = "hidden_protected"


@dataclass
class QuantRow:
    """One bit width: summed NLL and scored tokens per variant, and what "quantized" was."""

    bits: int
    nll_sum: dict[str, float]
    tokens: int
    quantized_cache: str
    hidden_tokens: int = 0  # (row, token, layer) triples the hidden-sink variant kept in full precision

    def ppl(self, variant: str) -> float:
        return math.exp(self.nll_sum[variant] / max(self.tokens, 1))

    def as_json(self) -> dict:
        out = {v: self.ppl(v) for v in (*VARIANTS, HIDDEN) if v in self.nll_sum}
        out.update(tokens=self.tokens, quantized_cache=self.quantized_cache,
                   recovered=recovered_share(out["full"], out["quantized"], out["sink_protected"]),
                   protected_vs_full=out["sink_protected"] / out["full"] - 1,
                   quantized_vs_full=out["quantized"] / out["full"] - 1)
        if HIDDEN in out:
            out.update(recovered_hidden=recovered_share(out["full"], out["quantized"], out[HIDDEN]),
                       hidden_protected_tokens=self.hidden_tokens)
        return out


def recovered_share(full: float, quantized: float, protected: float) -> float:
    """(quantized - protected) / (quantized - full); NaN when quantization lost nothing."""
    lost = quantized - full
    return (quantized - protected) / lost if lost > 0 else float("nan")


def make_cache(model, variant: str, *, bits: int, backend: str, n_sink: int, residual_length: int,
               q_group_size: int | None) -> tuple[object, str]:
    """(cache, description) for one variant."""
    from transformers import DynamicCache, QuantizedCache

    if variant == "full":
        return DynamicCache(config=model.config), "DynamicCache"
    quant = dict(bits=bits, backend=backend, residual_length=residual_length, q_group_size=q_group_size)
    if variant in ("sink_protected", HIDDEN):
        return SinkCache(model.config, n_sink=n_sink, window=None, **quant), f"SinkCache(n_sink={n_sink})"
    probe = SinkCache(model.config, n_sink=0, window=None, **quant)  # validates, resolves the group size
    axis = backend_axis(backend)
    try:
        cache = QuantizedCache(backend, model.config, nbits=bits, axis_key=axis, axis_value=axis,
                               q_group_size=probe.q_group_size, residual_length=residual_length)
        return cache, "transformers QuantizedCache"
    except ValueError:
        # transformers refuses models with sliding-window layers
        return probe, "SinkCache(n_sink=0): transformers' QuantizedCache refuses this model's sliding layers"


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, cache, *, chunk: int,
                 on_tokens: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Summed next-token NLL (fp32 log-softmax, fp64 sum) of ``ids`` (N,) fed in chunks through ``cache``."""
    device = model_device(model)
    keyword = cache_keyword(model)
    total, count = 0.0, 0
    ids = ids.to(device)
    for start in range(0, ids.numel() - 1, chunk):
        piece = ids[start : start + chunk]
        logits = model(input_ids=piece[None], use_cache=True, **{keyword: cache}).logits[0]
        targets = ids[start + 1 : start + 1 + piece.numel()]
        logp = torch.log_softmax(logits[: targets.numel()].float(), dim=-1)
        total += float(-logp.gather(-1, targets[:, None]).sum().double())
        count += targets.numel()
        if on_tokens is not None:
            on_tokens(piece.numel())
    return total, count


def measure_kvquant(model, sequences: Sequence[torch.Tensor], *, bits: Sequence[int], backend: str = "quanto",
                    n_sink: int = 4, residual_length: int = 128, q_group_size: int | None = None, chunk: int = 128,
                    hidden_sinks: bool = False,
                    on_tokens: Callable[[int], None] | None = None) -> list[QuantRow]:
    """One :class:`QuantRow` per bit width over ``sequences`` (1-D id tensors); full precision runs once."""
    if not sequences:
        raise UsageError("no sequence to measure")
    settings = dict(backend=backend, n_sink=n_sink, residual_length=residual_length, q_group_size=q_group_size)
    full_sum, tokens = 0.0, 0
    for ids in sequences:
        cache, _ = make_cache(model, "full", bits=bits[0], **settings)
        nll, count = sequence_nll(model, ids, cache, chunk=chunk, on_tokens=on_tokens)
        full_sum, tokens = full_sum + nll, tokens + count
    rows = []
    for width in bits:
        row = QuantRow(width, {"full": full_sum}, tokens, "")
        for variant in ("quantized", "sink_protected") + ((HIDDEN,) if hidden_sinks else ()):
            row.nll_sum[variant] = 0.0
            for ids in sequences:
                cache, what = make_cache(model, variant, bits=width, **settings)
                row.nll_sum[variant] += _variant_nll(model, ids, cache, variant, row, chunk, on_tokens)
                if variant == "quantized":
                    row.quantized_cache = what
        rows.append(row)
    return rows


def _variant_nll(model, ids, cache, variant: str, row: QuantRow, chunk: int, on_tokens) -> float:
    if variant != HIDDEN:
        return sequence_nll(model, ids, cache, chunk=chunk, on_tokens=on_tokens)[0]
    from sinkfix.analysis.hidden_sinks import protecting_hidden_sinks

    with protecting_hidden_sinks(model, cache) as guard:
        nll = sequence_nll(model, ids, cache, chunk=chunk, on_tokens=on_tokens)[0]
    row.hidden_tokens += guard.protected
    return nll
