"""Sink caches in the cases a review found wrong: a policy sink set longer than the cache's kept sinks,
a compiled loop over a left-padded batch, quantization arguments without bits, and `sinkfix stream`'s
checks that used to come after the work."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import cli
from sinkfix.errors import CacheError
from sinkfix.integrations import attention as attention_integration

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _stream(model, ids, policy, *, n_sink=1, window=6, record=None, monkeypatch=None):
    cache = sinkfix.SinkCache(model.config, n_sink=n_sink, window=window)
    if record is not None:  # (step, layer 0's sink columns, the tokens its cache columns hold, first real token)
        real = attention_integration.sink_attention

        def spy(*args, sink_cols=None, **kwargs):
            layer = cache.layers[0]
            if sink_cols is not None and len(record[-1]) == 0:
                record[-1].append((sink_cols.clone(), layer.last_columns.clone(), layer.first_real.clone()))
            return real(*args, sink_cols=sink_cols, **kwargs)

        monkeypatch.setattr(attention_integration, "sink_attention", spy)
    out = []
    with sinkfix.patch(model, policy), torch.no_grad():
        for t in range(ids.shape[1]):
            if record is not None:
                record.append([])
            out.append(model(ids[:, t:t + 1], cache=cache).logits[0])
    return torch.cat(out)


def test_a_sink_position_the_cache_has_dropped_is_absent_not_a_recent_token():
    """SinkCache(n_sink=1): once token 1 (or 4) has left the window, Policy(n_sink=2) (or extra
    position 4) must act as Policy(n_sink=1); the recent token in that column was corrected instead.
    One layer, so that a step's output depends on that step's attention alone (a second layer would
    read keys the first computed at earlier steps, when the two policies differed)."""
    model = _model(1)
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    one = _stream(model, ids, sinkfix.Policy(sink_scale=0.3))
    two = _stream(model, ids, sinkfix.Policy(sink_scale=0.3, n_sink=2))
    extra = _stream(model, ids, sinkfix.Policy(sink_scale=0.3, extra_sink_positions=(4,)))
    assert (one[8:] - two[8:]).abs().max() < 1e-5  # token 1 dropped from step 8 on (1 sink + window 6)
    assert (one[11:] - extra[11:]).abs().max() < 1e-5  # token 4 from step 11 on
    assert (one[:8] - two[:8]).abs().max() > 1e-3  # while it is held, the second sink is corrected


def test_a_kept_sink_position_is_the_column_that_holds_its_token(monkeypatch):
    """While the window holds token 4, extra position 4 is the column holding token 4, wherever the
    cache's eviction has moved it (columns are [kept sinks][window][new])."""
    model = _model(1)
    ids = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(2))
    record: list = []
    _stream(model, ids, sinkfix.Policy(sink_scale=0.3, extra_sink_positions=(4,)), record=record,
            monkeypatch=monkeypatch)
    checked = 0
    for step, calls in enumerate(record):
        if not calls:
            continue
        cols, tokens, first = calls[0]
        for slot, position in enumerate((0, 4)):
            col = int(cols[0, slot])
            held = bool((tokens[0] == first[0] + position).any())
            if held:
                assert col >= 0 and int(tokens[0, col]) == int(first[0]) + position, (step, position)
                checked += 1
            else:
                assert col == -1, (step, position)
    assert checked >= 15  # steps after the first eviction (step 7 on) included


def test_a_compiled_loop_finds_left_padding_in_the_mask():
    """torch.compile(model) over a left-padded batch, mask given, no position_ids: each row as alone
    (the compiled first call took the padding for real tokens, which became the row's sinks)."""
    model = _model(2, seed=4)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 97, (1, 9), generator=gen), torch.randint(3, 97, (1, 4), generator=gen)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def loop(step, x, am):
        cache = sinkfix.SinkCache(model.config, n_sink=2, window=6)
        out = []
        with torch.no_grad():
            logits = step(input_ids=x, attention_mask=am, cache=cache).logits[:, -1]
            out.append(logits)
            for _ in range(10):
                am = torch.cat([am, torch.ones(am.shape[0], 1, dtype=am.dtype)], 1)
                logits = step(input_ids=logits.argmax(-1, keepdim=True), attention_mask=am, cache=cache).logits[:, -1]
                out.append(logits)
        return torch.stack(out, 1), cache

    alone, _ = loop(model, b, torch.ones_like(b))
    torch._dynamo.reset()
    compiled, cache = loop(torch.compile(model, backend="eager"), ids, mask)
    assert cache.layers[0].first_real.tolist() == [0, 5]
    assert (compiled[1] - alone[0]).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(residual_length=0), "residual_length must be an integer >= 1"),
    (dict(q_group_size=5), "does not divide the head dimension"),
    (dict(q_group_size=0), "does not divide the head dimension"),
])
def test_quantization_arguments_are_checked_without_bits_too(kwargs, message):
    config = tiny_model("llama").config
    with pytest.raises(CacheError, match=message):
        sinkfix.SinkCache(config, n_sink=2, window=8, **kwargs)
    sinkfix.SinkCache(config, n_sink=2, window=8, residual_length=4, q_group_size=8)  # valid ones pass


# -- sinkfix stream: refused before the work -------------------------------------------------------
TEXT = "The attention sink of a language model is usually its first token. " * 12
STREAM = ["--tokens", "90", "--window", "20", "--n-sink", "2", "--segment", "30", "--chunk", "8"]


@pytest.fixture
def streamed(monkeypatch):
    """The tiny model as every model, and the list of variants that started streaming."""
    from sinkfix.analysis import streaming

    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    names: list = []
    monkeypatch.setattr(streaming, "stream_nll", lambda *a, **k: names.append(k["name"]))
    return model, names


def test_stream_refuses_a_content_profile_before_any_variant(streamed, tmp_path, capsys):
    from sinkfix.policy import ContentSinks
    from sinkfix.profile import ModelIdentity, Profile

    model, names = streamed
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    path = Profile(ModelIdentity.of(model), torch.ones(2, 4),
                   content_sinks=ContentSinks(threshold=0.1, hidden_sink_scale=0.5)).save(tmp_path / "p.json")
    rc = cli.main(["stream", "--text", str(text), *STREAM, "--profile", str(path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "content-mode profile" in err and "\n" not in err and names == []


@pytest.mark.parametrize("name", ["stream.json", "stream_tokens.pt", "stream.png"])
def test_stream_refuses_a_folder_in_an_output_files_place_before_any_variant(streamed, tmp_path, capsys, name):
    pytest.importorskip("matplotlib")
    _, names = streamed
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "o"
    (out / name).mkdir(parents=True)
    rc = cli.main(["stream", "--text", str(text), *STREAM, "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert name in err and "\n" not in err and names == []
    assert sorted(p.name for p in out.iterdir()) == [name]


@pytest.mark.parametrize("argv", [["stream", "--tokens", "abc"], ["kvquant", "--backend", "nope"],
                                  ["calibrate", "--steps", "1.5"], ["monitor", "report", "--margin", "x", "f"]])
def test_argparse_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "\n" not in err and "--help" in err
