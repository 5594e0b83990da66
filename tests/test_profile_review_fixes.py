"""Profiles, ``sinkfix calibrate`` and ``sinkfix inspect``: the defects a black-box review found, each
pinned by a test that failed before its fix."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

import sinkfix
from sinkfix.analysis.calibration import CalibrationError, CalibrationSettings, calibrate, fit_domains
from sinkfix.analysis.inspection import InspectionReport, inspect
from sinkfix.analysis.lodo import evaluation_windows
from sinkfix.analysis.metrics import ExtremeTokenMetrics
from sinkfix.errors import PolicyError, ProfileError, UsageError
from sinkfix.policy import ContentSinks, Policy
from sinkfix.profile import ModelIdentity, Profile, weights_fingerprint

from .conftest import CharTokenizer, text_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

TEXTS = {
    "prose": "the cat sat on the mat and the dog sat on the log. " * 30,
    "code": "for i in range(10):\n    total += i * i\n" * 40,
    "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40,
}


def _profile(model, **kwargs) -> Profile:
    beta = torch.linspace(0.5, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    return Profile(ModelIdentity.of(model), beta, **kwargs)


def _cli(capsys, command: str, *argv) -> tuple[int, str]:
    from sinkfix import cli

    rc = cli.main([command, *argv])
    return rc, capsys.readouterr().err


def _one_line_error(rc: int, err: str, command: str, *needles: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sinkfix {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


# -- 1. the pooled rule without validation windows ---------------------------------------------------
def test_pooled_rule_with_val_fraction_zero_writes_a_profile(tmp_path):
    """It ran the whole fit, then divided by the zero validation windows in the record."""
    model = tiny_model("llama", seed=3)
    profile = calibrate(model, CharTokenizer(), {"a": TEXTS["prose"], "b": TEXTS["code"]}, rule="pooled",
                        val_fraction=0, seq_len=32, max_tokens=200, steps=3, progress=False)
    record = profile.calibration
    assert record["texts"]["a"]["val_windows"] == 0 and record["validation"].startswith("none")
    assert record["nll"] == {"val_before": None, "val_after": None}
    assert record["ppl_change"]["val"] is None and record["ppl_change"]["val_per_domain"] == {"a": None, "b": None}
    assert record["fits"]["pooled"]["best_step"] == 3 and record["fits"]["pooled"]["val_nll_before"] is None
    assert not torch.equal(profile.sink_scale, torch.ones(2, 4, dtype=torch.float64))  # the last step's parameters
    loaded = Profile.load(profile.save(tmp_path / "p.json"))  # JSON without NaN
    assert loaded.calibration["validation"] == record["validation"]


def test_pooled_rule_with_val_fraction_zero_on_the_command_line(loaded_tiny, tmp_path, capsys):
    from sinkfix import cli

    out = tmp_path / "p.json"
    assert cli.main(["calibrate", *text_args(tmp_path, {"a": TEXTS["prose"], "b": TEXTS["code"]}), "--seq-len", "32",
                     "--max-tokens", "200", "--rule", "pooled", "--val-fraction", "0", "--steps", "2",
                     "--no-statistics", "--out", str(out)]) == 0
    assert Profile.load(out).calibration["nll"]["val_before"] is None
    assert "validation: none" in capsys.readouterr().out


# -- 2. the same model in another precision ----------------------------------------------------------
def _old_fingerprint(model) -> str:
    """The fingerprint as sinkfix computed it before cast fingerprints existed."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(flat[::step][:4096].to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def test_the_fingerprint_itself_is_unchanged():
    """Profiles written before keep fitting their models."""
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", seed=3).to(dtype)
        assert weights_fingerprint(model) == _old_fingerprint(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_float32_profile_fits_the_same_model_cast(dtype):
    """Calibration fits float32 models; the profile was refused as "another model" in half precision."""
    profile = _profile(tiny_model("llama", seed=3))
    model = tiny_model("llama", seed=3).to(dtype)
    profile.check(model)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad(), sinkfix.patch(model, profile) as handle:
        model(input_ids=ids)
        assert torch.equal(torch.stack([lp.beta for lp in handle.layer_policies()]), profile.sink_scale)
    with pytest.raises(ProfileError, match="weights fingerprint"):  # another model in that precision
        profile.check(tiny_model("llama", seed=4).to(dtype))


@pytest.mark.parametrize("fitted", [torch.bfloat16, torch.float16])
def test_a_half_precision_profile_fits_the_float32_model(fitted):
    profile = _profile(tiny_model("llama", seed=3).to(fitted))
    assert profile.model.dtype == str(fitted).removeprefix("torch.")
    profile.check(tiny_model("llama", seed=3))
    profile.check(tiny_model("llama", seed=3).to(fitted))
    with pytest.raises(ProfileError, match="weights fingerprint"):
        profile.check(tiny_model("llama", seed=4))


def test_bfloat16_and_float16_cannot_be_compared_and_say_so():
    profile = _profile(tiny_model("llama", seed=3).to(torch.bfloat16))
    with pytest.raises(ProfileError, match=r"fitted on bfloat16 weights and this model's are float16.*"
                                           r"without_weights_check"):
        profile.check(tiny_model("llama", seed=3).to(torch.float16))
    profile.without_weights_check().check(tiny_model("llama", seed=3).to(torch.float16))


def test_cast_fingerprints_round_trip(tmp_path):
    profile = _profile(tiny_model("llama", seed=3))
    data = json.loads(profile.save(tmp_path / "p.json").read_text())
    assert data["model"]["fingerprint_dtype"] == "float32"
    assert set(data["model"]["cast_fingerprints"]) == {"bfloat16", "float16"}
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded.model == profile.model
    loaded.check(tiny_model("llama", seed=3).to(torch.bfloat16))
    data["model"]["cast_fingerprints"] = {"bfloat16": 5}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="model.cast_fingerprints"):
        Profile.load(tmp_path / "bad.json")


