"""The measured steps of a bench run, one function each, each returning its raw numbers.

Every step measures all variants; the timed ones (prefill, decode, memory) go through them in ABBA
rounds (:func:`~sinkfix.bench.stats.alternate`). Turning the numbers into the JSON layout is
:mod:`sinkfix.bench.results`' job.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import torch

from sinkfix.bench.config import BenchConfig
from sinkfix.memory import MemoryPeak, measure_peak_memory, pin_mmap_threshold
from sinkfix.bench.prepare import Protocol, Setup
from sinkfix.bench.stats import alternate
from sinkfix.bench.timing import decode_step_times, prefill_kwargs, time_prefill
from sinkfix.evaluate import windows_nll

__all__ = [
    "ProgressFactory", "no_progress", "QualityResult", "MetricsResult", "Prompts", "PrefillResult", "DecodeResult",
    "MemoryResult", "Measurements", "measure_quality", "measure_metrics", "make_prompts", "measure_prefill",
    "measure_decode", "measure_memory",
]

# progress(description, total) -> context manager yielding advance(n)
ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None


@dataclass
class QualityResult:
    nll: dict[str, dict[str, tuple[float, int]]]  # variant -> domain -> (summed NLL, scored tokens)


@dataclass
class MetricsResult:
    summaries: dict[str, dict[str, Any]]  # variant -> summary; a variant is missing when its measurement failed
    note: str | None  # why the metrics are missing, when they are
    windows: int  # windows measured per variant (all domains together)


@dataclass
class Prompts:
    """The inputs of the timed steps: one prompt, cut from the texts, shared by every variant."""

    prefill_ids: torch.Tensor  # (batch, seq_len) on the model's device
    decode_ids: torch.Tensor  # (batch, prompt_len)
    extra: dict[str, Any]  # extra forward arguments of a prefill (prefill_kwargs)


@dataclass
class PrefillResult:
    seconds: dict[str, list[float]]  # variant -> one sample per timed round
    last_logits_only: bool = False  # the forward computed logits for the last position only


@dataclass
class DecodeResult:
    steps: dict[str, list[list[float]]] = field(default_factory=dict)  # variant -> rounds -> step seconds


@dataclass
class MemoryResult:
    peaks: dict[str, list[MemoryPeak]]
    note: str | None = None  # what the CPU numbers mean, when they are resident-set peaks


@dataclass
class Measurements:
    quality: QualityResult
    metrics: MetricsResult
    prefill: PrefillResult
    decode: DecodeResult
    memory: MemoryResult


def measure_quality(setup: Setup, protocol: Protocol, batch: int, progress: ProgressFactory) -> QualityResult:
    """Summed NLL and scored tokens of every domain's windows, per variant."""
    nll: dict[str, dict[str, tuple[float, int]]] = {v.name: {} for v in setup.variants}
    total = len(setup.variants) * sum(len(d.windows) for d in protocol.domains)
    with progress("perplexity", total) as advance:
        for variant in setup.variants:
            with variant.applied(setup.model, setup.backend):
                for domain in protocol.domains:
                    nll[variant.name][domain.name] = windows_nll(setup.model, domain.windows, batch, advance)
    return QualityResult(nll)


def _metrics_module() -> tuple[Any, str | None]:
    try:
        from sinkfix.analysis import metrics
    except ImportError as exc:
        return None, f"extreme-token metrics skipped: sinkfix.analysis.metrics is not available ({exc})"
    if not hasattr(metrics, "measure_extreme_tokens"):
        return None, "extreme-token metrics skipped: sinkfix.analysis.metrics has no measure_extreme_tokens"
    return metrics, None


def _summarise_metrics(result: Any) -> dict[str, Any]:
    sink = torch.as_tensor(result.sink_share, dtype=torch.float64)  # [L, Hq]
    drain = torch.as_tensor(result.value_drain, dtype=torch.float64)  # [L, Hkv]
    peak = torch.as_tensor(result.residual_peak, dtype=torch.float64)  # [L]
    sink_layer = sink.nanmean(-1) if sink.ndim == 2 else sink
    drain_layer = drain.nanmean(-1) if drain.ndim == 2 else drain
    hidden = getattr(result, "hidden_sink_share", None)
    hidden = None if hidden is None else torch.as_tensor(hidden, dtype=torch.float64)
    finite_drain = drain[~drain.isnan()]
    return {
        "summary": {
            "hidden_sink_share_mean": None if hidden is None else float(hidden.nanmean()),
            "sink_share_mean": float(sink.nanmean()),
            "sink_share_max_layer": float(sink_layer.max()),
            "residual_peak_max": float(peak.max()),
            "residual_peak_argmax_layer": int(peak.argmax()),
            "value_drain_mean": float(drain.nanmean()),
            "value_drain_min": float(finite_drain.min()) if finite_drain.numel() else None,
        },
        "sink_share_layer": sink_layer.tolist(),
        "residual_peak_layer": peak.tolist(),
        "value_drain_layer": drain_layer.tolist(),
        "sink_share": sink.tolist(),
        "value_drain": drain.tolist(),
        # tensors or lists, as the metrics module returns them: the results' final JSON pass converts them
        "peak_positions": getattr(result, "peak_positions", None),
    }


