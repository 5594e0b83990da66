"""Content-dependent sinks in a patched model: the sink set is decided on the prompt, carried with
the KV cache through decoding, and a cached decode equals a full forward that applies the same set."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import ContentSinks, Policy, PolicyError
from sinkfix.integrations.content_sinks import sink_sets, store_of, use_sink_sets
from tests.conftest import tiny_model

PROMPT = 12
STEPS = 5


def _greedy(model, ids, attention_mask=None, steps=STEPS):
    """Prefill + ``steps`` cached greedy steps by hand: (tokens, logits of each step (B, steps+1, V), cache)."""
    cache = tf.DynamicCache(config=model.config)
    mask = attention_mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        tokens = ids
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return tokens, torch.stack(logits, dim=1), cache, mask


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decode_equals_a_full_forward_applying_the_prompt_decided_set(arch, padded, one_thread):
    model = tiny_model(arch)
    ids = torch.randint(1, 97, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding in the second row
    with sinkfix.patch(model, Policy.act(), backend="torch"):
        tokens, step_logits, cache, full_mask = _greedy(model, ids, mask)
        sets = sink_sets(cache)
        assert sets and all(s.shape[-1] == PROMPT + STEPS for s in sets.values())
        assert any(bool(s[..., :PROMPT].any()) for s in sets.values())  # the prompt has hidden sinks
        assert not any(bool(s[..., PROMPT:].any()) for s in sets.values())  # generated keys are never sinks
        with torch.no_grad():
            full = model(input_ids=tokens, attention_mask=full_mask,
                         cache=use_sink_sets(tf.DynamicCache(config=model.config), sets), use_cache=True).logits
            redecided = model(input_ids=tokens, attention_mask=full_mask).logits
    torch.testing.assert_close(full[:, PROMPT - 1:], step_logits, atol=2e-5, rtol=0)
    # deciding on the whole sequence instead (what the one forward does) is a different rule
    assert (redecided[:, PROMPT - 1:] - step_logits).abs().max() > 1e-3
    with torch.no_grad():
        stock = model(input_ids=tokens, attention_mask=full_mask).logits
    assert (stock[:, PROMPT - 1:] - step_logits).abs().max() > 1e-3  # the policy did something


def test_generate_carries_the_set_like_the_manual_loop(one_thread):
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with sinkfix.patch(model, Policy.act(), backend="torch"):
        tokens, _, _, _ = _greedy(model, ids)
        generated = model.generate(ids, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:, : PROMPT + STEPS], tokens)


def test_the_set_follows_cache_reorder_crop_and_repeat(one_thread):
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    with sinkfix.patch(model, Policy.act(), backend="torch"):
        _, _, cache, _ = _greedy(model, ids, steps=2)
        store_of(cache).layers[0].hidden[0] = False  # make the two sequences' sets differ for sure
        before = sink_sets(cache)
        cache.reorder_cache(torch.tensor([1, 0]))
        after = sink_sets(cache)
        assert all(torch.equal(after[layer], before[layer].flip(0)) for layer in before)
        assert not torch.equal(after[0], before[0])  # the two sequences' sets differ, so the swap is seen
        cache.crop(-2)  # remove the 2 decoded tokens (a crop into the prompt is refused afterwards: below)
        assert all(s.shape[-1] == PROMPT for s in sink_sets(cache).values())
        assert cache.get_seq_length() == PROMPT
        cache.batch_repeat_interleave(2)
        assert all(s.shape[0] == 4 for s in sink_sets(cache).values())
        # decoding goes on from the cropped, repeated cache
        with torch.no_grad():
            model(input_ids=torch.ones(4, 1, dtype=torch.long), cache=cache, use_cache=True)
        assert all(s.shape[-1] == PROMPT + 1 for s in sink_sets(cache).values())


@pytest.mark.parametrize("make_cache", ["dynamic", "sink"])
def test_a_reset_cache_decides_the_next_prompts_set_afresh(make_cache, one_thread):
    """``cache.reset()`` (a new batch) left the old prompt's sets and column statistics on the cache,
    and they were merged into the next prompt's decision (SmolLM2: logits 5.5 away from a fresh cache)."""
    model = tiny_model("llama")
    first = torch.randint(1, 97, (1, 20), generator=torch.Generator().manual_seed(5))
    second = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(6))

    def new_cache():
        if make_cache == "sink":
            return sinkfix.SinkCache(model.config, n_sink=2, window=64)
        return tf.DynamicCache(config=model.config)

    with sinkfix.patch(model, Policy.act(threshold=0.05), backend="torch"), torch.no_grad():
        cache = new_cache()
        model(input_ids=first, cache=cache, use_cache=True)
        assert sink_sets(cache)
        cache.reset()
        reused = model(input_ids=second, cache=cache, use_cache=True).logits
        fresh_cache = new_cache()
        fresh = model(input_ids=second, cache=fresh_cache, use_cache=True).logits
        assert {layer: s.shape for layer, s in sink_sets(cache).items()} == \
            {layer: s.shape for layer, s in sink_sets(fresh_cache).items()}
        assert all(torch.equal(sink_sets(cache)[layer], s) for layer, s in sink_sets(fresh_cache).items())
    torch.testing.assert_close(reused, fresh, rtol=0, atol=1e-6)


