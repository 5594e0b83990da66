"""The measurements behind ``sinkfix bench``. Importable without rich or matplotlib.

One process, one model, several *variants* (the stock model and patched ones), each measured on:

* **quality**: token-weighted perplexity per domain over strided windows (the protocol of
  :mod:`sinkfix.evaluate`, BOS stated explicitly), and the change against stock in %;
* **extreme-token metrics** (sink share, residual peak ratio, value drain) from
  :mod:`sinkfix.analysis.metrics` when that module is importable, otherwise skipped with a note;
* **speed**: prefill and KV-cached ``generate`` decode, timed in alternating order (ABBA rounds) so
  that machine noise hits every variant alike; spreads, never a single sample;
* **memory**: the peak above the pre-call baseline of one prefill (CUDA max-allocated on GPU, the
  kernel's resident high-water mark on Linux CPUs).

:func:`run_bench` returns a plain dict (JSON-ready) whose layout is documented in ``schema.md``.
This module only orders the steps; each concern has its own module:

* :mod:`~sinkfix.bench.config`: :class:`BenchConfig`, :class:`Variant`, :func:`default_variants`;
* :mod:`~sinkfix.bench.prepare`: device, model, baseline attention, windows;
* :mod:`~sinkfix.bench.steps`: the measured steps, one function and one result type each;
* :mod:`~sinkfix.bench.stats`, :mod:`~sinkfix.bench.timing`, :mod:`~sinkfix.memory`: spreads
  and ABBA order, clocks, memory peaks;
* :mod:`~sinkfix.bench.provenance` and :mod:`~sinkfix.bench.results`: the JSON around the numbers.

The names those modules export stay importable from here.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from sinkfix.bench.config import DEFAULT_POLICIES, BenchConfig, Variant, default_variants
from sinkfix.memory import MemoryPeak, measure_peak_memory, pin_mmap_threshold, release_memory
from sinkfix.bench.prepare import (
    Domain,
    Protocol,
    Setup,
    build_protocol,
    choose_bos,
    load_profile,
    max_positions,
    pick_device,
    prepare_model,
    tokenizer_adds_bos,
    window_length_note,
)
from sinkfix.bench.provenance import load_average
from sinkfix.bench.results import SCHEMA_VERSION, assemble_results, jsonable
from sinkfix.bench.stats import Spread, alternate
from sinkfix.bench.steps import (
    Measurements,
    ProgressFactory,
    make_prompts,
    measure_decode,
    measure_memory,
    measure_metrics,
    measure_prefill,
    measure_quality,
    no_progress,
)
from sinkfix.bench.timing import prefill_kwargs, time_prefill
from sinkfix.evaluate import windows_nll
from sinkfix.errors import UsageError
from sinkfix.patch import PatchHandle
from sinkfix.texts import POOLED_NAME, QUICK_DOMAINS, load_texts

__all__ = [
    "SCHEMA_VERSION", "BenchConfig", "Variant", "Spread", "MemoryPeak", "ProgressFactory", "run_bench",
    "windows_nll", "alternate", "measure_peak_memory", "release_memory", "pin_mmap_threshold", "default_variants",
    "time_prefill", "prefill_kwargs", "DEFAULT_POLICIES", "Domain", "load_texts", "tokenizer_adds_bos",
    "max_positions",
]


class _PhaseClock:
    """Seconds per phase, each phase ending where the next begins."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self._last
        self._last = now

    def total(self) -> float:
        return time.perf_counter() - self.started


def _measure(setup: Setup, protocol: Protocol, config: BenchConfig, progress: ProgressFactory,
             clock: _PhaseClock, say: Callable[[str], None]) -> Measurements:
    quality = measure_quality(setup, protocol, config.batch, progress)
    clock.done("quality")
    metrics = measure_metrics(setup, protocol, config, progress)
    if metrics.note:
        say(metrics.note)
    clock.done("metrics")
    prompts = make_prompts(setup, protocol, config)
    prefill = measure_prefill(setup, prompts, config, progress)
    clock.done("prefill")
    decode = measure_decode(setup, prompts, config, progress)
    clock.done("decode")
    memory = measure_memory(setup, prompts, config, progress)  # last: it changes malloc's settings
    clock.done("memory")
    return Measurements(quality, metrics, prefill, decode, memory)


def run_bench(
    config: BenchConfig,
    *,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Run every measurement and return the results dict (layout: ``schema.md``).

    Bad input raises :class:`SinkfixError` (or ValueError/OSError subclasses) *before* the long
    steps: texts are read before the model is loaded, and every patched variant is applied once to
    the loaded model before any measurement.

    A model passed in ``model_and_tokenizer`` must be unpatched (:class:`UsageError` otherwise): the
    stock model is measured, and every variant patched and unpatched again.

    Side effects on the process: ``config.threads`` sets torch's thread count, ``config.baseline``
    the model's attention implementation, and on glibc CPUs the memory phase (the last one) pins
    malloc's mmap threshold for the rest of the process (:func:`pin_mmap_threshold`).
    """
    clock = _PhaseClock()
    load_start = load_average()
    say = log or (lambda message: None)
    config.validate()
    if model_and_tokenizer is not None and PatchHandle.of(model_and_tokenizer[0]) is not None:
        # each variant's patch replaced the caller's, and the stock model was measured with it removed:
        # the model came back unpatched, unsaid
        raise UsageError("run_bench measures the stock model and patches every variant itself: pass an unpatched "
                         "model (remove its patch first, handle.remove(), and patch it again afterwards)")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)

    # inputs first: a bad file fails in milliseconds, not after a 15 s model load
    # "all" is the results' column of every domain pooled: a text of that name is numbered (all-2)
    texts = load_texts(config.texts, config.dataset, split="eval",
                       domains=None if config.texts or config.dataset else QUICK_DOMAINS, reserved=[POOLED_NAME])
    profile = load_profile(config.profile) if config.profile is not None else None
    variants = default_variants(config.policies, profile, config.profile)
    bos = choose_bos(config, profile)  # a profile's BOS protocol, checked before the model loads
    if bos.note:
        say(bos.note)
    length_note = window_length_note(config, profile)
    if length_note:
        say(length_note)

    setup = prepare_model(config, variants, device, model_and_tokenizer, say)
    clock.done("setup")
    protocol = build_protocol(config, setup.tokenizer, texts, bos)
    measured = _measure(setup, protocol, config, progress or no_progress, clock, say)

    notes = [note for note in (bos.note, length_note, measured.metrics.note, measured.memory.note) if note]
    results = assemble_results(config, setup, protocol, measured, phases=clock.phases, notes=notes,
                               load_start=load_start)
    results["wall_time_s"] = clock.total()
    return jsonable(results)
