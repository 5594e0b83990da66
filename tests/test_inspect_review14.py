"""Review 14 of the measurement API and `sinkfix inspect`: right-padded batches, outputs checked before
the model loads, the cut flip table, the hidden-sink arguments, undefined values in the printed table
and the flip margin's boundary."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

import sinkfix
from sinkfix.analysis.inspection import InspectionReport, dormancy_flips, row_dormancy
from sinkfix.analysis.metrics import (ExtremeTokenMetrics, StreamingCollector, measure_extreme_tokens,
                                      observed_model)
from sinkfix.errors import UsageError
from sinkfix.patch import PatchHandle

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

_MEASURES = ("sink_share", "hidden_sink_share", "hidden_sink_rate", "dormancy", "dormant_fraction", "value_drain",
             "residual_peak")


# -- F1: padding rows count for nothing, left or right --------------------------------------------
def _reviewer_batch(side: str):
    """The review's case: a 40-token and a 20-token BOS sequence, the short one padded by 20."""
    torch.manual_seed(0)
    a = torch.cat([torch.tensor([1]), torch.randint(2, 97, (39,))])
    b = torch.cat([torch.tensor([1]), torch.randint(2, 97, (19,))])
    pad = torch.full((20,), 3)
    ones, zeros = torch.ones(20, dtype=torch.long), torch.zeros(20, dtype=torch.long)
    if side == "right":
        ids = torch.stack([a, torch.cat([b, pad])])
        mask = torch.stack([torch.ones(40, dtype=torch.long), torch.cat([ones, zeros])])
        real, padding = slice(0, 20), slice(20, 40)
    else:
        ids = torch.stack([a, torch.cat([pad, b])])
        mask = torch.stack([torch.ones(40, dtype=torch.long), torch.cat([zeros, ones])])
        real, padding = slice(20, 40), slice(0, 20)
    return a, b, ids, mask, real, padding


def _batched(model, ids, mask, threshold):
    with torch.no_grad(), observed_model(model, dict(hidden_sink_threshold=threshold)) as collector:
        collector.begin_window(ids, mask)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return collector.result()


def _assert_same(alone: ExtremeTokenMetrics, got: ExtremeTokenMetrics, names=_MEASURES):
    for name in names:
        x, y = getattr(alone, name), getattr(got, name)
        assert torch.allclose(x, y, atol=1e-6, equal_nan=True), (name, float((x - y).abs().nan_to_num(0).max()))


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_batch_measures_as_each_sequence_alone(side):
    """Right padding: the padding rows see the real keys before them and were counted as real rows
    (sink share 0.014 off, 1.5 hidden sinks per sequence, dormancy 0.011); left padding was exact."""
    model = tiny_model("llama", seed=3)
    a, b, ids, mask, real, padding = _reviewer_batch(side)
    alone = measure_extreme_tokens(model, [a, b], hidden_sink_threshold=0.04)
    _assert_same(alone, _batched(model, ids, mask, 0.04))
    rows = row_dormancy(model, ids, mask, hidden_sink_threshold=0.04)
    assert torch.allclose(rows[:, 0], row_dormancy(model, a[None], hidden_sink_threshold=0.04)[:, 0], atol=1e-6)
    assert torch.allclose(rows[:, 1, :, real], row_dormancy(model, b[None], hidden_sink_threshold=0.04)[:, 0],
                          atol=1e-6)
    assert rows[:, 1, :, padding].abs().max() == 0  # padding rows score 0 (right ones scored up to 0.109)


def test_a_right_padded_batch_under_a_policy_and_on_the_cheap_path():
    """The corrected measures (sink scaling, a virtual sink) and the cheap path's sink share, which
    reads the kernel's sink mass and counted the padding rows the same way."""
    model = tiny_model("llama", seed=3)
    a, b, ids, mask, _, _ = _reviewer_batch("right")
    handle = sinkfix.patch(model, sinkfix.Policy.parse("sink_scale=0.5,virtual_sink_logit=1"))
    try:
        alone = measure_extreme_tokens(model, [a, b], hidden_sink_threshold=0.04)
        _assert_same(alone, _batched(model, ids, mask, 0.04))
        cheap_alone = measure_extreme_tokens(model, [a, b], hidden_sink_threshold=None)
        _assert_same(cheap_alone, _batched(model, ids, mask, None), ("sink_share", "value_drain", "residual_peak"))
    finally:
        handle.remove()


# -- F2: every output file checked before the model loads -----------------------------------------
@pytest.mark.parametrize("name, texts", [("report.json", 1), ("sink_share.png", 1), ("value_norms.png", 2),
                                         ("domain_flips.png", 2)])