def test_an_old_profile_on_a_half_precision_model_says_what_to_do(tmp_path):
    model = tiny_model("llama", seed=3)
    data = _profile(model).to_dict()
    del data["model"]["fingerprint_dtype"], data["model"]["cast_fingerprints"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = Profile.load(tmp_path / "old.json")  # loads unchanged
    assert old.model.dtype is None and old.model.cast_fingerprints == ()
    assert old.model.fingerprint == _old_fingerprint(model)
    old.check(tiny_model("llama", seed=3))
    half = tiny_model("llama", seed=3).to(torch.bfloat16)
    with pytest.raises(ProfileError, match=r"weights are bfloat16.*without_weights_check\(\)"):
        sinkfix.patch(half, old)
    with torch.no_grad(), sinkfix.patch(half, old.without_weights_check()):  # reachable through patch()
        half(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ProfileError, match="architecture"):  # the shape checks stay
        old.without_weights_check().check(tiny_model("mistral", seed=3))


# -- 3. hand-edited domains and calibration records ---------------------------------------------------
@pytest.mark.parametrize("edit, field", [
    (lambda d: d.__setitem__("domains", {"a": [1, 2, 3]}), "domain 'a'"),
    (lambda d: d.__setitem__("domains", {"a": 5}), "domain 'a'"),
    (lambda d: d["calibration"].__setitem__("selection", "x"), "calibration.selection"),
    (lambda d: d["calibration"].__setitem__("selection", {"chosen": 3}), "calibration.selection.chosen"),
    (lambda d: d["calibration"].__setitem__("texts", 5), "calibration.texts"),
    (lambda d: d["calibration"].__setitem__("domain_robust", "no"), "calibration.domain_robust"),
    (lambda d: d["calibration"].__setitem__("rule", ["pooled"]), "calibration.rule"),
])
def test_malformed_domains_and_records_are_profile_errors(tmp_path, edit, field):
    data = _profile(tiny_model("llama", seed=3), calibration={"rule": "robust", "domain_robust": True,
                                                               "texts": {"a": {}, "b": {}},
                                                               "selection": {"chosen": "mean x1"}}).to_dict()
    assert Profile.from_dict(copy.deepcopy(data)).describe()
    edit(data)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=re.escape(field)):
        Profile.load(tmp_path / "p.json")


