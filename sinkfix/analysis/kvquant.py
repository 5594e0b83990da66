"""KV-cache quantization with and without sink protection: full / quantized / protected.

Protocol (docs/caches.md): each sequence (``seq_len`` tokens, BOS first when the protocol has one) is
fed through every variant's cache in chunks of ``chunk`` tokens, as a chunked prefill: every token
attends to the cache's (quantized) past and, in full precision, to the tokens of its own chunk
before it. Every token after the first is scored. The variants run in lockstep, chunk by chunk, so
each one's next-token distribution is compared with full precision's on the same token:

* **full**: transformers' ``DynamicCache`` (full precision);
* **quantized**: transformers' ``QuantizedCache`` with the same backend, bit width, per-token groups
  and residual length; for models it refuses (any sliding-window layer: Gemma2/3), ``SinkCache`` with
  no sinks, which quantizes exactly as ``QuantizedCache`` does (tests/test_caches_quantized.py) and
  also quantizes the sliding layers' windows;
* **sink_protected**: ``SinkCache(n_sink, window=None, bits)``: the same, with each row's first
  ``n_sink`` tokens kept in full precision;
* **hidden_protected** (optional): the same, plus the hidden sinks the model's attention finds
  (:mod:`sinkfix.analysis.hidden_sinks`) kept in full precision. Observing attention needs sinkfix's
  attention function, so with this variant every variant runs through the identity patch (equal to
  the stock attention to ~1e-5 on the logits).

Per variant: perplexity, and the mean KL divergence KL(full || variant) of the next-token
distributions (nats per token), the direct measure of how far quantization moved the model.
``recovered`` = (quantized - protected) / (quantized - full) for perplexity, ``recovered_kl`` the
same for KL: the share of the loss that protecting the sinks wins back.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from sinkfix.analysis.hidden_sinks import HiddenSinkGuard
from sinkfix.caches import SinkCache
from sinkfix.caches.cache import DEFAULT_RESIDUAL_LENGTH
from sinkfix.caches.chunked import cache_keyword
from sinkfix.caches.quantize import backend_axis
from sinkfix.errors import UsageError
from sinkfix.evaluate import model_device
from sinkfix.patch import patch
from sinkfix.policy import Policy

__all__ = ["QuantRow", "sequence_nll", "make_cache", "measure_kvquant", "recovered_share"]

VARIANTS = ("full", "quantized", "sink_protected")
HIDDEN = "hidden_protected"


@dataclass
class QuantRow:
    """One bit width: per variant summed NLL and summed KL(full || variant), scored tokens, and what
    "quantized" was."""

    bits: int
    nll_sum: dict[str, float]
    kl_sum: dict[str, float]
    tokens: int
    quantized_cache: str = ""
    hidden_tokens: int = 0  # (row, token, layer) triples the hidden-sink variant kept in full precision
    # fp8 only, per variant whose cache is a SinkCache: key and value elements clipped at the frozen
    # scale's range (SinkCache.fp8_saturated), summed over sequences
    fp8_saturated: dict[str, int] = field(default_factory=dict)

    def ppl(self, variant: str) -> float:
        return math.exp(self.nll_sum[variant] / max(self.tokens, 1))

    def kl(self, variant: str) -> float:
        return self.kl_sum.get(variant, 0.0) / max(self.tokens, 1)

    def as_json(self) -> dict:
        names = [v for v in (*VARIANTS, HIDDEN) if v in self.nll_sum]
        out: dict = {v: self.ppl(v) for v in names}
        full, quantized, protected = out["full"], out["quantized"], out["sink_protected"]
        out.update(tokens=self.tokens, quantized_cache=self.quantized_cache,
                   kl={v: self.kl(v) for v in names},
                   recovered=recovered_share(full, quantized, protected),
                   recovered_kl=recovered_share(0.0, self.kl("quantized"), self.kl("sink_protected")),
                   protected_vs_full=protected / full - 1, quantized_vs_full=quantized / full - 1)
        if self.fp8_saturated:
            out["fp8_saturated"] = dict(self.fp8_saturated)
        if HIDDEN in out:
            out.update(recovered_hidden=recovered_share(full, quantized, out[HIDDEN]),
                       recovered_kl_hidden=recovered_share(0.0, self.kl("quantized"), self.kl(HIDDEN)),
                       hidden_protected_tokens=self.hidden_tokens)
        return out


def recovered_share(full: float, quantized: float, protected: float) -> float:
    """(quantized - protected) / (quantized - full); NaN when quantization lost nothing."""
    lost = quantized - full
    return (quantized - protected) / lost if lost > 0 else float("nan")


def quantized_lengths(total: int, chunk: int, residual_length: int) -> list[int]:
    """The token counts transformers' ``QuantizedCache`` quantizes (each layer, each time) when a
    sequence of ``total`` tokens is fed as :func:`sequence_nll` feeds it: the first chunk, then
    everything so far whenever the full-precision residual would reach ``residual_length``."""
    lengths, seen, residual = [], 0, None
    for start in range(0, total - 1, chunk):
        size = min(chunk, total - start)
        seen += size
        if residual is None or residual + size >= residual_length:
            lengths.append(seen)
            residual = 0
        else:
            residual += size
    return lengths


def hqq_baseline_fails(model, lengths: Sequence[int], *, chunk: int, residual_length: int, bits: int,
                       group_size: int) -> bool:
    """Whether transformers' ``QuantizedCache`` with HQQ would fail on these sequence lengths: HQQ
    packs ``8 // bits`` rows of its (groups, group size) view into one byte row and raises a shape
    error from its bit packing when a quantized tensor's group count is not a multiple of that
    (239 tokens x 3 kv heads at 2 bits: 717 groups; ``sinkfix kvquant`` then died on a sequence's
    last chunk with a raw traceback, after measuring the rest of it)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    groups_per_token = heads * head_dim // group_size
    per_byte = 8 // bits
    return any(count * groups_per_token % per_byte
               for total in lengths for count in quantized_lengths(total, chunk, residual_length))


