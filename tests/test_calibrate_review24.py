"""`sinkfix calibrate` and profiles in the cases review 24 found: a copy of a text shifted by one
character calibrated as a second domain (tests/test_calibrate_review11.py), a file's own stem given to
another file, a --val-fraction clamped to another split than the one recorded, and hand-edited profiles
that loaded with another meaning."""

from __future__ import annotations

import json

import pytest
import torch

from sinkfix import cli
from sinkfix.analysis.calibration import CalibrationError, CalibrationSettings, domain_windows
from sinkfix.analysis.calibration import duplicate_windows
from sinkfix.errors import ProfileError
from sinkfix.profile import ModelIdentity, Profile
from sinkfix.texts import load_texts

from .conftest import CharTokenizer, text_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

THREE = {"prose": "the cat sat on the mat and the dog sat on the log. " * 30,
         "code": "for i in range(10):\n    total += i * i\n" * 40,
         "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40}


# -- a repeated stem never takes another file's own stem ------------------------------------------
def test_a_numbered_stem_never_takes_another_files_stem(tmp_path):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
    first, second, own = tmp_path / "d1" / "x.txt", tmp_path / "d2" / "x.txt", tmp_path / "x-2.txt"
    for i, path in enumerate((first, second, own)):
        path.write_text(f"text {i}")
    for order in ((first, second, own), (own, first, second), (first, own, second)):
        texts = load_texts(list(order))
        by_source = {t.source: name for name, t in texts.items()}
        # every order: the file named x-2 keeps it, the second x is numbered past it
        assert by_source == {str(first): "x", str(second): "x-3", str(own): "x-2"}, order
    # unchanged where nothing collides
    assert list(load_texts([first, second])) == ["x", "x-2"]


# -- a --val-fraction that would hold out every window ---------------------------------------------
def test_a_val_fraction_that_holds_out_every_window_is_refused():
    settings = CalibrationSettings(seq_len=64, val_fraction=0.95)
    with pytest.raises(CalibrationError, match=r"val_fraction \(--val-fraction\) 0\.95 holds out 6 of the 6 windows of text 'code'.*"
                                               r"at most 5 \(0\.833\)"):
        domain_windows(CharTokenizer(), {"code": THREE["code"][:64 * 6]}, settings)
    # a share that leaves one window to fit on is the split asked for, rounded
    split = domain_windows(CharTokenizer(), {"code": THREE["code"][:64 * 6]}, CalibrationSettings(seq_len=64,
                                                                                               val_fraction=0.8))
    assert (len(split["code"].calib), len(split["code"].val)) == (1, 5)


def test_the_command_refuses_it_in_one_line(loaded_tiny, tmp_path, capsys):
    out = tmp_path / "p.json"
    # an earlier profile (a file that is not one is refused before this check: review 39 #3)
    out.write_text('{"format": "sinkfix-profile", "keep": true}')
    rc = cli.main(["calibrate", *text_args(tmp_path, THREE), "--seq-len", "64", "--steps", "6", "--no-statistics",
                   "--max-tokens", "512", "--val-fraction", "0.999", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "val_fraction (--val-fraction) 0.999 holds out" in err, err
    assert out.read_text() == '{"format": "sinkfix-profile", "keep": true}'


def test_shifted_copies_are_found_and_distinct_texts_are_not():
    settings = CalibrationSettings(seq_len=64)
    windows = domain_windows(CharTokenizer(), {**THREE, "shifted": "\n" + THREE["code"]}, settings)
    found = duplicate_windows(windows)
    assert [(d.first, d.copy, d.contained) for d in found] == [("code", "shifted", False)] and found[0].share > 0.9
    assert duplicate_windows(domain_windows(CharTokenizer(), THREE, settings)) == []


def test_a_text_that_is_a_part_of_another_is_named_as_a_part(loaded_tiny, tmp_path, capsys):
    """Given first, the part is named as the part, with its own share (not "the same text", not 100%
    of the longer text's runs)."""
    long = "".join(f"line {i}: the value of x is {i * i} and y is {i + 3}\n" for i in range(120))
    texts = {"part": long[:1200], "whole": long, "code": THREE["code"]}
    rc = cli.main(["calibrate", *text_args(tmp_path, texts), "--seq-len", "64", "--steps", "6", "--no-statistics",
                   "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert "'part' (" in err and "is a part of 'whole'" in err and "of 'part''s token runs recur in 'whole'" in err
    assert "same text" not in err


# -- hand-edited profiles that loaded with another meaning -----------------------------------------
def _saved(tmp_path) -> dict:
    model = tiny_model("llama")
    shape = (model.config.num_hidden_layers, model.config.num_attention_heads)
    profile = Profile(ModelIdentity.of(model), torch.full(shape, 0.9), torch.full(shape, 1.5),
                      virtual_logit_on_sink_rows=True)
    return json.loads(profile.save(tmp_path / "p.json").read_text())


def test_a_policy_without_virtual_logit_on_sink_rows_is_refused_from_version_2(tmp_path):
    data = _saved(tmp_path)
    assert Profile.from_dict(data).virtual_logit_on_sink_rows is True
    del data["policy"]["virtual_logit_on_sink_rows"]
    for version in (2, 3):
        with pytest.raises(ProfileError, match=f"version-{version} profile's policy needs "
                                               "'virtual_logit_on_sink_rows'"):
            Profile.from_dict({**data, "version": version})
    # version 1 had no such key: it meant true, and still does
    assert Profile.from_dict({**data, "version": 1}).virtual_logit_on_sink_rows is True


@pytest.mark.parametrize("mode", [None, "positional"])
def test_a_version_4_profile_must_be_a_content_profile(tmp_path, mode):
    data = _saved(tmp_path)
    data["version"] = 4
    if mode is not None:
        data["policy"]["mode"] = mode
    with pytest.raises(ProfileError, match="version-4 profile is a content-mode profile"):
        Profile.from_dict(data)
