"""The telemetry guard on tiny models: calibration statistics in the profile, a request inside the
ranges left alone, a request far outside them served by the identity (the prompt rerun, generated
tokens equal to the identity model's), scopes, and the errors a guard can meet."""

from __future__ import annotations

import json

import pytest
import torch

import sinkfix
from sinkfix.errors import MonitorError, ProfileError
from sinkfix.profile import ModelIdentity, Profile, ProfileStatistics
from sinkfix.telemetry import Guard, calibration_statistics

from .conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ids(length: int, seed: int, high: int = 97) -> torch.Tensor:
    return torch.randint(2, high, (1, length), generator=torch.Generator().manual_seed(seed))


def _profile(model) -> Profile:
    g = torch.Generator().manual_seed(0)
    return Profile(ModelIdentity.of(model), 0.5 + 0.4 * torch.rand(2, 4, generator=g, dtype=torch.float64))


@pytest.fixture
def calibrated(one_thread):
    """A tiny model and a profile carrying statistics measured on 6 random-token windows of 64."""
    model = tiny_model("llama")
    profile = _profile(model)
    with sinkfix.patch(model, profile):
        stats = calibration_statistics(model, [_ids(64, seed)[0] for seed in range(6)], min_rows=16,
                                       protocol={"seq_len": 64})
    return model, profile.with_statistics(stats)


def test_statistics_are_prefix_ranges_of_the_live_statistic(calibrated):
    """low / high bracket the live prompt statistic of every calibration window and of its
    prefixes, and the widest ones are reached (not a loose bound)."""
    model, profile = calibrated
    stats = profile.statistics
    assert stats.windows == 6 and stats.min_rows == 16 and (stats.low < stats.high).all()
    with sinkfix.patch(model, profile), sinkfix.monitor(model) as monitor:
        for seed, length in ((0, 64), (3, 64), (4, 17), (5, 40)):
            with torch.no_grad(), monitor.request():
                model(input_ids=_ids(64, seed)[:, :length], use_cache=False)
            share = torch.tensor(monitor.records[0]["sink_share_unscaled"], dtype=torch.float64)
            assert (share >= stats.low - 1e-6).all() and (share <= stats.high + 1e-6).all()


def test_profile_statistics_round_trip_and_old_profiles_load(calibrated, tmp_path):
    model, profile = calibrated
    path = profile.save(tmp_path / "p.json")
    loaded = Profile.load(path)
    torch.testing.assert_close(loaded.statistics.low, profile.statistics.low)
    assert loaded.statistics.protocol == {"seq_len": 64}
    data = json.loads(path.read_text())
    del data["statistics"]  # a profile written before statistics existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Profile.load(tmp_path / "old.json").statistics is None
    data["statistics"] = {"sink_share_unscaled": {"low": [[0.5] * 4] * 2, "high": [[0.1] * 4] * 2},
                          "windows": 1, "min_rows": 8}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="low > high"):
        Profile.load(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="shape"):
        profile.with_statistics(ProfileStatistics(torch.zeros(3, 4), torch.ones(3, 4), 1, 8))


