"""The benchmark scripts' argument checks, outputs and clean-up, without running their measurements.

Each script is loaded as a module (benchmarks/ is not a package) and driven through ``main`` with the
expensive parts (loading a model, the measurement itself) replaced by stand-ins that fail the test if
they are reached, so that a check that must come first is seen to come first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sinkfix
from sinkfix.errors import UsageError

from .conftest import BENCHMARKS, benchmark_script


class _Reached(Exception):
    """A stand-in for expensive work was called."""


def _never(what: str):
    def stand_in(*args, **kwargs):
        raise _Reached(f"{what} ran before the arguments were refused")
    return stand_in


def _exit_code(fn, *args) -> int:
    with pytest.raises(SystemExit) as exited:
        fn(*args)
    return exited.value.code


# -- 1. bench_monitor_overhead --processes: the child must not see --processes again -----------------------
def test_without_option_strips_abbreviations_and_both_value_forms():
    bench = benchmark_script("bench_monitor_overhead")
    strip = bench._without_option
    assert strip(["--proc", "2", "--rounds", "1"], "--processes") == ["--rounds", "1"]
    assert strip(["--rounds", "1", "--processes=3", "--json", "x.json"], "--processes") == ["--rounds", "1", "--json",
                                                                                            "x.json"]
    assert strip(["--pro=2", "--prompt", "64"], "--processes") == ["--prompt", "64"]
    # another option that merely shares a prefix, and a value, are kept
    assert strip(["--prompt", "64", "--prefills", "2"], "--processes") == ["--prompt", "64", "--prefills", "2"]
    assert strip(["--js", "a.json", "--rounds", "1"], "--json") == ["--rounds", "1"]


def test_monitor_overhead_refuses_an_abbreviated_processes_before_spawning(monkeypatch, no_model, capsys):
    bench = benchmark_script("bench_monitor_overhead")
    monkeypatch.setattr(subprocess, "run", _never("a child process"))
    assert _exit_code(bench.main, ["--proc", "2", "--rounds", "1"]) == 2
    assert "--proc" in capsys.readouterr().err


# -- 2. check_monitor_agreement: unknown policies, nothing compared ----------------------------------------
def test_agreement_refuses_unknown_policies_and_never_passes_with_nothing_compared(no_model, capsys):
    bench = benchmark_script("check_monitor_agreement")
    assert _exit_code(bench.main, ["--policies", "sink_scale=0.9"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert bench._passed([]) is False
    assert bench._passed([{"sink_share": 0.0}]) is True and bench._passed([{"sink_share": 1.0}]) is False


# -- 3. bench_host_overhead leaves the process as it found it ----------------------------------------------
def test_host_overhead_main_restores_kernels_and_threads():
    bench = benchmark_script("bench_host_overhead")
    from sinkfix.kernels import attention_decode, attention_prefill

    kernels = (attention_decode._sink_attn_decode_split, attention_decode._sink_attn_decode_reduce,
               attention_prefill._sink_attn_fwd)
    before = torch.get_num_threads()
    other = 2 if before != 2 else 3  # a count main() does not set, so that a leftover 1 shows
    torch.set_num_threads(other)
    try:
        assert bench.main(["--device", "cpu", "--calls", "2", "--rounds", "1", "--keys", "16",
                           "--heads", "2", "1", "16"]) == 0
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)
    assert (attention_decode._sink_attn_decode_split, attention_decode._sink_attn_decode_reduce,
            attention_prefill._sink_attn_fwd) == kernels
    assert not any(isinstance(k, bench._LaunchStandIn) for k in kernels)


def test_host_overhead_monitor_callbacks_unwraps_what_it_timed():
    bench = benchmark_script("bench_host_overhead")
    monitor_class = importlib.import_module("sinkfix.telemetry.monitor").Monitor
    attention = importlib.import_module("sinkfix.integrations.attention")
    names = ("_on_attention", "_before_layers", "_residual_hook")
    originals = {name: monitor_class.__dict__[name] for name in names}
    deferral = attention.defers_sink_stats
    for _ in range(2):  # the second run must time each callback once, not through two wrappers
        spent = bench.monitor_callbacks("identity", requests=1, steps=2)
        assert spent["deferral test"] > 0 and spent["attention listener"] > 0
        assert {name: monitor_class.__dict__[name] for name in names} == originals
        assert attention.defers_sink_stats is deferral


def test_host_overhead_monitor_callbacks_refuses_the_call_options(monkeypatch):
    bench = benchmark_script("bench_host_overhead")
    monkeypatch.setattr(bench, "monitor_callbacks", _never("monitor_callbacks"))
    for extra in (["--calls", "3"], ["--keys", "64"], ["--heads", "4", "2", "16"], ["--profile", "5"],
                  ["--device", "cpu"]):
        assert _exit_code(bench.main, ["--monitor-callbacks", *extra]) == 2, extra


# -- 4. bench_monitor_overhead: unknown policies refused up front ------------------------------------------
def test_monitor_overhead_refuses_unknown_policies_before_measuring(no_model, capsys):
    bench = benchmark_script("bench_monitor_overhead")
    assert _exit_code(bench.main, ["--policies", "identity", "sink_scale=0.8", "--rounds", "1"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert _exit_code(bench.main, ["--help"]) == 0
    assert "per-head" in capsys.readouterr().out  # the names are listed


# -- 5. bench_decode: no timed step left ------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--new-tokens", "2"], ["--new-tokens", "5", "--skip", "4"]])
def test_bench_decode_refuses_runs_without_a_timed_step(argv, no_model, capsys):
    bench = benchmark_script("bench_decode")
    assert _exit_code(bench.main, [*argv, "--rounds", "1"]) == 2
    assert "leaves no timed decode step" in capsys.readouterr().err


# -- 6. one round: no interval, never settled --------------------------------------------------------------
def test_ratio_has_no_interval_with_one_unit():
    from sinkfix.bench.stats import ratio_of_block_medians, ratio_of_medians

    one = ratio_of_medians([1.1], [1.0])
    assert one.value == pytest.approx(1.1) and one.low is None and one.high is None and one.pairs == 1
    assert not one.has_interval
    block = ratio_of_block_medians([[1.1, 1.2, 1.0]], [[1.0, 1.0, 1.0]])
    assert block.value == pytest.approx(1.1) and block.low is None and block.high is None
    two = ratio_of_medians([1.1, 1.3], [1.0, 1.0])
    assert two.has_interval and two.low <= two.value <= two.high


def test_bench_decode_one_round_is_not_counted_as_settled():
    bench = benchmark_script("bench_decode")
    results = {"stock": {"prefill": [[1.0, 1.0]], "decode": [[0.05, 0.05]]},
               "identity": {"prefill": [[1.002, 1.002]], "decode": [[0.0501, 0.0501]]}}
    rows = bench._rows(results, "eager", "wall", 1, 0.0)
    judged = [r for r in rows if r["target"] is not None]
    assert judged and all(r["interval"] is None and r["interval_below_target"] is False for r in judged)
    assert all(r["met"] is True for r in judged)
    assert bench._interval_text(judged[0]) == "no interval (1 round)"


def test_monitor_overhead_one_round_is_not_counted_as_settled():
    bench = benchmark_script("bench_monitor_overhead")
    runs = {"off": {"prefill": [(0.1, 0.1, 0)], "step_runs": [[(0.01, 0.01), (0.01, 0.01)]]},
            "on": {"prefill": [(0.1, 0.1, 0)], "step_runs": [[(0.01, 0.01), (0.01, 0.01)]]}}
    table = bench._ratios(runs)
    assert table["on"]["decode_cpu_interval"]["high"] is None
    assert bench._interval(table["on"], "decode") == " no interval (1 round)"
    verdict = bench._verdict({"identity": table})
    assert all(" below it in 0 of 1" in line for line in verdict), verdict


# -- 7. bench_patch_overhead: the JSON path checked first, written atomically, with provenance -----------------
def test_patch_overhead_checks_the_json_path_before_measuring(monkeypatch, capsys):
    bench = benchmark_script("bench_patch_overhead")
    monkeypatch.setattr(bench, "measure_time", _never("measure_time"))
    monkeypatch.setattr(sys, "argv", ["bench_patch_overhead.py", "--skip-memory", "--json", "/proc/nowhere/x.json"])
    assert _exit_code(bench.main) == 2
    assert "/proc/nowhere/x.json" in capsys.readouterr().err


def test_patch_overhead_json_names_device_and_versions(monkeypatch, tmp_path):
    bench = benchmark_script("bench_patch_overhead")
    monkeypatch.setattr(bench, "measure_time", lambda args: {name: [0.010, 0.011] for name in bench.CONFIGS})
    out = tmp_path / "patch.json"
    monkeypatch.setattr(sys, "argv", ["bench_patch_overhead.py", "--skip-memory", "--json", str(out)])
    assert bench.main() == 0
    origin = json.loads(out.read_text(encoding="utf-8"))["provenance"]
    assert origin["device"] == "cpu" and origin["device_name"]
    assert origin["versions"]["torch"] and origin["versions"]["sinkfix"] and "transformers" in origin["versions"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_check_scripts_refuse_an_unwritable_json_before_loading(no_model):
    for name in ("check_monitor_agreement", "check_guard_margin", "bench_monitor_overhead"):
        assert _exit_code(benchmark_script(name).main, ["--json", "/proc/nowhere/x.json"]) == 2, name


# -- 8. bench_calibration_step: the folder first, the rounds in the name ------------------------------------
def test_calibration_step_checks_its_folder_before_the_work(monkeypatch):
    bench = benchmark_script("bench_calibration_step")
    monkeypatch.setattr(bench, "run", _never("the fitting steps"))
    assert _exit_code(bench.main, ["--out", "/proc/x"]) == 2


def test_calibration_step_names_other_round_counts(monkeypatch, tmp_path):
    bench = benchmark_script("bench_calibration_step")
    monkeypatch.setattr(bench, "run", lambda args: {"rounds": args.rounds})
    monkeypatch.setattr(bench, "markdown", lambda data: f"rounds {data['rounds']}")
    assert bench.main(["--rounds", "1", "--threads", "2", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-smollm2-135m-bos-2t-1r.json",
                                                          "step-smollm2-135m-bos-2t-1r.md"]
    # the default's name is the one docs/calibration.md cites
    default = argparse.Namespace(model="smollm2-135m", bos=True, threads=2, rounds=4)
    assert bench._tag(default) == "smollm2-135m-bos-2t"
    assert (BENCHMARKS / "results" / "calibration_step" / f"step-{bench._tag(default)}.json").exists()


# -- 9. merge_stream_runs: period and profile are part of the stream -----------------------------------------
def _protocol(**changes) -> dict:
    base = {"tokens": 160, "n_sink": 4, "window": 28, "cache_tokens": 32, "chunk": 16, "segment_len": 80,
            "warmup": 33, "recompute_every": 64, "bos": False, "model": "m", "text": "t", "profile": None,
            "period": None}
    return {**base, **changes}


def test_merge_refuses_runs_of_another_period_or_profile(monkeypatch):
    bench = benchmark_script("merge_stream_runs")
    from sinkfix.errors import UsageError

    runs = {}
    monkeypatch.setattr(bench, "load_run", lambda folder: runs[str(folder)])
    runs.update(a=(_protocol(), {"sink": object()}), b=(_protocol(period=48), {"window_only": object()}))
    with pytest.raises(UsageError, match="period"):
        bench.merge([Path("a"), Path("b")])
    runs.update(a=(_protocol(profile="p.json"), {"sink_profile": object()}),
                b=(_protocol(profile="q.json"), {"recompute_profile": object()}))
    with pytest.raises(UsageError, match="profile"):
        bench.merge([Path("a"), Path("b")])
    # a run without a profile (its variants use none) still merges with one that has it
    runs.update(a=(_protocol(), {"sink": object()}), b=(_protocol(profile="q.json"), {"sink_profile": object()}))
    monkeypatch.setattr(bench, "StreamResult", lambda variants, protocol: (sorted(variants), protocol))
    variants, protocol = bench.merge([Path("a"), Path("b")])
    assert variants == ["sink", "sink_profile"] and protocol["profile"] == "q.json"


def test_merge_refuses_recomputations_with_different_intervals(monkeypatch):
    """Merged, with the protocol naming the last run's 32 for both references."""
    bench = benchmark_script("merge_stream_runs")
    runs: dict = {}
    monkeypatch.setattr(bench, "load_run", lambda folder: runs[str(folder)])
    monkeypatch.setattr(bench, "StreamResult", lambda variants, protocol: (sorted(variants), protocol))
    runs.update(a=(_protocol(recompute_every=16), {"sink": 0, "recompute": 0}),
                b=(_protocol(recompute_every=32, profile="p.json"), {"sink_profile": 0, "recompute_profile": 0}))
    with pytest.raises(UsageError, match="b ran recompute_every = 32, a 16: .*same --recompute-every"):
        bench.merge([Path("a"), Path("b")])
    # equal intervals merge; a run that recomputed nothing does not count (its value is unused)
    runs.update(b=(_protocol(recompute_every=16, profile="p.json"), {"sink_profile": 0, "recompute_profile": 0}),
                c=(_protocol(recompute_every=64), {"window_only": 0}))
    variants, protocol = bench.merge([Path("c"), Path("a"), Path("b")])
    assert protocol["recompute_every"] == 16 and len(variants) == 5


