"""The results dict of a bench run (schema ``sinkfix.bench/1``, documented in ``schema.md``), from measured steps.

Nothing here measures: :func:`assemble_results` only arranges what :mod:`sinkfix.bench.steps`
returned, adds the ratios against the stock variant, and :func:`jsonable` makes the whole strict
JSON (non-finite numbers become null).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import torch

from sinkfix.bench.config import BenchConfig, Variant
from sinkfix.memory import MemoryPeak
from sinkfix.bench.prepare import Protocol, Setup, text_config
from sinkfix.bench.provenance import load_average, provenance
from sinkfix.bench.stats import Spread
from sinkfix.bench.steps import Measurements
from sinkfix.texts import POOLED_NAME
from sinkfix.evaluate import exp_nll

__all__ = ["SCHEMA_VERSION", "assemble_results", "jsonable", "busy_note"]

SCHEMA_VERSION = "sinkfix.bench/1"


def jsonable(value: Any) -> Any:
    """``value`` with tensors as lists, non-finite floats as None and unknown objects as strings."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


# -- run-level sections ---------------------------------------------------------------------------
def _model_section(config: BenchConfig, setup: Setup) -> dict[str, Any]:
    model = setup.model
    tc = text_config(model.config)
    return {
        "name": setup.model_name,
        "architecture": type(model).__name__,
        "num_layers": getattr(tc, "num_hidden_layers", None),
        "num_heads": getattr(tc, "num_attention_heads", None),
        "num_kv_heads": getattr(tc, "num_key_value_heads", getattr(tc, "num_attention_heads", None)),
        "hidden_size": getattr(tc, "hidden_size", None),
        "vocab_size": getattr(tc, "vocab_size", None),
        "max_position_embeddings": setup.limit,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "baseline_attention": config.baseline,
        "patch_backend": setup.backend,
    }


def _protocol_section(config: BenchConfig, setup: Setup, protocol: Protocol, last_logits_only: bool) -> dict[str, Any]:
    bos, stride = protocol.bos, protocol.stride
    decode = None
    if config.decode_tokens:
        decode = (f"greedy generate of {config.decode_tokens} tokens after a {setup.prompt_len}-token prompt, "
                  f"{config.decode_tokens - 1} KV-cached steps timed")
    return {
        "bos": bos,
        "bos_id": protocol.bos_id,
        "bos_source": protocol.bos_source,
        "seq_len": config.seq_len,
        "stride": stride,
        "max_windows": config.max_windows,
        "batch": config.batch,
        "description": (
            f"{'BOS + ' if bos else 'no BOS, '}{config.seq_len}-token windows, stride {stride}, no token "
            "scored twice, perplexity token-weighted over windows"
        ),
        "prefill": f"{config.batch}x{config.seq_len} tokens, one forward with KV cache"
                   + (", logits for the last position only (as generate does)" if last_logits_only else ""),
        "decode": decode,
        "timing_order": "ABBA rounds over variants after warmup rounds",
    }


def _domains_section(protocol: Protocol, stock_nll: dict[str, tuple[float, int]]) -> dict[str, Any]:
    return {
        d.name: {
            "source": d.source,
            "tokens_available": int(d.ids.numel()),
            "windows": len(d.windows),
            "scored_tokens": stock_nll[d.name][1],
        }
        for d in protocol.domains
    }


# -- per-variant sections -------------------------------------------------------------------------
def _quality_entry(nll_sum: float, tokens: int, stock_sum: float, stock_tokens: int) -> dict[str, Any]:
    nll = nll_sum / max(tokens, 1)
    stock_ppl = exp_nll(stock_sum / max(stock_tokens, 1))
    ppl = exp_nll(nll)
    return {"nll": nll, "ppl": ppl, "tokens": tokens, "delta_pct": 100.0 * (ppl / stock_ppl - 1.0)}


def _quality_section(nll: dict[str, tuple[float, int]], stock_nll: dict[str, tuple[float, int]]) -> dict[str, Any]:
    """Per domain, then ``all``: every scored token of every domain pooled (token-weighted)."""
    if POOLED_NAME in nll:
        raise ValueError(f"a domain may not be named {POOLED_NAME!r}: that key holds every domain pooled")
    section: dict[str, Any] = {}
    pooled = [0.0, 0, 0.0, 0]  # NLL, tokens, stock NLL, stock tokens
    for domain, (nll_sum, tokens) in nll.items():
        s_sum, s_tokens = stock_nll[domain]
        section[domain] = _quality_entry(nll_sum, tokens, s_sum, s_tokens)
        pooled = [pooled[0] + nll_sum, pooled[1] + tokens, pooled[2] + s_sum, pooled[3] + s_tokens]
    section[POOLED_NAME] = _quality_entry(*pooled)
    return section


def _rate_spread(times: Spread, tokens: int) -> dict[str, float]:
    # the fastest run gives the highest rate: min/max swap when inverting
    return {"min": tokens / times.max, "median": tokens / times.median, "max": tokens / times.min}


def _prefill_section(seconds: list[float], stock_seconds: list[float], tokens: int) -> dict[str, Any]:
    times, stock = Spread(tuple(seconds)), Spread(tuple(stock_seconds))
    return {
        "tokens": tokens,
        "seconds": times.to_dict(),
        "tokens_per_s": _rate_spread(times, tokens),
        "latency_ms": {"p50": times.percentile(50) * 1e3, "p90": times.percentile(90) * 1e3},
        "time_ratio_vs_stock": times.median / stock.median,
        "paired_time_ratio_vs_stock": Spread(tuple(a / b for a, b in zip(seconds, stock_seconds))).to_dict(),
    }


def _decode_rates(runs: list[list[float]] | None, batch: int) -> Spread:
    if not runs:
        return Spread((float("nan"),))
    return Spread(tuple(batch * len(steps) / sum(steps) for steps in runs if steps))


