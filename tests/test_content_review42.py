"""Review 42 of content-dependent sinks: a refused call or an identity step in the middle of a
cached generation left the cache one token ahead of its sink set (every later call refused as
"filled without this content-sink policy"); ``use_sink_sets`` on a cache holding keys, or with sets
for some layers only, failed the same way; out-of-range ``min_rows`` / ``reevaluate_every``, complex
parameters and a scalar ``heads=True`` were accepted (and described wrongly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import ContentSinks, Policy, ResidualClip
from sinkfix.errors import PolicyError
from sinkfix.integrations.content_sinks import sink_sets, use_sink_sets

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = 12


def _prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def _step(model, ids, cache, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, cache=cache, use_cache=True, **kwargs).logits[:, -1]


def _lengths(cache) -> list[int]:
    return [layer.get_seq_length() for layer in cache.layers]


# -- 1. a refused call is refused before any layer stores its keys -----------------------------------
@pytest.mark.parametrize("policy", [Policy.act(threshold=0.05),
                                    Policy(content_sinks=ContentSinks(threshold=0.05, hidden_sink_scale=0.3),
                                           layers=(1,))],
                         ids=["every layer", "layer 1 only"])
@pytest.mark.parametrize("how", ["output_attentions", "observer"])
def test_a_refused_decode_call_leaves_the_cache_in_step(policy, how):
    """Before: layer 0 stored the refused call's key (lengths [13, 12]) and the next, normal decode
    step failed with "filled without this content-sink policy"."""
    model = tiny_model("llama")
    ids = _prompt()
    with torch.no_grad(), sinkfix.patch(model, policy, backend="torch") as handle:
        cache = tf.DynamicCache(config=model.config)
        nxt = _step(model, ids, cache).argmax(-1, keepdim=True)
        with pytest.raises(NotImplementedError, match="not implemented for content-dependent sinks") as refused:
            if how == "output_attentions":
                _step(model, nxt, cache, output_attentions=True)
            else:
                with handle.observing(lambda call: None):
                    _step(model, nxt, cache)
        assert _lengths(cache) == [PROMPT, PROMPT]
        after_refusal = _step(model, nxt, cache)
        clean = tf.DynamicCache(config=model.config)
        _step(model, ids, clean)
        expected = _step(model, nxt, clean)
    torch.testing.assert_close(after_refusal, expected, atol=1e-6, rtol=0)
    assert "nothing of this call was stored in the cache, which can go on" in str(refused.value)


def test_the_out_of_step_error_names_the_other_causes_and_the_remedy():
    """A decode step run while another patch (here the identity) replaced the content-sink one: the
    next call's error named only "before patching, or by another model". It now names the other
    causes and says that reset() and feeding the sequence again repairs the cache, which it does."""
    model = tiny_model("llama")
    ids = _prompt(1)
    with torch.no_grad(), sinkfix.patch(model, Policy.act(threshold=0.05), backend="torch"):
        cache = tf.DynamicCache(config=model.config)
        nxt = _step(model, ids, cache).argmax(-1, keepdim=True)
        with sinkfix.patch(model, Policy(), backend="torch"):
            _step(model, nxt, cache)
        assert _lengths(cache) == [PROMPT + 1, PROMPT + 1]
        with pytest.raises(PolicyError, match=rf"decided for {PROMPT}: .*while a patch without it was in force.*"
                                              rf"failed in this layer's attention.*reset\(\) the cache and feed the "
                                              rf"sequence again"):
            _step(model, nxt, cache)
        cache.reset()
        _step(model, ids, cache)
        repaired = _step(model, nxt, cache)
        clean = tf.DynamicCache(config=model.config)
        _step(model, ids, clean)
        expected = _step(model, nxt, clean)
    torch.testing.assert_close(repaired, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_identity_steps_keep_the_sink_set_in_step(arch):
    """``run_as_identity`` for a decode step, then ``restore_layers``: the restored step was refused
    ("filled without this content-sink policy"). Its key is an ordinary key: the restored step
    equals one that applies the prompt's set to a cache whose identity step ran under an identity
    patch (use_sink_sets on the cache holding those keys)."""
    model = tiny_model(arch)
    ids = _prompt(2)
    policy = Policy(content_sinks=ContentSinks(threshold=0.05, hidden_sink_scale=0.3))
    with torch.no_grad(), sinkfix.patch(model, policy, backend="torch") as handle:
        cache = tf.DynamicCache(config=model.config)
        first = _step(model, ids, cache).argmax(-1, keepdim=True)
        prompt_sets = sink_sets(cache)
        assert any(bool(s.any()) for s in prompt_sets.values())  # the prompt has hidden sinks
        handle.run_as_identity([0, 1])
        identity_logits = _step(model, first, cache)
        handle.restore_layers()
        second = identity_logits.argmax(-1, keepdim=True)
        restored = _step(model, second, cache)
        assert {layer: s.shape[-1] for layer, s in sink_sets(cache).items()} == {0: PROMPT + 2, 1: PROMPT + 2}

        reference = tf.DynamicCache(config=model.config)
        _step(model, ids, reference)
        with sinkfix.patch(model, Policy(), backend="torch"):  # the identity step, under an identity patch
            reference_identity = _step(model, first, reference)
        use_sink_sets(reference, prompt_sets)
        expected = _step(model, second, reference)
    torch.testing.assert_close(identity_logits, reference_identity, atol=1e-6, rtol=0)
    torch.testing.assert_close(restored, expected, atol=1e-6, rtol=0)


def test_identity_steps_with_reevaluate_every_leave_their_rows_out_of_the_statistics():
    """With ``reevaluate_every`` the restored steps add their rows and decide again; the identity
    step's row is not in the column statistics (the rule did not run on it) and does not count as
    one of the N steps."""
    from sinkfix.integrations.content_sinks import store_of

    model = tiny_model("llama")
    ids = _prompt(4)
    rule = ContentSinks(threshold=0.05, hidden_sink_scale=0.3, reevaluate_every=2)
    with torch.no_grad(), sinkfix.patch(model, Policy(content_sinks=rule), backend="torch") as handle:
        cache = tf.DynamicCache(config=model.config)
        token = _step(model, ids, cache).argmax(-1, keepdim=True)
        handle.run_as_identity([0, 1])
        token = _step(model, token, cache).argmax(-1, keepdim=True)
        handle.restore_layers()
        token = _step(model, token, cache).argmax(-1, keepdim=True)
        entry = store_of(cache).layers[0]
        assert (entry.length, entry.stats_end, entry.steps_since_decision) == (PROMPT + 2, PROMPT + 2, 1)
        last = _step(model, token, cache)  # the second restored step decides again
        assert torch.isfinite(last).all()
    entry = store_of(cache).layers[0]
    assert (entry.length, entry.steps_since_decision) == (PROMPT + 3, 0)
    # rows seeing column 0: the prompt's and the two restored steps', not the identity step's
    assert entry.stats.rows[0, 0].item() == PROMPT + 2
    # column PROMPT (the identity step's key): seen by the two restored rows only
    assert entry.stats.rows[0, PROMPT].item() == 2
    assert entry.hidden.shape[-1] == PROMPT + 3


# -- 2. use_sink_sets on a cache holding keys; sets for some layers only -------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_use_sink_sets_on_a_cache_that_holds_the_keys_they_were_decided_on(arch):
    """The report's t27: the frozen store started at length 0 and the next decode step was refused
    as "the cache holds 14 keys but a sink set was decided for 0". gemma3's layer 0 is a sliding
    window of 5: its cache holds 5 columns of 14 positions."""
    model = tiny_model(arch)
    ids = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(3, 97, (1, 1), generator=torch.Generator().manual_seed(1))
    policy = Policy(content_sinks=ContentSinks(threshold=0.05, hidden_sink_scale=0.3))
    with torch.no_grad(), sinkfix.patch(model, policy, backend="torch"):
        decided = tf.DynamicCache(config=model.config)
        _step(model, ids, decided)
        sets = sink_sets(decided)
        assert any(bool(s.any()) for s in sets.values())
        expected = _step(model, nxt, decided)
        expected_next = _step(model, nxt, decided)
        given = tf.DynamicCache(config=model.config)
        _step(model, ids, given)  # the same keys
        use_sink_sets(given, sets)
        got = _step(model, nxt, given)
        got_next = _step(model, nxt, given)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_next, expected_next, atol=1e-6, rtol=0)


def test_use_sink_sets_for_some_layers_only_takes_later_calls():
    """The report's t28: a set for layer 0 only; layer 1 (no set: no hidden sinks) ran the prefill
    and refused the first decode step. It equals giving layer 1 an empty set."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(3, 97, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), sinkfix.patch(model, Policy(content_sinks=ContentSinks(threshold=0.05, hidden_sink_scale=0.3)),
                                        backend="torch"):
        decided = tf.DynamicCache(config=model.config)
        _step(model, ids, decided)
        sets = sink_sets(decided)
        assert bool(sets[1].any())  # an empty set for layer 1 is another set than the decided one
        runs = []
        for given in ({0: sets[0]}, {0: sets[0], 1: torch.zeros_like(sets[1])}):
            cache = use_sink_sets(tf.DynamicCache(config=model.config), given)
            runs.append([_step(model, ids, cache), _step(model, nxt, cache), _step(model, nxt, cache)])
    for got, expected in zip(*runs):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# -- 4. min_rows and reevaluate_every are bounded ----------------------------------------------------
