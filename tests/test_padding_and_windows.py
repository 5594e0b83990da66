"""A prompt gives the same result alone, left-padded, right-padded or fed in chunks: the cases where
the rule's inputs (which rows are real, which keys a window still shows) are easy to get wrong."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

import sinkfix
from sinkfix import ContentSinks, Policy
from sinkfix.integrations.content_sinks import sink_sets
from tests.conftest import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 6


def prompt_ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))


def alone_left_right(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real tokens' logits of ``ids`` alone, after PAD left-padding tokens, before PAD right-padding ones."""
    length = ids.shape[1]
    pads = torch.zeros(1, PAD, dtype=torch.long)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        left = model(input_ids=torch.cat([pads, ids], 1),
                     attention_mask=torch.tensor([[0] * PAD + [1] * length])).logits[:, PAD:]
        right = model(input_ids=torch.cat([ids, pads], 1),
                      attention_mask=torch.tensor([[1] * length + [0] * PAD])).logits[:, :length]
    return alone, left, right


RIGHT_PADDING_POLICY = Policy(content_sinks=ContentSinks(threshold=0.1, hidden_sink_scale=0.3, min_rows=3))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_content_sinks_ignore_right_padding_rows(arch, backend="torch"):
    """transformers masks padding on the key axis only: a right-padding row sees every real key, and
    its attention once counted in the column statistics (logits 0.19 / 0.48 from alone). The Triton
    backend's case: tests/kernels/test_patched_model.py."""
    model = tiny_model(arch)
    with sinkfix.patch(model, RIGHT_PADDING_POLICY, backend=backend):
        alone, left, right = alone_left_right(model, prompt_ids(10))
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    with sinkfix.patch(model):  # the comparison can tell: the rule changes these logits
        assert (alone_left_right(model, prompt_ids(10))[0] - alone).abs().max() > 1e-3


def test_relative_residual_clip_leaves_right_padding_out_of_its_median():
    model = tiny_model("llama")
    with sinkfix.patch(model, Policy(residual_clip=sinkfix.ResidualClip(1.05))):
        alone, left, right = alone_left_right(model, prompt_ids(5))
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)  # was 0.069 off
    assert (tiny_model("llama")(input_ids=prompt_ids(5)).logits - alone).abs().max() > 1e-3  # the clip acts here


def _one_layer(arch: str):
    config = tiny_config(arch)
    config.num_hidden_layers = 1
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = ["sliding_attention"]
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_a_chunked_prompt_on_a_sliding_window_gets_the_one_call_sink_set(arch):
    """The kept first candidate is the sequence's: deciding on the keys the window still showed kept
    the window's first candidate instead (a 20-token prompt on a window of 5, fed as 12 + 8 tokens,
    lost key 8 from every head's set, logits 0.26 apart)."""
    model = _one_layer(arch)
    ids = prompt_ids(20, seed=1)
    policy = Policy(content_sinks=ContentSinks(threshold=0.15, hidden_sink_scale=0.3))
    with sinkfix.patch(model, policy), torch.no_grad():
        whole_cache = DynamicCache(config=model.config)
        whole = model(input_ids=ids, past_key_values=whole_cache, use_cache=True).logits
        chunked_cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :12], past_key_values=chunked_cache, use_cache=True)
        second = model(input_ids=ids[:, 12:], past_key_values=chunked_cache, use_cache=True).logits
    one, two = sink_sets(whole_cache)[0][0], sink_sets(chunked_cache)[0][0]
    assert one.sum() > 0 and torch.equal(one, two)
    torch.testing.assert_close(second, whole[:, 12:], atol=1e-5, rtol=0)


def test_a_decision_taken_again_while_decoding_on_a_sliding_window_matches_one_call():
    """reevaluate_every on a sliding window: each re-decision lost one more hidden sink per head (8
    and 16 fewer than one call over the same tokens at steps 3 and 6)."""
    model = _one_layer("mistral")
    ids = prompt_ids(17, seed=1)
    every = ContentSinks(threshold=0.15, hidden_sink_scale=0.3, reevaluate_every=3)
    with sinkfix.patch(model, Policy(content_sinks=every)), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :10], past_key_values=cache, use_cache=True)
        for t in range(10, 16):
            model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        stored = sink_sets(cache)[0]
    with sinkfix.patch(model, Policy(content_sinks=ContentSinks(threshold=0.15, hidden_sink_scale=0.3))), \
            torch.no_grad():
        once = DynamicCache(config=model.config)
        model(input_ids=ids[:, :16], past_key_values=once, use_cache=True)  # the last re-decision saw rows 0..15
    assert sink_sets(once)[0].sum() > 0 and torch.equal(stored, sink_sets(once)[0])


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
@pytest.mark.parametrize("pad", [2, 3])
def test_a_hand_written_loop_without_position_ids_finds_the_sink_after_the_left_padding(arch, pad):
    """A decode loop that passes the attention mask but no ``position_ids`` gets transformers'
    positions, which count the left padding: on a sliding layer (window 5, so the cache keeps 4
    tokens) the sink was placed on a padding column (pad=2) or before the cache's first column
    (pad=3: one padding token already dropped), and the padded row ran without the policy (logits
    0.08-0.17 away from one forward over the same tokens). The cached step must equal that forward."""
    model = tiny_model(arch)
    real = 2  # with pad=3 the 5-token prompt leaves one padding token out of the 4 the cache keeps
    ids = prompt_ids(pad + real, seed=3).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    step = torch.tensor([[7], [9]])
    full_ids, full_mask = torch.cat([ids, step], 1), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with sinkfix.patch(model, Policy(sink_scale=0.2)), torch.no_grad():
        whole = model(input_ids=full_ids, attention_mask=full_mask).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        cached = model(input_ids=step, attention_mask=full_mask, past_key_values=cache, use_cache=True).logits[:, -1]
    assert cache.layers[0].keys.shape[2] <= 5 or not model.config.sliding_window
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_keys_that_left_the_window_of_a_cache_that_keeps_them_are_not_taken_for_padding(arch, with_mask):
    """A DynamicCache built without a config keeps every key, so a sliding layer's call starts with
    keys no row sees because they left the window, not because they are padding. Taking them for
    padding put the sink on the oldest key in the window (logits 0.10-0.16 off one forward)."""
    model = tiny_model(arch)
    ids = prompt_ids(12, seed=1)
    mask = torch.ones_like(ids) if with_mask else None
    with sinkfix.patch(model, Policy(sink_scale=0.2)), torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1]
        cache = DynamicCache()
        model(input_ids=ids[:, :-1], attention_mask=None if mask is None else mask[:, :-1], past_key_values=cache,
              use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
    assert cache.layers[0].keys.shape[2] == 12  # every key kept: the step saw 7 beyond its window of 5
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=0)
