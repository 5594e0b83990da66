"""Review 41 (KV caches, streaming and quantized): deepcopy of a quanto cache, fp8 hidden-sink
protection after the calibrating call, and ``sinkfix stream`` options no selected variant uses
(merge_stream_runs' recompute interval and --out: tests/test_benchmark_scripts.py, beside the
script's other merge tests). Tiny random models, a few seconds in all."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.analysis.hidden_sinks import protecting_hidden_sinks
from sinkfix.caches import SinkCache
from sinkfix.errors import CacheError

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")



def _sharp_llama():
    """The 2-layer tiny Llama with queries and keys x5: attention peaked enough to have hidden sinks
    in every chunk at threshold 0.03 (as review 41's models)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(5.0)
    return model


def _steps(model, cache, ids, start, stop) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(ids[:, t:t + 1], cache=cache).logits for t in range(start, stop)])


# -- 1. copy.deepcopy of a quanto-quantized cache -------------------------------------------------------------
QUANTO = dict(n_sink=2, window=10, residual_length=3, q_group_size=8)


def _quanto_cache(model, ids, bits):
    cache = SinkCache(model.config, bits=bits, **QUANTO)
    with torch.no_grad():
        model(ids[:, :20], cache=cache)  # evicts 8 of 20 tokens and quantizes
    _steps(model, cache, ids, 20, 25)
    assert cache.layers[0].body.quantized_len > 0 and cache.layers[0].evicted
    return cache


@pytest.mark.parametrize("bits", [2, 4])
def test_deepcopy_of_a_quanto_cache_continues_like_the_original(bits):
    """Raised torch's "only works for subclass types that implement clone()" RuntimeError."""
    model = tiny_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 40))
    cache = _quanto_cache(model, ids, bits)
    copied = copy.deepcopy(cache)
    assert copied.layers[0].body.qk is not cache.layers[0].body.qk
    assert copied.nbytes() == cache.nbytes()
    original, continued = _steps(model, cache, ids, 25, 40), _steps(model, copied, ids, 25, 40)
    assert (continued - original).abs().max().item() == 0.0
    # the copy's steps did not move the original: it continued as a fresh run of the same tokens
    fresh = _steps(model, _quanto_cache(model, ids, bits), ids, 25, 40)
    assert (original - fresh).abs().max().item() == 0.0


def test_deepcopy_falls_back_to_pickling_then_names_the_limitation(monkeypatch):
    """A quantized tensor that cannot be rebuilt from its inner tensors is copied through pickling;
    one that cannot be pickled either is a CacheError, not torch's RuntimeError."""
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor

    model = tiny_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 40))
    cache = _quanto_cache(model, ids, 4)

    def refuse(*args, **kwargs):
        raise TypeError("no unflatten here")

    monkeypatch.setattr(WeightQBitsTensor, "__tensor_unflatten__", staticmethod(refuse))
    copied = copy.deepcopy(cache)
    assert type(copied.layers[0].body.qk) is WeightQBitsTensor
    assert (_steps(model, copied, ids, 25, 30) - _steps(model, cache, ids, 25, 30)).abs().max().item() == 0.0
    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(CacheError, match="cannot copy this cache's quantized WeightQBitsTensor .*feed the prompt again"):
        copy.deepcopy(cache)


# -- 2. fp8 + protecting_hidden_sinks: every call's hidden sinks --------------------------------------------------
THRESHOLD, CHUNK, TOKENS, N_SINK = 0.03, 16, 96, 2


def _protected_per_chunk(model, cache, ids, observer=None) -> list[int]:
    per = []
    with torch.no_grad(), protecting_hidden_sinks(model, cache, threshold=THRESHOLD, min_rows=1) as guard:
        observing = sinkfix.PatchHandle.of(model).observing(observer) if observer else None
        if observing is not None:
            observing.__enter__()
        try:
            for start in range(0, TOKENS, CHUNK):
                before = guard.protected
                model(ids[:, start:start + CHUNK], cache=cache)
                per.append(guard.protected - before)
        finally:
            if observing is not None:
                observing.__exit__(None, None, None)
    return per


def _rule(call, n_sink: int) -> set[int]:
    """ACT's criterion recomputed from the call's query and keys with a plain causal softmax, on the
    call's new columns (the ones whose exact states the fp8 cache can hand over): a column, not a
    sink, whose mean attention over the rows that see it exceeds the threshold in some head. The
    cache never evicts (window=None), so a column is its token's absolute index."""
    q, k = call.query.float(), call.key.float()
    q_len, k_len = q.shape[2], k.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows = torch.arange(q_len)[:, None] + (k_len - q_len)
    sees = torch.arange(k_len)[None, :] <= rows  # (Q, K)
    scores = (q @ k.transpose(-1, -2) * call.scale).masked_fill(~sees, float("-inf"))
    weights = scores.softmax(-1)
    mean = weights.sum(2) / sees.sum(0)  # (B, Hq, K)
    margin = (mean - THRESHOLD).abs().min().item()
    assert margin > 1e-5, f"a column within {margin} of the threshold: the comparison could round either way"
    hidden = (mean > THRESHOLD).any(1)[0]
    return {c for c in range(max(k_len - q_len, n_sink), k_len) if bool(hidden[c])}


