"""Bad input to ``sinkfix calibrate`` and ``calibrate()``: one clear error before any model is loaded
(CLI: one line, exit code 2), never torch's error after the load or a crash at save."""

from __future__ import annotations

import json
import warnings

import pytest

import sinkfix
from sinkfix.analysis.calibration import CalibrationError, CalibrationSettings, calibrate, calibration_windows, fit_domains
from sinkfix.analysis.lodo import evaluation_windows, leave_one_domain_out
from sinkfix.commands.calibrate import default_out

from .conftest import CharTokenizer, text_args, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")

THREE = {
    "prose": "the cat sat on the mat and the dog sat on the log. " * 30,
    "code": "for i in range(10):\n    total += i * i\n" * 40,
    "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40,
}


@pytest.fixture
def files(tmp_path):
    return text_args(tmp_path, THREE)


def run_cli(capsys, *argv) -> tuple[int, str]:
    from sinkfix import cli

    rc = cli.main(["calibrate", *argv])
    captured = capsys.readouterr()
    return rc, captured.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sinkfix calibrate: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# -- 1. learning rates ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--lr", "--hidden-lr"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_learning_rates_must_be_finite_and_positive(no_model, files, tmp_path, capsys, flag, value):
    rc, err = run_cli(capsys, *files, "--out", str(tmp_path / "p.json"), "--seq-len", "64", f"{flag}={value}")
    assert_one_line_error(rc, err, flag, "finite number > 0")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, -0.5, True])
def test_api_learning_rate_is_checked_before_fitting(lr):
    with pytest.raises(CalibrationError, match=r"lr \(the Adam learning rate\) must be a finite number > 0"):
        CalibrationSettings(lr=lr)
    with pytest.raises(CalibrationError, match="finite number > 0"):
        calibrate(object(), CharTokenizer(), THREE, lr=lr, progress=False)  # refused before the model is touched


# -- 2. regularisation -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "-0.01"])
def test_reg_must_be_finite_and_not_negative(no_model, files, tmp_path, capsys, value):
    rc, err = run_cli(capsys, *files, "--out", str(tmp_path / "p.json"), "--seq-len", "64", "--reg", value)
    assert_one_line_error(rc, err, "--reg", "finite number >= 0")


def test_reg_zero_is_allowed():
    assert CalibrationSettings(reg=0.0).reg == 0.0
    for reg in (float("nan"), -1.0, float("inf")):
        with pytest.raises(CalibrationError, match="reg .* must be a finite number >= 0"):
            CalibrationSettings(reg=reg)


# -- 3. window length --------------------------------------------------------------------------------
@pytest.mark.parametrize("value,bos,minimum", [("1", "--bos", 3), ("2", "--bos", 3), ("0", "--bos", 3),
                                                ("-5", "--bos", 3), ("1", "--no-bos", 2)])
def test_seq_len_needs_two_text_tokens(no_model, files, tmp_path, capsys, value, bos, minimum):
    rc, err = run_cli(capsys, *files, "--out", str(tmp_path / "p.json"), "--seq-len", value, bos)
    assert_one_line_error(rc, err, f"--seq-len must be >= {minimum}", f"got {value}")


@pytest.mark.parametrize("seq_len,bos", [(1, True), (2, True), (0, False), (1, False), (2, "both")])
def test_api_seq_len_too_short(seq_len, bos):
    with pytest.raises(CalibrationError, match=r"seq_len must be >= [23]"):
        CalibrationSettings(seq_len=seq_len, bos=bos)
    with pytest.raises(CalibrationError, match=r"seq_len must be an integer >= [23]"):
        calibration_windows(CharTokenizer(), "abc" * 50, seq_len=seq_len, bos=bos)


@pytest.mark.parametrize("value", [2.5, 64.0, "64", None])
def test_api_seq_len_must_be_an_integer(value):
    with pytest.raises(CalibrationError, match=r"seq_len must be an integer, got"):
        calibrate(object(), CharTokenizer(), THREE, seq_len=value, progress=False)


def test_shortest_windows_work():
    """The smallest accepted lengths give windows with one or more scored tokens."""
    CalibrationSettings(seq_len=3, bos=True, max_tokens=None)
    CalibrationSettings(seq_len=2, bos=False, max_tokens=None)
    assert all(w.numel() == 3 for w in calibration_windows(CharTokenizer(), "abcdef", seq_len=3, bos=True))
    assert all(w.numel() == 2 for w in calibration_windows(CharTokenizer(), "abcdef", seq_len=2, bos=False))


@pytest.mark.parametrize("name", ["steps", "eval_every", "patience", "max_tokens"])
def test_api_counts_must_be_integers(name):
    with pytest.raises(CalibrationError, match=f"{name} must be an integer"):
        CalibrationSettings(**{name: 2.5})