def make_cache(model, variant: str, *, bits: int, backend: str, n_sink: int, residual_length: int | None,
               q_group_size: int | None, baseline_fails: bool = False) -> tuple[object, str]:
    """(cache, description) for one variant. ``baseline_fails``: transformers' ``QuantizedCache``
    cannot take this measurement (:func:`hqq_baseline_fails`), so "quantized" is ``SinkCache`` with no
    sinks, which quantizes as it does and pads what HQQ cannot pack."""
    from transformers import DynamicCache, QuantizedCache

    if variant == "full":
        return DynamicCache(config=model.config), "DynamicCache"
    # fp8 has no residual window: SinkCache refuses a residual_length with it (None: the default)
    quant = dict(bits=bits, backend=backend, residual_length=residual_length, q_group_size=q_group_size)
    if variant in ("sink_protected", HIDDEN):
        return SinkCache(model.config, n_sink=n_sink, window=None, **quant), f"SinkCache(n_sink={n_sink})"
    probe = SinkCache(model.config, n_sink=0, window=None, **quant)  # validates, resolves the group size
    if baseline_fails:
        return probe, ("SinkCache(n_sink=0): transformers' QuantizedCache cannot pack these HQQ token counts "
                       "(a multiple of 8 // bits groups)")
    axis = backend_axis(backend)
    try:
        if backend == "fp8":  # per-tensor: transformers refuses the group-wise options
            return QuantizedCache("fp8", model.config), "transformers QuantizedCache"
        cache = QuantizedCache(backend, model.config, nbits=bits, axis_key=axis, axis_value=axis,
                               q_group_size=probe.q_group_size, residual_length=residual_length)
        return cache, "transformers QuantizedCache"
    except ValueError:
        # transformers refuses models with sliding-window layers
        return probe, "SinkCache(n_sink=0): transformers' QuantizedCache refuses this model's sliding layers"


