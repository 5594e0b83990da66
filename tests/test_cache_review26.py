"""KV caches and their commands in the cases a review found wrong: `sinkfix stream`'s ignored or repeated
options and its hybrid-model title, `sinkfix kvquant`'s undefined shares and ignored fp8 option, the
content-sink refusal that left a cache out of step, sink stores allocated at n_sink, and the padded-row
promise for quantized caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import cli
from sinkfix.errors import CacheError

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
STREAM = ["--tokens", "90", "--window", "20", "--n-sink", "2", "--segment", "30", "--chunk", "8", "--no-figures"]


@pytest.fixture
def loads(monkeypatch):
    """The tiny Llama as every model; returns the list of names ``load_model`` was called with."""
    model = tiny_model("llama")
    names: list = []

    def load(name, **kw):
        names.append(name)
        return model, CharTokenizer()

    monkeypatch.setattr(sinkfix, "load_model", load)
    return names


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


# -- 1. --profile that no variant uses ------------------------------------------------------------
def test_stream_refuses_a_profile_that_no_chosen_variant_uses(loads, text_file, tmp_path, capsys):
    from sinkfix.profile import ModelIdentity, Profile

    path = Profile(ModelIdentity.of(tiny_model("llama", seed=5)), torch.full((2, 4), 0.7)).save(tmp_path / "p.json")
    rc = cli.main(["stream", "--text", str(text_file), *STREAM, "--profile", str(path), "--variants",
                   "sink,window_only", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "--profile is used only by the sink_profile and recompute_profile variants" in err
    assert loads == [] and not (tmp_path / "o" / "stream.json").exists()  # refused before the model loads


# -- 2. the hybrid-model title --------------------------------------------------------------------
@pytest.mark.parametrize("n_sink, window, wider", [(2, 20, False), (1, 2, True)])
def test_stream_title_compares_the_sliding_window_with_the_recomputation(monkeypatch, text_file, tmp_path, capsys,
                                                                         n_sink, window, wider):
    """tiny Gemma3: sliding window 5, so its sliding layer keeps 4 tokens; the recomputation feeds
    n_sink + window + 1 (23, or 4)."""
    model = tiny_model("gemma3")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    rc = cli.main(["stream", "--text", str(text_file), "--tokens", "60", "--window", str(window), "--n-sink",
                   str(n_sink), "--segment", "20", "--chunk", "8", "--variants", "sink", "--no-figures",
                   "--out", str(tmp_path / "o")])
    assert rc == 0
    out = " ".join(capsys.readouterr().out.split())
    context = n_sink + window + 1
    assert ("keep their own 4 tokens in both caches, more than the recomputation's" in out) == wider
    assert (f"fits in the recomputation's {context}: there every variant sees the same tokens" in out) == (not wider)


# -- 3. content sinks and a SinkCache that has evicted ---------------------------------------------
def test_the_content_sink_refusal_stores_nothing_and_the_cache_goes_on(one_thread):
    """The error came from layer 0's attention after its cache layer had stored the token: layer 0
    had seen one token more than layer 1, and every later call, even unpatched, was refused as an
    interrupted forward."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(1))
    cache = sinkfix.SinkCache(model.config, n_sink=2, window=6)
    clean = sinkfix.SinkCache(model.config, n_sink=2, window=6)
    with torch.no_grad():
        with sinkfix.patch(model, sinkfix.Policy.act(threshold=0.05), backend="torch"):
            for t in range(9):  # 9 tokens: the ninth evicts and still sees its keys in order
                model(ids[:, t:t + 1], cache=cache)
                model(ids[:, t:t + 1], cache=clean)
            with pytest.raises(CacheError, match="cannot follow a SinkCache that has evicted.*nothing of this call"):
                model(ids[:, 9:10], cache=cache)
        assert [layer.seen for layer in cache.layers] == [9, 9]
        for t in range(9, 14):  # unpatched, the cache goes on as one that never saw the refused call
            torch.testing.assert_close(model(ids[:, t:t + 1], cache=cache).logits,
                                       model(ids[:, t:t + 1], cache=clean).logits, rtol=0, atol=0)


