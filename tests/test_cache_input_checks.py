"""Input checks of the sink cache: feed()'s arguments at call time, a cache refusing a model whose
RoPE (or layer layout) differs from the config that built it, and SinkCache's constructor arguments."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

from sinkfix import CacheError
from sinkfix.caches import SinkCache, feed

from .conftest import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(batch=1, length=30, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _model(config):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _llama(**changes):
    """The tiny Llama config of conftest (2 layers, 4 heads, 2 kv heads, head dim 16), with ``changes``."""
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaConfig(**{**fields, **changes})


def _gemma3(**changes):
    return tf.Gemma3TextConfig(**{**tiny_config("gemma3").to_dict(), **changes})


@torch.no_grad()
def _decode(model, ids, cache, prefill=4):
    out = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
    out += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(out, 1)


# -- feed(): arguments checked when it is called, not when it is first iterated ----------------------
@pytest.mark.parametrize("cache, kwargs, match", [
    ("sink", dict(chunk_size=0), "chunk_size must be a positive integer"),
    ("sink", dict(chunk_size=2.0), "chunk_size must be a positive integer"),
    ("sink", dict(chunk_size=True), "chunk_size must be a positive integer"),
    (None, {}, "needs a SinkCache, got NoneType"),
    ("dynamic", {}, "needs a SinkCache, got DynamicCache"),
    ("sink", dict(on_chunk=3), "on_chunk must be callable"),
])
def test_feed_checks_its_arguments_when_called(cache, kwargs, match):
    model = tiny_model("llama")
    cache = {"sink": SinkCache(model.config, n_sink=2, window=8), "dynamic": DynamicCache(config=model.config),
             None: None}[cache]
    with pytest.raises(CacheError, match=match):
        feed(model, cache, _ids(), **kwargs)  # not iterated


@pytest.mark.parametrize("ids, match", [
    (_ids()[0], r"shape \(batch, tokens\), got shape \(30,\): for one sequence pass ids\[None\]"),
    (_ids()[None], r"shape \(batch, tokens\), got shape \(1, 1, 30\)"),
    (_ids().float(), "integer token ids"),
    ([[1, 2, 3]], "as a \\(batch, tokens\\) tensor, got list"),
])
def test_feed_refuses_input_ids_that_are_not_a_batch_of_token_ids(ids, match):
    model = tiny_model("llama")
    with pytest.raises(CacheError, match=match):
        feed(model, SinkCache(model.config, n_sink=2, window=8), ids)


def test_feed_runs_only_when_iterated_and_yields_each_chunks_logits():
    model = tiny_model("llama")
    ids = _ids(2, 20)
    cache = SinkCache(model.config, n_sink=2, window=8)
    chunks = feed(model, cache, ids, chunk_size=8)
    assert cache.get_seq_length() == 0  # nothing fed yet: feed returns an iterator
    shapes = []
    for logits in chunks:
        shapes.append(tuple(logits.shape))
        assert cache.get_seq_length() == sum(s[1] for s in shapes)
    assert shapes == [(2, 8, 97), (2, 8, 97), (2, 4, 97)]
    assert not any(t.requires_grad for t in feed(model, SinkCache(model.config, n_sink=2, window=8), ids))


# -- a cache refuses a model whose RoPE differs from the config that built it --------------------------
def test_a_cache_built_for_another_rope_theta_is_refused():
    built_for, caller = _llama(rope_theta=10000.0), _llama(rope_theta=500000.0)
    model = _model(caller)
    cache = SinkCache(built_for, n_sink=2, window=8)  # same layers, kv heads and head dim
    with pytest.raises(CacheError, match=r"rope_theta 10000\.0 in this cache's config, 500000\.0 in the model's"):
        _decode(model, _ids(), cache)
    assert cache.get_seq_length() == 0  # refused before anything was stored
    with pytest.raises(CacheError, match="re-rotate kept keys with the wrong frequencies"):
        model.generate(_ids(1, 5), attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=3,
                       do_sample=False, pad_token_id=0, cache=SinkCache(built_for, n_sink=2, window=8))


def test_a_cache_built_for_other_rope_scaling_is_refused():
    scaled = _llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(CacheError, match="rope_type 'default' in this cache's config, 'linear' in the model's"):
        _decode(_model(scaled), _ids(), SinkCache(_llama(), n_sink=2, window=8))


def test_a_cache_built_for_other_sliding_layer_rope_is_refused():
    """Gemma3's sliding layers have their own RoPE table; their windows are re-rotated too, so it is
    compared like the global layers' table."""
    params = tiny_config("gemma3").rope_parameters
    other = _gemma3(rope_parameters={**params, "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})
    cache = SinkCache(other, n_sink=2, window=8)
    with pytest.raises(CacheError, match="re-rotate kept keys with the wrong frequencies"):
        _decode(tiny_model("gemma3"), _ids(), cache)
    assert cache.get_seq_length() == 0


def test_an_equal_config_of_another_model_instance_is_served_exactly():
    model = tiny_model("llama")
    copy = tiny_config("llama")  # another object, the same values
    assert copy is not model.config
    ids = _ids(2, 30)
    torch.testing.assert_close(_decode(model, ids, SinkCache(copy, n_sink=2, window=8)),
                               _decode(model, ids, SinkCache(model.config, n_sink=2, window=8)), atol=0, rtol=0)


def test_a_cache_with_other_layer_types_or_windows_is_refused():
    model = tiny_model("gemma3")  # layers: sliding, full; window 5
    swapped = _gemma3(layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(CacheError, match="layer 0 is a sliding_attention layer in the calling model but a "
                                         "full_attention layer in this cache"):
        _decode(model, _ids(), SinkCache(swapped, n_sink=2, window=8))
    with pytest.raises(CacheError, match="layer 0 keeps a 5-token window in the calling model but 7"):
        _decode(model, _ids(), SinkCache(_gemma3(sliding_window=7), n_sink=2, window=8))


@pytest.mark.parametrize("arch, extra", [
    ("llama", {}),
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention"] * 2}),
])
def test_a_cache_for_more_layers_of_the_same_kinds_serves_a_shallower_model_exactly(arch, extra):
    # decided: accepted; the extra layers stay empty and nothing reads them (feed, generate, beams)
    model = tiny_model(arch)
    deeper = type(model.config)(**{**tiny_config(arch).to_dict(), "num_hidden_layers": 4, **extra})
    ids = _ids(2, 30)
    own = torch.cat(list(feed(model, SinkCache(model.config, n_sink=2, window=8), ids, chunk_size=7)), 1)
    big = torch.cat(list(feed(model, SinkCache(deeper, n_sink=2, window=8), ids, chunk_size=7)), 1)
    torch.testing.assert_close(big, own, atol=0, rtol=0)
    prompt = ids[:1, :5]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=15, num_beams=3, do_sample=False,
                  pad_token_id=0)
    assert torch.equal(model.generate(prompt, cache=SinkCache(deeper, n_sink=2, window=6), **kwargs),
                       model.generate(prompt, cache=SinkCache(model.config, n_sink=2, window=6), **kwargs))


def test_a_model_with_more_layers_than_the_cache_is_refused_at_the_first_layer():
    model = _model(_llama(num_hidden_layers=3))
    cache = SinkCache(tiny_config("llama"), n_sink=2, window=8)
    with pytest.raises(CacheError, match="made for a model with 2 layers; the calling model has 3"):
        _decode(model, _ids(), cache)
    assert cache.get_seq_length() == 0


# -- SinkCache's own arguments -------------------------------------------------------------------------
def test_the_model_instead_of_its_config_is_refused():
    model = tiny_model("llama")
    with pytest.raises(CacheError, match=r"takes the model's config, not the model: pass model\.config"):
        SinkCache(model)
    for wrong in (None, tiny_config("llama").to_dict(), "llama"):
        with pytest.raises(CacheError, match=r"needs the model's config .*pass model\.config"):
            SinkCache(wrong)


@pytest.mark.parametrize("bits", [None, 4])
def test_an_unknown_backend_is_refused_with_or_without_bits(bits):
    with pytest.raises(CacheError, match="unknown quantization backend 'nope'; choose one of quanto, hqq, fp8"):
        SinkCache(tiny_config("llama"), n_sink=2, window=8, bits=bits, backend="nope")


@pytest.mark.parametrize("interrupted_at", [0, 1])
def test_a_forward_interrupted_part_way_leaves_a_cache_that_refuses_to_go_on(interrupted_at):
    """A forward stopped between layers (an exception, Ctrl-C in a long feed) left the layers one
    token apart, and every later call ran on without complaint, each token at different places in
    different layers (SmolLM2: logits 1-5.8 off for the next 20 tokens). Until reset()."""
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = SinkCache(model.config, n_sink=2, window=8)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)

        def stop(*_):
            raise KeyboardInterrupt

        hook = model.model.layers[1].register_forward_pre_hook(stop)
        with pytest.raises(KeyboardInterrupt):  # layer 0 has taken the token, layer 1 has not
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        hook.remove()
        if interrupted_at == 1:  # the same, in a cache whose first forward was the interrupted one
            cache.reset()
            hook = model.model.layers[1].register_forward_pre_hook(stop)
            with pytest.raises(KeyboardInterrupt):
                model(input_ids=ids, cache=cache, use_cache=True)
            hook.remove()
        with pytest.raises(CacheError, match="out of step.*reset"):
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        cache.reset()
        fresh = SinkCache(model.config, n_sink=2, window=8)
        torch.testing.assert_close(model(input_ids=ids, cache=cache, use_cache=True).logits,
                                   model(input_ids=ids, cache=fresh, use_cache=True).logits, rtol=0, atol=0)


def test_continuing_a_sequence_and_left_padded_rows_are_not_refused():
    """Uses of one cache across calls that must go on: generate given all of a sequence so far (its next
    tokens at the next positions), a left-padded batch whose padded row counts positions from its first
    real token, and a loop that counts the padding too."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids = _ids(batch=2, length=10, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded
    cache = SinkCache(model.config, n_sink=2, window=8)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        more = torch.cat([out, _ids(batch=2, length=3, seed=6)], dim=1)
        more_mask = torch.cat([mask, torch.ones(2, more.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        model.generate(more, attention_mask=more_mask, cache=cache, max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
        counting = SinkCache(model.config, n_sink=2, window=8)  # positions count the padding
        positions = torch.arange(10)[None].expand(2, 10)
        model(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6], cache=counting,
              use_cache=True)
        model(input_ids=ids[:, 6:], attention_mask=mask, position_ids=positions[:, 6:], cache=counting,
              use_cache=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_chunks_with_positions_inside_the_cache_and_all_padding_chunks_go_on(arch):
    """Two legitimate loops a check on positions going backwards refused (a reuse check, taken back):
    chunks with positions counted inside the cache after it evicted (StreamingLLM's rule, which the
    cache follows), and a left-padded batch without a mask whose padded row has a chunk of padding
    only (positions 0, from the clamped cumsum the docs ask for). Inside-cache positions give what
    absolute ones give."""
    model = tiny_model(arch)
    ids = torch.randint(1, 97, (2, 28), generator=torch.Generator().manual_seed(7))
    absolute, inside = SinkCache(model.config, n_sink=2, window=6), SinkCache(model.config, n_sink=2, window=6)
    held = 0
    with torch.no_grad():
        for start in range(0, 28, 4):
            chunk = ids[:, start:start + 4]
            n = chunk.shape[1]
            want = model(chunk, cache=absolute, use_cache=True,
                         position_ids=(torch.arange(n) + start).expand(2, n)).logits
            got = model(chunk, cache=inside, use_cache=True, position_ids=(torch.arange(n) + held).expand(2, n)).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            held = min(held + n, 8)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :6] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = SinkCache(model.config, n_sink=2, window=8)
        for start in range(0, 12, 3):
            model(ids[:, start:start + 3], cache=padded, use_cache=True, position_ids=positions[:, start:start + 3])
