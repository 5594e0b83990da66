"""Calibration: it lowers NLL on its own split, leaves the model as it found it, and saves a profile."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import sinkfix
from sinkfix.patch import PatchHandle
from sinkfix.analysis import calibration as calibration_module
from sinkfix.analysis.calibration import (CalibrationError, CalibrationSettings, Calibrator, DomainFits, calibrate,
                                          calibration_windows, fit_domains, fit_matmul_dtype, robust_profile)
from sinkfix.analysis.robust import DEFAULT_SELECTION_RULE
from sinkfix.texts import DOMAINS, domain_text

from .conftest import CharTokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = {
    "prose": "the cat sat on the mat and the dog sat on the log. " * 30,
    "code": "for i in range(10):\n    total += i * i\n" * 40,
}
THREE = {**TEXTS, "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40}


def test_pooled_fit_lowers_validation_nll():
    model = tiny_model("llama")
    profile = calibrate(model, CharTokenizer(), TEXTS, rule="pooled", seq_len=64, steps=12, lr=0.3, reg=0.0,
                        val_fraction=0.25, eval_every=4, patience=10, progress=False)
    record = profile.calibration
    assert record["nll"]["val_after"] < record["nll"]["val_before"]
    assert record["rule"] == "pooled" and record["domain_robust"] is False and not profile.domain_robust
    assert profile.sink_scale.shape == (2, 4) and (profile.sink_scale < 1).any()
    assert record["protocol"] == {"seq_len": 64, "bos": True, "stride": 63, "windows": "non-overlapping"}
    assert [h["step"] for h in record["fits"]["pooled"]["history"]] == [0, 4, 8, 12]
    assert set(record["ppl_change"]["val_per_domain"]) == set(TEXTS)
    assert "not domain-robust" in profile.describe()


@pytest.mark.parametrize("selection_rule", ["safe-mean", "worst"])
def test_robust_rule_fits_each_domain_and_chooses_by_its_selection_rule(selection_rule):
    model = tiny_model("llama")
    profile = calibrate(model, CharTokenizer(), THREE, seq_len=64, steps=25, lr=0.3, eval_every=4, patience=10,
                        progress=False, selection_rule=selection_rule)
    record = profile.calibration
    assert record["rule"] == "robust" and profile.domain_robust and "domain-robust" in profile.describe()
    assert set(record["fits"]) == set(THREE) and set(profile.domain_parameters) == set(THREE)
    # 25 steps among 3 domains: the first takes the remainder (with 25 // 3 each, 24 ran, unsaid)
    assert [fit["steps_run"] for fit in record["fits"].values()] == [9, 8, 8]
    assert all(fit["val_nll_after"] <= fit["val_nll_before"] for fit in record["fits"].values())
    selection = record["selection"]
    assert selection["rule"] == selection_rule
    complete = {name: per for name, per in selection["changes"].items() if len(per) == len(THREE)}
    worst = {name: max(per.values()) for name, per in selection["changes"].items()}
    chosen = selection["chosen"]
    if selection_rule == "worst":
        assert worst[chosen] == min(worst.values()) <= 0  # the identity scores 0
    else:  # no held-out domain made worse, and the best mean of those that qualify
        assert worst[chosen] <= 0
        means = {name: sum(per.values()) / len(per) for name, per in complete.items() if max(per.values()) <= 0}
        assert means[chosen] == min(means.values())
        # what was not scored in full had already made a held-out domain worse
        assert all(max(per.values()) > 0 for name, per in selection["changes"].items() if name not in complete)
    assert set(record["ppl_change"]["val_per_domain"]) == set(THREE)
    with pytest.raises(CalibrationError, match="selection_rule must be one of"):
        calibrate(model, CharTokenizer(), THREE, seq_len=64, steps=2, selection_rule="best", progress=False)
    with pytest.raises(CalibrationError, match="rule='pooled' makes no selection"):
        calibrate(model, CharTokenizer(), THREE, rule="pooled", seq_len=64, steps=2, selection_rule=selection_rule,
                  progress=False)


def test_robust_rule_needs_two_domains():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match=r"at least two domains; only 'prose' is left"):
        calibrate(model, CharTokenizer(), {"prose": TEXTS["prose"]}, seq_len=64, progress=False)
    fits = fit_domains(model, CharTokenizer(), TEXTS, CalibrationSettings(seq_len=64, steps=2, eval_every=1),
                       progress=False)
    with pytest.raises(CalibrationError, match="at least two domains"):  # nothing left to validate on
        robust_profile(model, fits, ["code"], progress=False)
    with pytest.raises(CalibrationError, match="no fit for domain"):
        robust_profile(model, fits, ["code", "legal"], progress=False)
    with pytest.raises(CalibrationError, match="val_fraction must be > 0"):
        fit_domains(model, CharTokenizer(), TEXTS, CalibrationSettings(seq_len=64, val_fraction=0.0), progress=False)


def test_fits_round_trip_and_rebuild_a_profile_without_a_domain():
    model, tok = tiny_model("llama"), CharTokenizer()
    fits = fit_domains(model, tok, THREE, CalibrationSettings(seq_len=64, steps=12, lr=0.3, eval_every=2),
                       progress=False)
    again = DomainFits.from_dict(json.loads(json.dumps(fits.to_dict())), tok, THREE)
    assert again.domains == fits.domains and again.settings == fits.settings
    assert all(torch.equal(again.fits[d].beta, fits.fits[d].beta) for d in fits.domains)
    cache: dict = {}
    without = robust_profile(model, again, ["prose", "code"], progress=False, cache=cache)
    assert set(without.domain_parameters) == {"prose", "code"} and cache
    with pytest.raises(CalibrationError, match="are not the fitted domains"):
        DomainFits.from_dict(fits.to_dict(), tok, TEXTS)


def test_fits_of_built_in_domains_read_back_without_their_texts():
    """A saved fits file of built-in domains (any subset) cuts its windows again from those domains'
    calibration texts when no texts are given."""
    model, tok = tiny_model("llama"), CharTokenizer()
    texts = {d: domain_text(d, "calib") for d in ("legal", "pydoc")}
    fits = fit_domains(model, tok, texts, CalibrationSettings(seq_len=64, max_tokens=256, steps=2, eval_every=2),
                       progress=False)
    again = DomainFits.from_dict(json.loads(json.dumps(fits.to_dict())), tok)
    assert again.domains == ["legal", "pydoc"]
    assert all(torch.equal(a, b) for d in fits.domains for a, b in zip(again.windows[d].calib, fits.windows[d].calib))


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


@pytest.mark.parametrize("rule", ["pooled", "robust"])
def test_identity_profile_when_nothing_was_fitted(rule):
    from sinkfix.analysis.robust import candidates

    model = tiny_model("llama")
    pool = candidates(global_betas=())  # combinations of fits only: with no steps they are the identity
    profile = calibrate(model, CharTokenizer(), TEXTS, rule=rule, seq_len=64, steps=0, pool=pool, progress=False)
    assert torch.equal(profile.sink_scale, torch.ones(2, 4, dtype=torch.float64))
    assert profile.virtual_sink_logit is None
    assert all(fit["best_step"] == 0 for fit in profile.calibration["fits"].values())


def test_virtual_logits_are_fitted_and_round_trip(tmp_path):
    model = tiny_model("llama")
    profile = calibrate(model, CharTokenizer(), TEXTS, rule="pooled", seq_len=64, steps=6, lr=0.3, eval_every=2,
                        patience=5, virtual_logits=True, progress=False)
    assert profile.calibration["fits"]["pooled"]["best_step"] > 0
    assert profile.virtual_sink_logit is not None and torch.isfinite(profile.virtual_sink_logit).all()
    loaded = sinkfix.Profile.load(profile.save(tmp_path / "p.json"))
    assert torch.equal(loaded.virtual_sink_logit, profile.virtual_sink_logit)
    with sinkfix.patch(model, loaded) as handle:
        assert len(handle.layer_policies()) == 2


def test_bad_settings_and_short_texts():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="init_beta"):
        calibrate(model, CharTokenizer(), TEXTS, init_beta=1.0, progress=False)
    with pytest.raises(CalibrationError, match=r"text 'tiny' is too short: .* at least 126 tokens"):
        calibrate(model, CharTokenizer(), {"tiny": "x" * 100, "other": "y" * 1000}, seq_len=64, progress=False)
    with pytest.raises(CalibrationError, match="val_fraction"):
        calibrate(model, CharTokenizer(), TEXTS, val_fraction=1.0, progress=False)


def test_windows_do_not_overlap_and_start_with_bos():
    windows = calibration_windows(CharTokenizer(), "abcdefghij" * 10, seq_len=11, bos=True)
    assert len(windows) == 10 and all(w[0] == 1 and w.numel() == 11 for w in windows)
    assert torch.equal(torch.cat([w[1:] for w in windows]), CharTokenizer()("abcdefghij" * 10).input_ids[0])


def test_builtin_texts_exist_offline():
    for domain in DOMAINS:
        calib, held_out = domain_text(domain, "calib"), domain_text(domain, "eval")
        assert len(calib) > 20_000 and len(held_out) > 20_000
        assert calib[:2000] not in held_out


def test_calibrate_command(monkeypatch, tmp_path, capsys):
    from sinkfix import cli

    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    files = []
    for name, text in THREE.items():
        files += ["--text", str(tmp_path / f"{name}.txt")]
        (tmp_path / f"{name}.txt").write_text(text)
    out = tmp_path / "profile.json"
    rc = cli.main(["calibrate", *files, "--out", str(out), "--seq-len", "64", "--steps", "4", "--evaluate"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["format"] == "sinkfix-profile" and data["version"] == 3
    assert set(data["calibration"]["texts"]) == set(data["domains"]) == set(THREE)
    printed = capsys.readouterr().out
    assert "leave-one-domain-out" in printed and "worst" in printed and "domain-robust" in printed
    assert "validation windows" in printed  # user texts have no evaluation split: said so
    assert "[95%]" in printed and "percentile" in printed  # the interval column and what it is
    assert "made no held-out domain worse" in " ".join(printed.split())  # the table says which rule chose
    assert data["calibration"]["selection"]["rule"] == "safe-mean"
    rc = cli.main(["calibrate", *files, "--out", str(tmp_path / "worst.json"), "--seq-len", "64", "--steps", "4",
                   "--selection", "worst"])
    assert rc == 0 and "the best worst held-out domain's" in " ".join(capsys.readouterr().out.split())
    assert json.loads((tmp_path / "worst.json").read_text())["calibration"]["selection"]["rule"] == "worst"
    # one line, exit code 2, before any model is loaded: one domain cannot be calibrated domain-robustly,
    # and two leave nothing to choose with once one is left out
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: pytest.fail("loaded a model"))
    rc = cli.main(["calibrate", *files[:2], "--out", str(tmp_path / "one.json"), "--seq-len", "64"])
    assert rc == 2 and "at least two domains" in capsys.readouterr().err
    rc = cli.main(["calibrate", *files[:4], "--out", str(tmp_path / "two.json"), "--seq-len", "64", "--evaluate"])
    assert rc == 2 and "at least three domains" in capsys.readouterr().err
    # a selection rule where no selection is made is refused, not ignored
    rc = cli.main(["calibrate", *files, "--out", str(tmp_path / "p.json"), "--rule", "pooled", "--selection", "worst"])
    assert rc == 2 and "--rule pooled makes no selection" in capsys.readouterr().err
    rc = cli.main(["calibrate", *files, "--out", str(tmp_path / "h.json"), "--sinks", "hidden", "--selection", "worst"])
    assert rc == 2 and "hidden-sink selection chooses by the worst case" in capsys.readouterr().err
    # applying the saved profile to another model is a one-line CLI error, exit code 2
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (tiny_model("llama", seed=3), CharTokenizer()))
    rc = cli.main(["inspect", "--profile", str(out), "--text", str(tmp_path / "prose.txt"), "--out",
                   str(tmp_path / "r"), "--seq-len", "64", "--no-figures"])
    assert rc == 2 and "does not fit" in capsys.readouterr().err


# -- real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_per_domain_fits_lower_their_validation_nll(smollm2):
    model, tokenizer = smollm2
    texts = {d: domain_text(d, "calib")[:12000] for d in ("pydoc", "legal")}
    profile = calibrate(model, tokenizer, texts, seq_len=256, bos=True, max_tokens=3 * 255, steps=8,
                        lr=0.1, reg=0.0, val_fraction=0.34, eval_every=2, patience=5, progress=False)
    record = profile.calibration
    assert record["texts"]["pydoc"] == {"calib_windows": 2, "val_windows": 1}
    assert all(fit["val_nll_after"] < fit["val_nll_before"] - 1e-3 for fit in record["fits"].values())
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


def test_cli_defaults_are_the_library_defaults():
    """`sinkfix calibrate` and `calibrate()` must fit with the same settings: the measured tables in
    docs/calibration.md are of one default, whichever way it is called."""
    import inspect

    from sinkfix import cli

    args = cli.build_parser().parse_args(["calibrate"])
    library, signature = CalibrationSettings(), inspect.signature(calibrate).parameters
    for name in ("seq_len", "steps", "lr", "reg", "val_fraction", "max_tokens", "virtual_logits", "precision"):
        assert getattr(args, name) == getattr(library, name) == signature[name].default, name
    # None in both means the default rule; the CLI resolves it before calibrating (and refuses it where
    # no selection is made)
    assert args.selection is signature["selection_rule"].default is None and DEFAULT_SELECTION_RULE == "safe-mean"
    assert args.bos is library.bos is signature["bos"].default is True


# -- fitting steps in bfloat16 ---------------------------------------------------------------------
def test_fit_precision_resolves_by_device_and_model_dtype(monkeypatch):
    model = tiny_model("llama")
    assert fit_matmul_dtype(model, "float32") is None
    monkeypatch.setattr(calibration_module, "bf16_native", lambda device: False)
    assert fit_matmul_dtype(model, "auto") is None  # emulated bfloat16 is slower than float32
    with pytest.warns(UserWarning, match="does not multiply bfloat16 natively"):  # forced: done, with a warning
        assert fit_matmul_dtype(model, "bfloat16") is torch.bfloat16
    monkeypatch.setattr(calibration_module, "bf16_native", lambda device: True)
    assert fit_matmul_dtype(model, "auto") is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_matmul_dtype(model, "bfloat16") is torch.bfloat16
    assert fit_matmul_dtype(tiny_model("llama").to(torch.bfloat16), "bfloat16") is None  # already 16-bit
    with pytest.raises(CalibrationError, match="precision must be one of auto, bfloat16, float32, got 'fp16'"):
        fit_matmul_dtype(model, "fp16")
    with pytest.raises(CalibrationError, match="precision must be one of"):
        CalibrationSettings(precision="half")


def _step_gradients(model, ids, matmul_dtype):
    with Calibrator(model, True, matmul_dtype=matmul_dtype) as cal:
        theta = torch.linspace(1.0, 3.0, cal.shape[0] * cal.shape[1]).reshape(cal.shape).requires_grad_(True)
        logit = torch.linspace(-3.0, 1.0, cal.shape[0] * cal.shape[1]).reshape(cal.shape).requires_grad_(True)
        cal.set(torch.sigmoid(theta), logit)
        nll = cal.step_nll(ids)
        nll.backward()
        scored = cal.nll_with((torch.sigmoid(theta).detach(), logit.detach()), [ids])
    return float(nll.detach()), theta.grad, logit.grad, scored


def test_bfloat16_fitting_step_follows_the_float32_gradient_and_scores_in_float32():
    """Autocast runs the projections in bfloat16 (rotary embeddings then promote q and k back to
    float32 while v stays bfloat16: the attention call takes the widest); the gradient of the sink
    parameters must still point where float32's does, and scoring must not change at all."""
    model = tiny_model("llama")
    ids = torch.tensor([1] + [2 + (7 * i) % 90 for i in range(63)])
    loss32, theta32, logit32, scored32 = _step_gradients(model, ids, None)
    loss16, theta16, logit16, scored16 = _step_gradients(model, ids, torch.bfloat16)
    assert abs(loss16 - loss32) < 0.02 * loss32 and loss16 != loss32  # it did run in bfloat16
    for exact, approx in ((theta32, theta16), (logit32, logit16)):
        assert torch.nn.functional.cosine_similarity(exact.flatten(), approx.flatten(), dim=0) > 0.99
    assert scored16 == scored32


def test_fit_precision_is_recorded_and_old_fits_read_as_float32():
    model, tok = tiny_model("llama"), CharTokenizer()
    fits = fit_domains(model, tok, TEXTS, CalibrationSettings(seq_len=64, steps=4, eval_every=2, precision="bfloat16"),
                       progress=False)
    assert fits.fit_precision == "bfloat16"
    profile = robust_profile(model, fits, progress=False)
    assert profile.calibration["fit_precision"] == "bfloat16"
    assert profile.calibration["hyper"]["precision"] == "bfloat16"
    saved = fits.to_dict()
    assert DomainFits.from_dict(saved, tok, TEXTS).fit_precision == "bfloat16"
    del saved["fit_precision"], saved["settings"]["precision"]  # a fits file from before the option
    old = DomainFits.from_dict(saved, tok, TEXTS)
    assert old.fit_precision == "float32" and old.settings.precision == "float32"
    plain = fit_domains(model, tok, TEXTS, CalibrationSettings(seq_len=64, steps=4, eval_every=2, precision="float32"),
                        progress=False)
    assert plain.fit_precision == "float32"