def test_merge_takes_the_chunk_from_the_runs_that_fed_chunks(monkeypatch):
    """A run of recomputations only feeds no chunks (and sinkfix stream now refuses --chunk there):
    its recorded default chunk no longer stops it merging with caches fed in other chunks."""
    bench = benchmark_script("merge_stream_runs")
    runs: dict = {}
    monkeypatch.setattr(bench, "load_run", lambda folder: runs[str(folder)])
    monkeypatch.setattr(bench, "StreamResult", lambda variants, protocol: (sorted(variants), protocol))
    runs.update(a=(_protocol(chunk=32, recompute_every=128), {"recompute": 0}), b=(_protocol(chunk=8), {"sink": 0}))
    variants, protocol = bench.merge([Path("a"), Path("b")])
    assert variants == ["recompute", "sink"] and protocol["chunk"] == 8 and protocol["recompute_every"] == 128
    runs.update(c=(_protocol(chunk=16), {"window_only": 0}))
    with pytest.raises(UsageError, match="c ran chunk = 16, b 8: .*same --chunk"):
        bench.merge([Path("a"), Path("b"), Path("c")])


def test_merge_refuses_an_out_that_is_one_of_its_runs(tmp_path, monkeypatch, capsys):
    """--out naming an input run folder (under any spelling) replaced that run's stream.json and
    stream.png with the merge."""
    bench = benchmark_script("merge_stream_runs")
    run = tmp_path / "runA"
    run.mkdir()
    (run / "stream.json").write_text("{\"kept\": true}\n")
    monkeypatch.setattr(bench, "merge", lambda runs: pytest.fail("merged before the --out check"))
    with pytest.raises(SystemExit) as info:
        bench.main([str(run), str(tmp_path / "other"), "--out", str(tmp_path / "." / "runA")])
    assert info.value.code == 2
    assert "is the run folder" in capsys.readouterr().err
    assert (run / "stream.json").read_text() == "{\"kept\": true}\n"


