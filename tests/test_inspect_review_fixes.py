"""Inspect's measures in the cases a review found wrong or misleading: a padded batch, a sink set that
leaves no key to measure against, the flip margin, the flip figure and an earlier run's figures."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sinkfix
from sinkfix.analysis.inspection import check_flip_margin, dormancy_flips, inspect, row_dormancy
from sinkfix.analysis.metrics import measure_extreme_tokens
from sinkfix.errors import MonitorError, UsageError

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_dormancy_of_a_sequence_does_not_depend_on_the_rest_of_its_batch(seed):
    """A short sequence left-padded beside a long one is judged by its own row count: the hidden-sink
    rule's row limit was the batch's longest sequence's, which changed the short one's scores."""
    model = tiny_model("llama", seed=seed)
    g = torch.Generator().manual_seed(10 + seed)
    long = torch.randint(3, 97, (48,), generator=g)
    short = torch.randint(3, 97, (13,), generator=g)
    pad = long.numel() - short.numel()
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batched = row_dormancy(model, ids, mask)
    alone_short = row_dormancy(model, short[None])[:, 0]
    alone_long = row_dormancy(model, long[None])[:, 0]
    assert torch.allclose(batched[:, 1, :, pad:], alone_short, atol=1e-5)
    assert torch.allclose(batched[:, 0], alone_long, atol=1e-5)


def test_a_sink_set_that_covers_every_key_gives_undefined_measures_not_zero(tmp_path):
    """No row sees a key outside the sink set: the share and dormancy are means over zero rows, NaN
    (null in report.json, "-" in the table), not 0.00 and "active"."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(5))
    handle = sinkfix.patch(model, sinkfix.Policy(n_sink=16))
    try:
        m = measure_extreme_tokens(model, [ids])
        report = inspect(model, CharTokenizer(), {"a": "abcdefghij", "b": "klmnopqrst"}, seq_len=11, progress=False)
    finally:
        handle.remove()
    assert torch.isnan(m.sink_share).all() and torch.isnan(m.dormancy).all()
    assert torch.isnan(m.dormant_fraction).all() and torch.isnan(m.hidden_sink_share).all()
    assert not report.dormant().any()
    saved = json.loads(report.save_json(tmp_path / "r.json").read_text())
    shares = saved["domains"]["a"]["sink_share"]
    assert all(v is None for row in shares for v in row)
    # the measures of a window that does have non-sink keys stay numbers
    m = measure_extreme_tokens(model, [ids])
    assert not torch.isnan(m.sink_share).any() and not torch.isnan(m.dormancy).any()


@pytest.mark.parametrize("margin", [-1.0, -0.01, 0.5, 0.7, math.nan, math.inf, "0.1", True, None])
def test_flip_margin_outside_its_range_is_refused(margin):
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="flip_margin must be a number in"):
        inspect(model, CharTokenizer(), {"a": "abc def " * 8, "b": "x = y\n" * 8}, seq_len=24, progress=False,
                flip_margin=margin)
    with pytest.raises(MonitorError, match="--margin must be a number in"):
        from sinkfix.telemetry.report import check_margin

        check_margin(margin, "--margin")


def test_flip_margin_inside_its_range_is_accepted():
    assert check_flip_margin(0) == 0.0 and check_flip_margin(0.25) == 0.25 and check_flip_margin(0.499) == 0.499


def test_the_flip_figure_marks_only_the_flips_between_its_two_domains():
    from sinkfix.analysis.plots import _flips_between

    # head (0, 0) flips between a and b; head (0, 1) between b and c only; head (0, 2) between a and c
    a = torch.tensor([[0.9, 0.2, 0.9]], dtype=torch.float64)
    b = torch.tensor([[0.1, 0.2, 0.7]], dtype=torch.float64)
    c = torch.tensor([[0.5, 0.9, 0.1]], dtype=torch.float64)
    flips = {(f["layer"], f["head"]): f for f in dormancy_flips({"a": a, "b": b, "c": c}, margin=0.05)}
    assert set(flips) == {(0, 0), (0, 1), (0, 2)}
    assert _flips_between(flips[(0, 0)], "a", "b") and _flips_between(flips[(0, 0)], "b", "a")
    assert not _flips_between(flips[(0, 1)], "a", "b")  # active on both a and b
    assert not _flips_between(flips[(0, 2)], "a", "b")  # dormant on both a and b
    assert _flips_between(flips[(0, 2)], "a", "c")


def test_inspect_removes_an_earlier_runs_figures_it_did_not_draw(loaded_tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sinkfix import cli

    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("a sentence of prose, and then another one. " * 6)
    two.write_text("for i in range(10):\n    print(i)\n" * 8)
    out = tmp_path / "out"
    assert cli.main(["inspect", "--text", str(one), "--text", str(two), "--out", str(out), "--seq-len", "40"]) == 0
    assert (out / "domain_flips.png").exists()
    other = out / "notes.txt"
    other.write_text("kept")
    capsys.readouterr()
    assert cli.main(["inspect", "--text", str(one), "--out", str(out), "--seq-len", "40"]) == 0
    assert not (out / "domain_flips.png").exists() and (out / "sink_share.png").exists()
    assert "removed" in capsys.readouterr().out
    assert cli.main(["inspect", "--text", str(one), "--out", str(out), "--seq-len", "40", "--no-figures"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.json"]
    assert json.loads((out / "report.json").read_text())["domains"].keys() == {"one"}