@pytest.mark.parametrize("field", ["min_rows", "reevaluate_every"])
@pytest.mark.parametrize("value", [10 ** 30, 2 ** 63, 2 ** 24 + 1, 1e30])
def test_min_rows_and_reevaluate_every_above_the_bound_are_policy_errors(field, value):
    """min_rows=10**30 was accepted and failed at the first forward with torch's OverflowError."""
    with pytest.raises(PolicyError, match=rf"content sink {field} must be .*\[1, 16777216\].*MAX_CONTENT_ROWS"):
        ContentSinks(**{field: value})
    assert getattr(ContentSinks(**{field: 2 ** 24}), field) == 2 ** 24 == sinkfix.policy.MAX_CONTENT_ROWS


# -- 5. a scalar heads=True is every head -------------------------------------------------------------
@pytest.mark.parametrize("heads", [True, torch.tensor(True), np.bool_(True)])
def test_a_scalar_true_heads_is_every_head_and_describes_so(heads):
    """It described itself as "heads=1" (one corrected head) while correcting all of them."""
    rule = ContentSinks(threshold=0.05, hidden_sink_scale=0.3, heads=heads)
    policy = Policy(content_sinks=rule)
    assert policy.describe() == "sink_scale=1,hidden_sink_scale=0.3,hidden_sink_threshold=0.05"
    assert Policy.parse(policy.describe()) == policy
    assert rule.heads is None and rule == ContentSinks(threshold=0.05, hidden_sink_scale=0.3)
    # a scalar False is no head, as before
    assert Policy(content_sinks=ContentSinks(heads=False)).describe().endswith(",heads=0")


