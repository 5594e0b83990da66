"""benchmarks/bench_decode.py's rows: the ratio of medians over every step of every round, with an
interval that draws whole rounds, and every sample kept round by round."""

import importlib.util
import statistics
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_decode", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py")
bench_decode = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_decode)


def _results(states):
    stock = {"prefill": [[1.30, 1.31]] * len(states), "decode": [[0.050, 0.051, 0.049]] * len(states)}
    patched = {"prefill": [[1.30 * s, 1.31 * s] for s in states],
               "decode": [[0.050 * s, 0.051 * s, 0.049 * s] for s in states]}
    return {"stock": stock, "identity": patched}


def test_rows_carry_the_ratio_its_round_interval_and_the_samples():
    rows = bench_decode._rows(_results([1.00, 1.12, 1.02, 1.08, 1.01]), "eager", "wall", 1, 0.5)
    by = {(r["variant"], r["kind"]): r for r in rows}
    assert set(by) == {(v, k) for v in ("stock", "identity") for k in ("prefill", "decode")}
    decode = by["identity", "decode"]
    every = [x for r in _results([1.00, 1.12, 1.02, 1.08, 1.01])["identity"]["decode"] for x in r]
    assert decode["ratio"] == pytest.approx(statistics.median(every) / 0.050)
    assert decode["n"] == 15 and decode["rounds"] == 5 and len(decode["samples_ms"]) == 5
    low, high = decode["interval"]
    assert low <= decode["ratio"] <= high and high >= 1.08  # the slow rounds stay in the interval
    assert decode["target"] == 1.10 and decode["met"] is True and decode["interval_below_target"] == (high <= 1.10)
    # two of five rounds 15-20% slower: the point estimate meets the target, the interval does not
    shaky = bench_decode._rows(_results([1.00, 1.20, 1.02, 1.15, 1.01]), "eager", "wall", 1, 0.5)
    shaky_decode = next(r for r in shaky if r["variant"] == "identity" and r["kind"] == "decode")
    assert shaky_decode["met"] is True and shaky_decode["interval"][1] > 1.10
    assert shaky_decode["interval_below_target"] is False
    assert by["stock", "decode"]["met"] is None and "interval" not in by["stock", "decode"]


def test_a_shift_every_round_shares_is_sure():
    rows = bench_decode._rows(_results([1.03] * 4), "eager", "wall", 1, 0.5)
    prefill = next(r for r in rows if r["variant"] == "identity" and r["kind"] == "prefill")
    assert prefill["ratio"] == pytest.approx(1.03)
    assert prefill["interval"] == pytest.approx([1.03, 1.03]) and prefill["interval_below_target"] is True