def test_inspect_refuses_a_folder_in_an_output_files_place_before_the_model_loads(monkeypatch, tmp_path, capsys,
                                                                                  name, texts):
    """A folder named report.json (or like a figure) was found after every window ran, with report.json
    written and no figures."""
    from sinkfix import cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(sinkfix, "load_model", never)
    files = []
    for i in range(texts):
        files += ["--text", str(tmp_path / f"t{i}.txt")]
        (tmp_path / f"t{i}.txt").write_text(f"text number {i}: a sentence of prose, and another. " * 6)
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    assert cli.main(["inspect", *files, "--out", str(out), "--seq-len", "40"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{name}: it is a directory" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written


def test_inspect_without_figures_or_with_one_domain_ignores_folders_it_does_not_write(loaded_tiny, tmp_path):
    """--no-figures writes no figure, and one domain draws no domain_flips.png: folders of those names
    are no reason to refuse (the stale-figure cleanup leaves folders alone)."""
    from sinkfix import cli

    text = tmp_path / "t.txt"
    text.write_text("a sentence of prose, and then another one. " * 6)
    out = tmp_path / "out"
    (out / "sink_share.png").mkdir(parents=True)
    (out / "domain_flips.png").mkdir()
    assert cli.main(["inspect", "--text", str(text), "--out", str(out), "--seq-len", "40", "--no-figures"]) == 0
    assert (out / "report.json").is_file() and (out / "sink_share.png").is_dir()
    (out / "sink_share.png").rmdir()
    pytest.importorskip("matplotlib")
    assert cli.main(["inspect", "--text", str(text), "--out", str(out), "--seq-len", "40"]) == 0
    assert (out / "sink_share.png").is_file() and (out / "domain_flips.png").is_dir()


# -- F3 / F5: the printed tables -------------------------------------------------------------------
def _hand_report(n_layers: int = 8, n_heads: int = 8) -> InspectionReport:
    def metrics(d):
        z = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        return ExtremeTokenMetrics(sink_share=z, value_drain=torch.ones(n_layers, 2, dtype=torch.float64),
                                   residual_peak=torch.ones(n_layers, dtype=torch.float64),
                                   peak_positions=[0] * n_layers, peak_tokens=[1] * n_layers, hidden_sink_share=z,
                                   hidden_sink_rate=z, dormancy=d, dormant_fraction=z,
                                   hidden_sink_tokens=[{} for _ in range(n_layers)], windows=1, tokens=100)

    a = torch.full((n_layers, n_heads), 0.8, dtype=torch.float64)
    b = torch.full((n_layers, n_heads), 0.2, dtype=torch.float64)
    protocol = {"bos": True, "seq_len": 64, "policy": "identity", "flip_margin": 0.05, "dormant_threshold": 0.5}
    return InspectionReport({"name": "x", "architecture": "y"}, protocol, {"a": metrics(a), "b": metrics(b)},
                            dormancy_flips({"a": a, "b": b}, 0.05))


def _printed(report, **kwargs) -> str:
    from rich.console import Console

    from sinkfix.commands.inspect import print_report

    buf = io.StringIO()
    print_report(report, Console(file=buf, width=150), **kwargs)
    return buf.getvalue()


def test_a_cut_flip_table_says_how_many_more_and_where():
    """64 flipping heads printed 30 rows and nothing else."""
    report = _hand_report()
    assert len(report.flips) == 64
    printed = _printed(report)
    assert "... and 34 more (all in report.json)" in printed
    assert "... and 34 more (all in out/report.json)" in _printed(report, out="out")
    assert "more (all in" not in _printed(_hand_report(n_layers=3))  # 24 flips: the whole table, nothing to say


def test_undefined_sink_share_and_drain_print_as_a_dash():
    """n_sink=0 leaves no sink: report.json has null, the table printed "- / 0.00" and "inf"."""
    model = tiny_model("llama", seed=3)
    handle = sinkfix.patch(model, sinkfix.Policy.parse("n_sink=0,virtual_sink_logit=0"))
    try:
        report = sinkfix.analysis.inspection.inspect(
            model, CharTokenizer(), {"a": "a sentence of prose, and another. " * 4, "b": "x = [i for i in y]\n" * 4},
            seq_len=40, progress=False)
    finally:
        handle.remove()
    assert torch.isnan(report.overall.sink_share).all() and torch.isnan(report.overall.value_drain).all()
    rows = [line for line in _printed(report).splitlines()
            if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.split("│")[1:-1]]
        assert cells[1] == "- / -" and cells[4] == "-", cells
        assert "inf" not in line and "0.00" not in cells[1]


# -- F4: hidden-sink arguments checked ---------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, -1.0, 1.5, 1.0, math.nan, math.inf, True, "0.1"])
def test_measurement_refuses_a_hidden_sink_threshold_outside_0_1(threshold):
    """1.5, 1 and NaN found no hidden sink, 0 and -1 made every judged key one (248 in one window)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(UsageError, match=r"hidden_sink_threshold must be a number in \(0, 1\)"):
        measure_extreme_tokens(model, [ids], hidden_sink_threshold=threshold)
    with pytest.raises(UsageError, match=r"hidden_sink_threshold must be a number in \(0, 1\)"):
        StreamingCollector(2, [4, 4], hidden_sink_threshold=threshold)
    with pytest.raises(UsageError, match=r"hidden_sink_threshold must be a number in \(0, 1\)"):
        with observed_model(model, dict(hidden_sink_threshold=threshold)):
            pass
    with pytest.raises(UsageError, match=r"hidden_sink_threshold must be a number in \(0, 1\)"):
        row_dormancy(model, ids[None], hidden_sink_threshold=threshold)
    assert PatchHandle.of(model) is None  # nothing left patched


@pytest.mark.parametrize("min_queries", [math.nan, -5, 0, 2.5, True, "32", None])
def test_measurement_refuses_a_min_queries_that_is_not_a_count(min_queries):
    """NaN switched hidden-sink detection off silently; -5, 0 and 2.5 acted as 1."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(UsageError, match="min_queries must be an integer >= 1"):
        measure_extreme_tokens(model, [ids], min_queries=min_queries)
    with pytest.raises(UsageError, match="min_queries must be an integer >= 1"):
        StreamingCollector(2, [4, 4], min_queries=min_queries)
    assert PatchHandle.of(model) is None


def test_measurement_accepts_valid_hidden_sink_arguments():
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(1))
    m = measure_extreme_tokens(model, [ids], hidden_sink_threshold=0.04, min_queries=1)
    assert m.hidden_sink_threshold == 0.04 and m.dormancy is not None
    assert measure_extreme_tokens(model, [ids], hidden_sink_threshold=None).dormancy is None
    rows = row_dormancy(model, ids[None], hidden_sink_threshold=None)  # first-token sinks only
    assert rows.shape == (2, 1, 4, 40) and torch.isfinite(rows).all()


# -- F6: the flip margin is inclusive on both sides -------------------------------------------------
def _t(*values, dtype=torch.float64):
    return torch.tensor([list(values)], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_score_exactly_the_margin_away_counts_on_either_side(dtype):
    """0.55 vs 0.45 with a margin of 0.05 was no flip (0.55 counted as dormant, 0.45 not as active)."""
    flips = dormancy_flips({"a": _t(0.55, dtype=dtype), "b": _t(0.45, dtype=dtype)}, 0.05)
    assert [(f["dormant_on"], f["active_on"]) for f in flips] == [(["a"], ["b"])]
    flips = dormancy_flips({"a": _t(0.45, dtype=dtype), "b": _t(0.55, dtype=dtype), "c": _t(0.46, dtype=dtype)}, 0.05)
    assert [(f["dormant_on"], f["active_on"]) for f in flips] == [(["b"], ["a"])]  # c inside the band
    assert dormancy_flips({"a": _t(0.55, dtype=dtype), "b": _t(0.4501, dtype=dtype)}, 0.05) == []
    assert dormancy_flips({"a": _t(0.5499, dtype=dtype), "b": _t(0.45, dtype=dtype)}, 0.05) == []


def test_a_margin_of_zero_splits_at_the_threshold():
    """Dormant is >= 0.5 and active < 0.5, as InspectionReport.dormant has it: a head at 0.5 on both
    domains does not flip."""
    assert dormancy_flips({"a": _t(0.5), "b": _t(0.5)}, 0.0) == []
    flips = dormancy_flips({"a": _t(0.5), "b": _t(0.4999)}, 0.0)
    assert [(f["dormant_on"], f["active_on"]) for f in flips] == [(["a"], ["b"])]


def test_monitor_report_uses_the_same_inclusive_margin():
    """`sinkfix monitor report` finds its flips with the same function."""
    from sinkfix.telemetry import report as telemetry_report

    assert telemetry_report.dormancy_flips is dormancy_flips
    assert json.dumps(dormancy_flips({"a": _t(0.55), "b": _t(0.45)}, 0.05))  # JSON-ready