def test_the_content_sink_refusal_comes_first_when_only_a_later_layer_has_content_sinks(one_thread):
    """A policy on layer 1 only: the cache refuses at layer 0, before it stores anything."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    cache = sinkfix.SinkCache(model.config, n_sink=2, window=6)
    policy = sinkfix.Policy(layers=(1,), content_sinks=sinkfix.ContentSinks(threshold=0.05, hidden_sink_scale=0.5))
    with torch.no_grad(), sinkfix.patch(model, policy, backend="torch"):
        for t in range(9):
            model(ids[:, t:t + 1], cache=cache)
        with pytest.raises(CacheError, match="layer 1: content-dependent sinks cannot follow"):
            model(ids[:, 9:10], cache=cache)
    assert [layer.seen for layer in cache.layers] == [9, 9]


# -- 4. kvquant's share when quantization lowered the perplexity -----------------------------------
def test_kvquant_table_prints_no_nan_share_when_quantization_lowered_the_perplexity(capsys):
    from sinkfix.commands.kvquant import _print_table

    protocol = dict(model="m", texts=["t"], sequences_per_text=1, seq_len=96, bos=False, backend="quanto",
                    residual_length=32, n_sink=4, hidden_sinks=True)
    # tiny Llama at 2 bits: the quantized cache 0.2% below full, so the shares are undefined (NaN)
    row = dict(full=51737.961, quantized=51643.010, sink_protected=51644.354, hidden_protected=51689.366,
               kl=dict(quantized=2e-4, sink_protected=2e-4, hidden_protected=1e-4), recovered=float("nan"),
               recovered_kl=0.083, recovered_hidden=float("nan"), recovered_kl_hidden=0.376,
               quantized_vs_full=51643.010 / 51737.961 - 1, tokens=190, quantized_cache="transformers QuantizedCache")
    _print_table({"protocol": protocol, "2": row})
    out = capsys.readouterr().out
    assert "nan" not in out.lower()
    assert "n/a**" in out and "37.6%" in out and "8.3%" in out
    assert "quantization did not raise the perplexity" in " ".join(out.split())


# -- 5. a streaming cache with many sinks -----------------------------------------------------------
def test_a_streaming_cache_holds_only_the_sinks_it_has_captured(one_thread):
    """n_sink=10**6 held 528 MB after a 5-token prompt; 10**9 died with the allocator's RuntimeError."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    few = sinkfix.SinkCache(model.config, n_sink=5, window=10**9 + 1)
    many = sinkfix.SinkCache(model.config, n_sink=10**9, window=10**9 + 1)
    with torch.no_grad():
        expect = model(ids, cache=few).logits
        torch.testing.assert_close(model(ids, cache=many).logits, expect, rtol=0, atol=0)
        assert many.nbytes() == few.nbytes() and many.layers[0].sink_k.shape[2] == 5
        for t in range(3):  # the store grows with the tokens seen, and stays exact
            step = ids[:, t:t + 1]
            torch.testing.assert_close(model(step, cache=many).logits, model(step, cache=few).logits, rtol=0, atol=0)
    layer = many.layers[0]
    assert layer.sink_k.shape[2] == 8 and torch.equal(layer.sink_k, few.layers[0].body.materialize()[0])


