"""Profiles: JSON round trip, model identity checks, corrupted files, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sinkfix
from sinkfix.errors import ProfileError
from sinkfix.profile import CONTENT_VERSION, FORMAT, VERSION, ModelIdentity, Profile, atomic_write_text, weights_fingerprint

from .conftest import tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_profile(model, with_logits: bool = False) -> Profile:
    beta = torch.linspace(0.5, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    logits = torch.full((2, 4), -3.0, dtype=torch.float64) if with_logits else None
    return Profile(ModelIdentity.of(model), beta, logits, calibration={"note": "test"})


@pytest.mark.parametrize("with_logits", [False, True])
def test_round_trip(tmp_path, with_logits):
    model = tiny_model("llama")
    profile = make_profile(model, with_logits)
    path = profile.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["model"]["architecture"] == "LlamaForCausalLM" and data["model"]["num_heads"] == [4, 4]
    assert data["model"]["fingerprint"] == weights_fingerprint(model)
    loaded = Profile.load(path)
    assert torch.equal(loaded.sink_scale, profile.sink_scale)
    assert (loaded.virtual_sink_logit is None) == (not with_logits)
    if with_logits:
        assert torch.equal(loaded.virtual_sink_logit, profile.virtual_sink_logit)
    assert loaded.model == profile.model and loaded.calibration == {"note": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind


def test_patch_applies_profile_and_matches_policy():
    model = tiny_model("llama")
    profile = make_profile(model)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad(), sinkfix.patch(model, profile) as handle:
        out_profile = model(input_ids=ids).logits
        betas = torch.stack([lp.beta for lp in handle.layer_policies()])
    assert torch.equal(betas, profile.sink_scale)
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy(sink_scale=profile.sink_scale)):
        out_policy = model(input_ids=ids).logits
    assert torch.equal(out_profile, out_policy)


def test_fingerprint_is_stable_and_sensitive():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # element 0 is always in the sample
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_profile_for_another_model_is_refused():
    profile = make_profile(tiny_model("llama"))
    with pytest.raises(ProfileError, match="weights fingerprint"):
        sinkfix.patch(tiny_model("llama", seed=1), profile)
    # same architecture and shape: accepted on request
    assert profile.policy_for(tiny_model("llama", seed=1), check_weights=False).sink_scale.shape == (2, 4)
    with pytest.raises(ProfileError, match="architecture LlamaForCausalLM vs Qwen2ForCausalLM"):
        sinkfix.patch(tiny_model("qwen2"), profile)
    import transformers as tf

    deeper = tf.AutoModelForCausalLM.from_config(
        tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ProfileError, match="num_layers 2 vs 3"):
        sinkfix.patch(deeper, profile)
    assert deeper.config._attn_implementation != sinkfix.IMPL_NAME  # nothing was patched
    # per-layer head counts in runs, not written out (30 and 18 of them made a 700-character line)
    with pytest.raises(ProfileError, match=r"num_heads 4 in each of 2 layers vs 4 in each of 3 layers"):
        sinkfix.patch(deeper, profile)


def test_per_layer_values_are_written_in_runs():
    from sinkfix.profile import _per_layer

    assert _per_layer((9,) * 30) == "9 in each of 30 layers"
    assert _per_layer((8, 8, 4, 4, 4, 2)) == "(8 x2, 4 x3, 2)"
    assert _per_layer((1,)) == "1 in each of 1 layer" and _per_layer(3) == "3" and _per_layer(()) == "()"


def _write(path, data) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_corrupted_and_invalid_files(tmp_path):
    model = tiny_model("llama")
    good = make_profile(model).to_dict()
    path = tmp_path / "p.json"
    cases = {
        "corrupted": (good and json.dumps(good)[:-40], "corrupted"),
        "not a profile": ({"hello": 1}, "not a sinkfix profile"),
        "future": ({**good, "version": CONTENT_VERSION + 1}, "newer"),
        "no version": ({k: v for k, v in good.items() if k != "version"}, "version"),
        "nan": (json.dumps(good).replace(str(good["policy"]["sink_scale"][0][0]), "NaN", 1), "NaN"),
        "range": ({**good, "policy": {**good["policy"], "sink_scale": [[1.5] * 4] * 2}}, r"\[0.0, 1.0\]"),
        "shape": ({**good, "policy": {**good["policy"], "sink_scale": [[1.0] * 3] * 2}}, "shape"),
        "strings": ({**good, "policy": {**good["policy"], "sink_scale": [["a"] * 4] * 2}}, "numeric"),
        "no model": ({k: v for k, v in good.items() if k != "model"}, "'model' entry"),
        "model keys": ({**good, "model": {"architecture": "X"}}, "lacks"),
        "clip": ({**good, "policy": {**good["policy"], "residual_clip": [0.5, 2.0]}}, "residual_clip"),
    }
    for name, (data, message) in cases.items():
        _write(path, data)
        with pytest.raises(ProfileError, match=message):
            Profile.load(path)
    with pytest.raises(ProfileError, match="not found"):
        Profile.load(tmp_path / "missing.json")
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ProfileError, match="cannot read"):
        Profile.load(path)


def test_version_1_files_keep_their_meaning(tmp_path):
    """Version 1 counted the virtual logit in the sink's own row too: such a file loads with
    virtual_logit_on_sink_rows = True, i.e. it still computes what it was fitted for."""
    model = tiny_model("llama")
    path = tmp_path / "v1.json"
    v1 = make_profile(model, with_logits=True).to_dict()
    v1["version"] = 1
    del v1["policy"]["virtual_logit_on_sink_rows"]
    _write(path, v1)
    loaded = Profile.load(path)
    assert loaded.virtual_logit_on_sink_rows is True and loaded.policy().virtual_logit_on_sink_rows is True
    torch.testing.assert_close(loaded.virtual_sink_logit, make_profile(model, with_logits=True).virtual_sink_logit)


def _domain_profile(model) -> Profile:
    profile = make_profile(model, with_logits=True)
    fits = {"pydoc": (torch.full((2, 4), 0.7), torch.full((2, 4), -2.0)), "cpp": (torch.ones(2, 4), None)}
    return Profile(profile.model, profile.sink_scale, profile.virtual_sink_logit, domain_parameters=fits,
                   calibration={"rule": "robust", "domain_robust": True, "texts": {"pydoc": {}, "cpp": {}},
                                "selection": {"chosen": "consensus x1"}})


def test_per_domain_parameters_round_trip_and_are_checked(tmp_path):
    model = tiny_model("llama")
    loaded = Profile.load(_domain_profile(model).save(tmp_path / "p.json"))
    assert set(loaded.domain_parameters) == {"pydoc", "cpp"} and loaded.version == VERSION == 3
    beta, logit = loaded.domain_parameters["pydoc"]
    torch.testing.assert_close(beta, torch.full((2, 4), 0.7, dtype=torch.float64))
    torch.testing.assert_close(logit, torch.full((2, 4), -2.0, dtype=torch.float64))
    assert loaded.domain_parameters["cpp"][1] is None
    assert loaded.domain_robust
    # a record without the selection rule predates it: those profiles were chosen by the worst case
    assert ("domain-robust: 'consensus x1' chosen by leave-one-domain-out (worst selection) over pydoc, cpp"
            in loaded.describe())
    loaded.calibration["selection"]["rule"] = "safe-mean"
    assert "(safe-mean selection)" in loaded.describe()
    good = loaded.to_dict()
    # each entry with both keys, as written (one without virtual_sink_logit is refused: review 39 #4)
    bad = {"shape": ({"pydoc": {"sink_scale": [[1.0] * 3] * 2, "virtual_sink_logit": None}},
                     "domain 'pydoc' sink_scale has shape"),
           "range": ({"pydoc": {"sink_scale": [[2.0] * 4] * 2, "virtual_sink_logit": None}}, r"must lie in \[0.0, 1.0\]"),
           "missing": ({"pydoc": {"virtual_sink_logit": None}}, "has no 'sink_scale'"),
           "type": ([1, 2], "'domains' entry must be an object")}
    for name, (domains, message) in bad.items():
        _write(tmp_path / "bad.json", {**good, "domains": domains})
        with pytest.raises(ProfileError, match=message):
            Profile.load(tmp_path / "bad.json")


@pytest.mark.parametrize("version", [1, 2])
def test_old_profiles_load_unchanged_and_say_they_are_not_domain_robust(tmp_path, version):
    """Profiles from before domain-robust calibration: same parameters, same meaning, and a plain warning."""
    model = tiny_model("llama")
    old = make_profile(model, with_logits=True).to_dict()
    old["version"] = version
    old["calibration"] = {"protocol": {"seq_len": 512, "bos": True}, "best_step": 110}
    del old["domains"]
    if version == 1:
        del old["policy"]["virtual_logit_on_sink_rows"]
    _write(tmp_path / "old.json", old)
    loaded = Profile.load(tmp_path / "old.json")
    assert loaded.version == version and loaded.domain_parameters is None and not loaded.domain_robust
    torch.testing.assert_close(loaded.sink_scale, make_profile(model).sink_scale)
    assert f"not domain-robust (format version {version})" in loaded.describe()
    assert "worse on other kinds of text" in loaded.describe()
    # saving writes the current format; the parameters and the record are kept
    again = Profile.load(loaded.save(tmp_path / "new.json"))
    assert json.loads((tmp_path / "new.json").read_text())["version"] == VERSION
    assert torch.equal(again.sink_scale, loaded.sink_scale) and again.calibration == loaded.calibration


@pytest.mark.parametrize("on_sink_rows", [False, True])
def test_virtual_logit_row_rule_round_trips_and_applies(tmp_path, on_sink_rows):
    """The flag survives save/load and decides whether the first token's own row (which sees only
    the sink) is changed by the virtual logit."""
    model = tiny_model("llama")
    profile = make_profile(model, with_logits=True)
    profile.sink_scale = torch.ones_like(profile.sink_scale)
    profile.virtual_logit_on_sink_rows = on_sink_rows
    loaded = Profile.load(profile.save(tmp_path / "p.json"))
    assert loaded.virtual_logit_on_sink_rows is on_sink_rows
    ids = torch.tensor([[3, 7, 1, 4, 9]])
    with torch.no_grad():
        stock = model(ids).logits
        with sinkfix.patch(model, loaded):
            patched = model(ids).logits
    row0_changed = (patched[0, 0] - stock[0, 0]).abs().max().item() > 1e-4
    assert row0_changed is on_sink_rows
    assert (patched[0, 1:] - stock[0, 1:]).abs().max().item() > 1e-4  # later rows always change


def test_nan_profile_cannot_be_built():
    model = tiny_model("llama")
    beta = torch.ones(2, 4, dtype=torch.float64)
    beta[0, 1] = float("nan")
    with pytest.raises(ProfileError, match="NaN"):
        Profile(ModelIdentity.of(model), beta)


def test_unwritable_path_is_a_profile_error(tmp_path):
    profile = make_profile(tiny_model("llama"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ProfileError, match="cannot write"):
        profile.save(blocker / "p.json")  # parent is a regular file
    with pytest.raises(ProfileError, match="directory"):
        profile.save(tmp_path)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    atomic_write_text(path, "old contents")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ProfileError, match="No space left"):
        atomic_write_text(path, "new contents")
    assert path.read_text() == "old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_identity_matches_patched_and_unpatched_model():
    model = tiny_model("gemma3")
    before = ModelIdentity.of(model)
    with sinkfix.patch(model):
        during = ModelIdentity.of(model)
    assert before == during and before.num_heads == (4, 4)
