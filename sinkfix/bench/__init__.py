"""``sinkfix bench``: quality, extreme-token metrics, speed and memory of a model before and after patching.

:func:`run_bench` (:mod:`sinkfix.bench.runner`) orders the measured steps; the measurement logic
(no rich, no matplotlib) is split by concern: ``config`` (settings, variants), ``prepare`` (device,
model, windows), ``steps`` (quality, metrics, prefill, decode, memory), ``stats``, ``timing``,
``provenance`` and ``results`` (the JSON dict); memory peaks come from :mod:`sinkfix.memory`, which
``sinkfix stream`` shares. The terminal table, the JSON/CSV writers
and the plots live in :mod:`sinkfix.bench.report`. The JSON layout is documented in
``sinkfix/bench/schema.md`` and versioned by :data:`SCHEMA_VERSION`.

    from sinkfix.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig(model="smollm2-135m", policies=("sink_scale=0.9",)))
"""

from sinkfix.bench.runner import (
    SCHEMA_VERSION,
    BenchConfig,
    Spread,
    Variant,
    alternate,
    measure_peak_memory,
    prefill_kwargs,
    release_memory,
    run_bench,
    time_prefill,
    windows_nll,
)

__all__ = [
    "SCHEMA_VERSION", "BenchConfig", "Spread", "Variant", "alternate", "measure_peak_memory", "prefill_kwargs",
    "release_memory", "run_bench", "time_prefill", "windows_nll",
]