def test_a_cache_that_evicts_with_a_store_grown_call_by_call_matches_a_fresh_forward(one_thread):
    """The sink store grows one token at a time and then serves as the head after eviction: the same
    logits as a fresh forward over the kept tokens (one layer, whose cached keys do not depend on
    what earlier layers saw)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval().double()
    ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    n_sink, window = 3, 5
    cache = sinkfix.SinkCache(model.config, n_sink=n_sink, window=window)
    with torch.no_grad():
        for t in range(16):
            got = model(ids[:, t:t + 1], cache=cache).logits[:, -1]
            kept = list(range(t + 1)) if t <= n_sink + window else list(range(n_sink)) + list(range(t - window, t + 1))
            fresh = model(ids[:, kept]).logits[:, -1]
            torch.testing.assert_close(got, fresh, rtol=0, atol=1e-6)
    assert cache.layers[0].sink_k.shape[2] == n_sink


# -- 6. kvquant --backend fp8 --residual-length ------------------------------------------------------
def test_kvquant_fp8_refuses_a_residual_length_it_would_ignore(loads, text_file, capsys):
    rc = cli.main(["kvquant", "--text", str(text_file), "--backend", "fp8", "--residual-length", "7",
                   "--seq-len", "32", "--chunk", "16", "--json"])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "--residual-length with --backend fp8" in err and loads == []
    # without it fp8 runs, and records no residual window
    rc = cli.main(["kvquant", "--text", str(text_file), "--backend", "fp8", "--seq-len", "32", "--chunk", "16",
                   "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["protocol"]["residual_length"] is None


def test_kvquant_residual_length_defaults_to_128_for_the_integer_backends():
    from sinkfix.commands.kvquant import _check

    args = cli.build_parser().parse_args(["kvquant"])
    _check(args)
    assert args.residual_length == 128
    args = cli.build_parser().parse_args(["kvquant", "--residual-length", "16"])
    _check(args)
    assert args.residual_length == 16


# -- 7. --period on a short text ---------------------------------------------------------------------
def test_stream_period_on_a_short_text_names_the_period(loads, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("hello world, this is a short text. " * 5)  # 175 characters: 175 tokens
    rc = cli.main(["stream", "--text", str(short), "--tokens", "3000", "--period", "500", "--window", "28",
                   "--n-sink", "4", "--segment", "64", "--no-figures", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "has 175 tokens, fewer than the 500 that --period 500 repeats" in err and "--tokens 500" not in err


def test_stream_text_names_the_tokens_when_the_period_is_longer_than_the_stream():
    from sinkfix.commands.stream import stream_text
    from sinkfix.errors import UsageError

    with pytest.raises(UsageError, match=r"has 20 tokens, fewer than --tokens 50$"):
        stream_text(CharTokenizer(), "x" * 20, 50, None, period=80)


@pytest.mark.parametrize("text", ["x", ""])
def test_a_text_of_under_two_tokens_is_named_with_what_was_asked(text):
    """A one-token file gave tokenize()'s own "text is too short: 1 token(s), fewer than the 2 needed",
    naming neither the file nor the 256 tokens `kvquant --seq-len 256` asked for."""
    from sinkfix.commands.stream import stream_text
    from sinkfix.errors import UsageError

    count = "1 token" if text else "0 tokens"
    with pytest.raises(UsageError, match=rf"^the text tiny has {count}, fewer than the 256 asked$"):
        stream_text(CharTokenizer(), text, 256, None, what="the text tiny", asked="the 256 asked")


def test_stream_names_a_text_file_of_under_two_tokens(loads, tmp_path, capsys):
    short = tmp_path / "tiny.txt"
    short.write_text("x")
    assert cli.main(["stream", "--text", str(short), "--tokens", "60", "--window", "20", "--n-sink", "2",
                     "--segment", "30", "--no-figures", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"the text ({short}) has 1 token, fewer than --tokens 60" in err, err


# -- 8. a repeated variant ---------------------------------------------------------------------------
@pytest.mark.parametrize("variants", ["sink,sink", "sink,window_only,sink"])
def test_stream_refuses_a_repeated_variant(loads, text_file, tmp_path, capsys, variants):
    rc = cli.main(["stream", "--text", str(text_file), *STREAM, "--variants", variants, "--out", str(tmp_path / "o")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "--variants names sink more than once" in err and loads == []


# -- 9. quantized caches, left padding and position_ids ------------------------------------------------
def _padded_loop(model, ids, mask, with_positions: bool, forced, **quant):
    cache = sinkfix.SinkCache(model.config, n_sink=2, window=None, **quant)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = (lambda: {"position_ids": positions}) if with_positions else dict
    with torch.no_grad():
        out = [model(input_ids=ids, attention_mask=mask, cache=cache, **extra()).logits[:, -1]]
        for s in range(forced.shape[1]):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            positions = positions[:, -1:] + 1
            out.append(model(input_ids=forced[:, s:s + 1], attention_mask=mask, cache=cache, **extra()).logits[:, -1])
    return torch.stack(out, 1)


def test_a_quantized_cache_needs_padding_aware_positions_and_the_docs_say_so(one_thread):
    pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(3)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 97, (1, 9), generator=g), torch.randint(3, 97, (1, 4), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    forced = torch.randint(3, 97, (2, 4), generator=g)
    quant = dict(bits=4, residual_length=4, q_group_size=8)
    gaps = {}
    for with_positions in (False, True):
        both = _padded_loop(model, ids, mask, with_positions, forced, **quant)
        alone = _padded_loop(model, b, torch.ones_like(b), with_positions, forced[1:], **quant)
        gaps[with_positions] = float((both[1] - alone[0]).abs().max())
    assert gaps[True] < 1e-5 < 1e-4 < gaps[False]  # measured 2.1e-3 over 8 steps
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "A quantized one does (`bits=2|4`, and fp8): without them a padded row's keys are quantized" in readme
    caches = " ".join((ROOT / "docs" / "caches.md").read_text().split())
    assert "With a quantized cache that holds only with padding-aware `position_ids`" in caches
    assert "its one scale per tensor is shared by the batch's rows" in caches