def test_a_sink_cache_that_has_evicted_is_refused_not_misread(one_thread):
    """The sets are kept per token from the first; a SinkCache that has evicted hands over
    [kept sinks][window][new], which was read as one run of tokens: the kept sinks got the flags of
    evicted tokens (SmolLM2: logits 0.15-0.71 off at every step). Until it evicts it equals a
    DynamicCache (the evicting call included); from the next call on the combination is refused."""
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(7))
    with sinkfix.patch(model, Policy.act(threshold=0.05), backend="torch"), torch.no_grad():
        sink, dynamic = sinkfix.SinkCache(model.config, n_sink=2, window=12), tf.DynamicCache(config=model.config)
        out = model(input_ids=ids, cache=sink, use_cache=True).logits
        torch.testing.assert_close(out, model(input_ids=ids, cache=dynamic, use_cache=True).logits, rtol=0, atol=0)
        step = torch.tensor([[4]])
        for _ in range(4):  # 14 tokens: the cache holds 2 sinks + a window of 12 without evicting
            a = model(input_ids=step, cache=sink, use_cache=True).logits
            b = model(input_ids=step, cache=dynamic, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        # the 15th token evicts; that call still sees its keys in order (equal), the next one would not
        a = model(input_ids=step, cache=sink, use_cache=True).logits
        torch.testing.assert_close(a, model(input_ids=step, cache=dynamic, use_cache=True).logits, rtol=0, atol=1e-6)
        with pytest.raises(sinkfix.errors.CacheError, match="cannot follow a SinkCache that has evicted"):
            model(input_ids=step, cache=sink, use_cache=True)


def test_reevaluation_decides_on_every_row_seen(one_thread):
    """With reevaluate_every = N, after N decode steps the set is decided on the prompt's and the
    generated rows. Layer 0's inputs do not depend on any correction, so its decision must equal
    the one a prefill of the whole sequence makes."""
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    rule = ContentSinks(threshold=0.1, hidden_sink_scale=0.4, reevaluate_every=4)
    with sinkfix.patch(model, Policy(content_sinks=rule), backend="torch"):
        tokens, _, cache, _ = _greedy(model, ids, steps=4)
        prefill_of_all = tf.DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=tokens, cache=prefill_of_all, use_cache=True)
    # after step 4 the loop's cache holds the same PROMPT + 4 keys, all of whose rows were seen
    decided = sink_sets(cache)[0]
    assert decided.shape[-1] == PROMPT + 4
    assert torch.equal(decided, sink_sets(prefill_of_all)[0])


def test_a_cache_filled_without_the_policy_is_refused(one_thread):
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    cache = tf.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)  # stock prefill
    with sinkfix.patch(model, Policy.act(), backend="torch"), torch.no_grad():
        with pytest.raises(PolicyError, match="filled without this content-sink policy"):
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)


