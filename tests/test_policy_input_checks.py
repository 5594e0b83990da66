"""Input checks of policies and profiles: layer lists and ranges in specs, strict JSON types in the
profile loader, and a PolicyError (not a raw Python or torch error) for a wrong argument type."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sinkfix import ContentSinks, Policy, ResidualClip
from sinkfix.errors import PolicyError, ProfileError, SinkfixError
from sinkfix.policy import SPEC_KEYS
from sinkfix.profile import CONTENT_VERSION, ModelIdentity, Profile

from .conftest import tiny_model


# -- layer lists and ranges in specs ------------------------------------------------------------
@pytest.mark.parametrize("spec, layers", [
    ("layers=5-20", tuple(range(5, 21))),  # a-b is inclusive
    ("layers=0:3-5:9", (0, 3, 4, 5, 9)),
    ("layers=5:20", (5, 20)),  # ':' still separates items: existing specs parse as before
    ("layers=0:5:20", (0, 5, 20)),
    ("layers=7", (7,)),
    ("layers=4-4", (4,)),
    ("layers=-1", (-1,)),  # negative layers count from the end, as before
    ("layers=-3--1", (-3, -2, -1)),
    ("layers=1:0", (1, 0)),  # a list, in any order
])
def test_layer_lists_and_inclusive_ranges(spec, layers):
    assert Policy.parse(f"sink_scale=0.9,{spec}").layers == layers


def test_extra_sink_positions_take_ranges_too():
    assert Policy.parse("n_sink=1,extra_sink_positions=3-5:9").extra_sink_positions == (3, 4, 5, 9)


@pytest.mark.parametrize("value, message", [
    ("9-5", "descending; write 5-9"),
    ("5:5", "layer 5 is listed twice"),
    ("0-3:2", "layer 2 is listed twice"),
    ("-2-1", "mixes negative and non-negative"),
    ("5-", "not a layer or an inclusive range"),
    ("a-b", "not a layer or an inclusive range"),
    ("0-99999999", "too long"),
    ("0::3", "an empty item"),  # skipped before
    ("0:3:", "an empty item"),
])
def test_bad_layer_lists_are_refused_naming_the_spec(value, message):
    spec = f"sink_scale=0.9,layers={value}"
    with pytest.raises(PolicyError, match=message) as info:
        Policy.parse(spec)
    assert repr(spec) in str(info.value)


def test_a_repeated_sink_position_is_refused():
    with pytest.raises(PolicyError, match="position 3 is listed twice"):
        Policy.parse("extra_sink_positions=3:2-4")


@pytest.mark.parametrize("policy", [
    Policy(sink_scale=0.9, layers=tuple(range(5, 21))),
    Policy(sink_scale=0.9, layers=(0, 3, 4, 5, 9)),
    Policy(sink_scale=0.9, layers=(20, 5, 6)),
    Policy(sink_scale=0.9, layers=(-3, -2, -1, 0, 1, 2)),
    Policy(sink_scale=0.9, n_sink=2, extra_sink_positions=(3, 4, 5, 9)),
])
def test_describe_writes_lists_in_spec_form_that_parses_back(policy):
    text = policy.describe()
    assert "[" not in text
    assert Policy.parse(text) == policy


def test_describe_ranges_read_as_ranges():
    assert Policy(sink_scale=0.9, layers=range(5, 21)).describe() == "sink_scale=0.9,layers=5-20"
    # the same layers listed twice through the constructor are written once: layers are a set
    assert Policy(sink_scale=0.9, layers=(1, 2, 1)).describe() == "sink_scale=0.9,layers=1:2"


@pytest.mark.parametrize("spec, key", [
    ("clip=8,clip_abs=500", "'clip' and 'clip_abs'"),
    ("clip_abs=500,clip=8", "'clip' and 'clip_abs'"),
    ("sink_scale=0.9,sink_scale=0.5", "'sink_scale' is given twice"),
    ("clip=8,n_sink=1,clip=4", "'clip' is given twice"),
    ("layers=1,layers=2", "'layers' is given twice"),
    ("hidden_sink_threshold=0.1,hidden_sink_threshold=0.2", "'hidden_sink_threshold' is given twice"),
    (" n_sink=1, n_sink =1", "'n_sink' is given twice"),  # the same value twice too: one key, one value
])
def test_a_key_given_twice_is_refused(spec, key):
    with pytest.raises(PolicyError, match=key) as info:
        Policy.parse(spec)
    assert "\n" not in str(info.value)


# Specs over every key the grammar has, alone and together, and values that %g would round.
ROUND_TRIP_SPECS = [
    "sink_scale=0.9", "sink_scale=0", "sink_scale=0.123456789", "sink_scale=1,n_sink=2",
    "virtual_sink_logit=1.5", "virtual_sink_logit=-0.3333333333333333,virtual_logit_on_sink_rows=1",
    "virtual_logit_on_sink_rows=0,sink_scale=0.5",
    "n_sink=0", "n_sink=3,extra_sink_positions=5:9-12", "extra_sink_positions=4",
    "layers=5-20", "layers=20:5:6", "layers=-3--1:0", "sink_scale=0.8,layers=0:3-5:9",
    "clip=8", "clip=2.5000001", "clip_abs=500", "clip_abs=1e-07,sink_scale=0.95",
    "hidden_sink_scale=0.4", "hidden_sink_threshold=0.25", "hidden_sink_scale=0.9,hidden_sink_threshold=0.1",
    "sink_scale=0.7,virtual_sink_logit=0.1,virtual_logit_on_sink_rows=1,n_sink=2,layers=1:2,"
    "extra_sink_positions=7,clip=6.5,hidden_sink_scale=0.3,hidden_sink_threshold=0.15",
    "identity", "drop", "act",
]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS)
def test_describe_parses_back_to_an_equal_policy(spec):
    policy = Policy.parse(spec)
    text = policy.describe()
    assert Policy.parse(text) == policy, text
    assert Policy.parse(text).describe() == text


def test_the_round_trip_covers_every_spec_key():
    used = {item.split("=", 1)[0].strip() for spec in ROUND_TRIP_SPECS for item in spec.split(",") if "=" in item}
    assert used == set(SPEC_KEYS)


@pytest.mark.parametrize("policy", [
    Policy(n_sink=2),  # behaves as the identity, but is not Policy()
    Policy(sink_scale=1, layers=(0,)),
    Policy(residual_clip=ResidualClip(8.0)),
    Policy(residual_clip=ResidualClip(500, mode="absolute")),
    Policy.act(0.25, 0.05),
    Policy(sink_scale=2 / 3, virtual_sink_logit=math.pi),
])
def test_describe_of_constructed_policies_parses_back(policy):
    assert Policy.parse(policy.describe()) == policy


@pytest.mark.parametrize("policy, part", [
    (Policy(residual_clip=ResidualClip(8.0, sink_norm=30.0)), "clip_sink_norm=30"),
    (Policy(residual_clip=ResidualClip([8.0, 9.0])), "clip=per-layer"),
    (Policy(sink_scale=torch.full((2, 4), 0.5)), "sink_scale=per-head[0.5..0.5]"),
    (Policy(content_sinks=ContentSinks(min_rows=4)), "min_rows=4"),
    (Policy(content_sinks=ContentSinks(reevaluate_every=16)), "reevaluate_every=16"),
    # the API keeps the flag without a virtual logit (it changes nothing); a spec refuses the item
    (Policy(virtual_logit_on_sink_rows=True), "virtual_logit_on_sink_rows=1"),
    (Policy(content_sinks=ContentSinks(hidden_sink_scale=1.0)), "hidden_sink_scale=1"),
])
def test_what_a_spec_cannot_say_is_named_and_not_read_as_something_else(policy, part):
    text = policy.describe()
    assert part in text.split(",")
    with pytest.raises(PolicyError):
        Policy.parse(text)


# -- the profile loader refuses malformed fields ---------------------------------------------------
def _profile_dict() -> dict:
    identity = ModelIdentity("LlamaForCausalLM", 2, (4, 4), 2, 64, 128, "ab" * 16, name="tiny")
    return Profile(identity, torch.full((2, 4), 0.5, dtype=torch.float64), calibration={"note": "test"}).to_dict()


@pytest.mark.parametrize("section, key, value, message", [
    ("policy", "n_sink", 1.7, "n_sink must be an integer, got 1.7"),
    ("policy", "n_sink", True, "n_sink must be an integer, got true"),
    ("policy", "n_sink", "1", 'n_sink must be an integer, got "1"'),
    ("policy", "n_sink", -1, "n_sink must be >= 0"),
    ("policy", "extra_sink_positions", "12", 'extra_sink_positions must be a list of integers, got "12"'),
    ("policy", "extra_sink_positions", "5", 'extra_sink_positions must be a list of integers, got "5"'),
    ("policy", "extra_sink_positions", [1.0], r"extra_sink_positions must be a list of integers, got \[1.0\]"),
    ("policy", "extra_sink_positions", [True], r"extra_sink_positions must be a list of integers, got \[true\]"),
    ("policy", "extra_sink_positions", None, "extra_sink_positions must be a list of integers, got null"),
    ("policy", "extra_sink_positions", [-2], "extra_sink_positions must be >= 0"),
    ("policy", "residual_clip", "88", r'residual_clip must be a list of numbers \(or "inf"\), got "88"'),
    ("policy", "residual_clip", ["8", 2], "residual_clip must be a list of numbers"),
    ("policy", "residual_clip", [True, 2], "residual_clip must be a list of numbers"),
    ("policy", "sink_scale", [[True] * 4] * 2, "sink_scale must hold numbers, not true/false"),
    ("model", "num_layers", "2", 'model.num_layers must be an integer, got "2"'),
    ("model", "num_layers", 2.0, "model.num_layers must be an integer, got 2.0"),
    ("model", "num_heads", "44", 'model.num_heads must be a list of integers, got "44"'),
    ("model", "hidden_size", 64.5, "model.hidden_size must be an integer, got 64.5"),
    ("model", "vocab_size", True, "model.vocab_size must be an integer, got true"),
    ("model", "architecture", 5, "model.architecture must be a string, got 5"),
    ("model", "fingerprint", None, "model.fingerprint must be a string, got null"),
    ("model", "name", 3, "model.name must be a string or null, got 3"),
    (None, "version", True, "no integer 'version' \\(got true\\)"),
])
def test_profile_loader_refuses_malformed_fields(tmp_path, section, key, value, message):
    data = _profile_dict()
    (data if section is None else data[section])[key] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        Profile.load(path)


def test_profile_statistics_counts_must_be_integers():
    data = _profile_dict()
    data["statistics"] = {"sink_share_unscaled": {"low": [[0.1] * 4] * 2, "high": [[0.5] * 4] * 2},
                          "windows": 2.5, "min_rows": 8}
    with pytest.raises(ProfileError, match="statistics.windows must be an integer, got 2.5"):
        Profile.from_dict(data)
    data["statistics"]["windows"], data["statistics"]["min_rows"] = 2, True
    with pytest.raises(ProfileError, match="statistics.min_rows must be an integer, got true"):
        Profile.from_dict(data)
    data["statistics"]["min_rows"] = 8
    assert Profile.from_dict(data).statistics.windows == 2


def test_content_sink_heads_must_be_true_or_false():
    data = _profile_dict()
    data["version"] = CONTENT_VERSION
    data["policy"]["mode"] = "content"
    data["policy"]["content_sinks"] = {"threshold": 0.1, "hidden_sink_scale": [[0.4] * 4] * 2,
                                       "heads": [[1, 0, 0.5, 0]] * 2, "min_rows": 1, "reevaluate_every": None}
    with pytest.raises(ProfileError, match="content_sinks.heads must be a \\[layers\\]\\[heads\\] array of true/false"):
        Profile.from_dict(data)
    data["policy"]["content_sinks"]["heads"] = [[True, False, True, False]] * 2
    heads = Profile.from_dict(data).content_sinks.heads
    assert heads.dtype == torch.bool and heads.sum().item() == 4


def test_valid_and_older_profiles_still_load(tmp_path):
    data = _profile_dict()
    data["policy"].update(n_sink=2, extra_sink_positions=[5, 9], residual_clip=[8, "inf"])
    loaded = Profile.from_dict(data)
    assert loaded.n_sink == 2 and loaded.extra_sink_positions == (5, 9)
    assert loaded.residual_clip == [8.0, math.inf]
    assert Profile.load(loaded.save(tmp_path / "p.json")).to_dict() == loaded.to_dict()
    # version 1: no row flag, no domains; n_sink / extra_sink_positions may be absent entirely
    v1 = _profile_dict()
    v1["version"] = 1
    for key in ("virtual_logit_on_sink_rows", "n_sink", "extra_sink_positions"):
        del v1["policy"][key]
    del v1["domains"]
    old = Profile.from_dict(v1)
    assert old.n_sink == 1 and old.extra_sink_positions == () and old.virtual_logit_on_sink_rows is True
    # null optional model fields are still accepted
    data = _profile_dict()
    data["model"].update(num_kv_heads=None, hidden_size=None, vocab_size=None, name=None)
    assert Profile.from_dict(data).model.num_kv_heads is None


# -- wrong argument types to Policy(...) -----------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: Policy(residual_clip=2.0), r"residual_clip must be a sinkfix.ResidualClip or None .*got float 2.0"),
    (lambda: Policy(layers="0:1"), "layers must be a list or tuple of ints, got str '0:1'"),
    (lambda: Policy(layers=3), "layers must be a list or tuple of ints, got int 3"),
    (lambda: Policy(layers=(1, 1.5)), "layers must be a list or tuple of ints; item 1 is float 1.5"),
    (lambda: Policy(layers=[True]), "item 0 is bool True"),
    (lambda: Policy(extra_sink_positions="12"), "extra_sink_positions must be a list or tuple of ints, got str"),
    (lambda: Policy(n_sink=True), "n_sink must be a non-negative int, got bool True"),
    (lambda: Policy(n_sink=1.5), "n_sink must be a non-negative int, got float 1.5"),
    (lambda: Policy(sink_scale="0.9"), "sink_scale must be a number, .* or a tensor, got str '0.9'"),
    (lambda: Policy(sink_scale=None), "sink_scale must be a number, .* got NoneType"),
    (lambda: Policy(virtual_sink_logit=[1.0, "a"]), "virtual_sink_logit must be a number, .* got list"),
    (lambda: ResidualClip("8"), "residual_clip.threshold must be a number or one number per layer, got str '8'"),
    (lambda: ResidualClip(8.0, sink_norm="1"), "residual_clip.sink_norm must be a number"),
    (lambda: ContentSinks(hidden_sink_scale="0.4"), "hidden_sink_scale must be a number, .* got str '0.4'"),
    (lambda: ContentSinks(heads="ab"), "content sink heads must be a bool"),
])
def test_wrong_argument_types_are_policy_errors(make, message):
    with pytest.raises(PolicyError, match=message) as info:
        make()
    assert isinstance(info.value, SinkfixError)


def test_valid_argument_types_still_work():
    beta = torch.full((2, 4), 0.5)
    pol = Policy(sink_scale=beta, virtual_sink_logit=np.zeros((2, 4)), n_sink=np.int64(2),
                 extra_sink_positions=torch.tensor([5, 7]), layers=np.array([0, 1]),
                 residual_clip=ResidualClip([8.0, math.inf], sink_norm=100))
    assert pol.n_sink == 2 and type(pol.n_sink) is int
    assert pol.extra_sink_positions == (5, 7) and pol.layers == (0, 1)
    assert all(type(v) is int for v in pol.extra_sink_positions + pol.layers)
    assert len(pol.resolve(2, [4, 4])) == 2
    assert Policy(sink_scale=[[0.5, 1.0]], layers=range(1)).layers == (0,)
    assert Policy(sink_scale=np.float32(0.5), layers=[1.0, 2]).layers == (1, 2)  # integral floats, as before
    assert Policy(sink_scale=torch.tensor(0.9, requires_grad=True)).sink_scale.requires_grad


@pytest.mark.parametrize("beta, logit, message", [
    (torch.full((4,), 1.5), None, r"layer 0: beta must lie in \[0.0, 1.0\]"),
    (torch.full((4,), -0.5), None, r"layer 0: beta must lie in \[0.0, 1.0\]"),
    (torch.full((4,), float("nan")), None, "layer 0: beta contains NaN or inf"),
    (torch.full((4,), float("inf")), None, "layer 0: beta contains NaN or inf"),
    (torch.full((4,), 0.9), torch.full((4,), float("nan")), "layer 0: virtual_sink_logit contains NaN or inf"),
    ([0.9] * 4, None, r"layer 0: beta must be a tensor of shape \(4,\), got list"),
    (torch.empty(4, device="meta"), None, "layer 0: beta is on the meta device"),
    (torch.full((3,), 0.9), None, r"layer 0: beta must have shape \(4,\), got \(3,\)"),
    (torch.full((4,), 1.0000001, dtype=torch.float64), None, r"got min 1.0000001, max 1.0000001"),  # not "1, 1"
])
def test_live_parameters_are_checked_like_a_policys(beta, logit, message):
    """LayerPolicy.set_parameters (PatchHandle.layer_policies(): the documented way to change a patched
    model at once) checked shapes only: a beta of 1.5 or -0.5 was computed, NaN / inf gave NaN logits,
    a list or a meta tensor raised Python's own errors. The model keeps its parameters."""
    import sinkfix

    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with sinkfix.patch(model, Policy(sink_scale=0.5)) as handle, torch.no_grad():
        before = model(ids).logits
        layer = handle.layer_policies()[0]
        with pytest.raises(PolicyError, match=message):
            layer.set_parameters(beta, logit)
        assert torch.equal(model(ids).logits, before)