# -- 4. n_sink has a maximum ---------------------------------------------------------------------------
def test_n_sink_above_the_maximum_is_refused(tmp_path):
    """patch() built set(range(n_sink)): 1e8 exhausted memory."""
    for n in (1025, 10**8, 10**30):
        with pytest.raises(PolicyError, match="n_sink must be at most 1024"):
            Policy(n_sink=n)
    from sinkfix.policy import MAX_N_SINK

    assert MAX_N_SINK == 1024
    assert Policy(n_sink=MAX_N_SINK).resolve(1, [2])[0].sink_positions == tuple(range(MAX_N_SINK))
    with pytest.raises(PolicyError, match="at most 1024"):
        Policy.parse("n_sink=100000000")
    data = _profile(tiny_model("llama", seed=3)).to_dict()
    data["policy"]["n_sink"] = 10**8
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"n_sink must be at most 1024 .*got 100000000"):
        Profile.load(tmp_path / "p.json")


# -- 5. a text of one token ----------------------------------------------------------------------------
def test_a_one_token_text_is_named_with_the_minimum():
    model = tiny_model("llama", seed=3)
    texts = {"prose": TEXTS["prose"], "one": "x"}
    with pytest.raises(CalibrationError, match=r"text 'one' is too short: .*at least 126 tokens"):
        calibrate(model, CharTokenizer(), texts, seq_len=64, max_tokens=300, steps=2, progress=False)
    with pytest.raises(UsageError, match=r"text 'one' is too short: 1 token\(s\), fewer than the 2 needed"):
        inspect(model, CharTokenizer(), texts, seq_len=64, max_tokens=200, progress=False)


def test_a_one_token_text_on_the_command_lines(loaded_tiny, tmp_path, capsys):
    files = text_args(tmp_path, {"prose": TEXTS["prose"], "code": TEXTS["code"], "one": "x"})
    rc, err = _cli(capsys, "calibrate", *files, "--seq-len", "64", "--max-tokens", "300", "--steps", "3",
                   "--out", str(tmp_path / "p.json"))
    _one_line_error(rc, err, "calibrate", "text 'one' is too short", "at least 126 tokens")
    rc, err = _cli(capsys, "inspect", *files, "--seq-len", "64", "--max-tokens", "200", "--no-figures",
                   "--out", str(tmp_path / "insp"))
    _one_line_error(rc, err, "inspect", "text 'one' is too short", "fewer than the 2 needed")


# -- 6. windows beyond the model's positions -----------------------------------------------------------
def test_windows_beyond_the_model_positions_are_refused():
    gpt2 = tiny_model("gpt2", seed=3)  # 256 positions: an IndexError from its position table before
    with pytest.raises(UsageError, match=r"seq_len 300: window length 300 is larger.*max_position_embeddings = 256"):
        inspect(gpt2, CharTokenizer(), TEXTS["prose"], seq_len=300, max_tokens=None, progress=False)
    inspect(gpt2, CharTokenizer(), TEXTS["prose"], seq_len=300, max_tokens=100, progress=False)  # windows of 101
    llama = tiny_model("llama", seed=3)  # RoPE: ran past its 256 positions without a word
    for rule in ("robust", "pooled"):
        with pytest.raises(CalibrationError, match=r"seq_len 300 is larger than .*max_position_embeddings = 256"):
            calibrate(llama, CharTokenizer(), TEXTS, rule=rule, seq_len=300, max_tokens=None, steps=0,
                      progress=False)


def test_seq_len_beyond_the_positions_on_the_command_lines(loaded_tiny, tmp_path, capsys):
    files = text_args(tmp_path, TEXTS)
    rc, err = _cli(capsys, "calibrate", *files, "--seq-len", "300", "--max-tokens", "600", "--steps", "3",
                   "--no-statistics", "--out", str(tmp_path / "p.json"))
    _one_line_error(rc, err, "calibrate", "--seq-len 300 is larger than", "max_position_embeddings = 256")
    assert not (tmp_path / "p.json").exists()
    rc, err = _cli(capsys, "inspect", *files, "--seq-len", "300", "--no-figures", "--out", str(tmp_path / "i"))
    _one_line_error(rc, err, "inspect", "--seq-len 300 is larger than", "max_position_embeddings = 256")