def test_fp8_protects_hidden_sinks_after_the_calibrating_call():
    """fp8 protected the first chunk's hidden sinks only: [28, 0, 0, 0, 0, 0] here."""
    model = _sharp_llama()
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (1, TOKENS))
    quanto = _protected_per_chunk(model, SinkCache(model.config, n_sink=N_SINK, window=None, bits=4,
                                                   residual_length=8, q_group_size=8), ids)
    assert quanto == [28, 31, 17, 4, 0, 0]  # the integer backend judges every chunk
    expected: dict[int, set[int]] = {0: set(), 1: set()}

    def reference(call):
        expected[call.layer] |= _rule(call, N_SINK)

    cache = SinkCache(model.config, n_sink=N_SINK, window=None, bits=8, backend="fp8")
    fp8 = _protected_per_chunk(model, cache, ids, reference)
    assert fp8 == [28, 30, 17, 4, 0, 0]
    assert all(fp8[i] > 0 for i, n in enumerate(quanto) if n)
    # the protected tokens are exactly those the rule picks in the calls that wrote them
    for index, layer in enumerate(cache.layers):
        assert set(layer.hidden_abs[0].tolist()) - {-1} == expected[index]
    assert sum(len(cols) for cols in expected.values()) == sum(fp8)
    # and they are kept exact, not cast: layer 0's keys do not depend on the cache
    exact = SinkCache(model.config, n_sink=N_SINK, window=None)
    with torch.no_grad():
        model(ids, cache=exact)
    layer, full = cache.layers[0], exact.layers[0]
    columns = layer.hidden_abs[0]
    assert bool((columns >= 2 * CHUNK).any())  # protected in a call after the calibrating one
    assert torch.equal(layer.hidden_k, full.body.k[:, :, columns])
    assert torch.equal(layer.hidden_v, full.body.v[:, :, columns])
    cast_k, _ = layer.body.materialize()
    assert (cast_k[:, :, columns] - layer.hidden_k).abs().max().item() > 1e-3  # what fp8 would have read
    # the guard gone, the cache no longer keeps a call's exact states alive
    assert all(not lay.expose_new_states and lay.last_new_states is None for lay in cache.layers)


# -- 5. sinkfix stream: options no selected variant uses --------------------------------------------------
STREAM = ["stream", "--tokens", "90", "--window", "20", "--n-sink", "2", "--segment", "30", "--no-figures"]


@pytest.mark.parametrize("argv, message", [
    (["--variants", "sink", "--recompute-every", "7"],
     "--recompute-every is used only by the recompute and recompute_profile variants, and --variants 'sink' runs "
     "neither"),
    (["--variants", "recompute", "--chunk", "3"],
     "--chunk is used only by the cache variants (sink, window_only, sink_profile), and --variants 'recompute' runs "
     "only recomputations"),
    (["--variants", "sink", "--period", "500"], "--period 500 is not shorter than the stream (--tokens 90)"),
    (["--period", "90"], "--period 90 is not shorter than the stream (--tokens 90)"),
])
def test_stream_refuses_options_no_variant_uses_before_the_model_loads(no_model, text_file, tmp_path, capsys,
                                                                       argv, message):
    """Each exited 0 and recorded the unused value in stream.json as part of the protocol."""
    assert cli.main([*STREAM, "--text", str(text_file), *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["--variants", "sink"], ["--variants", "recompute"], ["--variants", "sink", "--chunk", "3"],
    ["--variants", "recompute", "--recompute-every", "7"], ["--period", "89"], [],
])
def test_stream_defaults_and_used_options_are_accepted(load_reached, text_file, tmp_path, capsys, argv):
    assert cli.main([*STREAM, "--text", str(text_file), *argv, "--out", str(tmp_path / "o")]) == 2
    assert "reached the model load" in capsys.readouterr().err


def test_stream_records_the_defaults_of_options_left_out(monkeypatch, text_file, tmp_path, capsys):
    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    assert cli.main([*STREAM, "--text", str(text_file), "--variants", "recompute", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "recompute every 64" in out and "chunks of" not in out  # no chunk fed: not in the title
    protocol = json.loads((tmp_path / "r" / "stream.json").read_text())["protocol"]
    assert (protocol["chunk"], protocol["recompute_every"]) == (32, 64)
    # with a BOS the stream has one token less to repeat in: a period of tokens - 1 repeats nothing
    assert cli.main([*STREAM, "--text", str(text_file), "--variants", "sink", "--bos", "--period", "89",
                     "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--period 89 is not shorter than the stream after its BOS (89 tokens)" in err and "\n" not in err


def test_a_copy_taken_while_a_guard_is_active_keeps_no_exact_states():
    """The fp8 guard switches its layers to keep each call's exact new states; a copy (deepcopy or
    pickle) taken meanwhile kept the switch on for good, holding one call's keys and values alive
    after every later call with no guard reading them."""
    import copy
    import io

    model = _sharp_llama()
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (1, 2 * CHUNK + 1))
    cache = SinkCache(model.config, n_sink=N_SINK, window=None, bits=8, backend="fp8")
    with torch.no_grad(), protecting_hidden_sinks(model, cache, threshold=THRESHOLD, min_rows=1):
        model(ids[:, :CHUNK], cache=cache)
        model(ids[:, CHUNK:2 * CHUNK], cache=cache)
        assert all(lay.expose_new_states and lay.last_new_states is not None for lay in cache.layers)
        copied = copy.deepcopy(cache)
        buffer = io.BytesIO()
        torch.save(cache, buffer)
    buffer.seek(0)
    pickled = torch.load(buffer, weights_only=False)
    for other in (copied, pickled):
        with torch.no_grad():
            model(ids[:, 2 * CHUNK:], cache=other)
        assert all(not lay.expose_new_states and lay.last_new_states is None for lay in other.layers)
