"""Sink-protected KV quantization: equal to transformers' QuantizedCache without protection, exact sinks,
round-trip error bounds, eviction and beam reordering of quantized state."""

from __future__ import annotations

import pytest
import torch
from transformers import QuantizedCache

import sinkfix
from sinkfix.errors import BackendUnavailableError
from sinkfix.caches import KVQuantizer, SinkCache
from sinkfix.caches.body import FullBody, QuantizedBody
from sinkfix.caches.layers import SinkLayer
from sinkfix.caches.rope import Rotary

from .cache_layers import feed_layer as _feed
from .cache_layers import outlier_tokens as _tokens
from .cache_layers import prefill_then_decode
from .conftest import tiny_model

pytest.importorskip("optimum.quanto")
pytest.importorskip("hqq")
pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = [("quanto", 2), ("quanto", 4), ("hqq", 2), ("hqq", 4)]




def _step(q: torch.Tensor) -> torch.Tensor:
    """One quantization step of per-token groups of q.shape[-1] channels: (max - min) / (2^b - 1)."""
    return (q.amax(-1, keepdim=True) - q.amin(-1, keepdim=True))


@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_round_trip_error_is_within_one_quantization_step(backend, bits):
    quantizer = KVQuantizer(backend, bits, group_size=16)
    k, _ = _tokens(dim=32)
    restored = quantizer.dequantize(quantizer.quantize(k))
    err = (restored - k).abs()
    groups = k.unflatten(-1, (2, 16))
    step = (_step(groups) / (2 ** bits - 1)).expand_as(groups).flatten(-2)
    # rounding to the grid costs half a step, a rounded zero point at most another half
    assert (err <= step * 1.001 + 1e-6).all()
    # per-token groups: the outlier token's error stays its own (others are 50x smaller)
    assert err[:, :, 1:].max() < 0.2 * err[:, :, 0].max()
    again = quantizer.dequantize(quantizer.quantize(restored))
    if backend == "quanto":  # requantizing changes nothing but float rounding: flushing again is harmless
        torch.testing.assert_close(again, restored, atol=1e-7 * restored.abs().max().item(), rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_without_protection_equals_transformers_quantized_cache(backend, bits):
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(0))

    def run(cache):
        return prefill_then_decode(model, ids, cache)

    axis = 0 if backend == "quanto" else 1
    shipped = run(QuantizedCache(backend, model.config, nbits=bits, q_group_size=16, residual_length=8,
                                 axis_key=axis, axis_value=axis))
    ours = run(SinkCache(model.config, n_sink=0, window=None, bits=bits, backend=backend, residual_length=8))
    assert torch.equal(ours, shipped)
    protected = run(SinkCache(model.config, n_sink=2, window=None, bits=bits, backend=backend, residual_length=8))
    full = run(SinkCache(model.config, n_sink=2, window=None))
    assert not torch.equal(protected, shipped)  # protection changes something ...
    assert (protected - full).abs().max() < (shipped - full).abs().max() * 1.5  # ... and is no worse by much


def _layer(n_sink, window, bits=2, residual=4):
    body = QuantizedBody(KVQuantizer("quanto", bits, 16), residual) if bits else FullBody()
    rotary = Rotary(1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)))
    return SinkLayer(n_sink=n_sink, window=window, rotary=rotary, body=body)




def test_sinks_stay_exact_and_other_tokens_quantize_once():
    k, v = _tokens()
    n_sink, sizes = 2, [7, 1, 1, 5, 1, 3, 1, 1]
    layer = _layer(n_sink, window=None)
    keys, values = _feed(layer, k, v, sizes + [1])
    seen = sum(sizes)
    assert torch.equal(keys[:, :, :n_sink], k[:, :, :n_sink]) and torch.equal(values[:, :, :n_sink], v[:, :, :n_sink])
    quantized = layer.body.quantized_len
    assert 0 < quantized <= seen
    q = layer.body.quantizer
    # per-token groups: each quantized token equals its own round trip, however often it was flushed
    torch.testing.assert_close(values[:, :, n_sink:quantized], q.dequantize(q.quantize(v[:, :, n_sink:quantized])),
                               atol=0, rtol=0)
    assert torch.equal(values[:, :, quantized:], v[:, :, quantized : seen + 1])  # residual and new: exact