def test_request_inside_the_ranges_keeps_the_correction(calibrated):
    model, profile = calibrated
    with sinkfix.patch(model, profile), sinkfix.monitor(model, guard=profile) as monitor, torch.no_grad():
        monitor.generate(input_ids=_ids(64, 2), max_new_tokens=4, do_sample=False, pad_token_id=0)
        guard = monitor.records[0]["guard"]
        assert guard["checked"] and not guard["tripped"] and guard["action"] == "none"
        assert guard["worst"]["excess"] < 0 and monitor.records[0]["correction"]["identity_layers"] == []
        monitor.generate(input_ids=_ids(8, 2), max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert not monitor.records[0]["guard"]["checked"]  # 7 rows < min_rows: not judged


def _far_outside() -> torch.Tensor:
    """A prompt unlike the calibration windows: 250 tokens where calibration never saw more than 64.
    A random model's attention spreads over the longer context and its sink share falls to ~0.02,
    a third of the smallest calibration value (~0.059, measured). (On SmolLM2, with real text, the
    slow test uses a prompt of random token ids instead.)"""
    return _ids(250, 9)


def test_request_far_outside_is_served_by_the_identity(calibrated):
    model, profile = calibrated
    prompt = _far_outside()
    with torch.no_grad():
        with sinkfix.patch(model):
            identity_tokens = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            identity_logits = model(input_ids=prompt).logits
        with sinkfix.patch(model, profile):
            corrected_logits = model(input_ids=prompt).logits
            with sinkfix.monitor(model, guard=profile, guard_margin=0.02) as monitor:
                logits = monitor.forward(input_ids=prompt).logits
                tokens = monitor.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            record = monitor.records[0]
            # after the request the correction is back for the next one
            assert sinkfix.PatchHandle.of(model).identity_layers == []
            assert torch.equal(model(input_ids=prompt).logits, corrected_logits)
    guard = record["guard"]
    assert guard["tripped"] and guard["action"] == "rerun as identity" and guard["layers"] == [0, 1]
    assert guard["worst"]["share"] < guard["worst"]["low"] - 0.02
    assert record["correction"]["identity_layers"] == [0, 1]
    assert record["sink_share"] == record["sink_share_unscaled"]  # beta = 1 served
    assert record["tokens"] == 255  # the rerun prompt counted once
    assert torch.equal(tokens, identity_tokens) and torch.equal(logits, identity_logits)
    assert (corrected_logits - identity_logits).abs().max() > 1e-3


def test_a_tripped_row_reruns_the_whole_batch_and_every_record_says_so(calibrated):
    """One forward serves a batch: an in-range row next to a far-outside one is served by the
    fallback too, and its record says why (it once said "none" although it was rerun)."""
    model, profile = calibrated
    inside, far = _ids(64, 2), _far_outside()
    batch = torch.zeros(2, far.shape[1], dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0, -64:], mask[0, -64:] = inside[0], 1
    batch[1], mask[1] = far[0], 1
    with torch.no_grad():
        with sinkfix.patch(model):
            identity_logits = model(input_ids=batch, attention_mask=mask).logits
        with sinkfix.patch(model, profile), sinkfix.monitor(model, guard=profile, guard_margin=0.02) as monitor:
            logits = monitor.forward(input_ids=batch, attention_mask=mask).logits
            records = monitor.records
    in_range, tripped = records[0]["guard"], records[1]["guard"]
    assert tripped["tripped"] and tripped["action"] == "rerun as identity"
    assert not in_range["tripped"] and in_range["layers"] == []
    assert in_range["action"] == "rerun as identity: another row of the batch tripped"
    assert records[0]["correction"]["identity_layers"] == [0, 1]
    torch.testing.assert_close(logits[0, -64:], identity_logits[0, -64:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("scope", ["layers", "request"])
def test_guard_scopes(scope, one_thread):
    """Ranges that only layer 1 violates: scope 'layers' switches layer 1 off, 'request' both."""
    model = tiny_model("llama")
    profile = _profile(model)
    ranges = ProfileStatistics(torch.tensor([[0.0] * 4, [0.9] * 4]), torch.ones(2, 4), 1, 8)
    profile = profile.with_statistics(ranges)
    with sinkfix.patch(model, profile), sinkfix.monitor(model, guard=Guard(ranges, 0.05, scope)) as monitor:
        with torch.no_grad():
            monitor.forward(input_ids=_ids(30, 1))
    record = monitor.records[0]
    assert record["guard"]["layers"] == [1]
    assert record["correction"]["identity_layers"] == ([1] if scope == "layers" else [0, 1])


def test_guard_errors(calibrated, one_thread):
    model, profile = calibrated
    bare = Profile(profile.model, profile.sink_scale)
    with pytest.raises(MonitorError, match="not patched"):
        sinkfix.monitor(model, guard=profile)
    with sinkfix.patch(model, bare):
        with pytest.raises(MonitorError, match="carries calibration statistics"):
            sinkfix.monitor(model, guard=bare)
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.9)):
        with pytest.raises(MonitorError, match="not the policy this model is patched with"):
            sinkfix.monitor(model, guard=profile)
    with pytest.raises(MonitorError, match="margin"):
        Guard(profile.statistics, margin=-1)
    with pytest.raises(MonitorError, match="patched model"):
        calibration_statistics(model, [_ids(20, 0)[0]])


def test_a_cache_that_cannot_be_rolled_back_is_left_as_the_forward_made_it(one_thread):
    """A Qwen2 whose first layer is full and second sliding (window 5): the prompt's keys cannot be
    cropped from the sliding layer once the window is full. transformers crops layer by layer, so the
    full layer used to lose the prompt's keys before the sliding one refused; now nothing is cut."""
    import transformers as tf
    from transformers import DynamicCache

    from sinkfix.telemetry.monitor import _rollback

    from .conftest import _COMMON

    torch.manual_seed(0)
    config = tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                            **_COMMON)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=_ids(20, 1), past_key_values=cache)
        model(input_ids=_ids(30, 2), past_key_values=cache, position_ids=torch.arange(20, 50)[None])
    before = [(layer.keys, layer.values) for layer in cache.layers]
    assert before[0][0].shape[-2] == 50
    assert not _rollback(cache, 20, 30)
    for layer, (keys, values) in zip(cache.layers, before):
        assert layer.keys is keys and layer.values is values
    assert cache.get_seq_length() == 50
    # a cache that can be rolled back still is (layer by layer, both layers full)
    full = DynamicCache(config=tiny_model("llama").config)
    llama = tiny_model("llama")
    with torch.no_grad():
        llama(input_ids=_ids(20, 1), past_key_values=full)
        llama(input_ids=_ids(30, 2), past_key_values=full, position_ids=torch.arange(20, 50)[None])
    assert _rollback(full, 20, 30) and full.get_seq_length() == 20