def test_a_profile_with_a_scalar_true_heads_loads_as_every_head(tmp_path):
    from sinkfix.profile import ModelIdentity, Profile

    model = tiny_model("llama", seed=3)
    rule = ContentSinks(threshold=0.1, hidden_sink_scale=0.5)
    path = Profile(ModelIdentity.of(model), torch.full((2, 4), 0.9, dtype=torch.float64),
                   content_sinks=rule).save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    data["policy"]["content_sinks"]["heads"] = True
    path.write_text(json.dumps(data))
    loaded = Profile.load(path).content_sinks
    assert loaded.heads is None and "heads=" not in loaded.describe()


# -- 6. complex parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, make", [
    ("hidden_sink_scale", lambda v: ContentSinks(hidden_sink_scale=v)),
    ("sink_scale", lambda v: Policy(sink_scale=v)),
    ("virtual_sink_logit", lambda v: Policy(virtual_sink_logit=v)),
    ("residual_clip.threshold", lambda v: ResidualClip(v + 2)),
    ("residual_clip.sink_norm", lambda v: ResidualClip(2.0, sink_norm=v + 2)),
    ("content sink threshold", lambda v: ContentSinks(threshold=v * 0.1)),
])
@pytest.mark.parametrize("value", [torch.tensor(0.5 + 3j), np.array([[0.5 + 3j] * 4] * 2), np.complex128(0.5 + 3j),
                                   torch.tensor(0.5 + 0j)], ids=["tensor", "array", "numpy scalar", "zero imaginary"])
def test_complex_parameters_are_refused_naming_them(name, make, value):
    """hidden_sink_scale=torch.tensor(0.5+3j) ran as 0.5 (the imaginary part dropped with torch's
    generic warning only), as sink_scale did."""
    with pytest.raises(PolicyError, match=rf"{name} must be .*real"):
        make(value)