def test_quantized_streaming_keeps_the_same_tokens_as_full_precision():
    k, v = _tokens(length=40)
    sizes = [5, 1, 1, 1, 9, 1, 1, 1, 1, 3, 1, 1, 1, 1]
    exact, quantized = _layer(2, window=6, bits=None), _layer(2, window=6, bits=4, residual=3)
    _feed(exact, k, v, sizes)
    _feed(quantized, k, v, sizes)
    assert torch.equal(exact.column_info()[0], quantized.column_info()[0])
    assert exact.kept_length == quantized.kept_length == 8
    head = quantized._head()
    assert torch.equal(head[1], v[:, :, :2])  # the sinks are exact after eviction too
    body_k, body_v = quantized._body()
    lo = sum(sizes) - 6
    q = quantized.body.quantizer
    n = quantized.body.quantized_len
    torch.testing.assert_close(body_v[:, :, :n], q.dequantize(q.quantize(v[:, :, lo : lo + n])), atol=0, rtol=0)
    assert torch.equal(body_v[:, :, n:], v[:, :, lo + n : lo + 6])
    assert quantized.nbytes() < exact.nbytes()


def test_beam_reordering_of_quantized_state_round_trips_nothing():
    k, v = _tokens(batch=3)
    layer = _layer(2, window=None, bits=2, residual=4)
    _feed(layer, k, v, [6, 1, 1])
    before = layer._body()
    beam = torch.tensor([2, 2, 0])
    layer.reorder_cache(beam)
    after = layer._body()
    assert torch.equal(after[0], before[0][beam]) and torch.equal(after[1], before[1][beam])
    # the next flush requantizes everything in the new row order: the old quantized tokens stay (up to a
    # float rounding), the two residual ones are quantized now, from the reordered exact values
    _feed(layer, k[beam], v[beam], [1, 1, 1], first=8)
    assert layer.body.quantized_len == 10
    values = layer._body()[1]
    torch.testing.assert_close(values[:, :, :6], after[1][:, :, :6], atol=1e-6 * after[1].abs().max().item(), rtol=0)
    q = layer.body.quantizer
    torch.testing.assert_close(values[:, :, 6:8], q.dequantize(q.quantize(v[beam][:, :, 6:8])), atol=1e-5, rtol=0)


def test_missing_backend_package_is_a_clear_error(monkeypatch):
    import transformers.cache_utils as cache_utils

    monkeypatch.setattr(cache_utils, "is_hqq_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="pip install hqq"):
        KVQuantizer("hqq", 2)


@torch.no_grad()
def test_hidden_sinks_found_by_attention_are_kept_exact():
    from transformers import DynamicCache

    from sinkfix.analysis.hidden_sinks import protecting_hidden_sinks

    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    cache, plain = SinkCache(model.config, n_sink=1, window=None, bits=2, residual_length=8), DynamicCache()
    # a random tiny model spreads attention evenly: a low threshold makes some keys "hidden sinks"
    with protecting_hidden_sinks(model, cache, threshold=0.08, min_rows=4) as guard:
        for start in range(0, 48, 16):
            model(ids[:, start : start + 16], cache=cache, use_cache=True)
            model(ids[:, start : start + 16], cache=plain, use_cache=True)
    assert guard.protected > 0
    assert sinkfix.PatchHandle.of(model) is None  # the temporary identity patch is gone
    for layer, exact in zip(cache.layers, plain.layers):
        if layer.hidden_abs is None:
            continue
        keys, values = layer._body()
        for row in range(2):
            cols = layer.hidden_abs[row][layer.hidden_abs[row] >= 0]
            assert (cols >= 1).all()  # never the sink itself (protected anyway)
            assert torch.equal(values[row][:, cols], exact.values[row][:, cols])
            assert torch.equal(keys[row][:, cols], exact.keys[row][:, cols])
        others = torch.ones(48, dtype=torch.bool)
        others[layer.hidden_abs[0][layer.hidden_abs[0] >= 0]] = False
        others[0] = False
        assert not torch.equal(values[0][:, others[: values.shape[2]]], exact.values[0][:, others[: values.shape[2]]])
