"""SinkCache on the real pretrained models that ship inside packages (slow: loads them)."""

from __future__ import annotations

import pytest
import torch

from sinkfix.caches import SinkCache, feed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROSE = (
    "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, "
    "the members agreed to postpone the decision until more information about the costs of the new "
    "library building was available."
)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_greedy_generation_identical_while_it_fits_then_streams_on(name, smollm2, request):
    model, tok = smollm2 if name == "smollm2" else request.getfixturevalue("gemma3")
    enc = tok(PROSE, return_tensors="pt")
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    plain = model.generate(**enc, **kwargs)
    fits = SinkCache(model.config, n_sink=4, window=enc.input_ids.shape[1] + 24)
    assert torch.equal(model.generate(**enc, cache=fits, **kwargs), plain)
    small = SinkCache(model.config, n_sink=4, window=24)  # evicts from the prompt on
    streamed = model.generate(**enc, cache=small, **kwargs)
    assert streamed.shape == plain.shape and small.get_seq_length() == plain.shape[1] - 1
    full = next(layer for layer in small.layers if layer.keep_sinks)  # Gemma3's first layers are sliding
    assert full.kept_length == 28


@torch.no_grad()
def test_chunked_streaming_matches_decoding_on_smollm2(smollm2):
    model, tok = smollm2
    ids = tok(PROSE * 3, return_tensors="pt").input_ids[:, :90]
    window = 30
    cache = SinkCache(model.config, n_sink=4, window=window)
    decoded = torch.cat([model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(90)], 1)
    one = torch.cat(list(feed(model, SinkCache(model.config, n_sink=4, window=window), ids, chunk_size=1)), 1)
    torch.testing.assert_close(one, decoded, atol=2e-4, rtol=0)
    chunked = torch.cat(list(feed(model, SinkCache(model.config, n_sink=0, window=window + 4), ids, chunk_size=16)), 1)
    window_only = SinkCache(model.config, n_sink=0, window=window + 4)
    decoded_w = torch.cat([model(ids[:, t : t + 1], cache=window_only, use_cache=True).logits for t in range(90)], 1)
    torch.testing.assert_close(chunked, decoded_w, atol=2e-4, rtol=0)
