"""Streaming perplexity: a sink cache vs a window-only cache vs sliding windows recomputed afresh.

Protocol (stated next to every number ``sinkfix stream`` reports, docs/caches.md):

* one token stream of N tokens (built-in held-out prose by default), scored token by token: token s
  is predicted from what the cache lets token s - 1 see;
* **sink**: ``SinkCache(n_sink, window)``; **window_only**: ``SinkCache(0, n_sink + window)``, the
  same memory without sinks; both fed in chunks by :func:`sinkfix.caches.feed`, so every token sees
  exactly what one-token decoding shows it (its row's sinks, the ``window`` tokens before it, itself),
  with the sinks placed once per chunk;
* **recompute**: every ``recompute_every``-th token after the warm-up, predicted by a fresh forward
  over the ``n_sink + window + 1`` tokens ending before it (positions from 0): the same number of keys
  the caches attend to. Recomputation is the expensive baseline, hence the subsample; the comparison
  with the caches is made on the same positions (``paired``);
* **warm-up**: the first ``n_sink + window + 1`` scored tokens, which every variant predicts from the
  whole prefix; segments of ``segment_len`` scored tokens tile the rest of the stream up to its end.

Memory (peak resident set per segment, above nothing: absolute) and time per token are recorded per
segment, so constant memory and time per token can be read off the result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sinkfix.memory import measure_peak_memory
from sinkfix.caches import SinkCache, feed
from sinkfix.errors import UsageError
from sinkfix.evaluate import model_device

__all__ = ["StreamVariant", "StreamResult", "stream_nll", "recompute_nll", "measure_streaming", "recompute_positions",
           "segment_ppl", "running_ppl", "running_ratio", "check_stream_arguments"]


@dataclass
class StreamVariant:
    """One variant's per-token NLL (NaN where it was not scored) and its per-segment cost."""

    name: str
    nll: torch.Tensor  # (N,) float64; nll[s] = -log p(token s | what the variant shows), NaN = not scored
    ms_per_token: list[float] = field(default_factory=list)  # per segment, wall clock
    # per segment, this process's CPU time: unlike the wall clock it does not grow when other jobs
    # share the cores (wall time per token varied 5x with the load in docs/caches.md's 20k-token run)
    cpu_ms_per_token: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)  # per segment, absolute
    cache_mib: list[float] = field(default_factory=list)  # cached state held at each segment's end

    @property
    def scored(self) -> torch.Tensor:
        return ~torch.isnan(self.nll)

    @property
    def tokens(self) -> int:
        return int(self.scored.sum())

    def ppl(self, mask: torch.Tensor | None = None) -> float:
        keep = self.scored if mask is None else self.scored & mask
        return math.exp(float(self.nll[keep].mean())) if bool(keep.any()) else float("nan")


