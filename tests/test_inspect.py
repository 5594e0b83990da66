"""Streaming extreme-token metrics, row dormancy, inspect reports, figures and the inspect command."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

import sinkfix
from sinkfix.patch import PatchHandle
from sinkfix.analysis.inspection import DORMANT_THRESHOLD, InspectionReport, _domain_flips, inspect, row_dormancy
from sinkfix.analysis.metrics import ExtremeTokenMetrics, StreamingCollector, measure_extreme_tokens
from sinkfix.ops.attention import AttentionResult
from sinkfix.patch import AttentionCall

from .conftest import CharTokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


# -- hand-computed case: one head that provably sinks on key 0 ----------------------------------
def _sinking_call(beta: float | None = None) -> tuple[AttentionCall, dict]:
    """One head, 4 tokens, scale 1. Key 0 scores 5 against every query, the others 0; value 0 is 10x
    smaller than the others. Row i sees key 0 and i other keys, so p_i0 = e^5 / (e^5 + i)."""
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 4, 2).clone()
    k = torch.zeros(1, 1, 4, 2)
    k[0, 0, 0] = torch.tensor([5.0, 0.0])
    v = torch.ones(1, 1, 4, 2)
    v[0, 0, 0] = 0.1
    module = types.SimpleNamespace()
    call = AttentionCall(
        layer=0, module=module, query=q, key=k, value=v, attn_mask=None, causal=True, scale=1.0, softcap=None,
        sink_cols=torch.tensor([[0]]), first_real_col=torch.tensor([0]), extra_logits=None, virtual_sink_logit=None,
        beta=None if beta is None else torch.tensor([beta]), result=AttentionResult(torch.zeros(1, 1, 4, 2), None, None, None),
    )
    e5 = math.exp(5)
    p0 = [e5 / (e5 + i) for i in (1, 2, 3)]
    drain = 0.1 * math.sqrt(2) / math.sqrt(2)  # ||v_0|| / median(||v||) = 0.1 (median of {0.1, 1, 1, 1} is 1)
    return call, {"p0": p0, "drain": drain}


def test_hand_computed_sink_share_drain_and_dormancy():
    call, hand = _sinking_call()
    collector = StreamingCollector(1, [1], min_queries=1)
    collector.begin_window(torch.arange(4)[None])
    collector.observe(call)
    m = collector.result()
    share = sum(hand["p0"]) / 3  # rows 1..3; row 0 sees only the sink and is left out
    assert m.sink_share[0, 0].item() == pytest.approx(share, rel=1e-6)
    assert m.value_drain[0, 0].item() == pytest.approx(hand["drain"], rel=1e-6)
    # dormancy = attention on the sink x (1 - drain): the head wastes ~89% of its attention
    assert m.dormancy[0, 0].item() == pytest.approx(share * (1 - hand["drain"]), rel=1e-6)
    assert m.dormancy[0, 0].item() >= DORMANT_THRESHOLD
    assert m.dormant_fraction[0, 0].item() == 1.0
    assert m.hidden_sink_rate[0, 0].item() == 0.0  # keys 1..3 get < 0.1 of their viewers' attention


def test_hand_computed_corrected_share_under_a_policy():
    call, hand = _sinking_call(beta=0.25)
    collector = StreamingCollector(1, [1], min_queries=1)
    collector.begin_window(torch.arange(4)[None])
    collector.observe(call)
    m = collector.result()
    share = sum(hand["p0"]) / 3
    assert m.sink_share[0, 0].item() == pytest.approx(0.25 * share, rel=1e-6)
    assert m.dormancy[0, 0].item() == pytest.approx(0.25 * share * 0.9, rel=1e-6)


def test_hidden_sink_found_by_act_criterion():
    """Key 2 gets most of the attention of every row that sees it: a hidden sink; key 0 stays the first sink."""
    call, _ = _sinking_call()
    k = torch.zeros(1, 1, 6, 2)
    k[0, 0, 0] = torch.tensor([3.0, 0.0])
    k[0, 0, 2] = torch.tensor([6.0, 0.0])
    call.key = k
    call.query = torch.tensor([1.0, 0.0]).expand(1, 1, 6, 2).clone()
    call.value = torch.ones(1, 1, 6, 2)
    collector = StreamingCollector(1, [1], min_queries=1)
    collector.begin_window(torch.tensor([[7, 8, 9, 10, 11, 12]]))
    collector.observe(call)
    m = collector.result()
    assert m.hidden_sink_rate[0, 0].item() == 1.0
    assert m.hidden_sink_tokens[0] == {9: 1}
    # rows 2..5 put e^6 / (e^6 + e^3 + (i - 1)) on key 2; rows 1 sees no hidden sink
    e3, e6 = math.exp(3), math.exp(6)
    expected = sum(e6 / (e6 + e3 + (i - 1)) for i in range(2, 6)) / 5
    assert m.hidden_sink_share[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_hidden_sink_behind_a_sink_that_takes_almost_everything():
    """Key 0 takes all but ~1e-8 of every row (as in SmolLM2's sink heads); of the rest key 2 takes
    most. With beta = 0.7 the correction moves 0.3 of each row onto the non-sink keys, so key 2's
    corrected mean attention is about 0.3 x its share of them: a hidden sink. p_N must be summed over
    the non-sink keys: as l_all - l_S it cancels to 0 in fp32 and the freed mass was never counted."""
    call, _ = _sinking_call(beta=0.7)
    n = 12
    call.query = torch.tensor([1.0, 0.0]).expand(1, 1, n, 2).clone()
    k = torch.zeros(1, 1, n, 2)
    k[0, 0, 0] = torch.tensor([20.0, 0.0])  # e^-20 = 2e-9 of the sink's weight per other key
    k[0, 0, 2] = torch.tensor([2.0, 0.0])
    call.key, call.value = k, torch.ones(1, 1, n, 2)
    collector = StreamingCollector(1, [1], min_queries=1)
    collector.begin_window(torch.arange(n)[None])
    collector.observe(call)
    m = collector.result()
    # fp64: row i (i >= 1) sees keys 0..i; the correction keeps beta p_S on the sink and gives the
    # non-sink keys p_j (p_N + (1 - beta) p_S) / p_N
    scores = (call.query[0, 0].double() @ k[0, 0].double().T).tril()
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    p = torch.softmax(scores, -1)
    p_s, p_n = p[:, 0], p[:, 1:].sum(-1)
    applied = p[1:, 1:] * ((p_n + 0.3 * p_s) / p_n)[1:, None]
    column_means = applied.sum(0) / torch.arange(n - 1, 0, -1)  # key j (j >= 1) is seen by rows j..n-1
    assert column_means[1] > 0.1 and (column_means[2:] < 0.1).all()  # key 2 alone is a hidden sink
    assert m.hidden_sink_rate[0, 0].item() == 1.0
    assert m.hidden_sink_tokens[0] == {2: 1}


# -- against dense ground truth on a real (tiny) model -----------------------------------------
def test_metrics_match_dense_attention_and_hidden_states():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(1))
    values = {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda mod, args, out, i=i: values.__setitem__(i, out.detach())) for i, layer in enumerate(model.model.layers)]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids[None], output_attentions=True, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    m = measure_extreme_tokens(model, [ids])
    assert model.config._attn_implementation == "eager" and PatchHandle.of(model) is None
    for layer, att in enumerate(ref.attentions):
        att = att[0].double()  # (H, Q, K)
        assert torch.allclose(m.sink_share[layer], att[:, 1:, 0].mean(-1), atol=1e-5)
        vnorm = values[layer][0].view(24, 2, 16).norm(dim=-1).T.double()  # (Hkv, K)
        assert torch.allclose(m.value_drain[layer], vnorm[:, 0] / vnorm.median(-1).values, atol=1e-5)
    # output_hidden_states[l + 1] is layer l's output (the last one is after the final norm)
    norms = ref.hidden_states[1].norm(dim=-1)[0].double()
    assert m.residual_peak[0].item() == pytest.approx((norms.max() / norms.median()).item(), rel=1e-5)
    assert m.peak_positions[0] == int(norms.argmax())


def test_patched_model_reports_corrected_share_and_keeps_patch():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(2))
    stock = measure_extreme_tokens(model, [ids], hidden_sink_threshold=None)
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.5)) as handle:
        fixed = measure_extreme_tokens(model, [ids], hidden_sink_threshold=None)
        assert handle.active and PatchHandle.of(model) is handle
    # layer 0 sees the same inputs, so its share is exactly halved; later layers see corrected inputs
    assert torch.allclose(fixed.sink_share[0], 0.5 * stock.sink_share[0], atol=1e-6)
    assert not torch.allclose(fixed.sink_share[1], stock.sink_share[1], atol=1e-6)


def test_light_and_blockwise_paths_agree():
    model = tiny_model("qwen2")
    windows = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 30)]
    light = measure_extreme_tokens(model, windows, hidden_sink_threshold=None)
    full = measure_extreme_tokens(model, windows)
    assert light.dormancy is None and full.dormancy is not None
    assert torch.allclose(light.sink_share, full.sink_share, atol=1e-6)
    assert torch.equal(light.residual_peak, full.residual_peak)
    assert full.windows == 2 and full.tokens == 47


def test_measure_rejects_no_windows():
    with pytest.raises(ValueError, match="at least one window"):
        measure_extreme_tokens(tiny_model("llama"), [])


@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "gptoss"])
def test_metrics_run_on_other_architectures(arch):
    model = tiny_model(arch)
    m = measure_extreme_tokens(model, [torch.randint(0, 97, (16,))])
    assert m.sink_share.shape == (2, 4) and torch.isfinite(m.sink_share).all()
    assert ((m.dormancy >= 0) & (m.dormancy <= 1)).all()
    json.dumps(m.to_dict(), allow_nan=False)


# -- row dormancy ---------------------------------------------------------------------------------
def test_row_dormancy_shape_and_agrees_with_per_head_state():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 28), generator=torch.Generator().manual_seed(3))
    rows = row_dormancy(model, ids)
    assert rows.shape == (2, 1, 4, 28)
    per_head = measure_extreme_tokens(model, [ids[0]]).dormancy
    assert torch.allclose(rows[:, 0, :, 1:].mean(-1).double(), per_head, atol=1e-6)


def test_row_dormancy_padding_rows_are_zero():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    rows = row_dormancy(model, ids, mask)
    assert rows.shape == (2, 2, 4, 12)
    assert rows[:, 1, :, :4].abs().max() == 0
    assert rows[:, 1, :, 4:].abs().max() > 0
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        row_dormancy(model, ids[0])


def test_row_dormancy_detects_a_constructed_dormant_head():
    """Layer 0 made to sink provably: token 0 alone has a key (along the slowest RoPE pair, so the
    score does not depend on position), every other token's query points at it, and its value is
    zero. Every row i >= 1 then puts ~all its attention on a zero value: dormant, score ~1."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    ids[0, 0] = 0
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[0] = 0
        emb[0, 0] = 1.0  # token 0 lives on direction 0 ...
        emb[3:, 0] = 0
        emb[3:, 1] = 1.0  # ... every other token has a large component on direction 1
        attn.k_proj.weight.zero_()
        attn.k_proj.weight[7::16, 0] = 1.0  # head dim 7 (slowest rotation) of every kv head reads direction 0
        attn.q_proj.weight.zero_()
        attn.q_proj.weight[7::16, 1] = 1.0  # queries read direction 1 into the same head dim
        attn.v_proj.weight[:, 0] = 0  # token 0's value is zero
    rows = row_dormancy(model, ids)
    assert rows.shape == (2, 1, 4, 16)
    assert rows[0, 0, :, 1:].min() > 0.99
    m = measure_extreme_tokens(model, [ids[0]])
    assert m.sink_share[0].min() > 0.99 and m.value_drain[0].max() < 1e-6
    assert (m.dormancy[0] >= DORMANT_THRESHOLD).all() and m.dormant_fraction[0].min() == 1.0


# -- reports ------------------------------------------------------------------------------------
def _metrics_with(dormancy: torch.Tensor) -> ExtremeTokenMetrics:
    L, H = dormancy.shape
    return ExtremeTokenMetrics(sink_share=dormancy.clone(), value_drain=torch.ones(L, 1), residual_peak=torch.ones(L),
                               peak_positions=[0] * L, peak_tokens=[0] * L, dormancy=dormancy, tokens=10)


def test_domain_flips_need_the_margin():
    prose = torch.tensor([[0.9, 0.52, 0.1], [0.7, 0.2, 0.6]], dtype=torch.float64)
    code = torch.tensor([[0.1, 0.47, 0.1], [0.65, 0.8, 0.3]], dtype=torch.float64)
    flips = _domain_flips({"prose": _metrics_with(prose), "code": _metrics_with(code)}, margin=0.05)
    found = {(f["layer"], f["head"]): f for f in flips}
    assert set(found) == {(0, 0), (1, 1), (1, 2)}  # (0, 1) sits within the margin of the threshold
    assert found[(0, 0)]["dormant_on"] == ["prose"] and found[(1, 1)]["dormant_on"] == ["code"]
    assert flips[0]["delta"] == pytest.approx(0.8)
    # a third domain inside the band (0.53) is listed on neither side, though the head flips
    legal = torch.tensor([[0.53, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
    flips = _domain_flips({"prose": _metrics_with(prose), "code": _metrics_with(code), "legal": _metrics_with(legal)},
                          margin=0.05)
    head = next(f for f in flips if (f["layer"], f["head"]) == (0, 0))
    assert head["dormant_on"] == ["prose"] and head["active_on"] == ["code"]


def test_inspect_tiny_model_two_domains(tmp_path):
    model = tiny_model("llama")
    texts = {"prose": "the quick brown fox jumps over the lazy dog. " * 8, "code": "def f(x):\n    return x + 1\n" * 10}
    report = inspect(model, CharTokenizer(), texts, seq_len=64, progress=False)
    assert isinstance(report, InspectionReport) and set(report.domains) == {"prose", "code"}
    assert report.protocol["bos"] is True and report.protocol["seq_len"] == 64
    assert report.domains["prose"].windows == 6  # 360 characters in windows of 63 text tokens
    assert report.dormant("code").shape == (2, 4)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["format"] == "sinkfix-inspection" and set(data["dormant"]) == {"prose", "code"}
    path = report.save_json(tmp_path / "r" / "report.json")
    assert json.loads(path.read_text())["model"]["architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), r"max_tokens must be None or an integer >= 2 .*got 0"),
    (dict(max_tokens=-5), r"max_tokens must be None or an integer >= 2 .*got -5"),
    (dict(max_tokens=1.5), r"max_tokens must be None or an integer >= 2"),
    (dict(seq_len=2), r"seq_len must be an integer >= 3 \(the BOS token and 2 text tokens; 2 with bos=False\), got 2"),
    (dict(seq_len=1, bos=False), r"seq_len must be an integer >= 2 \(2 text tokens\), got 1"),
    (dict(seq_len=64.0), r"seq_len must be an integer >= 3"),
])
def test_inspect_refuses_windows_that_measure_nothing(kwargs, message):
    """max_tokens=0 measured 1-token windows and a negative count nearly the whole text."""
    from sinkfix.analysis.inspection import text_windows
    from sinkfix.errors import UsageError

    model = tiny_model("llama")
    model.forward = lambda *a, **k: pytest.fail("the model ran before the arguments were checked")
    with pytest.raises(UsageError, match=message):
        inspect(model, CharTokenizer(), "a sentence of prose. " * 20, progress=False, **kwargs)
    with pytest.raises(UsageError, match=message):
        text_windows(CharTokenizer(), "a sentence of prose. " * 20, **kwargs)


def test_the_smallest_windows_inspect_accepts():
    from sinkfix.analysis.inspection import text_windows

    text = "a sentence of prose. " * 20
    assert [w.numel() for w in text_windows(CharTokenizer(), text, seq_len=3, max_tokens=4)] == [3, 3]
    assert [w.numel() for w in text_windows(CharTokenizer(), text, seq_len=2, bos=False, max_tokens=2)] == [2]
    # a max_tokens below one window gives one shorter window, as a text shorter than a window does
    assert [w.numel() for w in text_windows(CharTokenizer(), text, seq_len=64, max_tokens=5)] == [6]


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from sinkfix.analysis.plots import write_figures

    model = tiny_model("llama")
    texts = {"a": "abc def ghi " * 20, "b": "x = [i for i in y]\n" * 10}
    report = inspect(model, CharTokenizer(), texts, seq_len=48, progress=False)
    paths = write_figures(report, tmp_path)
    assert {p.name for p in paths} == {"sink_share.png", "residual_norms.png", "value_norms.png", "domain_flips.png"}
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    from sinkfix.analysis import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plots.PlotError, match="pip install"):
        plots.sink_share_heatmap(None, tmp_path / "x.png")


def test_inspect_command(monkeypatch, tmp_path, capsys):
    from sinkfix import cli

    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    prose, code = tmp_path / "prose.txt", tmp_path / "code.py"
    prose.write_text("a sentence of prose, and then another one. " * 6)
    code.write_text("for i in range(10):\n    print(i)\n" * 8)
    out = tmp_path / "out"
    rc = cli.main(["inspect", "--text", str(prose), "--text", str(code), "--out", str(out), "--seq-len", "40"])
    assert rc == 0
    data = json.loads((out / "report.json").read_text())
    assert set(data["domains"]) == {"prose", "code"}
    assert (out / "sink_share.png").exists() and (out / "domain_flips.png").exists()
    printed = capsys.readouterr().out
    assert "sink layers" in printed and "resid." in printed and "no head changes state" in printed
    # the margin is named beside the counts that use the bare threshold (they differed under "no head
    # changes state" with nothing to say why)
    assert "by the margin (0.05 on each side of the dormant threshold 0.5" in " ".join(printed.split())
    assert PatchHandle.of(model) is None


def test_inspect_command_errors(tmp_path, capsys):
    from sinkfix import cli

    assert cli.main(["inspect", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err


# -- real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_known_sink_layers(smollm2):
    from sinkfix.texts import domain_text

    model, tokenizer = smollm2
    # 128-token windows: the early sink layers (3-9) spread their attention over more keys in longer
    # windows (max head share 0.89 at 128 tokens, 0.27 at 512 on this prose).
    report = inspect(model, tokenizer, domain_text("pydoc", "eval", max_chars=6000), seq_len=128, bos=True,
                     max_tokens=3 * 127, progress=False)
    m = report.overall
    found = report.sink_layers(0.4)  # a head with >= 0.4 of its attention on token 0
    assert {5, 20, 29} <= set(found), found
    assert not {0, 1, 11} & set(found), found
    # the massive residual state sits on token 0 from layer ~11 on, far above the median token
    assert all(m.peak_positions[layer] == 0 for layer in range(11, 28)), m.peak_positions
    assert m.residual_peak[11:28].min() > 30
    assert m.value_drain[20].max() < 0.5  # the sink's value is drained in the sink layers
    assert (m.dormancy[12:] >= DORMANT_THRESHOLD).sum() > 10


def test_inspect_without_matplotlib_is_refused_before_the_model_loads(monkeypatch, tmp_path, capsys):
    """Without matplotlib, inspect measured every domain and wrote report.json, then exited 2 on the
    first figure: now it says so before the model loads (or with --no-figures runs as before)."""
    import sys

    from sinkfix import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing matplotlib was reported")

    monkeypatch.setattr(sinkfix, "load_model", never)
    text = tmp_path / "prose.txt"
    text.write_text("The first token of a sequence often becomes an attention sink. " * 8)
    rc = cli.main(["inspect", "--text", str(text), "--out", str(tmp_path / "out"), "--seq-len", "40"])
    assert rc == 2
    assert "pip install 'sinkfix[plots]'" in capsys.readouterr().err


def test_a_text_shorter_than_one_window_is_said_and_recorded():
    """A 2-token file beside a long text was measured on a 3-token window (every token a "hidden sink",
    64 heads "flipping" between the texts), silently, under a header of 512-token windows."""
    model = tiny_model("llama")
    texts = {"long": "the quick brown fox jumps over the lazy dog. " * 8, "tiny": "ab"}
    with pytest.warns(UserWarning, match=r"text 'tiny' gives one window of 3 tokens, shorter than the 64-token "
                                         r"windows asked: its numbers rest on 2 rows"):
        report = inspect(model, CharTokenizer(), texts, seq_len=64, bos=True, max_tokens=None)
    assert report.protocol["short_texts"] == {"tiny": 3}
    with pytest.warns(UserWarning, match="shorter than the 64-token") as said:
        inspect(model, CharTokenizer(), texts, seq_len=64, bos=True, max_tokens=None)
    assert said[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # texts of full windows: no warning, no record
        full = inspect(model, CharTokenizer(), {"long": texts["long"]}, seq_len=64, bos=True, max_tokens=None)
    assert "short_texts" not in full.protocol


def test_value_norm_figure_ticks_whole_kv_heads(tmp_path, monkeypatch):
    """One kv head (Gemma3-270m) got an axis labelled -0.4 ... 0.4."""
    pytest.importorskip("matplotlib")
    from sinkfix.analysis import plots

    model = tiny_model("gemma3")  # 1 kv head
    report = inspect(model, CharTokenizer(), {"a": "the quick brown fox jumps over the lazy dog. " * 8}, seq_len=64,
                     bos=True, max_tokens=None)
    ticks = []
    real_save = plots._save

    def keep(plt_module, fig, path, **kw):
        ticks.extend(fig.axes[0].get_xticks().tolist())
        return real_save(plt_module, fig, path, **kw)

    monkeypatch.setattr(plots, "_save", keep)
    plots.value_norm_plot(report, tmp_path / "v.png")
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
