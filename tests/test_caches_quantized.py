"""Sink-protected KV quantization: equal to transformers' QuantizedCache without protection, exact sinks,
round-trip error bounds, eviction and beam reordering of quantized state."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import QuantizedCache

import sinkfix
from sinkfix.errors import BackendUnavailableError, UsageError
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


@pytest.mark.parametrize("bits", [2, 4])
def test_a_window_no_larger_than_the_residual_is_refused(bits):
    """The residual flushes once it holds residual_length tokens; a window that keeps fewer would
    never be quantized after the first call (and held the first call's evicted block: more bytes
    than full precision)."""
    config = tiny_model("llama").config
    for window, residual in ((100, 128), (128, 128), (8, 8)):
        with pytest.raises(sinkfix.CacheError, match=rf"window \({window}\) must be larger than residual_length "
                                                     rf"\({residual}\).*set residual_length below {window}"):
            SinkCache(config, n_sink=4, window=window, bits=bits, residual_length=residual)
    SinkCache(config, n_sink=4, window=100, bits=bits, residual_length=32)
    SinkCache(config, n_sink=4, window=None, bits=bits, residual_length=128)  # never evicts: no window to fill
    SinkCache(config, n_sink=4, window=100)  # full precision has no residual


@torch.no_grad()
def test_a_quantized_window_stays_smaller_than_full_precision():
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    full = SinkCache(model.config, n_sink=4, window=40)
    quantized = SinkCache(model.config, n_sink=4, window=40, bits=4, residual_length=8)
    prefill_then_decode(model, ids, full, prefill=60)
    prefill_then_decode(model, ids, quantized, prefill=60)
    body = quantized.layers[0].body
    assert body.quantized_len > 0 and body.offset < 40  # flushed after the prompt; the prompt's block is gone
    assert quantized.nbytes() < full.nbytes() / 2


def test_a_fully_evicted_quantized_block_is_released():
    """A hybrid model's sliding layer keeps a window fixed by the model, which may be no larger than
    residual_length: the first call's quantized block is released once it has all left the window,
    not held until a flush that never comes."""
    k, v = _tokens(length=40)
    layer = _layer(0, window=6, bits=4, residual=16)
    _feed(layer, k, v, [20])
    assert layer.body.quantized_len == 6 and layer.body.q_len == 20  # the evicted 14 are skipped
    _feed(layer, k, v, [1] * 5, first=20)
    assert layer.body.quantized_len == 1
    _feed(layer, k, v, [1], first=25)
    assert layer.body.qk is None and layer.body.q_len == 0 and len(layer.body) == 6
    exact = _layer(0, window=6, bits=None)
    _feed(exact, k, v, [20] + [1] * 6)
    assert layer.nbytes() == exact.nbytes()
    keys, values = _feed(layer, k, v, [1], first=26)
    assert torch.equal(values, v[:, :, 20:27])  # the window in full precision, as the residual keeps it
    model = tiny_model("gemma3")  # sliding window 5: its layer keeps 4 tokens, fewer than residual_length 8
    cache = SinkCache(model.config, n_sink=2, window=16, bits=4, residual_length=8)
    prefill_then_decode(model, torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(0)), cache)
    assert cache.layers[0].body.qk is None and len(cache.layers[0].body) == 4


@torch.no_grad()
@pytest.mark.parametrize("bits", [None, 2, 4])
def test_a_cache_that_never_evicts_serves_models_without_rope(bits):
    """GPT-2 (learned absolute positions): with window=None no key is ever moved, so the cache needs
    no rotary embedding; it equals transformers' own caches."""
    from transformers import DynamicCache

    model = tiny_model("gpt2")
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    if bits is None:
        shipped = DynamicCache(config=model.config)
    else:
        shipped = QuantizedCache("quanto", model.config, nbits=bits, q_group_size=16, residual_length=8, axis_key=0,
                                 axis_value=0)
    quant = {} if bits is None else dict(bits=bits, residual_length=8)
    ours = SinkCache(model.config, n_sink=0, window=None, **quant)
    assert torch.equal(prefill_then_decode(model, ids, ours), prefill_then_decode(model, ids, shipped))
    protected = SinkCache(model.config, n_sink=2, window=None, **quant)
    prefill_then_decode(model, ids, protected)
    with pytest.raises(sinkfix.UnsupportedModelError, match="no rotary position embeddings.*window=None"):
        SinkCache(model.config, n_sink=2, window=16, **quant)


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


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("tokens", [9, 10, 11])
def test_hqq_takes_token_counts_its_bit_packing_does_not_divide(bits, tokens):
    """HQQ packs 8 // bits rows into a byte and failed with a shape error on other counts (9 tokens
    of a 1-head, 16-dim model at 2 bits; transformers' QuantizedCache fails the same way). The zero
    tokens that pad the count are groups of their own: the real tokens quantize as they would alone."""
    x = torch.randn(1, 1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
    quantizer = KVQuantizer("hqq", bits, 16)
    got = quantizer.dequantize(quantizer.quantize(x))
    assert got.shape == x.shape
    whole = 8  # a count the packing divides at 2 and 4 bits
    alone = quantizer.dequantize(quantizer.quantize(x[..., :whole, :]))
    torch.testing.assert_close(got[..., :whole, :], alone, atol=0, rtol=0)
    assert (got - x).abs().max() < (0.9 if bits == 2 else 0.3)  # quantized, not garbage


def test_gemma3_prompt_of_an_odd_length_through_a_hqq_cache():
    model = tiny_model("gemma3")
    cache = SinkCache(model.config, 2, 16, bits=2, backend="hqq", residual_length=4)
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(0)), past_key_values=cache)
        step = model(torch.tensor([[5]]), past_key_values=cache).logits
    assert torch.isfinite(step).all()


