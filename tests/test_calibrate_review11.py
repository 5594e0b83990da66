"""`sinkfix calibrate` and profiles in the cases review 11 found wrong: options --sinks hidden ignored and
recorded as used, --evaluate ignored with --rule pooled, one text twice that the string comparison missed,
domain names read as rich markup, window counts and intervals that said more than was scored, an empty
--out, overlapping bos="both" windows, an old profile made domain-robust by saving it, a progress bar
redrawn complete after Ctrl-C, and a "too short" message that contradicted itself."""

from __future__ import annotations

import json

import pytest
import torch

from sinkfix import cli
from sinkfix.analysis.calibration import (CalibrationError, CalibrationSettings, Progress, calibration_windows,
                                          domain_windows, fit_domains)
from sinkfix.errors import ProfileError
from sinkfix.profile import ModelIdentity, Profile

from .conftest import CharTokenizer, text_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

THREE = {"prose": "the cat sat on the mat and the dog sat on the log. " * 30,
         "code": "for i in range(10):\n    total += i * i\n" * 40,
         "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40}
SMALL = ["--seq-len", "64", "--steps", "6", "--no-statistics"]


def _one_line_error(capsys, *argv) -> str:
    rc = cli.main(["calibrate", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    return err


# -- F1: options that would do nothing are refused ------------------------------------------------
def test_positional_options_are_refused_with_sinks_hidden(no_model, tmp_path, capsys):
    files = text_args(tmp_path, THREE)
    err = _one_line_error(capsys, *files, "--sinks", "hidden", "--steps", "3", "--lr", "9", "--reg", "2",
                          "--precision", "bfloat16", "--no-virtual-logits", "--out", str(tmp_path / "p.json"))
    assert "--steps, --lr, --reg, --precision, --no-virtual-logits set the positional-sink fit" in err
    err = _one_line_error(capsys, *files, "--sinks", "hidden", "--virtual-on-sink-rows", "--out",
                          str(tmp_path / "p.json"))
    assert err.count("--virtual-on-sink-rows") == 1 and "sets the positional-sink fit" in err
    # the same value as the default, given on purpose, is still given
    err = _one_line_error(capsys, *files, "--sinks", "hidden", "--steps", "150", "--out", str(tmp_path / "p.json"))
    assert "--steps sets" in err
    assert not (tmp_path / "p.json").exists()
    # refused before the texts are read and listed on stdout (a one-line refusal came after six lines)
    assert cli.main(["calibrate", *files, "--sinks", "hidden", "--steps", "20", "--out", str(tmp_path / "p.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1


def test_a_hidden_profile_records_only_the_settings_its_fits_read(loaded_tiny, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = cli.main(["calibrate", *text_args(tmp_path, THREE), "--sinks", "hidden", "--seq-len", "64",
                   "--max-tokens", "640", "--hidden-steps", "6", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    record = json.loads(out.read_text())["calibration"]
    assert record["hyper"] == {"val_fraction": 0.25, "max_tokens": 640}
    assert record["hidden"]["steps"] == 6


def test_evaluate_with_rule_pooled_is_refused(no_model, tmp_path, capsys):
    files = text_args(tmp_path, THREE)
    for extra in ([], ["--eval-windows", "5"]):
        err = _one_line_error(capsys, *files, "--rule", "pooled", "--evaluate", *extra, "--out",
                              str(tmp_path / "p.json"))
        assert "--evaluate" in err and "--rule robust" in err


# -- F2: one text twice, as far as a calibration reads it -----------------------------------------
@pytest.mark.parametrize("copy, extra", [
    (THREE["prose"] + "\n", []),  # one more trailing newline
    (" " + THREE["prose"], []),  # one leading space: every window's cut moves by a token
    ("\n" + THREE["prose"], []),  # one leading blank line
    (THREE["prose"] + THREE["list"], ["--max-tokens", "1000"]),  # goes on only past the tokens read
])
def test_a_copy_that_differs_outside_the_windows_is_refused(loaded_tiny, tmp_path, capsys, copy, extra):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "copy.txt").write_text(copy)
    out = tmp_path / "p.json"
    err = _one_line_error(capsys, *text_args(tmp_path, THREE), "--text", str(tmp_path / "other" / "copy.txt"),
                          *SMALL, *extra, "--out", str(out))
    assert "given twice" in err and "'copy'" in err and "'prose'" in err and "token runs recur" in err
    assert not out.exists()


@pytest.mark.parametrize("copy", [THREE["prose"] + "\n", " " + THREE["prose"]])
def test_the_library_warns_about_texts_with_identical_windows(copy):
    texts = {**THREE, "copy": copy}
    with pytest.warns(UserWarning, match=r"one calibration text given twice: 'copy' is 'prose' again"):
        fit_domains(tiny_model("llama"), CharTokenizer(), texts, CalibrationSettings(seq_len=64, steps=0),
                    progress=False)


# -- F3, F4, F5: what the tables print ------------------------------------------------------------
def test_domain_names_are_printed_verbatim_and_one_window_has_no_interval(loaded_tiny, tmp_path, capsys):
    named = {"notes[i]": THREE["prose"], "[bold]src": THREE["code"], "x[:]": THREE["list"]}
    rc = cli.main(["calibrate", *text_args(tmp_path, named), *SMALL, "--evaluate", "--eval-windows", "1",
                   "--out", str(tmp_path / "p.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = captured.out
    for name in named:
        # the log lines, the fits table, the selection table's columns, the summary, the LODO rows
        assert text.count(name) >= 5, (name, text)
    assert "over notes[i], [bold]src, x[:]" in " ".join(text.split())
    # one window drawn with replacement is that window every time: no interval, not a zero-width one
    assert "[n/a: 1" in text and "no interval" in text


def test_the_lodo_title_says_when_a_domain_had_fewer_windows(loaded_tiny, tmp_path, capsys):
    rc = cli.main(["calibrate", *text_args(tmp_path, THREE), *SMALL, "--evaluate", "--eval-windows", "100",
                   "--out", str(tmp_path / "p.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = " ".join(captured.out.split())
    assert "the first 100 (fewer where a text has fewer: 'windows')" in text
    assert "┃ windows ┃" in text


def test_guard_statistics_record_the_windows_each_text_gave(loaded_tiny, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = cli.main(["calibrate", *text_args(tmp_path, dict(list(THREE.items())[:2])), "--seq-len", "64",
                   "--steps", "2", "--statistics-windows", "500", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    protocol = data["statistics"]["protocol"]
    assert protocol["windows_per_text"] == 500  # the number asked for
    used = protocol["windows_used"]
    assert set(used) == {"prose", "code"} and all(0 < n < 500 for n in used.values())
    assert sum(used.values()) == data["statistics"]["windows"]
    # a file written before windows_used still loads
    del protocol["windows_used"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Profile.load(tmp_path / "old.json").statistics.protocol["windows_per_text"] == 500


# -- F6 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_refused(no_model, tmp_path, capsys, out):
    err = _one_line_error(capsys, *text_args(tmp_path, THREE), "--out", out)
    assert "--out is empty" in err


# -- F7: bos="both" windows tile the text ---------------------------------------------------------
def _bodies(windows):
    """Each window's text tokens and whether it starts with BOS (CharTokenizer: BOS 1, text ids >= 2)."""
    return [(w[1:].tolist(), True) if int(w[0]) == 1 else (w.tolist(), False) for w in windows]


def test_both_windows_tile_the_text_without_overlap_or_gaps():
    text = THREE["prose"] + THREE["code"]
    ids = [2 + ord(c) % 90 for c in text]
    L = 16
    windows = calibration_windows(CharTokenizer(), text, seq_len=L, bos="both", max_tokens=16 * 15)
    bodies = _bodies(windows)
    assert [b for _, b in bodies] == [i % 2 == 0 for i in range(len(bodies))]
    assert all(len(w) == L for w in windows)
    joined = [t for body, _ in bodies for t in body]
    assert joined == ids[:len(joined)]  # in order, each token once, none skipped
    assert len(ids[:16 * 15]) - len(joined) < L  # only a last partial window is left


def test_both_calibration_and_validation_windows_share_no_token():
    text = THREE["code"]
    settings = CalibrationSettings(seq_len=64, bos="both", max_tokens=16 * 64)
    dw = domain_windows(CharTokenizer(), {"x": text}, settings)["x"]
    calib = [t for body, _ in _bodies(dw.calib) for t in body]
    val = [t for body, _ in _bodies(dw.val) for t in body]
    ids = [2 + ord(c) % 90 for c in text]
    assert calib + val == ids[:len(calib) + len(val)]


def test_bos_true_windows_are_unchanged():
    text = THREE["prose"]
    ids = [2 + ord(c) % 90 for c in text]
    windows = calibration_windows(CharTokenizer(), text, seq_len=64, bos=True, max_tokens=8192)
    expected = [[1] + ids[s:s + 63] for s in range(0, len(ids) - 63 + 1, 63)]
    assert [w.tolist() for w in windows] == expected


# -- F8: an old profile saved again ---------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_an_old_profile_saved_again_is_still_not_domain_robust(tmp_path, version):
    profile = Profile(ModelIdentity.of(tiny_model("llama", seed=3)), torch.full((2, 4), 0.9),
                      calibration={"domain_robust": True, "rule": "robust", "texts": {"prose": {}, "code": {}},
                                   "selection": {"chosen": "global 0.9", "rule": "safe-mean"}})
    data = profile.to_dict()
    data["version"] = version
    data.pop("domains")
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = Profile.load(tmp_path / "old.json")
    assert not old.domain_robust
    old.save(tmp_path / "again.json")
    saved = json.loads((tmp_path / "again.json").read_text())
    assert saved["version"] == 3 and saved["fitted_version"] == version
    assert saved["calibration"] == data["calibration"]  # the record is kept as it was
    again = Profile.load(tmp_path / "again.json")
    assert not again.domain_robust
    assert f"not domain-robust (format version {version}, saved again as 3)" in again.describe()
    # and a third time
    again.save(tmp_path / "third.json")
    assert f"(format version {version}, saved again as 3)" in Profile.load(tmp_path / "third.json").describe()


def test_a_new_profile_is_saved_without_a_fitted_version(tmp_path):
    profile = Profile(ModelIdentity.of(tiny_model("llama", seed=3)), torch.full((2, 4), 0.9),
                      calibration={"domain_robust": True, "rule": "robust"})
    profile.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert "fitted_version" not in data and Profile.load(tmp_path / "p.json").domain_robust
    for bad in (3, 0, "2", True):
        data["fitted_version"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(ProfileError, match="fitted_version"):
            Profile.load(tmp_path / "bad.json")


# -- F9 -------------------------------------------------------------------------------------------
def test_an_interrupted_progress_bar_stays_where_it_stopped():
    bar = Progress(10, True, "test")
    with pytest.raises(KeyboardInterrupt):
        try:
            bar.tick(4)
            raise KeyboardInterrupt
        finally:
            bar.close()
    assert (bar.bar.n, bar.bar.total) == (4, 10)
    finished = Progress(10, True, "test")
    try:
        finished.tick(4)  # stopped early: the total shrinks to what was done
    finally:
        finished.close()
    assert (finished.bar.n, finished.bar.total) == (4, 4)


# -- F10 ------------------------------------------------------------------------------------------
def test_too_short_says_what_is_missing():
    settings = CalibrationSettings(seq_len=64, steps=0)
    with pytest.raises(CalibrationError, match=r"gives 1 full .*\(one window: nothing left to validate on\)$"):
        domain_windows(CharTokenizer(), {"w1": "abcdefghij " * 10}, settings)
    with pytest.raises(CalibrationError, match=r"gives 0 full .*\(shorter than one window: nothing to fit on\)$"):
        domain_windows(CharTokenizer(), {"w0": "abcdefghij " * 5}, settings)