# -- 7. --eval-windows applies to domains scored on their validation windows ---------------------------
def test_validation_windows_caps_the_windows_of_text_domains():
    settings = CalibrationSettings(seq_len=32, max_tokens=None, steps=0, val_fraction=0.5)
    fits = fit_domains(tiny_model("llama", seed=3), CharTokenizer(), TEXTS, settings, progress=False)
    assert all(len(fits.windows[d].val) >= 3 for d in TEXTS)
    windows, sources = evaluation_windows(CharTokenizer(), {d: None for d in TEXTS}, fits, eval_windows=8,
                                          validation_windows=2)
    assert {d: len(w) for d, w in windows.items()} == {d: 2 for d in TEXTS}
    assert set(sources.values()) == {"validation windows"}
    assert all(torch.equal(windows[d][i].input_ids, fits.windows[d].val[i]) for d in TEXTS for i in range(2))


def test_calibrate_evaluate_applies_eval_windows_to_text_domains(loaded_tiny, monkeypatch, tmp_path, capsys):
    """--text domains have no evaluation split: every validation window was scored, whatever
    --eval-windows said, under a title saying "first N"."""
    from sinkfix import cli
    from sinkfix.analysis import lodo

    scored = {}

    def recording(*args, **kwargs):
        windows, sources = real(*args, **kwargs)
        scored.update({d: len(w) for d, w in windows.items()})
        return windows, sources

    real = lodo.evaluation_windows
    monkeypatch.setattr(lodo, "evaluation_windows", recording)
    assert cli.main(["calibrate", *text_args(tmp_path, TEXTS), "--seq-len", "32", "--max-tokens", "400",
                     "--steps", "3", "--no-statistics", "--evaluate", "--eval-windows", "1",
                     "--out", str(tmp_path / "p.json")]) == 0
    assert scored == {d: 1 for d in TEXTS}
    assert "the first 1 of each domain's evaluation text (or of its validation windows" in \
        " ".join(capsys.readouterr().out.split())


# -- 8. inspect refuses content-dependent sinks before the model loads ---------------------------------
def test_inspect_refuses_content_sinks_before_loading(no_model, tmp_path, capsys):
    path = _profile(tiny_model("llama", seed=3),
                    content_sinks=ContentSinks(threshold=0.1, hidden_sink_scale=0.5)).save(tmp_path / "content.json")
    files = text_args(tmp_path, {"prose": TEXTS["prose"]})
    rc, err = _cli(capsys, "inspect", *files, "--no-figures", "--seq-len", "64", "--profile", str(path),
                   "--out", str(tmp_path / "i"))
    _one_line_error(rc, err, "inspect", "content-mode profile", "content-dependent sinks")
    rc, err = _cli(capsys, "inspect", *files, "--no-figures", "--seq-len", "64", "--policy", "hidden_sink_scale=0.5",
                   "--out", str(tmp_path / "i"))
    _one_line_error(rc, err, "inspect", "hidden_sink_scale=0.5", "content-dependent sinks")


# -- 9. calibrate: values always checked, ignored options refused -------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["--hidden-threshold", "5"], ["--hidden-threshold", "threshold must lie in (0, 1)"]),
    (["--hidden-init-beta", "1.5"], ["--hidden-init-beta", "beta must lie in (0, 1)"]),
    (["--hidden-steps", "-1"], ["--hidden-steps must be >= 0"]),
    (["--hidden-threshold", "0.2"], ["--hidden-threshold", "--sinks positional fits none"]),
    (["--sinks", "positional", "--hidden-steps", "30", "--hidden-lr", "0.1"],
     ["--hidden-steps, --hidden-lr", "--sinks positional fits none"]),
    (["--no-statistics", "--statistics-windows", "0"], ["--statistics-windows must be >= 1"]),
    (["--no-statistics", "--statistics-windows", "4"], ["--statistics-windows", "--no-statistics measures none"]),
    (["--no-virtual-logits", "--virtual-on-sink-rows"], ["--virtual-on-sink-rows", "--no-virtual-logits fits none"]),
    (["--no-virtual-logits", "--no-virtual-on-sink-rows"], ["--no-virtual-on-sink-rows", "--no-virtual-logits"]),
])
def test_calibrate_refuses_ignored_and_invalid_options(no_model, tmp_path, capsys, argv, needles):
    rc, err = _cli(capsys, "calibrate", *text_args(tmp_path, TEXTS), "--seq-len", "64",
                   "--out", str(tmp_path / "p.json"), *argv)
    _one_line_error(rc, err, "calibrate", *needles)