def test_observers_are_refused_not_ignored(one_thread):
    # (the Triton backend runs content-dependent sinks: tests/kernels/test_content_path.py)
    model = tiny_model("llama")
    with sinkfix.patch(model, Policy.act(), backend="torch") as handle, torch.no_grad():
        with handle.observing(lambda call: None), pytest.raises(NotImplementedError, match="content-dependent"):
            model(input_ids=torch.ones(1, 4, dtype=torch.long))


# -- profiles record the mode ------------------------------------------------------------------------
def _content_profile(model):
    from sinkfix.profile import ModelIdentity, Profile

    rule = ContentSinks(threshold=0.15, hidden_sink_scale=torch.linspace(0.2, 0.9, 8, dtype=torch.float64).reshape(2, 4),
                        heads=torch.tensor([[True, False, True, True], [False, True, True, True]]), min_rows=4)
    return Profile(ModelIdentity.of(model), torch.full((2, 4), 0.9, dtype=torch.float64), content_sinks=rule)


def test_content_profile_round_trips_and_applies(tmp_path, one_thread):
    import json

    from sinkfix.profile import CONTENT_VERSION, VERSION, Profile

    model = tiny_model("llama")
    profile = _content_profile(model)
    path = profile.save(tmp_path / "content.json")
    data = json.loads(path.read_text())
    assert data["version"] == CONTENT_VERSION and data["policy"]["mode"] == "content"
    loaded = Profile.load(path)
    assert loaded.mode == "content" and loaded.content_sinks == profile.content_sinks
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with sinkfix.patch(model, loaded, backend="torch"):
            from_profile = model(input_ids=ids).logits
        with sinkfix.patch(model, profile.policy(), backend="torch"):
            from_policy = model(input_ids=ids).logits
    assert torch.equal(from_profile, from_policy)
    # a positional profile is still written (and read) as before
    positional = Profile(profile.model, profile.sink_scale)
    data = json.loads(positional.save(tmp_path / "pos.json").read_text())
    assert data["version"] == VERSION and "mode" not in data["policy"]
    assert Profile.load(tmp_path / "pos.json").mode == "positional"


def test_old_version_profile_naming_a_mode_is_refused(tmp_path, one_thread):
    import json

    from sinkfix.errors import ProfileError
    from sinkfix.profile import Profile

    model = tiny_model("llama")
    data = _content_profile(model).to_dict()
    for version in (1, 2, 3):
        data["version"] = version
        (tmp_path / "old.json").write_text(json.dumps(data))
        with pytest.raises(ProfileError, match=f"version-{version} profile cannot name a mode"):
            Profile.load(tmp_path / "old.json")
    data["version"] = 4
    data["policy"]["mode"] = "hidden"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="mode must be"):
        Profile.load(tmp_path / "bad.json")
    data["policy"]["mode"] = "content"
    data["policy"]["content_sinks"]["threshold"] = 1.5
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="threshold"):
        Profile.load(tmp_path / "bad.json")


def test_a_static_cache_is_refused(one_thread):
    model = tiny_model("llama")
    cache = tf.StaticCache(config=model.config, max_cache_len=32)
    with sinkfix.patch(model, Policy.act(), backend="torch"), torch.no_grad():
        with pytest.raises(PolicyError, match="fixed key columns"):
            model(input_ids=torch.ones(1, 6, dtype=torch.long), cache=cache, use_cache=True)


@pytest.mark.slow  # inductor compiles of a tiny model: ~1 min of CPU
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compiled_fullgraph_prefill_and_decode_equal_eager(arch, one_thread):
    """torch.compile(fullgraph=True) over the content path: the prompt decides the set, the
    compiled cached decode carries it, and every step's logits equal the eager patched model's;
    ``torch._dynamo.explain`` sees no graph break in a prefill or a cached decode step."""
    model = tiny_model(arch)
    ids = torch.randint(1, 97, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with sinkfix.patch(model, Policy.act(), backend="torch"):
        eager_tokens, eager_logits, eager_cache, _ = _greedy(model, ids, mask)
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, use_cache=False)
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
            cache = tf.DynamicCache(config=model.config)
            step = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            explained = torch._dynamo.explain(model)(input_ids=step, attention_mask=torch.cat(
                [mask, torch.ones_like(step)], 1), cache=cache, use_cache=True)
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        tokens, logits, compiled_cache, _ = _greedy(compiled, ids, mask)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=0)
    assert torch.equal(tokens, eager_tokens)
    for layer, mask_set in sink_sets(eager_cache).items():
        assert torch.equal(sink_sets(compiled_cache)[layer], mask_set)