def test_a_head_whose_share_is_not_a_number_trips_the_guard_and_the_record_is_logged(calibrated, tmp_path):
    """A NaN weight makes one layer's shares NaN: the guard treats them as out of every range (a NaN
    comparison used to say in range) and the record's numbers that are not finite are null in the
    log (they used to fail the JSON write and lose the request)."""
    model, profile = calibrated
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    profile = profile.without_weights_check()  # the NaN changed the weights' fingerprint
    log = tmp_path / "t.jsonl"
    with sinkfix.patch(model, profile), sinkfix.monitor(model, guard=profile, log=log) as monitor, torch.no_grad():
        monitor.forward(input_ids=_ids(64, 2))
    guard = monitor.records[0]["guard"]
    assert guard["tripped"] and 1 in guard["layers"] and guard["worst"]["layer"] == 1
    assert guard["worst"]["share"] is None and guard["worst"]["excess"] is None
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["guard"]["tripped"]


def test_guard_margin_is_applied_or_refused(calibrated):
    """guard_margin sets a profile's guard margin; with a Guard (which carries its own) or without a
    guard it is refused, never ignored."""
    model, profile = calibrated
    with sinkfix.patch(model, profile):
        with sinkfix.monitor(model, guard=profile, guard_margin=0.4) as monitor:
            assert monitor.guard.margin == 0.4
        with sinkfix.monitor(model, guard=profile) as monitor:
            assert monitor.guard.margin == 0.15
        guard = Guard.from_profile(profile, margin=0.3)
        with sinkfix.monitor(model, guard=guard, guard_margin=0.3) as monitor:
            assert monitor.guard is guard
        with pytest.raises(MonitorError, match="carries its own margin"):
            sinkfix.monitor(model, guard=guard, guard_margin=0.4)
        with pytest.raises(MonitorError, match="guard_margin without a guard"):
            sinkfix.monitor(model, guard_margin=0.4)
        assert sinkfix.PatchHandle.of(model).policy == profile.policy_for(model)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3)])
def test_a_guard_made_for_another_model_is_refused_at_creation(shape, one_thread):
    """A Guard built by hand is checked against the model when the monitor is made (its ranges met
    the first request's statistics in a broadcast RuntimeError)."""
    model = tiny_model("llama")  # 2 attention layers of 4 heads
    guard = Guard(ProfileStatistics(torch.zeros(*shape), torch.ones(*shape), 1, 8), 0.05)
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.8)):
        with pytest.raises(MonitorError, match=r"\(layers, heads\).*2 attention layers of up to 4 heads"):
            sinkfix.monitor(model, guard=guard)
        fitting = Guard(ProfileStatistics(torch.zeros(2, 4), torch.ones(2, 4), 1, 8), 0.05)
        with sinkfix.monitor(model, guard=fitting) as monitor, torch.no_grad():
            monitor.forward(input_ids=_ids(30, 1))
        assert monitor.records[0]["guard"]["checked"]