@pytest.mark.parametrize("argv", [["--sinks", "hidden", "--hidden-threshold", "0.2", "--hidden-steps", "30"],
                                  ["--statistics-windows", "4"], ["--virtual-on-sink-rows"],
                                  ["--no-virtual-logits", "--no-statistics"]])
def test_calibrate_accepts_options_that_apply(load_reached, tmp_path, capsys, argv):
    rc, err = _cli(capsys, "calibrate", *text_args(tmp_path, TEXTS), "--seq-len", "64",
                   "--out", str(tmp_path / "p.json"), *argv)
    assert rc == 2 and "reached the model load" in err, err


# -- 10. describe() names the version it read ----------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_describe_names_one_format_version(tmp_path, version):
    data = _profile(tiny_model("llama", seed=3), calibration={"rule": "pooled"}).to_dict()
    data["version"] = version
    (tmp_path / "p.json").write_text(json.dumps(data))
    text = Profile.load(tmp_path / "p.json").describe()
    assert set(re.findall(r"format version (\d+)", text)) == {str(version)}, text


# -- 11. the docs say how many windows --evaluate scores -----------------------------------------------
def test_docs_state_the_evaluate_default():
    from sinkfix.commands.calibrate import EVAL_WINDOWS

    protocol = (ROOT / "docs" / "calibration.md").read_text().split("## Protocol", 1)[1].split("\n## ", 1)[0]
    bullet = protocol.split("* **Leave-one-domain-out**", 1)[1].split("\n* ", 1)[0]
    assert f"{EVAL_WINDOWS} by default with `sinkfix calibrate --evaluate`" in " ".join(bullet.split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"`sinkfix calibrate --evaluate` scores the first {EVAL_WINDOWS}" in readme


# -- 12. inspect's combined peak ------------------------------------------------------------------------
def _metrics(windows: int, position: int, token: int, counts: dict[int, int]) -> ExtremeTokenMetrics:
    return ExtremeTokenMetrics(sink_share=torch.zeros(1, 2, dtype=torch.float64),
                               value_drain=torch.zeros(1, 2, dtype=torch.float64),
                               residual_peak=torch.ones(1, dtype=torch.float64), peak_positions=[position],
                               peak_tokens=[token], peak_position_counts=[counts],
                               hidden_sink_tokens=[{token: windows}], windows=windows, tokens=64 * windows)


def test_the_overall_peak_is_where_most_windows_peak():
    """The first domain's peak (2 windows at position 7) was reported for all 12 windows."""
    report = InspectionReport({}, {}, {"small": _metrics(2, 7, 40, {7: 2}), "large": _metrics(10, 0, 1, {0: 10})})
    overall = report.overall
    assert (overall.peak_positions, overall.peak_tokens) == ([0], [1])
    assert overall.peak_position_counts == [{0: 10, 7: 2}]
    assert overall.hidden_sink_tokens == [{1: 10, 40: 2}]
    # with the full counts inspect() keeps: a pair that is no domain's own peak can win overall
    counts = {"small": [Counter({(7, 40): 2, (3, 9): 2})], "large": [Counter({(0, 1): 3, (3, 9): 2})]}
    domains = {"small": _metrics(4, 7, 40, {7: 2, 3: 2}), "large": _metrics(5, 0, 1, {0: 3, 3: 2})}
    report = InspectionReport({}, {}, domains, peak_counts=counts)
    assert (report.overall.peak_positions, report.overall.peak_tokens) == ([3], [9])


def test_inspect_reports_the_combined_peak_with_its_token():
    model = tiny_model("llama", seed=3)
    report = inspect(model, CharTokenizer(), {"a": TEXTS["prose"], "b": TEXTS["code"]}, seq_len=32, max_tokens=200,
                     progress=False)
    overall = report.overall
    for layer, position in enumerate(overall.peak_positions):
        pairs = sum((report.peak_counts[d][layer] for d in ("a", "b")), Counter())
        assert pairs[(position, overall.peak_tokens[layer])] == max(pairs.values())
        assert overall.peak_tokens[layer] in report.token_strings