# -- 10. every script's --help ---------------------------------------------------------------------------
_HELP_PROBE = r"""
import contextlib, io, json, runpy, sys
failed = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exited:
        code = exited.code
    except BaseException as error:
        code = repr(error)
    if code not in (0, None) or "usage:" not in out.getvalue():
        failed[path] = code
print(json.dumps(failed))
"""


def test_every_benchmark_script_prints_its_help():
    """One process for all of them (importing torch once); none of them needs CUDA to parse. Modules
    without a command line (flash_minimal.py, imported by kernel_audit.py) are left out."""
    scripts = sorted(str(p) for p in BENCHMARKS.glob("*.py") if '__name__ == "__main__"' in p.read_text())
    assert len(scripts) > 15
    done = subprocess.run([sys.executable, "-c", _HELP_PROBE, *scripts], capture_output=True, text=True,
                          timeout=120, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


# -- 11. check_guard_margin: calibrate's domains, at least one random prompt -----------------------------------
def test_guard_margin_ranges_cover_calibrates_domains(monkeypatch):
    bench = benchmark_script("check_guard_margin")
    from sinkfix.texts import DOMAINS

    asked: list[str] = []
    monkeypatch.setattr(sinkfix, "load_model", lambda name: (object(), object()))
    monkeypatch.setattr(sinkfix.Profile, "load", staticmethod(lambda path: object()))
    monkeypatch.setattr(bench, "domain_text", lambda domain, split: asked.append((domain, split)) or "")
    monkeypatch.setattr(bench, "text_windows", lambda *args, **kwargs: [])
    monkeypatch.setattr(bench, "bos_token_id", _never("the requests"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(_Reached):
            bench.main(["--profile", "p.json"])
    finally:
        torch.set_num_threads(threads)
    assert asked == [(domain, "calib") for domain in DOMAINS]


def test_guard_margin_refuses_no_random_prompts(no_model):
    bench = benchmark_script("check_guard_margin")
    assert _exit_code(bench.main, ["--random-prompts", "0"]) == 2


# -- 13. arguments that were silently ignored ------------------------------------------------------------
def test_hidden_sink_evaluation_uses_eval_seq_len(monkeypatch):
    bench = benchmark_script("hidden_sink_calibration")
    lengths: list[int] = []

    class Result:
        ppl = 2.0

        def protocol(self) -> str:
            return "p"

    calibration = {"best_step": 1, "val_nll_stock": 1.0, "val_nll_init": 1.0, "val_nll_best": 1.0,
                   "heads_chosen": 1, "heads_total": 2}
    monkeypatch.setattr(sinkfix, "load_model", lambda name: (object(), object()))
    monkeypatch.setattr(bench, "calibrate_hidden_sinks",
                        lambda *args, **kwargs: argparse.Namespace(calibration=calibration))
    monkeypatch.setattr(bench, "perplexity", lambda *args, seq_len, **kwargs: lengths.append(seq_len) or Result())
    monkeypatch.setattr(sinkfix, "patch", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(sys, "argv", ["hidden_sink_calibration.py", "--seq-len", "64", "--eval-seq-len", "128"])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    assert lengths and set(lengths) == {128}


def test_intervals_of_reads_a_processes_file(tmp_path, capsys):
    bench = benchmark_script("bench_monitor_overhead")
    run = {"rounds": 1, "prefills": 2, "policies": {"identity": {
        "off": {"prefill_cpu_samples_ms": [10.0, 10.2]}, "on (sample 32)": {"prefill_cpu_samples_ms": [10.3, 10.5]}}}}
    path = tmp_path / "processes.json"
    path.write_text(json.dumps({"processes": 2, "summary": {}, "runs": [run, run]}), encoding="utf-8")
    assert bench._intervals_of([str(path)]) == 0
    out = capsys.readouterr().out
    assert "None rounds" not in out
    assert out.count("prefill x") == 2 and "process 1" in out and "process 2" in out