# -- 4. evaluation windows -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_windows_must_be_positive(no_model, files, tmp_path, capsys, value):
    rc, err = run_cli(capsys, *files, "--out", str(tmp_path / "p.json"), "--seq-len", "64", "--evaluate",
                      "--eval-windows", value)
    assert_one_line_error(rc, err, "--eval-windows must be >= 1", f"got {value}")


def test_api_eval_windows_must_be_positive():
    model, tok = tiny_model("llama"), CharTokenizer()
    fits = fit_domains(model, tok, THREE, CalibrationSettings(seq_len=64, steps=3, eval_every=1), progress=False)
    for bad in (0, -1, 1.5):
        with pytest.raises(CalibrationError, match="eval_windows must be an integer >= 1"):
            leave_one_domain_out(model, tok, fits, {"prose": THREE["prose"]}, eval_windows=bad, progress=False)
        with pytest.raises(CalibrationError, match="eval_windows must be an integer >= 1"):
            evaluation_windows(tok, {"prose": THREE["prose"]}, fits, bad)
    windows, _ = evaluation_windows(tok, {"prose": THREE["prose"] * 3}, fits, 2)
    assert len(windows["prose"]) == 2


# -- 5. the default profile name -------------------------------------------------------------------------
def test_default_out_names_a_local_folder_by_its_own_name(tmp_path, monkeypatch):
    (tmp_path / "lm" / "tiny_full").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert default_out("../lm/tiny_full") == "tiny_full.profile.json"
    assert default_out("../lm/tiny_full/") == "tiny_full.profile.json"
    assert default_out(str(tmp_path / "lm" / "tiny_full")) == "tiny_full.profile.json"
    monkeypatch.chdir(tmp_path / "lm" / "tiny_full")
    assert default_out(".") == "tiny_full.profile.json"
    # registry names and hub ids (not folders here) keep their names
    assert default_out("smollm2-135m") == "smollm2-135m.profile.json"
    assert default_out("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB_SmolLM2-135M.profile.json"


def test_cli_writes_the_default_profile_name_of_a_relative_folder(monkeypatch, tmp_path, files, capsys):
    (tmp_path / "lm" / "tiny_full").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    from sinkfix import cli

    rc = cli.main(["calibrate", "--model", "../lm/tiny_full", *files, "--seq-len", "64", "--steps", "3",
                           "--no-statistics"])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert written == ["tiny_full.profile.json"]
    assert json.loads((tmp_path / "work" / written[0]).read_text())["format"] == "sinkfix-profile"


# -- 6. the same text twice ---------------------------------------------------------------------------------
def test_same_file_twice_is_refused(no_model, files, tmp_path, capsys):
    again = ["--text", files[1]]
    rc, err = run_cli(capsys, *files, *again, "--out", str(tmp_path / "p.json"), "--seq-len", "64")
    assert_one_line_error(rc, err, "given twice", "'prose-2'", "'prose'")


def test_two_files_with_one_content_are_refused(no_model, files, tmp_path, capsys):
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "notes.txt").write_text(THREE["code"])
    rc, err = run_cli(capsys, *files, "--text", str(tmp_path / "copy" / "notes.txt"), "--out",
                      str(tmp_path / "p.json"), "--seq-len", "64")
    assert_one_line_error(rc, err, "given twice", "'notes'", "'code'")