def test_kvquant_measures_hqq_token_counts_transformers_cannot_pack():
    """transformers' QuantizedCache with HQQ fails (a shape error from HQQ's bit packing) on a tensor
    whose group count is not a multiple of 8 // bits: ``sinkfix kvquant --backend hqq`` died on a
    sequence's last chunk with a raw traceback. The measurement now predicts it from the lengths and
    takes SinkCache(n_sink=0), which quantizes as QuantizedCache does and pads; where transformers'
    cache packs every count, it stays the baseline."""
    from sinkfix.analysis.kvquant import hqq_baseline_fails, measure_kvquant, quantized_lengths

    model = tiny_model("llama")  # 2 kv heads of 16: 2 groups of 16 per token
    assert quantized_lengths(22, 7, 8) == [7, 21]  # chunks of 7 (the last token is not fed): 7 + 7 < 8 + 7
    assert quantized_lengths(23, 10, 8) == [10, 20]  # the last chunk of 3 stays in the residual
    assert hqq_baseline_fails(model, [22], chunk=7, residual_length=8, bits=2, group_size=16)  # 14 groups
    assert not hqq_baseline_fails(model, [23], chunk=10, residual_length=8, bits=2, group_size=16)
    ids = torch.randint(1, 97, (22,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):  # what the baseline does on its own
        cache = QuantizedCache("hqq", model.config, nbits=2, axis_key=1, axis_value=1, q_group_size=16,
                               residual_length=8)
        with torch.no_grad():
            model(input_ids=ids[None, :7], cache=cache, use_cache=True)
    [row] = measure_kvquant(model, [ids], bits=[2], backend="hqq", n_sink=2, residual_length=8, q_group_size=16,
                            chunk=7)
    assert row.tokens == 21 and "cannot pack" in row.quantized_cache
    assert all(math.isfinite(row.ppl(v)) for v in ("full", "quantized", "sink_protected"))
    [row] = measure_kvquant(model, [ids[:23]], bits=[2], backend="hqq", n_sink=2, residual_length=8,
                            q_group_size=16, chunk=10)
    assert row.quantized_cache == "transformers QuantizedCache"


# -- review 79: a protocol that reads no quantized token is refused ------------------------------------------
@pytest.mark.parametrize("argv, message", [
    # one forward holds the whole sequence: nothing reads a quantized past (three equal rows, KL 0)
    (["--seq-len", "100", "--bits", "4"], "a 100-token sequence feeds 99 tokens (its last is only predicted), all in "
                                          "one 128-token forward (--chunk)"),
    (["--seq-len", "16", "--chunk", "16"], "all in one 16-token forward"),
    # review 83: the last token is never fed, so 129 tokens at chunk 128 are one forward too (KL 0)
    (["--seq-len", "129", "--chunk", "128"], "a 129-token sequence feeds 128 tokens"),
    (["--seq-len", "65", "--chunk", "32", "--n-sink", "40"], "starts at token 32): the sink-protected cache"),
    # every token read from the cache protected: "100% recovered" by quantizing nothing
    (["--seq-len", "10", "--chunk", "4", "--residual-length", "4", "--n-sink", "20"],
     "20 sinks (--n-sink) keep every token a forward reads from the cache in full precision (the last 4-token "
     "forward of a 10-token sequence starts at token 8)"),
    (["--seq-len", "10", "--chunk", "4", "--n-sink", "8"], "protect fewer than 8"),
])
def test_kvquant_refuses_a_protocol_that_measures_nothing(argv, message, capsys, monkeypatch):
    from sinkfix import cli, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("refused after the model loaded"))
    assert cli.main(["kvquant", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_measure_kvquant_refuses_a_sequence_in_one_chunk():
    from sinkfix.analysis.kvquant import check_measurable

    # 10 tokens feed 9 (0..8): forwards at 0, 4, 8; the last reads tokens 0..7, token 7 not a sink
    check_measurable([10, 12], chunk=4, n_sink=7)
    check_measurable([6], chunk=4, n_sink=3)  # 6 tokens feed 5: a second forward (token 4) reads 0..3
    with pytest.raises(UsageError, match="a 5-token sequence feeds 4 tokens"):
        check_measurable([10, 5], chunk=4, n_sink=0)
    with pytest.raises(UsageError, match="protect fewer than 8"):
        check_measurable([10], chunk=4, n_sink=8)
    with pytest.raises(UsageError, match="protect fewer than 4"):
        check_measurable([9], chunk=4, n_sink=4)  # 9 feed 8: forwards at 0 and 4 only
