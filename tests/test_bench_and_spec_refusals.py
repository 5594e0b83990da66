"""What the bench and the policy specs did silently: a domain named like the pooled column, a
caller's patch removed, spec items without effect, a second --profile, numbers a profile file
cannot hold, and a bad --policy found only after the texts were read."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import sinkfix
from sinkfix import Policy, ResidualClip
from sinkfix.cli import main
from sinkfix.errors import PolicyError, ProfileError, UsageError
from sinkfix.texts import POOLED_NAME, load_texts

from .test_bench import FAST, PROSE, _load, _save_tiny

REPO = Path(__file__).resolve().parents[1]
STORED_PROFILE = REPO / "benchmarks/results/calibration_lodo/bf16-fits/profile-smollm2-135m-bos.json"


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def test_a_text_named_all_does_not_take_the_pooled_name(tmp_path):
    (tmp_path / "all.txt").write_text(PROSE)
    (tmp_path / "code.py").write_text(PROSE[::-1])
    (tmp_path / "all-2.txt").write_text(PROSE[5:])
    texts = load_texts([tmp_path / "all.txt", tmp_path / "code.py"], reserved=[POOLED_NAME])
    assert list(texts) == ["all-2", "code"] and POOLED_NAME == "all"
    # a file's own name is never taken: all.txt beside all-2.txt is numbered past it
    assert list(load_texts([tmp_path / "all.txt", tmp_path / "all-2.txt"], reserved=[POOLED_NAME])) == ["all-3", "all-2"]
    assert list(load_texts([tmp_path / "all.txt"])) == ["all"]  # other commands have no pooled column


def test_the_bench_json_keeps_a_domain_from_all_txt_apart_from_the_pool(tmp_path, one_thread):
    model = _save_tiny(tmp_path / "tiny", seed=0)
    (tmp_path / "all.txt").write_text(PROSE)
    rc, stdout, stderr = _cli("bench", "--model", str(model), "--text", str(tmp_path / "all.txt"), *FAST,
                              "--policy", "drop", "--json")
    assert rc == 0, stderr
    results = json.loads(stdout)
    assert list(results["domains"]) == ["all-2"]
    for variant in results["variants"]:
        own, pooled = variant["quality"]["all-2"], variant["quality"]["all"]
        assert own["tokens"] == results["domains"]["all-2"]["scored_tokens"] == pooled["tokens"]
        assert own["ppl"] == pooled["ppl"]  # one domain: the pool is that domain


def test_quality_section_refuses_a_domain_named_like_the_pool():
    from sinkfix.bench.results import _quality_section

    with pytest.raises(ValueError, match="may not be named 'all'"):
        _quality_section({"all": (1.0, 2)}, {"all": (1.0, 2)})


def test_run_bench_refuses_a_patched_model_and_leaves_its_patch(tmp_path, one_thread):
    from sinkfix.bench.config import BenchConfig
    from sinkfix.bench.runner import run_bench

    model, tokenizer = _load(_save_tiny(tmp_path / "tiny", seed=0))
    (tmp_path / "prose.txt").write_text(PROSE)
    handle = sinkfix.patch(model, Policy(sink_scale=0.0))
    config = BenchConfig(texts=(str(tmp_path / "prose.txt"),), seq_len=32, max_windows=1, decode_tokens=0,
                         repeats=1, memory_rounds=0, policies=("drop",))
    with pytest.raises(UsageError, match="pass an unpatched model"):
        run_bench(config, model_and_tokenizer=(model, tokenizer))
    assert handle.active and sinkfix.PatchHandle.of(model) is handle


@pytest.mark.parametrize("spec, says", [
    ("extra_sink_positions=", "no position given"),
    ("layers=0::1", "an empty item"),
    ("layers=0:", "an empty item"),
    ("virtual_logit_on_sink_rows=1", "has none"),
    ("clip=inf", "never clips"),
    ("clip_abs=inf", "never clips"),
    ("sink_scale=0.5,n_sink=0", "would change nothing"),
    ("hidden_sink_scale=1", "would change nothing"),
    ("hidden_sink_scale=1,hidden_sink_threshold=0.1", "would change nothing"),
])
def test_spec_items_without_effect_are_refused(spec, says):
    with pytest.raises(PolicyError, match=says):
        Policy.parse(spec)


@pytest.mark.parametrize("spec", ["sink_scale=0.5,n_sink=0,extra_sink_positions=2", "virtual_sink_logit=0,n_sink=0",
                                  "virtual_sink_logit=1,virtual_logit_on_sink_rows=1", "layers=0:3-5", "clip=8"])
def test_specs_with_an_effect_still_parse_and_round_trip(spec):
    policy = Policy.parse(spec)
    assert Policy.parse(policy.describe()) == policy


def test_describe_keeps_one_element_tensors_apart_from_scalars():
    per_head = Policy(sink_scale=[[0.5]])
    assert per_head.describe().startswith("sink_scale=per-head")
    with pytest.raises(PolicyError):
        Policy.parse(per_head.describe())  # refused, never read as a scalar for every model shape
    one_clip = Policy(residual_clip=ResidualClip(torch.tensor(2.0)))
    assert one_clip.describe() == "sink_scale=1,clip=2"
    assert Policy.parse(one_clip.describe()) == one_clip


def test_a_sink_position_listed_twice_is_refused_by_the_constructor():
    with pytest.raises(PolicyError, match="lists 3 twice"):
        Policy(extra_sink_positions=(3, 5, 3))


@pytest.mark.parametrize("command", ["bench", "eval", "inspect", "stream"])
def test_a_second_profile_is_refused(command):
    rc, _, stderr = _cli(command, "--profile", "a.json", "--profile", "b.json")  # a.json does not exist either
    assert rc == 2 and "--profile is given twice (a.json, then b.json)" in stderr


@pytest.mark.parametrize("written, says", [("1e-400", "would read as 0"), ("-2.5e-999", "would read as 0"),
                                           ("1e400", "would read as inf")])
def test_a_profile_number_that_float_cannot_hold_is_refused(tmp_path, written, says):
    text = STORED_PROFILE.read_text()
    first = json.loads(text)["policy"]["sink_scale"][0][0]
    assert repr(first) in text
    path = tmp_path / "p.json"
    path.write_text(text.replace(repr(first), written, 1))
    with pytest.raises(ProfileError, match=says):
        sinkfix.Profile.load(path)
    path.write_text(text.replace(repr(first), "0.0e5", 1))  # a written zero is a zero
    assert float(sinkfix.Profile.load(path).sink_scale[0, 0]) == 0.0


def test_inspect_refuses_a_bad_policy_before_reading_the_texts(tmp_path):
    rc, stdout, stderr = _cli("inspect", "--policy", "bogus", "--out", str(tmp_path / "report"))
    assert rc == 2 and "'bogus' is not key=value" in stderr
    assert "texts" not in stdout and not (tmp_path / "report").exists()


# each with an argument the command refuses at once, so that a regression fails fast instead of running
@pytest.mark.parametrize("command, fails_fast", [("eval", ["--limit", "0"]), ("inspect", ["--seq-len", "1"])])
def test_a_second_policy_is_refused_where_policy_is_not_repeatable(command, fails_fast):
    rc, _, stderr = _cli(command, *fails_fast, "--policy", "drop", "--policy", "sink_scale=0.9")
    assert rc == 2 and "--policy is given twice (drop, then sink_scale=0.9)" in stderr


def test_monitor_run_refuses_a_second_policy():
    rc, _, stderr = _cli("monitor", "run", "--requests", "r.jsonl", "--out", "o.jsonl", "--policy", "drop",
                         "--policy", "sink_scale=0.9")
    assert rc == 2 and "--policy is given twice" in stderr


def test_a_profile_integer_float_cannot_hold_is_refused(tmp_path):
    text = STORED_PROFILE.read_text()
    first = json.loads(text)["policy"]["sink_scale"][0][0]
    path = tmp_path / "p.json"
    path.write_text(text.replace(repr(first), "1" + "0" * 400, 1))
    with pytest.raises(ProfileError, match="too large for a float"):  # an OverflowError traceback before
        sinkfix.Profile.load(path)


def test_a_profile_with_a_sink_position_twice_is_refused_when_built_and_loaded(tmp_path):
    data = json.loads(STORED_PROFILE.read_text())
    data["policy"]["extra_sink_positions"] = [3, 3]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"p.json: profile extra_sink_positions lists 3 twice"):
        sinkfix.Profile.load(path)


def test_a_huge_profile_n_sink_is_named_short(tmp_path):
    data = json.loads(STORED_PROFILE.read_text())
    data["policy"]["n_sink"] = int("1" + "0" * 400)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="n_sink must be at most 1024") as info:
        sinkfix.Profile.load(path)
    assert len(str(info.value)) < 300  # the 401 digits were printed whole