def _forward(model, piece: torch.Tensor, cache, keyword: str) -> torch.Tensor:
    """Log-probabilities (C, V), fp32, of one chunk through ``cache``."""
    logits = model(input_ids=piece[None], use_cache=True, **{keyword: cache}).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, cache, *, chunk: int,
                 on_tokens: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Summed next-token NLL (fp32 log-softmax, fp64 sum) of ``ids`` (N,) fed in chunks through ``cache``."""
    keyword = cache_keyword(model)
    ids = ids.to(model_device(model))
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, chunk):
        piece = ids[start : start + chunk]
        targets = ids[start + 1 : start + 1 + piece.numel()]
        logp = _forward(model, piece, cache, keyword)[: targets.numel()]
        total += float(-logp.gather(-1, targets[:, None]).sum().double())
        count += targets.numel()
        if on_tokens is not None:
            on_tokens(piece.numel())
    return total, count


@torch.no_grad()
def _lockstep(model, ids: torch.Tensor, caches: dict, rows: dict, *, chunk: int, observing, guards: dict,
              on_tokens) -> int:
    """Feed ``ids`` through every cache chunk by chunk; add NLL and KL(full || variant) to ``rows``."""
    keyword = cache_keyword(model)
    ids = ids.to(model_device(model))
    count = 0
    for start in range(0, ids.numel() - 1, chunk):
        piece = ids[start : start + chunk]
        targets = ids[start + 1 : start + 1 + piece.numel()]
        n = targets.numel()
        full = _forward(model, piece, caches["full", None], keyword)[:n]
        full_nll = float(-full.gather(-1, targets[:, None]).sum().double())
        p_full = full.exp()
        for (variant, width), cache in caches.items():
            if variant == "full":
                for row in rows.values():
                    row.nll_sum["full"] = row.nll_sum.get("full", 0.0) + full_nll
                continue
            with observing(guards[variant, width]) if (variant, width) in guards else contextlib.nullcontext():
                logp = _forward(model, piece, cache, keyword)[:n]
            row = rows[width]
            row.nll_sum[variant] = row.nll_sum.get(variant, 0.0) + float(-logp.gather(-1, targets[:, None]).sum().double())
            row.kl_sum[variant] = row.kl_sum.get(variant, 0.0) + float((p_full * (full - logp)).sum().double())
        count += n
        if on_tokens is not None:
            on_tokens(piece.numel() * len(caches))
    return count


def check_measurable(lengths: Sequence[int], *, chunk: int, n_sink: int) -> None:
    """Refuse a protocol that measures nothing: a cache quantizes what it holds at the end of each
    forward, so only the tokens of a sequence's second and later ``chunk``-token forwards read a
    quantized past, and that past (the tokens before the last forward) must hold more than the
    ``n_sink`` protected ones. A sequence in one forward gave three identical rows, KL exactly 0,
    called "a loss too small to share"; ``n_sink`` past it "100% recovered" by quantizing nothing."""
    shortest = min(lengths)
    fed = shortest - 1  # the last token is only predicted, never fed (the forwards start at 0, chunk, ... < fed)
    if fed <= chunk:
        raise UsageError(f"a {shortest}-token sequence feeds {fed} tokens (its last is only predicted), all in one "
                         f"{chunk}-token forward (--chunk), which reads no quantized past: nothing would be measured; "
                         f"make the sequences at least 2 tokens longer than the chunk (--seq-len >= --chunk + 2)")
    past = chunk * ((fed - 1) // chunk)  # where the last forward of the shortest sequence begins
    if n_sink >= past:
        raise UsageError(f"{n_sink} sinks (--n-sink) keep every token a forward reads from the cache in full precision (the "
                         f"last {chunk}-token forward of a {shortest}-token sequence starts at token {past}): the "
                         f"sink-protected cache would quantize nothing; protect fewer than {past}")


def measure_kvquant(model, sequences: Sequence[torch.Tensor], *, bits: Sequence[int], backend: str = "quanto",
                    n_sink: int = 4, residual_length: int | None = None, q_group_size: int | None = None, chunk: int = 128,
                    hidden_sinks: bool = False,
                    on_tokens: Callable[[int], None] | None = None) -> list[QuantRow]:
    """One :class:`QuantRow` per bit width over ``sequences`` (1-D id tensors). ``residual_length``:
    default 128 for the integer backends; refused with fp8, which has no residual window."""
    if not sequences:
        raise UsageError("no sequence to measure")
    check_measurable([ids.numel() for ids in sequences], chunk=chunk, n_sink=n_sink)
    if backend == "fp8" and residual_length is not None:  # it was ignored without a word
        raise UsageError(f"residual_length with backend 'fp8': fp8 casts every token and has no residual window, "
                         f"got {residual_length}")
    if backend != "fp8" and residual_length is None:
        residual_length = DEFAULT_RESIDUAL_LENGTH
    settings = dict(backend=backend, n_sink=n_sink, residual_length=residual_length, q_group_size=q_group_size)
    variants = ("quantized", "sink_protected") + ((HIDDEN,) if hidden_sinks else ())
    rows = {width: QuantRow(width, {}, {}, 0) for width in bits}
    fails = {width: backend == "hqq" and hqq_baseline_fails(
        model, [ids.numel() for ids in sequences], chunk=chunk, residual_length=residual_length, bits=width,
        group_size=SinkCache(model.config, n_sink=0, window=None, bits=width, backend=backend,
                             residual_length=residual_length, q_group_size=q_group_size).q_group_size)
        for width in bits}  # decided for all sequences alike: one baseline per row
    handle = patch(model, Policy()) if hidden_sinks else None  # attention observers need sinkfix's function
    try:
        for ids in sequences:
            caches = {("full", None): make_cache(model, "full", bits=bits[0], **settings)[0]}
            for width in bits:
                for variant in variants:
                    caches[variant, width], what = make_cache(model, variant, bits=width, **settings,
                                                              baseline_fails=fails[width])
                    if variant == "quantized":
                        rows[width].quantized_cache = what
            guards = {key: HiddenSinkGuard(cache) for key, cache in caches.items() if key[0] == HIDDEN}
            count = _lockstep(model, ids, caches, rows, chunk=chunk, guards=guards, on_tokens=on_tokens,
                              observing=handle.observing if handle is not None else None)
            for width in bits:
                rows[width].tokens += count
                rows[width].hidden_tokens += sum(g.protected for (v, w), g in guards.items() if w == width)
            if backend == "fp8":
                for (variant, width), cache in caches.items():
                    if variant != "full" and isinstance(cache, SinkCache):  # transformers' own cache counts none
                        counts = rows[width].fp8_saturated
                        counts[variant] = counts.get(variant, 0) + cache.fp8_saturated()
    finally:
        if handle is not None:
            handle.remove()
    return [rows[width] for width in bits]