def test_a_value_just_out_of_range_is_printed_with_the_digits_that_show_it():
    """A Python float is kept in float64: 1.0000000001 was refused as "got min 1, max 1"."""
    with pytest.raises(PolicyError, match=r"got min 1.0000000001, max 1.0000000001"):
        Policy(sink_scale=1.0000000001)


def test_a_meta_tensor_policy_is_refused_by_name():
    with pytest.raises(PolicyError, match="sink_scale is a tensor on the meta device"):
        Policy(sink_scale=torch.empty(2, 4, device="meta"))


@pytest.mark.parametrize("sink_scale", [0.3, torch.full((2, 4), 0.5)])
def test_a_sink_scale_on_an_empty_sink_set_is_said(sink_scale):
    """A spec refuses it; built in Python it was kept (a profile may set it) and gave the stock model bit
    for bit, unsaid."""
    with pytest.warns(UserWarning, match="n_sink=0 without extra_sink_positions leaves it empty"):
        Policy(sink_scale=sink_scale, n_sink=0)


def test_a_policy_whose_items_all_act_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Policy(sink_scale=0.3, n_sink=0, extra_sink_positions=(2,))
        Policy(n_sink=0)
        Policy(virtual_sink_logit=-2.0, virtual_logit_on_sink_rows=True)
        Policy(virtual_logit_on_sink_rows=True)  # live parameters may add the logits it acts on


@pytest.mark.parametrize("where, key", [(None, "domian"), (None, "statistic"), ("model", "fingerprnt_dtype")])
def test_a_profile_key_this_reader_does_not_know_is_named(where, key):
    """Unknown keys of "policy" are refused; at the top and in "model" they were ignored unsaid, so a
    hand-edited "domian" (for "domains") loaded with the section silently absent."""
    data = _profile_dict()
    (data if where is None else data[where])[key] = {}
    with pytest.warns(UserWarning, match=rf"has key\(s\) this sinkfix does not know, ignored: '{key}'"):
        Profile.from_dict(data)


def test_a_profile_as_written_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Profile.from_dict(_profile_dict())