@dataclass
class StreamResult:
    variants: dict[str, StreamVariant]
    protocol: dict

    def segment_bounds(self) -> list[tuple[int, int]]:
        """As many ``segment_len`` segments as fit after the warm-up, ending with the stream's last
        token (the last segment is the stream's tail; a remainder shorter than a segment sits between
        the warm-up and the first segment)."""
        p = self.protocol
        start, end, size = p["warmup"] + 1, p["tokens"], p["segment_len"]
        count = max((end - start) // size, 0)
        return [(end - (count - i) * size, end - (count - i - 1) * size) for i in range(count)]

    def summary(self) -> dict:
        """The JSON ``sinkfix stream --json`` prints: per variant ppl, segments, tokens (+ costs), the
        paired comparison with recomputation, and the protocol."""
        out: dict = {}
        bounds = self.segment_bounds()
        for name, v in self.variants.items():
            out[name] = {"ppl": v.ppl(), "segments": [segment_ppl(v, lo, hi) for lo, hi in bounds],
                         "tokens": v.tokens, "ms_per_token": v.ms_per_token,
                         "cpu_ms_per_token": v.cpu_ms_per_token, "peak_rss_mib": v.peak_rss_mib,
                         "cache_mib": v.cache_mib}
        out["paired"] = self.paired()
        out["protocol"] = dict(self.protocol, segments=[list(b) for b in bounds])
        return out

    def reference_for(self, name: str) -> StreamVariant | None:
        """The recomputation a variant is compared with: the one with the same suffix (``_profile``:
        patched too), else the unpatched one."""
        suffix = name[len(name.split("_profile")[0]):]
        return self.variants.get("recompute" + suffix) or self.variants.get("recompute")

    def paired(self) -> dict:
        """Every variant on the positions its recomputation scored: perplexity, ratio to recomputation,
        and that ratio per segment (how flat the variant stays relative to the baseline)."""
        out = {}
        for name, v in self.variants.items():
            reference = self.reference_for(name)
            if reference is None:
                continue
            where = reference.scored
            per_segment = []
            for lo, hi in self.segment_bounds():
                mask = torch.zeros_like(where)
                mask[lo:hi] = True
                per_segment.append(v.ppl(where & mask) / reference.ppl(mask))
            out[name] = {"ppl": v.ppl(where), "reference": reference.name,
                         "ratio_to_recompute": v.ppl(where) / reference.ppl(), "segment_ratios": per_segment,
                         "positions": int(where.sum())}
        return out

    def token_nll(self) -> dict[str, torch.Tensor]:
        """Per-token NLL of every variant (NaN = not scored), to save next to the summary."""
        return {name: v.nll for name, v in self.variants.items()}


def recompute_positions(warmup: int, tokens: int, recompute_every: int) -> list[int]:
    """The stream positions a recomputation scores: every ``recompute_every``-th after the warm-up."""
    return list(range(warmup + 1, tokens, recompute_every))


def segment_ppl(variant: StreamVariant, lo: int, hi: int) -> float:
    mask = torch.zeros_like(variant.scored)
    mask[lo:hi] = True
    return variant.ppl(mask)


def running_ppl(variant: StreamVariant, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, perplexity over the trailing ``span`` positions) at every scored position."""
    scored = variant.scored
    values = torch.where(scored, variant.nll, 0.0)
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)])
    ccount = torch.cat([torch.zeros(1, dtype=torch.float64), scored.double().cumsum(0)])
    idx = torch.arange(values.numel())
    lo = (idx + 1 - span).clamp(min=0)
    mean = (csum[idx + 1] - csum[lo]) / (ccount[idx + 1] - ccount[lo]).clamp(min=1)
    return idx[scored], mean[scored].exp()


def running_ratio(variant: StreamVariant, reference: StreamVariant, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, exp(mean NLL difference to ``reference``) over the trailing ``span`` positions) at the
    positions both scored: the running perplexity ratio on identical tokens."""
    both = variant.scored & reference.scored
    diff = StreamVariant("diff", torch.where(both, variant.nll - reference.nll, float("nan")))
    return running_ppl(diff, span)


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, C, V) logits, (B, C) next tokens -> (B, C) NLL in fp64 (fp32 log-softmax, as sinkfix.evaluate)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1).double()


def stream_nll(model, ids: torch.Tensor, cache: SinkCache, *, chunk: int, segments: list[tuple[int, int]],
               name: str, on_tokens: Callable[[int], None] | None = None) -> StreamVariant:
    """Stream ``ids`` (N,) through ``cache`` in chunks; NLL of every token after the first.

    Chunks are cut at segment boundaries so each segment's time and peak memory are its own."""
    n = ids.numel()
    nll = torch.full((n,), float("nan"), dtype=torch.float64)
    variant = StreamVariant(name, nll)
    device = model_device(model)
    cuts = sorted({0, n, *[b for seg in segments for b in seg if 0 < b < n]})
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        def run(lo=lo, hi=hi):
            span = ids[lo:hi].to(device)[None]
            for i, logits in enumerate(feed(model, cache, span, chunk_size=chunk, on_chunk=on_tokens)):
                start = lo + i * chunk
                stop = min(start + logits.shape[1], n - 1)  # the stream's last token predicts nothing
                if stop > start:
                    target = ids[start + 1 : stop + 1].to(logits.device)[None]
                    nll[start + 1 : stop + 1] = _token_nll(logits[:, : stop - start], target)[0].cpu()

        began, began_cpu = time.perf_counter(), time.process_time()
        peak = measure_peak_memory(run)
        elapsed, elapsed_cpu = time.perf_counter() - began, time.process_time() - began_cpu
        if (lo, hi) in segments:
            variant.ms_per_token.append(1000 * elapsed / (hi - lo))
            variant.cpu_ms_per_token.append(1000 * elapsed_cpu / (hi - lo))
            variant.peak_rss_mib.append((peak.baseline_bytes + peak.peak_bytes) / 2 ** 20)
            variant.cache_mib.append(cache.nbytes() / 2 ** 20)
    return variant