def measure_metrics(setup: Setup, protocol: Protocol, config: BenchConfig, progress: ProgressFactory) -> MetricsResult:
    """Sink share, residual peak and value drain on the first windows of each domain, per variant.

    Optional: a missing metrics module leaves a note and no metrics, a failure on one variant a note
    and no metrics for that variant; never a failed run.
    """
    module, note = _metrics_module()
    windows = [w.input_ids for d in protocol.domains for w in d.windows[: config.metrics_windows]]
    if module is None:
        return MetricsResult({}, note, len(windows))
    if not windows:
        return MetricsResult({}, "extreme-token metrics skipped: metrics_windows=0 (BenchConfig)", 0)
    summaries: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    with progress("extreme-token metrics", len(setup.variants) * len(windows)) as advance:
        for variant in setup.variants:
            try:
                with variant.applied(setup.model, setup.backend):
                    result = module.measure_extreme_tokens(
                        setup.model, windows, hidden_sink_threshold=config.hidden_sink_threshold, progress=advance,
                    )
                summaries[variant.name] = _summarise_metrics(result)
            except Exception as exc:  # noqa: BLE001 - keep the other variants and sections; say what failed
                failures.append(f"{variant.name}: {type(exc).__name__}: {exc}")
    note = f"extreme-token metrics failed on {'; '.join(failures)}" if failures else None
    return MetricsResult(summaries, note, len(windows))


def make_prompts(setup: Setup, protocol: Protocol, config: BenchConfig) -> Prompts:
    """One ``batch x seq_len`` prompt from the texts, BOS first when the protocol has one."""
    stream = torch.cat([d.ids for d in protocol.domains])
    if stream.numel() < config.seq_len:  # speed needs length, not meaning: repeat the text
        stream = stream.repeat(config.seq_len // max(stream.numel(), 1) + 1)
    prompt = stream[: config.seq_len - (1 if protocol.bos else 0)]
    if protocol.bos:
        prompt = torch.cat([torch.tensor([protocol.bos_id], dtype=prompt.dtype), prompt])
    prefill_ids = prompt[None].expand(config.batch, -1).contiguous().to(setup.device)
    return Prompts(prefill_ids, prefill_ids[:, : setup.prompt_len], prefill_kwargs(setup.model))


def measure_prefill(setup: Setup, prompts: Prompts, config: BenchConfig, progress: ProgressFactory) -> PrefillResult:
    """Seconds of one prefill forward, ``repeats`` samples per variant after ``warmup`` rounds."""
    by_name = {v.name: v for v in setup.variants}

    def prefill(name: str) -> float:
        with by_name[name].applied(setup.model, setup.backend):
            return time_prefill(setup.model, prompts.prefill_ids, prompts.extra)

    with progress("prefill timing", (config.warmup + config.repeats) * len(by_name)) as advance:
        seconds = alternate(list(by_name), prefill, repeats=config.repeats, warmup=config.warmup, on_step=advance)
    return PrefillResult(seconds, last_logits_only=bool(prompts.extra))


def _pad_id(tokenizer) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return pad_id if pad_id is not None else (getattr(tokenizer, "eos_token_id", None) or 0)


def measure_decode(setup: Setup, prompts: Prompts, config: BenchConfig, progress: ProgressFactory) -> DecodeResult:
    """Step latencies of KV-cached greedy decoding; nothing when ``decode_tokens`` is 0."""
    if not config.decode_tokens:
        return DecodeResult()
    by_name = {v.name: v for v in setup.variants}
    pad_id = _pad_id(setup.tokenizer)

    def decode(name: str) -> list[float]:
        with by_name[name].applied(setup.model, setup.backend):
            return decode_step_times(setup.model, prompts.decode_ids, config.decode_tokens, pad_id)

    with progress("decode timing", (config.warmup + config.decode_repeats) * len(by_name)) as advance:
        steps = alternate(list(by_name), decode, repeats=config.decode_repeats, warmup=config.warmup,
                          on_step=advance)
    return DecodeResult(steps)


def measure_memory(setup: Setup, prompts: Prompts, config: BenchConfig, progress: ProgressFactory) -> MemoryResult:
    """Peak memory above the pre-call baseline of one prefill, ``memory_rounds`` samples per variant.

    Run last: on glibc CPUs it pins malloc's mmap threshold for the rest of the process
    (:func:`~sinkfix.memory.pin_mmap_threshold`), which would slow the timed steps.
    """
    by_name = {v.name: v for v in setup.variants}
    if not config.memory_rounds:
        return MemoryResult({name: [] for name in by_name})
    pinned = setup.device.type == "cpu" and pin_mmap_threshold()

    def peak(name: str) -> MemoryPeak:
        with by_name[name].applied(setup.model, setup.backend):
            return measure_peak_memory(lambda: time_prefill(setup.model, prompts.prefill_ids, prompts.extra),
                                       setup.device)

    with progress("memory", config.memory_rounds * len(by_name)) as advance:
        peaks = alternate(list(by_name), peak, repeats=config.memory_rounds, warmup=0, on_step=advance)
    method = next(iter(peaks.values()))[0].method
    note = None
    if method in ("linux_vmhwm", "rss_sampling", "ru_maxrss_delta"):
        note = (
            f"memory: process resident-set peak above the pre-call baseline ({method}), one "
            f"{config.batch}x{config.seq_len} prefill, measured in-process after gc + malloc_trim"
            + (" with glibc's mmap threshold pinned" if pinned else "")
            + "; benchmarks/bench_patch_overhead.py (source distribution) measures each configuration in a fresh "
            "process"
        )
    return MemoryResult(peaks, note)
