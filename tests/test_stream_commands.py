"""``sinkfix stream`` and ``sinkfix kvquant`` on tiny random models: JSON schema, files, errors."""

from __future__ import annotations

import hashlib
import json
import re
import math

import pytest
import torch

import sinkfix
from sinkfix import cli
from sinkfix.analysis.streaming import StreamResult, StreamVariant

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture
def tiny(monkeypatch):
    def use(arch="llama"):
        model = tiny_model(arch)
        monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
        return model
    return use


def test_stream_json_has_every_variant(tiny, text_file, tmp_path, capsys):
    tiny("llama")
    out = tmp_path / "out"
    rc = cli.main(["stream", "--text", str(text_file), "--tokens", "150", "--window", "20", "--n-sink", "2",
                   "--segment", "30", "--chunk", "8", "--recompute-every", "8", "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("sink", "window_only", "recompute"):
        v = result[name]
        assert set(v) >= {"ppl", "segments", "tokens"} and math.isfinite(v["ppl"])
        assert len(v["segments"]) == (150 - 23) // 30
    assert result["sink"]["tokens"] == result["window_only"]["tokens"] == 149
    assert result["recompute"]["tokens"] == len(range(24, 150, 8))
    assert len(result["sink"]["ms_per_token"]) == len(result["sink"]["segments"])
    assert len(result["sink"]["cpu_ms_per_token"]) == len(result["sink"]["segments"])
    assert all(ms > 0 for ms in result["sink"]["cpu_ms_per_token"])
    assert result["paired"]["recompute"]["ratio_to_recompute"] == 1.0
    assert len(result["paired"]["sink"]["segment_ratios"]) == len(result["sink"]["segments"])
    tokens = torch.load(out / "stream_tokens.pt")
    assert set(tokens) == {"sink", "window_only", "recompute"} and tokens["sink"].shape == (150,)
    assert result["protocol"]["segments"][-1][1] == 150  # the last segment is the stream's tail
    assert (out / "stream.png").stat().st_size > 0 and json.loads((out / "stream.json").read_text()) == result


@pytest.mark.parametrize("argv, message", [
    (["--window", "0"], "window must be an integer >= 1"),
    (["--n-sink", "8", "--window", "8"], "smaller than window"),
    (["--tokens", "20", "--window", "20"], "leaves no full segment"),
    (["--chunk", "0"], "--chunk must be"),
    (["--variants", "sink,dense"], "--variants takes"),
    (["--variants", "sink_profile"], "need --profile"),
    (["--tokens", "5000", "--window", "20", "--segment", "30"], "fewer than --tokens"),
])
def test_stream_bad_input_exits_2_with_one_line(tiny, text_file, capsys, argv, message):
    tiny("llama")
    assert cli.main(["stream", "--text", str(text_file), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def _strict(text: str):
    """JSON as strict parsers read it: NaN or Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_stream_json_is_strict_json_with_null_for_missing_ratios(tiny, text_file, tmp_path, capsys):
    """A segment without a recomputed position has no ratio: null, not a bare NaN."""
    tiny("llama")
    out = tmp_path / "out"
    rc = cli.main(["stream", "--text", str(text_file), "--tokens", "150", "--window", "20", "--n-sink", "2",
                   "--segment", "30", "--chunk", "8", "--recompute-every", "100", "--out", str(out), "--no-figure",
                   "--json"])
    assert rc == 0
    result = _strict(capsys.readouterr().out)
    assert None in result["paired"]["sink"]["segment_ratios"]
    assert _strict((out / "stream.json").read_text()) == result


def test_stream_checks_the_profile_against_the_model_before_streaming(tiny, text_file, tmp_path, capsys,
                                                                     monkeypatch):
    """A profile fitted on another model is refused right after the model loads, not after the
    unpatched variants have streamed."""
    from sinkfix.analysis import streaming
    from sinkfix.profile import ModelIdentity, Profile

    other = tiny_model("llama", seed=5)
    path = Profile(ModelIdentity.of(other), torch.full((2, 4), 0.7)).save(tmp_path / "p.json")
    tiny("llama")
    streamed = []
    monkeypatch.setattr(streaming, "stream_nll", lambda *a, **k: streamed.append(k["name"]))
    rc = cli.main(["stream", "--text", str(text_file), "--tokens", "90", "--window", "20", "--n-sink", "2",
                   "--segment", "30", "--profile", str(path), "--out", str(tmp_path / "o"), "--no-figure"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "this profile was calibrated for" in err and "\n" not in err
    assert streamed == [] and not (tmp_path / "o" / "stream.json").exists()


def test_stream_refuses_a_model_without_rope_before_streaming(tiny, text_file, tmp_path, capsys, monkeypatch):
    from sinkfix.analysis import streaming

    tiny("gpt2")
    recomputed = []
    monkeypatch.setattr(streaming, "recompute_nll", lambda *a, **k: recomputed.append(k["name"]))
    rc = cli.main(["stream", "--text", str(text_file), "--tokens", "90", "--window", "20", "--n-sink", "2",
                   "--segment", "30", "--variants", "recompute,sink", "--out", str(tmp_path / "o"), "--no-figure"])
    assert rc == 2
    assert "no rotary position embeddings" in capsys.readouterr().err and recomputed == []


def test_stream_missing_text_file_exits_2(tmp_path, capsys):
    assert cli.main(["stream", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("arch, quantized", [("llama", "transformers QuantizedCache"), ("gemma3", "SinkCache(n_sink=0)")])
def test_kvquant_json(tiny, text_file, capsys, arch, quantized):
    pytest.importorskip("optimum.quanto")
    tiny(arch)
    rc = cli.main(["kvquant", "--text", str(text_file), "--bits", "2,4", "--seq-len", "64", "--chunk", "16",
                   "--residual-length", "8", "--n-sink", "2", "--hidden-sinks", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"2", "4", "protocol", "provenance"}
    # what a rerun needs: the text's hash, the numeric group size, versions of the quantization backend
    assert result["protocol"]["text_sha256"] == {"text": hashlib.sha256(text_file.read_text().encode()).hexdigest()}
    assert result["protocol"]["group_size"] == 16  # the tiny models' head dimension, under 64
    prov = result["provenance"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["optimum-quanto"]
    assert prov["torch_threads"] == torch.get_num_threads() and prov["device"] == "cpu"
    for bits in ("2", "4"):
        row = result[bits]
        assert row["tokens"] == 63 and row["quantized_cache"].startswith(quantized)
        assert all(math.isfinite(row[k]) for k in ("full", "quantized", "sink_protected", "hidden_protected"))
        assert row["quantized"] != row["full"]
        assert row["kl"]["full"] == 0 and row["kl"]["quantized"] > 0 and row["kl"]["sink_protected"] > 0
        assert math.isfinite(row["recovered_kl"]) and math.isfinite(row["recovered_kl_hidden"])
    assert result["2"]["full"] == result["4"]["full"]
    assert result["2"]["kl"]["quantized"] > result["4"]["kl"]["quantized"]  # 2 bits move the model further


def test_kvquant_prints_its_table_beside_the_provenance(tiny, text_file, tmp_path, capsys):
    """The table skipped only the "protocol" entry: with "provenance" beside it the default command
    (no --json) failed with KeyError 'full' after every measurement."""
    pytest.importorskip("optimum.quanto")
    tiny("llama")
    out = tmp_path / "r.json"
    assert cli.main(["kvquant", "--text", str(text_file), "--bits", "4", "--seq-len", "64", "--chunk", "16",
                     "--residual-length", "8", "--n-sink", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full ppl" in " ".join(printed.split()) and "provenance" in json.loads(out.read_text())


def test_kvquant_fp8_reports_the_elements_its_frozen_scale_clipped(tiny, text_file, tmp_path, capsys):
    tiny("gemma3")  # transformers refuses its sliding layers: both fp8 variants are SinkCaches
    out = tmp_path / "r.json"
    assert cli.main(["kvquant", "--text", str(text_file), "--backend", "fp8", "--seq-len", "64", "--chunk", "16",
                     "--n-sink", "2", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    counts = json.loads(out.read_text())["8"]["fp8_saturated"]
    assert set(counts) == {"quantized", "sink_protected"} and all(isinstance(n, int) and n >= 0 for n in counts.values())
    assert (f"fp8 elements clipped at the frozen scale's range: quantized {counts['quantized']:,}, sink protected "
            f"{counts['sink_protected']:,}") in printed


@pytest.mark.parametrize("argv, message", [
    (["--bits", "3"], "--bits with --backend quanto takes 2 and 4"),
    (["--bits", "8"], "--bits with --backend quanto takes 2 and 4"),
    (["--backend", "fp8", "--bits", "4"], "--bits with --backend fp8 takes 8"),
    (["--bits", "two"], "comma-separated integers"),
    (["--n-sink", "-1"], "--n-sink must be >= 0"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
])
def test_kvquant_bad_input_exits_2_with_one_line(text_file, capsys, argv, message):
    assert cli.main(["kvquant", "--text", str(text_file), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_kvquant_text_too_short_names_its_own_flags(tiny, tmp_path, capsys):
    pytest.importorskip("optimum.quanto")
    tiny("llama")
    short = tmp_path / "short.txt"
    short.write_text("short text")
    assert cli.main(["kvquant", "--text", str(short), "--seq-len", "100", "--sequences", "3", "--chunk", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the text short" in err and "has 10 tokens, fewer than the 300 that --seq-len 100 x --sequences 3" in err
    assert "--tokens" not in err and "\n" not in err


def test_kvquant_serves_a_model_without_rope(tiny, text_file, capsys):
    """Its caches never evict (window=None), so no key is moved and GPT-2 needs no RoPE."""
    pytest.importorskip("optimum.quanto")
    tiny("gpt2")
    rc = cli.main(["kvquant", "--text", str(text_file), "--bits", "4", "--seq-len", "48", "--chunk", "16",
                   "--residual-length", "8", "--n-sink", "2", "--json"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out)["4"]
    assert row["quantized_cache"] == "transformers QuantizedCache" and row["tokens"] == 47
    assert row["kl"]["quantized"] > 0 and math.isfinite(row["sink_protected"])


def test_segments_tile_the_stream_up_to_its_end():
    nll = torch.zeros(100, dtype=torch.float64)
    result = StreamResult({"sink": StreamVariant("sink", nll)}, {"tokens": 100, "warmup": 10, "segment_len": 25})
    assert result.segment_bounds() == [(25, 50), (50, 75), (75, 100)]


def test_stream_with_a_profile_adds_patched_variants(tiny, text_file, tmp_path, capsys):
    from sinkfix.profile import ModelIdentity, Profile

    model = tiny("llama")
    beta = torch.full((2, 4), 0.7)
    path = Profile(ModelIdentity.of(model), beta, calibration={"note": "test"}).save(tmp_path / "p.json")
    rc = cli.main(["stream", "--text", str(text_file), "--tokens", "90", "--window", "20", "--n-sink", "2",
                   "--segment", "30", "--chunk", "8", "--recompute-every", "16",
                   "--variants", "sink,recompute,sink_profile,recompute_profile",
                   "--profile", str(path), "--out", str(tmp_path / "o"), "--no-figure", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert {"sink", "recompute", "sink_profile", "recompute_profile"} <= set(result) and "window_only" not in result
    assert result["sink_profile"]["ppl"] != result["sink"]["ppl"]
    assert result["paired"]["sink_profile"]["reference"] == "recompute_profile"
    assert sinkfix.PatchHandle.of(model) is None


def test_running_perplexity_is_a_trailing_mean_over_scored_positions():
    from sinkfix.analysis.streaming import running_ppl

    nll = torch.tensor([float("nan"), 1.0, float("nan"), 3.0, 5.0], dtype=torch.float64)
    positions, ppl = running_ppl(StreamVariant("recompute", nll), span=3)
    assert positions.tolist() == [1, 3, 4]
    torch.testing.assert_close(ppl.log(), torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))


def test_stream_text_defaults_to_a_builtin_domain_and_mixed_interleaves_every_domain():
    from sinkfix.commands.stream import _load_text
    from sinkfix.texts import DOMAINS, domain_text, mixed_text

    parser = cli.build_parser()
    text, source = _load_text(parser.parse_args(["stream"]))
    assert text == domain_text("pydoc", "eval") and "pydoc" in source
    text, source = _load_text(parser.parse_args(["stream", "--builtin", "legal"]))
    assert text == domain_text("legal", "eval")
    mixed = mixed_text("eval")
    assert all(d in mixed.source for d in DOMAINS)
    # every paragraph of every domain once, in an order that is fixed by the seed and mixes domains
    paragraphs = mixed.text.split("\n\n")
    import re

    expected = sorted(p.strip() for d in DOMAINS for p in re.split(r"\n\s*\n", domain_text(d, "eval")) if p.strip())
    assert sorted(paragraphs) == expected
    assert mixed_text("eval").text == mixed.text and mixed_text("eval", seed=1).text != mixed.text
    domain_of = {p.strip(): d for d in DOMAINS for p in re.split(r"\n\s*\n", domain_text(d, "eval")) if p.strip()}
    # each domain already shows up in the first tenth
    assert {domain_of[p] for p in paragraphs[: len(paragraphs) // 10]} == set(DOMAINS)


def test_stream_unknown_builtin_exits_2(capsys):
    assert cli.main(["stream", "--builtin", "encyclopedia"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown domain 'encyclopedia'" in err and "\n" not in err


def test_kvquant_default_texts_are_the_two_quick_domains(text_file):
    from sinkfix.commands.kvquant import default_texts
    from sinkfix.texts import QUICK_DOMAINS

    assert list(default_texts(None)) == list(QUICK_DOMAINS)
    assert list(default_texts([str(text_file)])) == [text_file.stem]


def test_stream_period_repeats_the_first_tokens_exactly():
    from sinkfix.commands.stream import stream_text

    from .conftest import CharTokenizer

    tokenizer = CharTokenizer()
    text = " ".join(f"word{i}" for i in range(400))
    plain = stream_text(tokenizer, text, 100, None)
    periodic = stream_text(tokenizer, text, 100, 7, period=30)
    assert periodic[0] == 7 and periodic.numel() == 100
    body = periodic[1:]
    assert torch.equal(body[:30], plain[:30]) and torch.equal(body[30:60], plain[:30]) and torch.equal(body[90:], plain[:9])


def test_stream_period_within_the_cache_exits_2(capsys):
    assert cli.main(["stream", "--period", "100", "--window", "252"]) == 2
    assert "--period must be larger than the cache" in capsys.readouterr().err


def test_kvquant_table_shows_no_perplexity_share_of_a_negligible_loss(capsys):
    from sinkfix.commands.kvquant import _print_table

    protocol = dict(model="m", texts=["t"], sequences_per_text=1, seq_len=8, bos=True, backend="quanto",
                    residual_length=4, n_sink=1)

    def row(quantized_vs_full, recovered):
        return dict(full=10.0, quantized=10.0 * (1 + quantized_vs_full), sink_protected=10.0,
                    kl=dict(quantized=1e-3, sink_protected=5e-4), recovered=recovered, recovered_kl=0.5,
                    quantized_vs_full=quantized_vs_full, tokens=7, quantized_cache="QuantoQuantizedCache")

    # a synthetic row: the quantized cache moved the perplexity by 0.003%, a share of that is noise
    _print_table({"protocol": protocol, "8": row(3e-5, -2.5)})
    out = capsys.readouterr().out
    assert "-250.0%" not in out and "n/a*" in out and "less than 0.1%" in out
    _print_table({"protocol": protocol, "2": row(0.2, 0.4)})
    out = capsys.readouterr().out
    assert "40.0%" in out and "n/a" not in out and "residual 4" in out
    _print_table({"protocol": dict(protocol, backend="fp8", residual_length=None), "8": row(0.2, 0.4)})
    assert "no residual window" in capsys.readouterr().out  # was "residual None"


def test_stream_table_names_the_recompute_period_only_when_a_recomputation_ran(tiny, text_file, tmp_path,
                                                                                  capsys):
    tiny("llama")
    for variants, named in (("window_only", False), ("sink,recompute", True)):
        # --recompute-every without a recomputation is refused (review 41): given only where one runs
        every = ["--recompute-every", "8"] if named else []
        rc = cli.main(["stream", "--text", str(text_file), "--tokens", "90", "--window", "20", "--n-sink", "2",
                       "--segment", "30", "--chunk", "8", *every, "--variants", variants,
                       "--no-figures", "--out", str(tmp_path / variants)])
        assert rc == 0
        out = capsys.readouterr().out
        assert ("recompute every 8" in out) == named
        # segments of 30 tokens scored every 8th token: 3 or 4 positions each, said in the row
        assert named == bool(re.search(r"\d\.\d{3} \(4\)", out)) == ("the n tokens it scored" in out)


@pytest.mark.parametrize("recorded, flag, bos, source, note", [
    (True, None, True, "profile", "BOS first, as --profile p.json was calibrated (the tokenizer adds none; --no-bos"),
    (False, None, False, "profile", None),          # the tokenizer adds none either: nothing to say
    (None, None, False, "tokenizer", None),         # nothing recorded: the tokenizer decides, as before
    (True, "--no-bos", False, "flag", "--profile p.json was calibrated with a BOS but is measured without one"),
    (True, "--bos", True, "flag", None),
])
def test_stream_starts_as_the_profile_was_calibrated(tiny, text_file, tmp_path, capsys, recorded, flag, bos, source,
                                                      note):
    """The tokenizer decided alone: SmolLM2's adds no BOS, and its stored BOS profile was streamed without
    one, unsaid (`sinkfix bench` already followed the profile's protocol)."""
    from sinkfix.profile import ModelIdentity, Profile

    model = tiny("llama")
    calibration = {"protocol": {"bos": recorded}} if recorded is not None else {"note": "no protocol"}
    path = Profile(ModelIdentity.of(model), torch.full((2, 4), 0.7), calibration=calibration).save(tmp_path / "p.json")
    rc = cli.main(["stream", "--text", str(text_file), "--tokens", "60", "--window", "20", "--n-sink", "2",
                   "--segment", "30", "--chunk", "8", "--variants", "sink,sink_profile", "--profile", str(path),
                   *([flag] if flag else []), "--out", str(tmp_path / "o"), "--no-figure", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    protocol = json.loads(captured.out)["protocol"]
    assert (protocol["bos"], protocol["bos_from"]) == (bos, source)
    assert (note in captured.err) if note else ("note:" not in captured.err)
    tokens = torch.load(tmp_path / "o" / "stream_tokens.pt")["sink"]
    assert tokens.shape == (60,)


def test_stream_figure_labels_follow_the_run(tiny, text_file, tmp_path):
    """A fixed 1024 labelled a 90-token stream's curves "trailing 1024 positions"."""
    pytest.importorskip("matplotlib")
    from matplotlib import pyplot as plt

    from sinkfix.analysis import plots

    tiny("llama")
    labels = []
    real_save = plots._save

    def keep_labels(plt_module, fig, path, **kw):
        labels.extend(ax.get_ylabel() for ax in fig.axes)
        return real_save(plt_module, fig, path, **kw)

    import unittest.mock

    with unittest.mock.patch.object(plots, "_save", keep_labels):
        assert cli.main(["stream", "--text", str(text_file), "--tokens", "90", "--window", "20", "--n-sink", "2",
                         "--segment", "30", "--chunk", "8", "--variants", "sink,window_only",
                         "--out", str(tmp_path / "o")]) == 0
    plt.close("all")
    # the ratio's span, 4 x 30 positions, is longer than the 90-token stream
    assert labels == ["perplexity, trailing 30 positions", "ppl ratio, since the stream's start"]


def test_stream_figure_names_the_recomputation_curves_span(tiny, text_file, tmp_path):
    """Recomputation is scored every k-th token, so its curve runs over 4 x the segment: the legend said
    only "(every 50th token)" under an axis labelled "trailing 100 positions" (SmolLM2: the curve read
    114 where the trailing 100 positions gave 440, the JSON's segment value)."""
    pytest.importorskip("matplotlib")
    from matplotlib import pyplot as plt

    from sinkfix.analysis import plots

    tiny("llama")
    legends = []
    real_save = plots._save

    def keep_legend(plt_module, fig, path, **kw):
        legends.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        return real_save(plt_module, fig, path, **kw)

    import unittest.mock

    with unittest.mock.patch.object(plots, "_save", keep_legend):
        assert cli.main(["stream", "--text", str(text_file), "--tokens", "200", "--window", "20", "--n-sink", "2",
                         "--segment", "20", "--chunk", "8", "--variants", "sink,recompute", "--recompute-every", "10",
                         "--out", str(tmp_path / "o")]) == 0
    plt.close("all")
    assert "recompute (every 10th token; trailing 80 positions)" in legends and "sink" in legends


def test_one_segment_has_no_drift_column(tiny, text_file, tmp_path, capsys):
    """With one segment, first and last are the same segment: the table printed last/first 1.000 as if
    the stream had stayed flat."""
    tiny("llama")
    assert cli.main(["stream", "--text", str(text_file), "--tokens", "60", "--window", "20", "--n-sink", "2",
                     "--segment", "30", "--chunk", "8", "--variants", "sink,window_only", "--no-figures",
                     "--out", str(tmp_path / "o")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("│ sink ", "│ window_only "))]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("│").split("│")]
        assert cells[4] == "-" and cells[5] == "-", cells  # last seg, last/first
        assert float(cells[3]) > 0
        # no recomputation ran: its two columns are "-" (they printed "nan")
        assert cells[6] == "-" and cells[7] == "-", cells


def test_a_lost_ctrl_c_still_stops_the_files_being_replaced(tiny, text_file, tmp_path, capsys, monkeypatch):
    """Python drops an exception raised inside a destructor: one Ctrl-C of 17 during `sinkfix bench` was
    lost that way, and the run went on and replaced its --out folder's files, exit status 0. The command
    line's handler records the interrupt; every later write raises it, and the command ends as
    interrupted (130) with the earlier files as they were."""
    import signal

    import sinkfix.analysis.streaming as streaming
    from sinkfix.files import atomic_write_text, pending_interrupt

    tiny("llama")
    real = streaming.measure_streaming

    def interrupted_in_a_destructor(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what Python does with it inside __del__ ("Exception ignored in: ...")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "measure_streaming", interrupted_in_a_destructor)
    # as in a terminal: `make test` runs some groups as background jobs, which inherit SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "o"
    atomic_write_text(out / "stream.json", "earlier run\n")
    try:
        rc = cli.main(["stream", "--text", str(text_file), "--tokens", "60", "--window", "20", "--n-sink", "2",
                       "--segment", "30", "--chunk", "8", "--variants", "sink", "--no-figures", "--out", str(out)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)
    assert rc == 130 and capsys.readouterr().err.strip().endswith("sinkfix stream: interrupted")
    assert (out / "stream.json").read_text() == "earlier run\n" and not (out / "stream_tokens.pt").exists()
    assert pending_interrupt() is None


@pytest.mark.parametrize("handler", ["library", "ignored"])
def test_the_interrupt_handler_replaces_a_library_handler_and_keeps_an_ignored_signal(tiny, text_file, tmp_path,
                                                                                     capsys, monkeypatch, handler):
    """Only Python's own handler was replaced: with another one installed (the full test suite runs
    with one), a lost Ctrl-C went unrecorded. An ignored SIGINT (a shell's background job) stays ignored."""
    import signal

    import sinkfix.analysis.streaming as streaming

    tiny("llama")
    seen = []
    real = streaming.measure_streaming

    def record_handler(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "measure_streaming", record_handler)
    installed = (lambda signum, frame: None) if handler == "library" else signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, installed)
    try:
        assert cli.main(["stream", "--text", str(text_file), "--tokens", "60", "--window", "20", "--n-sink", "2",
                         "--segment", "30", "--chunk", "8", "--variants", "sink", "--no-figures",
                         "--out", str(tmp_path / "o")]) == 0
        assert signal.getsignal(signal.SIGINT) is installed  # restored after the command
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [cli._interrupt if handler == "library" else signal.SIG_IGN]