def _decode_section(runs: list[list[float]], stock_runs: list[list[float]], config: BenchConfig,
                    prompt_len: int) -> dict[str, Any]:
    rates = _decode_rates(runs, config.batch)
    steps = Spread(tuple(s for run in runs for s in run))
    paired = tuple(sum(a) / sum(b) for a, b in zip(runs, stock_runs) if a and b)
    return {
        "new_tokens": config.decode_tokens,
        "prompt_tokens": prompt_len,
        "tokens_per_s": rates.to_dict(),
        "step_latency_ms": {"p50": steps.percentile(50) * 1e3, "p90": steps.percentile(90) * 1e3,
                            "min": steps.min * 1e3, "max": steps.max * 1e3, "n": len(steps.samples)},
        "time_ratio_vs_stock": _decode_rates(stock_runs, config.batch).median / rates.median,
        "paired_time_ratio_vs_stock": Spread(paired or (float("nan"),)).to_dict(),
    }


def _median_peak(peaks: list[MemoryPeak] | None) -> int | None:
    if not peaks:
        return None
    return int(statistics.median(p.peak_bytes for p in peaks))


def _memory_section(peaks: list[MemoryPeak], stock_peaks: list[MemoryPeak]) -> dict[str, Any] | None:
    if not peaks:
        return None
    median_peak, stock_peak = _median_peak(peaks), _median_peak(stock_peaks)
    return {
        "peak_bytes": median_peak,
        "samples": [p.peak_bytes for p in peaks],
        "baseline_bytes": peaks[0].baseline_bytes,
        "ratio_vs_stock": median_peak / stock_peak if stock_peak else None,
        "method": peaks[0].method,
    }


def _variant_entry(variant: Variant, stock: str, config: BenchConfig, setup: Setup, measured: Measurements) -> dict:
    name = variant.name
    decode = measured.decode.steps
    return {
        "name": name,
        "kind": variant.kind,
        "policy": None if variant.kind == "stock" else variant.describe(),
        "source": variant.source,
        "attention": config.baseline if variant.kind == "stock" else "sinkfix",
        "quality": _quality_section(measured.quality.nll[name], measured.quality.nll[stock]),
        "metrics": measured.metrics.summaries.get(name),
        "speed": {
            "prefill": _prefill_section(measured.prefill.seconds[name], measured.prefill.seconds[stock],
                                        config.batch * config.seq_len),
            "decode": _decode_section(decode[name], decode[stock], config, setup.prompt_len) if decode else None,
        },
        "memory": _memory_section(measured.memory.peaks.get(name) or [], measured.memory.peaks.get(stock) or []),
    }


# -- the whole ------------------------------------------------------------------------------------
def busy_note(device: torch.device, loads: list[list[float] | None], usable: int | None) -> str | None:
    """A warning when the load exceeded the usable CPUs during a CPU run. ``loads``: the (1, 5, 15)-minute
    load-average triples at the start and at the end (None: unknown).

    Busy means a 1-minute average above the usable CPUs at either instant, or the last sample's 5-minute
    average above them (the nearest record of the load over a run of a few minutes; a start's 5- and
    15-minute averages describe the time before the run). The note prints every recorded average: the
    1-minute values alone said "up to 3.9" for a run whose own 5- and 15-minute averages at its end were
    5.1 and 5.6."""
    known = [list(x) for x in loads if x]
    usable = usable or 1
    if device.type != "cpu" or not known:
        return None
    last = loads[-1]
    watched = [x[0] for x in known] + ([last[1]] if last and len(last) > 1 else [])
    if max(watched) <= usable:
        return None
    # with more runnable threads than CPUs, torch's workers wait for each other at every parallel
    # region: code made of many small ops (decode steps, the patched epilogue) slows down far more
    # than one big fused op, so ratios drift from what an idle machine shows
    names = ["start", "end"] if len(loads) == 2 else [f"sample {i}" for i in range(len(loads))]
    shown = "; ".join(f"{name} {' / '.join(f'{v:.1f}' for v in x)}" for name, x in zip(names, loads) if x)
    return (f"the machine was busy (load averages over 1 / 5 / 15 minutes: {shown}; {usable} usable CPUs): timings "
            "and ratios are noisier than on an idle machine; the paired ratios show the spread (--threads 1 "
            "suffers less)")


def assemble_results(
    config: BenchConfig,
    setup: Setup,
    protocol: Protocol,
    measured: Measurements,
    *,
    phases: dict[str, float],
    notes: list[str],
    load_start: list[float] | None,
) -> dict[str, Any]:
    """The results dict in schema order; ``wall_time_s`` stays None for the caller to fill in."""
    stock = setup.variants[0].name
    prov = provenance(setup.device)
    prov["load_average_start"], prov["load_average_end"] = load_start, load_average()
    busy = busy_note(setup.device, [prov["load_average_start"], prov["load_average_end"]], prov["usable_cpus"])
    metrics = measured.metrics
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": None,
        "phase_seconds": phases,
        "config": asdict(config) | {"policies": list(config.policies), "texts": list(config.texts)},
        "provenance": prov,
        "model": _model_section(config, setup),
        "protocol": _protocol_section(config, setup, protocol, measured.prefill.last_logits_only),
        "domains": _domains_section(protocol, measured.quality.nll[stock]),
        "metrics_status": {
            "available": all(v.name in metrics.summaries for v in setup.variants),
            "note": metrics.note,
            "windows": metrics.windows,
            "hidden_sink_threshold": config.hidden_sink_threshold,
        },
        "variants": [_variant_entry(v, stock, config, setup, measured) for v in setup.variants],
        "notes": notes + ([busy] if busy else []),
    }