def test_same_stem_different_text_is_fine(load_reached, files, tmp_path, capsys):
    """Two files of one stem and different text are two domains (prose, prose-2): not refused as copies."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "prose.txt").write_text("a bird flew over the wall and a fox ran past the hall. " * 30)
    rc, err = run_cli(capsys, *files, "--text", str(tmp_path / "other" / "prose.txt"), "--out",
                      str(tmp_path / "p.json"), "--seq-len", "64")
    assert rc == 2 and "reached the model load" in err
    assert "given twice" not in err


def test_api_warns_about_identical_texts():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"one calibration text given twice: 'copy' is 'prose' again"):
        fit_domains(model, CharTokenizer(), {"prose": THREE["prose"], "code": THREE["code"], "copy": THREE["prose"]},
                    CalibrationSettings(seq_len=64, steps=0), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_domains(model, CharTokenizer(), THREE, CalibrationSettings(seq_len=64, steps=0), progress=False)


# -- the other numeric options -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needles", [
    (["--steps", "-1"], ["--steps must be >= 0"]),
    (["--steps", "2"], ["--steps 2 split evenly among 3 domains leaves 1 of them 0 steps"]),
    (["--sinks", "hidden", "--hidden-steps", "1"], ["--hidden-steps 1 split evenly among 3 domains leaves 2 of them 0"]),
    (["--val-fraction", "nan"], ["--val-fraction must lie in [0, 1)"]),
    (["--val-fraction", "1"], ["--val-fraction must lie in [0, 1)"]),
    (["--val-fraction", "-0.1"], ["--val-fraction must lie in [0, 1)"]),
    (["--val-fraction", "0"], ["--val-fraction must be > 0 with --rule robust"]),
    (["--max-tokens", "0"], ["--max-tokens must be >= 1"]),
    (["--max-tokens", "100"], ["--max-tokens 100 cannot give a text the 2 full 64-token window(s)", "at least 126"]),
    (["--statistics-windows", "0"], ["--statistics-windows must be >= 1"]),
    (["--threads", "0"], ["--threads must be >= 1"]),
    (["--sinks", "hidden", "--hidden-threshold", "nan"], ["threshold must lie in (0, 1)"]),
    (["--sinks", "combined", "--hidden-init-beta", "1"], ["beta must lie in (0, 1)"]),
])
def test_other_numeric_options(no_model, files, tmp_path, capsys, argv, needles):
    rc, err = run_cli(capsys, *files, "--out", str(tmp_path / "p.json"), "--seq-len", "64", *argv)
    assert_one_line_error(rc, err, *needles)


def test_accepted_edge_values_reach_the_model_load(load_reached, files, tmp_path, capsys):
    """Values that mean something are not refused: steps 0 (the identity), reg 0, val fraction 0 pooled."""
    for argv in (["--steps", "0"], ["--reg", "0"], ["--rule", "pooled", "--val-fraction", "0", "--max-tokens", "63"],
                 ["--steps", "3"], ["--evaluate", "--eval-windows", "1"]):
        rc, err = run_cli(capsys, *files, "--out", str(tmp_path / "p.json"), "--seq-len", "64", *argv)
        assert rc == 2 and "reached the model load" in err, (argv, err)


def test_api_max_tokens_too_short_for_the_windows():
    with pytest.raises(CalibrationError, match=r"max_tokens 100 cannot give a domain the 2 full 64-token window"):
        CalibrationSettings(seq_len=64, max_tokens=100)
    CalibrationSettings(seq_len=64, max_tokens=63, val_fraction=0.0)  # one window, no validation: enough


def test_api_robust_steps_below_the_number_of_domains_warn():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="leaves 1 of them 0 steps"):
        fit_domains(model, CharTokenizer(), THREE, CalibrationSettings(seq_len=64, steps=2), progress=False)


@pytest.mark.parametrize("field, value", [("lr", float("nan")), ("lr", 0.0), ("lr", float("inf")), ("reg", -0.1),
                                          ("reg", float("nan"))])
def test_hidden_sink_settings_refuse_a_rate_or_weight_that_means_nothing(field, value):
    from sinkfix.analysis.content_calibration import HiddenSettings

    with pytest.raises(CalibrationError, match="hidden-sink"):
        HiddenSettings(**{field: value})


def test_eval_windows_without_evaluate_is_refused(no_model, files, tmp_path, capsys):
    rc, err = run_cli(capsys, *files, "--out", str(tmp_path / "p.json"), "--seq-len", "64", "--eval-windows", "4")
    assert_one_line_error(rc, err, "--eval-windows sets how --evaluate scores each domain")


def test_one_dataset_with_the_robust_rule_is_refused_before_it_is_loaded(no_model, tmp_path, capsys, monkeypatch):
    """A --dataset is one domain, which the default robust rule cannot calibrate: the error came after the
    set was downloaded and read."""
    import sinkfix.texts

    def no_download(*args, **kwargs):
        raise AssertionError("the dataset was loaded")

    monkeypatch.setattr(sinkfix.texts, "load_dataset_text", no_download)
    rc, err = run_cli(capsys, "--dataset", "wikitext:wikitext-2-raw-v1", "--out", str(tmp_path / "p.json"))
    assert_one_line_error(rc, err, "needs at least two domains", "only 'wikitext' is", "--rule pooled")


@pytest.mark.parametrize("command", ["calibrate", "inspect", "bench"])
def test_dataset_given_twice_is_refused(command, capsys):
    """argparse kept the last of two --dataset options, unsaid."""
    from sinkfix import cli

    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--dataset", "a", "--dataset", "b"])
    assert exited.value.code == 2
    assert "--dataset is given twice (a, then b): give it once" in capsys.readouterr().err


def test_only_calibrate_tells_a_dataset_to_use_rule_pooled(capsys):
    """monitor ranges shares calibrate's text options but has no --rule: its --dataset help named it."""
    from sinkfix import cli

    for argv, says in ((["calibrate", "--help"], True), (["monitor", "ranges", "--help"], False)):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert ("--rule pooled (the default robust rule" in " ".join(capsys.readouterr().out.split())) is says