@torch.no_grad()
def recompute_nll(model, ids: torch.Tensor, *, context: int, positions: list[int], bos_id: int | None,
                  batch: int = 8, name: str = "recompute",
                  on_tokens: Callable[[int], None] | None = None) -> StreamVariant:
    """NLL of token s for each s in ``positions``, from a fresh forward over the ``context`` tokens
    before it (``context - 1`` of them after a BOS when ``bos_id`` is given)."""
    nll = torch.full((ids.numel(),), float("nan"), dtype=torch.float64)
    device = model_device(model)
    body = context - (bos_id is not None)
    for i in range(0, len(positions), batch):
        chosen = positions[i : i + batch]
        windows = torch.stack([ids[s - body : s] for s in chosen])
        if bos_id is not None:
            windows = torch.cat([torch.full((len(chosen), 1), bos_id, dtype=ids.dtype), windows], dim=1)
        logits = model(input_ids=windows.to(device), use_cache=False).logits[:, -1:]
        targets = ids[chosen][:, None].to(logits.device)
        nll[chosen] = _token_nll(logits, targets)[:, 0].cpu()
        if on_tokens is not None:
            on_tokens(len(chosen))
    return StreamVariant(name, nll)


def check_stream_arguments(tokens: int, n_sink: int, window: int, chunk: int, segment_len: int,
                           recompute_every: int) -> None:
    """Raise :class:`UsageError` for a stream the protocol cannot measure."""
    for label, value, low in (("--tokens", tokens, 2), ("--chunk", chunk, 1), ("--segment", segment_len, 1),
                              ("--recompute-every", recompute_every, 1)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{label} must be an integer >= {low}, got {value!r}")
    warmup = n_sink + window + 1
    if tokens < warmup + segment_len + 1:
        raise UsageError(f"--tokens {tokens} leaves no full segment: it needs at least {warmup + segment_len + 1} "
                         f"(the first token, which has no context to be scored in, a warm-up of n_sink + window + 1 "
                         f"= {warmup} tokens and a segment of {segment_len})")


def measure_streaming(model, ids: torch.Tensor, *, n_sink: int, window: int, chunk: int = 32,
                      segment_len: int = 1024, recompute_every: int = 64, bos_id: int | None = None,
                      variants: tuple[str, ...] = ("sink", "window_only", "recompute"), suffix: str = "",
                      on_tokens: Callable[[int], None] | None = None) -> StreamResult:
    """Run the variants over the stream ``ids`` (N,) (BOS first when the protocol has one)."""
    n = ids.numel()
    warmup = n_sink + window + 1
    protocol = {"tokens": n, "n_sink": n_sink, "window": window, "cache_tokens": n_sink + window, "chunk": chunk,
                "segment_len": segment_len, "warmup": warmup, "recompute_every": recompute_every,
                "bos": bos_id is not None,
                "max_position_embeddings": getattr(model.config, "max_position_embeddings", None)}
    result = StreamResult({}, protocol)
    segments = result.segment_bounds()
    for kind in variants:
        name = kind + suffix
        if kind == "recompute":
            positions = recompute_positions(warmup, n, recompute_every)
            # progress in stream tokens: a recomputed position stands for recompute_every of them
            progress = None if on_tokens is None else (lambda k: on_tokens(k * recompute_every))
            result.variants[name] = recompute_nll(model, ids, context=warmup, positions=positions, bos_id=bos_id,
                                                  name=name, on_tokens=progress)
            continue
        sinks = n_sink if kind == "sink" else 0
        cache = SinkCache(model.config, n_sink=sinks, window=n_sink + window - sinks)
        result.variants[name] = stream_nll(model, ids, cache, chunk=chunk, segments=segments, name=name,
                                           on_tokens=on_tokens)
    return result

