"""Calibration: it lowers NLL on its own split, leaves the model as it found it, and saves a profile."""

from __future__ import annotations

import json

import pytest
import torch

import sinkfix
from sinkfix.patch import PatchHandle
from sinkfix.analysis.calibration import CalibrationError, calibrate, calibration_windows
from sinkfix.texts import domain_text

from .conftest import CharTokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = {
    "prose": "the cat sat on the mat and the dog sat on the log. " * 30,
    "code": "for i in range(10):\n    total += i * i\n" * 40,
}


def test_calibration_lowers_nll_on_its_own_split():
    model = tiny_model("llama")
    profile = calibrate(model, CharTokenizer(), TEXTS, seq_len=64, steps=12, lr=0.3, reg=0.0, val_fraction=0.25,
                        eval_every=4, patience=10, progress=False)
    nll = profile.calibration["nll"]
    assert nll["calib_after"] < nll["calib_before"]
    assert nll["val_after"] <= nll["val_before"]
    assert profile.sink_scale.shape == (2, 4) and (profile.sink_scale < 1).any()
    assert profile.calibration["protocol"] == {"seq_len": 64, "bos": True, "stride": 63, "windows": "non-overlapping"}
    assert [h["step"] for h in profile.calibration["history"]] == [0, 4, 8, 12]


def test_calibration_leaves_the_model_untouched():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    grads = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, CharTokenizer(), TEXTS, seq_len=64, steps=3, eval_every=3, progress=False)
    assert PatchHandle.of(model) is None and model.config._attn_implementation == "sdpa"
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_calibration_restores_a_previous_patch():
    model = tiny_model("llama")
    policy = sinkfix.Policy(sink_scale=0.7)
    sinkfix.patch(model, policy)
    calibrate(model, CharTokenizer(), TEXTS, seq_len=64, steps=2, eval_every=2, progress=False)
    restored = PatchHandle.of(model)
    assert restored is not None and restored.policy is policy
    restored.remove()


def test_identity_profile_when_nothing_helps():
    model = tiny_model("llama")
    profile = calibrate(model, CharTokenizer(), TEXTS, seq_len=64, steps=0, progress=False)
    assert torch.equal(profile.sink_scale, torch.ones(2, 4, dtype=torch.float64))
    assert profile.calibration["best_step"] == 0


def test_virtual_logits_are_fitted_and_round_trip(tmp_path):
    model = tiny_model("llama")
    profile = calibrate(model, CharTokenizer(), TEXTS, seq_len=64, steps=6, lr=0.3, eval_every=2, patience=5,
                        virtual_logits=True, progress=False)
    if profile.calibration["best_step"] > 0:
        assert profile.virtual_sink_logit is not None and torch.isfinite(profile.virtual_sink_logit).all()
    loaded = sinkfix.Profile.load(profile.save(tmp_path / "p.json"))
    assert (loaded.virtual_sink_logit is None) == (profile.virtual_sink_logit is None)
    with sinkfix.patch(model, loaded) as handle:
        assert len(handle.layer_policies()) == 2


def test_bad_settings_and_short_texts():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="init_beta"):
        calibrate(model, CharTokenizer(), TEXTS, init_beta=1.0, progress=False)
    with pytest.raises(CalibrationError, match="shorter than one"):
        calibrate(model, CharTokenizer(), {"tiny": "too short"}, seq_len=64, progress=False)
    with pytest.raises(CalibrationError, match="val_fraction"):
        calibrate(model, CharTokenizer(), TEXTS, val_fraction=1.0, progress=False)


def test_windows_do_not_overlap_and_start_with_bos():
    windows = calibration_windows(CharTokenizer(), "abcdefghij" * 10, seq_len=11, bos=True)
    assert len(windows) == 10 and all(w[0] == 1 and w.numel() == 11 for w in windows)
    assert torch.equal(torch.cat([w[1:] for w in windows]), CharTokenizer()("abcdefghij" * 10).input_ids[0])


def test_builtin_texts_exist_offline():
    for domain in ("prose", "code"):
        calib, held_out = domain_text(domain, "calib"), domain_text(domain, "eval")
        assert len(calib) > 20_000 and len(held_out) > 20_000
        assert calib[:2000] not in held_out


def test_calibrate_command(monkeypatch, tmp_path, capsys):
    from sinkfix import cli

    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    files = []
    for name, text in TEXTS.items():
        files += ["--text", str(tmp_path / f"{name}.txt")]
        (tmp_path / f"{name}.txt").write_text(text)
    out = tmp_path / "profile.json"
    rc = cli.main(["calibrate", *files, "--out", str(out), "--seq-len", "64", "--steps", "4"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["format"] == "sinkfix-profile" and set(data["calibration"]["texts"]) == {"prose", "code"}
    printed = capsys.readouterr().out
    assert "validation" in printed and "calibration" in printed
    # applying the saved profile to another model is a one-line CLI error, exit code 2
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (tiny_model("llama", seed=3), CharTokenizer()))
    rc = cli.main(["inspect", "--profile", str(out), "--text", str(tmp_path / "prose.txt"), "--out",
                   str(tmp_path / "r"), "--seq-len", "64", "--no-figures"])
    assert rc == 2 and "does not fit" in capsys.readouterr().err


# -- real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_calibration_lowers_nll_on_its_own_split(smollm2):
    model, tokenizer = smollm2
    text = domain_text("prose", "calib")[:12000]
    profile = calibrate(model, tokenizer, {"prose": text}, seq_len=256, bos=True, max_tokens=3 * 255, steps=4,
                        lr=0.1, reg=0.0, val_fraction=0.34, eval_every=2, patience=5, progress=False)
    nll = profile.calibration["nll"]
    assert profile.calibration["texts"]["prose"] == {"calib_windows": 2, "val_windows": 1}
    assert nll["calib_after"] < nll["calib_before"] - 1e-3
    assert profile.model.num_layers == 30 and profile.model.num_heads == (9,) * 30


@pytest.mark.parametrize("bos,override,expected", [(True, None, True), (False, None, False), (True, False, False)])
def test_virtual_logit_row_rule_follows_the_bos_protocol(bos, override, expected):
    """With BOS windows the sink's own row is the BOS token and the virtual logits may act on it;
    without BOS it is a word and is left alone, unless the caller says otherwise."""
    model = tiny_model("llama")
    profile = calibrate(model, CharTokenizer(), TEXTS, seq_len=64, bos=bos, steps=4, lr=0.3, eval_every=2,
                        patience=5, virtual_logit_on_sink_rows=override, progress=False)
    assert profile.calibration["hyper"]["virtual_logit_on_sink_rows"] is expected
    assert profile.virtual_logit_on_sink_rows is (expected and profile.virtual_sink_logit is not None)
