"""`sinkfix bench` and policy specs (review 34): a closed standard output does not cost the files, a
write that fails part way leaves no earlier run's files beside the new ones, and inputs that were
silently dropped or ignored are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkfix.bench.config import default_variants
from sinkfix.bench.report import OUTPUT_FILES, write_outputs
from sinkfix.errors import OutputError, PolicyError, ProfileError, UsageError
from sinkfix.policy import Policy
from tests import test_bench

# the module fixtures of test_bench (one tiny model on disk, one JSON run), shared by assignment
files = test_bench.files
json_run = test_bench.json_run

REPO = Path(__file__).resolve().parents[1]


def test_a_reader_that_closes_the_output_does_not_cost_the_files(files, tmp_path):
    # `sinkfix bench --out DIR | head`: the table mode exited 1 without a word and the JSON mode with a
    # BrokenPipeError traceback, both before the files were written
    for mode in ([], ["--json"]):
        out_dir = tmp_path / f"out{len(mode)}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        child = subprocess.Popen(
            [sys.executable, "-m", "sinkfix", "bench", "--model", str(files["model"]), "--text", str(files["prose"]),
             "--seq-len", "32", "--max-windows", "1", "--decode-tokens", "0", "--repeats", "1", "--threads", "1",
             "--out", str(out_dir), *mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
        child.stdout.close()  # the reader is gone before the first line
        err = child.stderr.read().decode()
        assert child.wait(timeout=300) == 2, err
        assert err.strip().splitlines() == [
            f"sinkfix bench: error: standard output was closed by its reader before everything was printed; the "
            f"files under {out_dir} were written"], err
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUT_FILES)
        assert json.loads((out_dir / "results.json").read_text())["variants"][0]["name"] == "stock"


def test_a_write_that_fails_part_way_leaves_no_earlier_run_beside_the_new_files(json_run, tmp_path, monkeypatch):
    import sinkfix.bench.report as report

    results, _, _ = json_run
    for name in OUTPUT_FILES:
        (tmp_path / name).write_bytes(b"an earlier run")
    real = report.save_figure

    def full_disk(fig, path, **kwargs):
        if Path(path).name == "residual_peak.png":
            import matplotlib.pyplot as plt

            plt.close(fig)
            raise OutputError(f"cannot write {path}: No space left on device")
        return real(fig, path, **kwargs)

    monkeypatch.setattr(report, "save_figure", full_disk)
    with pytest.raises(OutputError) as info:
        write_outputs(tmp_path, results)
    message = str(info.value)
    assert ("holds this run's results.json, results.csv, ppl_delta.png, sink_share.png; removed an earlier run's "
            "residual_peak.png, speed_ratio.png") in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppl_delta.png", "results.csv", "results.json",
                                                          "sink_share.png"]
    assert json.loads((tmp_path / "results.json").read_text())["variants"] == results["variants"]


def test_a_first_write_that_fails_leaves_the_earlier_run_whole(json_run, tmp_path, monkeypatch):
    import sinkfix.bench.report as report

    results, _, _ = json_run
    for name in OUTPUT_FILES:
        (tmp_path / name).write_bytes(b"an earlier run")
    monkeypatch.setattr(report, "write_json", lambda path, results: (_ for _ in ()).throw(
        OutputError(f"cannot write {path}: No space left on device")))
    with pytest.raises(OutputError, match="No space left"):
        write_outputs(tmp_path, results)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUT_FILES)
    assert all(p.read_bytes() == b"an earlier run" for p in tmp_path.iterdir())


@pytest.mark.parametrize("spec, says", [
    ("clip=1.1,layers=0", "the residual clip acts on every layer"),  # read as "clip layer 0 only"
    ("sink_scale=0.5,n_sink=2,extra_sink_positions=1", "extra_sink_positions 1 already in the sink set"),
    ("sink_scale=0.5,extra_sink_positions=0:3", "extra_sink_positions 0 already in the sink set"),
    ("sink_scale=0.5,n_sink=0,extra_sink_positions=0-1024", "lists 1025 positions; at most 1024"),
])
def test_spec_items_that_change_nothing_or_too_many_positions_are_refused(spec, says):
    with pytest.raises(PolicyError, match=says):
        Policy.parse(spec)


def test_specs_that_still_parse():
    # structures the API keeps, describes and parses back, and extra positions after the first n_sink
    for spec in ("layers=1", "n_sink=4", "sink_scale=0.9,layers=0,clip=1.1", "sink_scale=0.5,n_sink=2,"
                 "extra_sink_positions=4", "sink_scale=0.5,n_sink=0,extra_sink_positions=0-1023",
                 "virtual_logit_on_sink_rows=0,sink_scale=0.5"):
        assert Policy.parse(Policy.parse(spec).describe()) == Policy.parse(spec)


def test_bench_refuses_a_policy_that_is_another_one_again():
    # `virtual_logit_on_sink_rows=0` alone is the identity: its variant was dropped without a word
    with pytest.raises(UsageError, match="is the policy 'identity', which is measured anyway"):
        default_variants(["virtual_logit_on_sink_rows=0"])
    with pytest.raises(UsageError, match="--policy 'sink_scale=0.9' already gives"):
        default_variants(["sink_scale=0.9", "sink_scale=0.90"])
    assert [v.name for v in default_variants(["identity", "drop"])] == ["stock", "identity", "drop (sink_scale=0)"]


@pytest.mark.parametrize("argv, says", [
    (["bench", "--out", ""], "--out is empty"),
    (["inspect", "--out", " "], "--out is empty"),
    (["bench", "--dataset", ""], "--dataset is empty"),
    (["bench", "--stride", "513"], "--stride 513 exceeds the 512 text tokens per window (--seq-len 512"),
    (["bench", "--bos", "--seq-len", "32", "--stride", "32"], "less the BOS of --bos"),
])
def test_options_refused_before_the_model_loads(argv, says, capsys):
    from sinkfix.cli import main

    # a model that does not exist: the option must be refused before any load is tried
    assert main([*argv, "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert says in err and "nonexistent" not in err, err


def test_a_profile_bos_that_is_not_a_boolean_is_refused(tmp_path):
    from sinkfix.profile import ModelIdentity, Profile
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    beta = torch.full((model.config.num_hidden_layers, model.config.num_attention_heads), 0.9, dtype=torch.float64)
    path = Profile(ModelIdentity.of(model), beta, calibration={"protocol": {"bos": True}}).save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    data["calibration"]["protocol"]["bos"] = "true"  # read as "not recorded": measured without its BOS, unsaid
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r'calibration.protocol.bos must be true, false or "both", got "true"'):
        Profile.load(path)