@pytest.mark.slow  # an aot_eager compile of a tiny model
def test_a_cache_made_inside_a_compiled_forward_carries_and_follows_its_sets(one_thread):
    """A plain compiled forward (no cache given: transformers makes one inside the compiled region)
    under fullgraph: the cache it returns carries the prompt's sets, a cached step with it equals
    the eager model's, and a crop of it crops the sets too. The cache's followed methods used to be
    closures over bound methods, which dynamo cannot rebuild for a cache made inside the graph."""
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(6))
    nxt = torch.tensor([[5]])
    with sinkfix.patch(model, Policy.act(), backend="torch"), torch.no_grad():
        eager = model(input_ids=ids)
        eager_sets = {layer: hidden.clone() for layer, hidden in sink_sets(eager.past_key_values).items()}
        eager_step = model(input_ids=nxt, past_key_values=eager.past_key_values).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids)
        torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=0)
        cache = compiled.past_key_values
        assert eager_sets and set(sink_sets(cache)) == set(eager_sets)
        for layer, hidden in eager_sets.items():
            assert torch.equal(sink_sets(cache)[layer], hidden)
        step = model(input_ids=nxt, past_key_values=cache).logits
        torch.testing.assert_close(step, eager_step, atol=1e-5, rtol=0)
        cache.crop(-1)  # the step's token off again: the sets follow
        assert cache.get_seq_length() == PROMPT
        assert all(hidden.shape[-1] == PROMPT for hidden in sink_sets(cache).values())


def test_crop_zero_changes_nothing_and_a_crop_into_the_statistics_is_refused(one_thread):
    """transformers 5 calls crop(0) when assisted decoding accepts every candidate: it emptied the
    sets (the next step failed: "the cache holds 8 keys but a sink set was decided for 0"). A crop
    that removes tokens whose rows are in the column statistics cannot take them out of the sums:
    deciding again on them is refused (it used to count the removed rows: logits 3.8e-2 off).
    Cropping decoded tokens that never entered the statistics stays exact."""
    from sinkfix.errors import CacheError

    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(8))
    step = torch.tensor([[7]])
    with sinkfix.patch(model, Policy.act(), backend="torch"), torch.no_grad():
        fresh = tf.DynamicCache(config=model.config)
        model(input_ids=ids, cache=fresh, use_cache=True)
        expected = model(input_ids=step, cache=fresh, use_cache=True).logits
        cache = tf.DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True)
        cache.crop(0)
        assert cache.get_seq_length() == PROMPT and all(h.shape[-1] == PROMPT for h in sink_sets(cache).values())
        model(input_ids=torch.tensor([[3]]), cache=cache, use_cache=True)  # a decoded token, then taken back
        cache.crop(-1)
        torch.testing.assert_close(model(input_ids=step, cache=cache, use_cache=True).logits, expected,
                                   atol=1e-6, rtol=0)
        cache.crop(-4)  # into the prompt, whose rows are in the statistics and decided the sets
        with pytest.raises(CacheError, match="cropped below tokens whose attention rows"):
            model(input_ids=ids[:, :3], cache=cache, use_cache=True)
        with pytest.raises(CacheError, match="cropped below tokens whose attention rows"):
            model(input_ids=step, cache=cache, use_cache=True)  # a single step would apply those sets
        cache.reset()  # a reset cache decides afresh
        model(input_ids=ids, cache=cache, use_cache=True)
        torch.testing.assert_close(model(input_ids=step, cache=cache, use_cache=True).logits, expected,
                                   atol=1e-6, rtol=0)
