"""``sinkfix bench``: outputs checked before the run, names printed as written, metrics of a variant
without a sink set, the BOS protocol of a profile, the name of a caller's model, the sink-share caveat.

Runs are tiny (16-token windows, one window, no decode, one timed round) on the byte-level Llama
that tests/test_bench.py builds.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_bench import CODE, PROSE, _save_tiny, run_cli

QUICK = ["--seq-len", "16", "--max-windows", "1", "--decode-tokens", "0", "--repeats", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_fixes")
    (root / "prose.txt").write_text(PROSE)
    (root / "code.py").write_text(CODE)
    return {"root": root, "model": _save_tiny(root / "tiny", seed=0), "prose": root / "prose.txt",
            "code": root / "code.py"}


def _no_model_load(monkeypatch) -> None:
    from sinkfix.bench import prepare

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output check")

    monkeypatch.setattr(prepare, "load_model", refuse)


def _profile(files, path: Path, calibration: dict | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    from sinkfix.profile import ModelIdentity, Profile

    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    Profile(ModelIdentity.of(model), torch.full((2, 4), 0.9, dtype=torch.float64),
            calibration=calibration or {}).save(path)
    return path


# -- --out: every file it will hold is checked before the model loads ----------------------------
@pytest.mark.parametrize("blocked", ["results.json", "results.csv", "ppl_delta.png", "sink_share.png",
                                     "speed_ratio.png"])
def test_a_folder_where_an_output_file_goes_is_refused_before_the_model_loads(files, tmp_path, monkeypatch,
                                                                               blocked):
    # before: only DIR itself was checked; the run went through and failed at the write, leaving
    # a new results.json beside the earlier run's other files
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("an earlier run")
    if blocked == "results.csv":
        (out / "results.csv").unlink()
    (out / blocked).mkdir()
    _no_model_load(monkeypatch)
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), *QUICK,
                                 "--out", str(out))
    assert rc == 2 and stdout == "", stderr
    assert stderr.startswith("sinkfix bench: error: cannot write") and blocked in stderr
    assert "AssertionError" not in stderr
    assert sorted(p.name for p in out.iterdir()) == sorted({"results.csv", blocked})


@pytest.mark.parametrize("as_json", [False, True])
def test_a_write_that_fails_late_comes_after_the_results_are_printed(files, tmp_path, monkeypatch, as_json):
    from sinkfix.bench import report
    from sinkfix.errors import OutputError

    def full_disk(path, results):
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(report, "write_csv", full_disk)
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), *QUICK,
                                 "--policy", "drop", "--out", str(tmp_path / "out"), *(["--json"] if as_json else []))
    assert rc == 2 and "No space left on device" in stderr
    # before: nothing on stdout, the measured numbers lost
    if as_json:
        assert [v["name"] for v in json.loads(stdout)["variants"]] == ["stock", "identity", "drop (sink_scale=0)"]
    else:
        assert "Quality and extreme tokens" in stdout and "drop (sink_scale=0)" in stdout


# -- names from paths and exception texts are printed as written, never as markup --------------
def test_names_with_brackets_are_printed_as_written(files, tmp_path, monkeypatch):
    from sinkfix.bench import steps

    model = tmp_path / "m[" / "x]"  # the path holds "[/x]": a closing tag rich cannot match
    shutil.copytree(files["model"], model)
    data = tmp_path / "data[v2].txt"
    data.write_text(PROSE)
    code = tmp_path / "[red]code.py"
    code.write_text(CODE)
    dollars = tmp_path / "p$_$q.txt"  # matplotlib reads "$_$" as mathtext, which fails to render
    dollars.write_text(PROSE)
    real, _ = steps._metrics_module()

    class FailsOnIdentity:  # the second variant measured is identity
        calls = 0

        @staticmethod
        def measure_extreme_tokens(*args, **kwargs):
            FailsOnIdentity.calls += 1
            if FailsOnIdentity.calls == 2:
                raise ValueError("no [bold]sink[/] here")
            return real.measure_extreme_tokens(*args, **kwargs)

    monkeypatch.setattr(steps, "_metrics_module", lambda: (FailsOnIdentity, None))
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("--model", str(model), "--text", str(data), str(code), str(dollars), *QUICK,
                                 "--policy", "sink_scale=0.5", "--out", str(out))
    # before: "ppl data" and "ppl code" headers, then rich.errors.MarkupError on the model path
    assert rc == 0, stderr
    flat = " ".join(stdout.split())
    assert f"sinkfix bench {model}" in flat
    assert "ppl data[v2]" in flat and "ppl [red]code" in flat
    assert "extreme-token metrics failed on identity: ValueError: no [bold]sink[/] here" in flat
    assert {"ppl_delta.png", "sink_share.png", "speed_ratio.png"} <= {p.name for p in out.iterdir()}


def test_progress_messages_are_printed_as_written():
    from rich.console import Console

    from sinkfix.commands.bench import _log_to

    buffer = io.StringIO()
    _log_to(Console(file=buffer, width=200))("loading m[/x] ...")  # before: MarkupError on a terminal
    assert buffer.getvalue().strip() == "loading m[/x] ..."


# -- an empty sink set: sink-dependent measures undefined, the rest measured ---------------------
@pytest.mark.parametrize("spec", ["n_sink=0", "n_sink=0,extra_sink_positions=100"])
@pytest.mark.parametrize("threshold", [0.1, None])
def test_metrics_of_an_empty_sink_set_are_undefined_not_an_error(spec, threshold):
    from sinkfix import Policy, patch
    from sinkfix.analysis.metrics import measure_extreme_tokens
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    windows = [torch.randint(2, 90, (20,))]
    with patch(model, Policy.parse(spec)):
        # before: IndexError for n_sink=0; for a sink position beyond the window, a share of 0 and
        # the drain of key 0, which is no sink
        result = measure_extreme_tokens(model, windows, hidden_sink_threshold=threshold)
    assert result.sink_share.shape == (2, 4) and result.sink_share.isnan().all()
    assert result.value_drain.shape == (2, 2) and result.value_drain.isnan().all()
    assert torch.isfinite(result.residual_peak).all()
    if threshold is not None:
        assert torch.isfinite(result.hidden_sink_share).all() and torch.isfinite(result.dormancy).all()
    stock = measure_extreme_tokens(model, windows, hidden_sink_threshold=threshold)
    assert torch.isfinite(stock.sink_share).all() and torch.isfinite(stock.value_drain).all()


def test_bench_with_an_empty_sink_set_keeps_every_variants_metrics(files):
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), *QUICK,
                                 "--policy", "n_sink=0", "--json")
    assert rc == 0, stderr
    results = json.loads(stdout)
    # before: available false and every variant's metrics null
    assert results["metrics_status"]["available"] and results["metrics_status"]["note"] is None
    stock, identity, empty = results["variants"]
    assert stock["metrics"]["summary"]["sink_share_mean"] > 0
    summary = empty["metrics"]["summary"]
    assert summary["sink_share_mean"] is None and summary["value_drain_mean"] is None
    assert empty["metrics"]["sink_share_layer"] == [None, None]
    assert summary["residual_peak_max"] > 0


def test_one_variant_failing_its_metrics_keeps_the_others(files, monkeypatch):
    from sinkfix.bench import steps

    real, _ = steps._metrics_module()

    class FailsOnIdentity:
        calls = 0

        @staticmethod
        def measure_extreme_tokens(*args, **kwargs):
            FailsOnIdentity.calls += 1
            if FailsOnIdentity.calls == 2:
                raise RuntimeError("out of memory")
            return real.measure_extreme_tokens(*args, **kwargs)

    monkeypatch.setattr(steps, "_metrics_module", lambda: (FailsOnIdentity, None))
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), *QUICK,
                                 "--policy", "drop", "--json")
    assert rc == 0, stderr
    results = json.loads(stdout)
    status = results["metrics_status"]
    assert status["available"] is False  # not every variant has metrics
    assert status["note"] == "extreme-token metrics failed on identity: RuntimeError: out of memory"
    assert status["note"] in results["notes"]
    stock, identity, drop = results["variants"]
    # before: every variant's metrics null
    assert identity["metrics"] is None
    assert stock["metrics"]["summary"]["sink_share_mean"] > 0 and drop["metrics"] is not None


# -- the BOS protocol a profile was calibrated with ----------------------------------------------
@pytest.mark.parametrize("flag, bos, source, note", [
    ((), True, "profile", "windows start with a BOS, as the profile was calibrated (--no-bos to measure without)"),
    (("--no-bos",), False, "flag", "was calibrated with a BOS but is measured without one (--no-bos)"),
    (("--bos",), True, "flag", None),
])
def test_a_profile_calibrated_with_bos_is_measured_with_bos(files, tmp_path, flag, bos, source, note):
    profile = _profile(files, tmp_path / "with-bos.json",
                       {"protocol": {"seq_len": 512, "bos": True, "stride": 511, "windows": "non-overlapping"}})
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), *QUICK,
                                 "--profile", str(profile), *flag, "--json")
    assert rc == 0, stderr
    results = json.loads(stdout)
    # before: no BOS (this tokenizer adds none by itself), bos_source "tokenizer", no note
    assert results["protocol"]["bos"] is bos and results["protocol"]["bos_source"] == source
    bos_notes = [n for n in results["notes"] if "calibrated" in n and "BOS" in n]
    if note is None:
        assert bos_notes == []
    else:
        assert len(bos_notes) == 1 and note in bos_notes[0] and "with-bos.json" in bos_notes[0]
    # the profile's 512-token windows measured at --seq-len 16: said too (review 82)
    assert [n for n in results["notes"] if "token windows" in n] == [
        "--profile with-bos.json was calibrated on 512-token windows and is measured on 16-token ones (--seq-len 512 "
        "to measure as calibrated): its perplexity changes need not match the calibration's"]


def test_the_profile_note_is_printed_with_the_table(files, tmp_path):
    profile = _profile(files, tmp_path / "with-bos.json", {"protocol": {"seq_len": 512, "bos": True}})
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), *QUICK,
                                 "--profile", str(profile))
    assert rc == 0, stderr
    assert "BOS + 16-token windows" in stdout
    assert "as the profile was calibrated" in " ".join(stdout.split())


def test_a_profile_without_a_recorded_protocol_follows_the_tokenizer(files, tmp_path):
    profile = _profile(files, tmp_path / "plain.json")
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), *QUICK,
                                 "--profile", str(profile), "--json")
    assert rc == 0, stderr
    results = json.loads(stdout)
    assert results["protocol"]["bos"] is False and results["protocol"]["bos_source"] == "tokenizer"
    assert not [n for n in results["notes"] if "calibrated" in n]


def test_a_profiles_bos_needs_room_in_the_window_before_the_model_loads(files, tmp_path, monkeypatch):
    profile = _profile(files, tmp_path / "with-bos.json", {"protocol": {"bos": True}})
    _no_model_load(monkeypatch)
    rc, stdout, stderr = run_cli("--model", str(files["model"]), "--text", str(files["prose"]), "--seq-len", "2",
                                 "--profile", str(profile))
    assert rc == 2 and "--seq-len must be >= 3" in stderr and "--no-bos" in stderr, stderr


# -- the name of a model given from Python --------------------------------------------------------
def test_a_callers_model_is_named_by_its_own_config(files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sinkfix.bench import BenchConfig, run_bench

    config = BenchConfig(texts=(str(files["prose"]),), seq_len=16, max_windows=1, decode_tokens=0, repeats=1,
                         policies=("identity",), memory_rounds=0, metrics_windows=0)
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    loaded = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    # before: "smollm2-135m", BenchConfig's default model, for any model given
    assert run_bench(config, model_and_tokenizer=(loaded, tokenizer))["model"]["name"] == str(files["model"])
    built = type(loaded)(loaded.config).eval()
    built.config._name_or_path = ""
    assert run_bench(config, model_and_tokenizer=(built, tokenizer))["model"]["name"] == "LlamaForCausalLM"


# -- the sink-share column is per variant's own sink set -----------------------------------------
def test_sink_share_caveat_is_documented_and_shown():
    from rich.console import Console

    from sinkfix.bench.report import render

    doc = (Path(__file__).resolve().parents[1] / "sinkfix" / "bench" / "schema.md").read_text()
    assert "own sink set" in " ".join(doc.split())

    def variant(name, kind, policy, share):
        metrics = {"summary": {"sink_share_mean": share, "residual_peak_max": 10.0, "value_drain_mean": 0.5}}
        speed = {"prefill": {"tokens_per_s": {"min": 1.0, "median": 1.0, "max": 1.0}, "time_ratio_vs_stock": 1.0,
                             "latency_ms": {"p50": 1.0, "p90": 1.0}}, "decode": None}
        return {"name": name, "kind": kind, "policy": policy, "metrics": metrics, "speed": speed, "memory": None,
                "quality": {d: {"ppl": 2.0, "delta_pct": 0.0} for d in ("prose", "all")}}

    results = {
        "model": {"name": "tiny", "architecture": "LlamaForCausalLM", "parameters": 1e5, "dtype": "float32",
                  "baseline_attention": "sdpa", "patch_backend": "torch"},
        "provenance": {"device": "cpu", "device_name": "cpu", "torch_threads": 1, "load_average_start": None,
                       "load_average_end": None, "versions": {"torch": "x", "transformers": "y"},
                       "git": {"revision": None, "dirty": False}},
        "protocol": {"description": "no BOS, 16-token windows"},
        "domains": {"prose": {"scored_tokens": 15}},
        "metrics_status": {"available": True},
        "variants": [variant("stock", "stock", None, 0.3), variant("sink_scale=1,n_sink=4", "policy",
                                                                   "sink_scale=1,n_sink=4", 0.5)],
        "notes": [],
        "wall_time_s": 1.0,
    }

    def shown(results) -> str:
        buffer = io.StringIO()
        render(results, Console(file=buffer, width=200))
        return " ".join(buffer.getvalue().split())

    assert "each variant's own sink set" in shown(results)
    results["variants"][1] = variant("sink_scale=0.9", "policy", "sink_scale=0.9", 0.27)
    assert "own sink set" not in shown(results)  # same sink set everywhere: nothing to warn about
