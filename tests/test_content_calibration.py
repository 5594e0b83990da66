"""Calibration of the per-head hidden-sink beta and of the head choice (content-dependent sinks)."""

from __future__ import annotations

import pytest
import torch

import sinkfix
from sinkfix.analysis.calibration import CalibrationError
from sinkfix.analysis.content_calibration import calibrate_hidden_sinks
from sinkfix.patch import PatchHandle
from sinkfix.profile import Profile

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = {
    "prose": "the cat sat on the mat, and the dog sat on the log. " * 30,
    "code": "for i in range(10):\n    total += i * i\n" * 40,
}


def test_fit_keeps_the_best_validation_nll_and_leaves_the_model_untouched():
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    profile = calibrate_hidden_sinks(model, CharTokenizer(), TEXTS, seq_len=48, steps=8, lr=0.3, reg=0.0,
                                     eval_every=2, patience=10, max_tokens=600, progress=False)
    record = profile.calibration
    assert profile.mode == "content" and record["mode"] == "content"
    assert record["val_nll_best"] <= record["val_nll_init"]
    assert [h["step"] for h in record["history"]] == [2, 4, 6, 8]
    rule = profile.content_sinks
    beta = torch.as_tensor(rule.hidden_sink_scale)
    heads = torch.as_tensor(rule.heads)
    assert beta.shape == heads.shape == (2, 4) and heads.dtype == torch.bool
    assert bool((beta[~heads] == 1).all()) and bool((beta[heads] <= 0.98).all())
    assert record["heads_chosen"] == int(heads.sum())
    assert PatchHandle.of(model) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert any(p.requires_grad for p in model.parameters())  # flags restored


def test_fit_on_top_of_a_positional_profile_keeps_it(tmp_path):
    from sinkfix.profile import ModelIdentity

    model = tiny_model("llama")
    base = Profile(ModelIdentity.of(model), torch.full((2, 4), 0.8, dtype=torch.float64), calibration={"note": "base"})
    profile = calibrate_hidden_sinks(model, CharTokenizer(), TEXTS, seq_len=48, steps=2, eval_every=2, max_tokens=400,
                                     base=base, progress=False)
    assert torch.equal(profile.sink_scale, base.sink_scale) and profile.calibration["note"] == "base"
    assert profile.calibration["hidden_sinks"]["mode"] == "content"
    loaded = Profile.load(profile.save(tmp_path / "both.json"))
    assert loaded.mode == "content" and torch.equal(loaded.sink_scale, base.sink_scale)


def test_bad_settings_are_refused():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="init_beta"):
        calibrate_hidden_sinks(model, CharTokenizer(), TEXTS, init_beta=1.0, progress=False)
    with pytest.raises(CalibrationError, match="too few"):
        calibrate_hidden_sinks(model, CharTokenizer(), {"short": "abc " * 10}, seq_len=48, progress=False)
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.9), backend="torch"):
        with pytest.raises(CalibrationError, match="remove the existing patch"):
            calibrate_hidden_sinks(model, CharTokenizer(), TEXTS, seq_len=48, progress=False)
