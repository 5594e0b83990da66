"""The eval report's interval when some bootstrap draws have no difference, its confidence label,
its one-item cell, and an export that checks every target before writing any."""

from __future__ import annotations

import io
import math

import pytest

from sinkfix.errors import OutputError
from sinkfix.lmeval.builtin import export_tasks
from sinkfix.lmeval.report import confidence_label, protocol_lines, table_rows
from sinkfix.lmeval.stats import compare_paired


def _sum_until_repeated(times: int):
    """A sum that passes float's range (inf) once item 0 is drawn ``times`` times or more: in both
    runs, so that such a draw's difference is inf - inf."""
    def aggregate(values):
        return math.inf if sum(1 for v in values if v == 0.0 or v == 0.5) >= times else sum(values)
    return aggregate


@pytest.mark.parametrize("times, bounded", [(4, True), (3, False)])
def test_draws_without_a_difference_widen_the_interval_instead_of_erasing_it(times, bounded):
    stock = [0.0] + [1.0 + 0.01 * i for i in range(49)]
    corrected = [0.5] + [1.02 + 0.01 * i for i in range(49)]
    result = compare_paired(stock, corrected, _sum_until_repeated(times), iterations=2000, seed=1)
    # item 0 drawn 4+ times out of 50: about 1.7% of draws (under the 2.5% tail); 3+: about 8%
    assert 0 < result.undefined_draws < (0.025 * 2000 if bounded else 2000)
    assert math.isfinite(result.delta)
    if bounded:  # before: both bounds NaN as soon as one draw was
        assert result.ci_low <= result.delta <= result.ci_high
        plain = compare_paired(stock[1:], corrected[1:], sum, iterations=2000, seed=1)
        assert math.isfinite(plain.ci_low) and plain.undefined_draws == 0
    else:
        assert math.isnan(result.ci_low) and math.isnan(result.ci_high)


def _report(metric: dict, confidence: float = 0.95) -> dict:
    return {"tasks": {"t": {"metrics": {"m": metric}}}, "settings": {"confidence": confidence, "iterations": 2000,
                                                                      "seed": 0},
            "protocol": {"device": "cpu", "batch_size": 1, "prefix_token_id": 0, "max_length": 8},
            "model": {"name": "tiny"}, "correction": {"description": "drop"}, "versions": {"lm_eval": "x"},
            "threads": 1}


def _metric(**over) -> dict:
    base = {"items": 3, "stock": 1.0, "corrected": 1.1, "delta": 0.1, "ci_low": 0.01, "ci_high": 0.2,
            "higher_is_better": False, "test": "sign-flip-exact", "p_value": 0.5, "iterations": 2000,
            "stock_only": None, "corrected_only": None}
    return {**base, **over}


def test_interval_cells_say_what_a_missing_bound_means():
    assert table_rows(_report(_metric()))[0][6] == "[+0.0100, +0.2000]"
    assert table_rows(_report(_metric(items=1, ci_low=None, ci_high=None)))[0][6] == "n/a: one item"
    cell = table_rows(_report(_metric(ci_low=None, ci_high=0.2, undefined_draws=84)))[0][6]
    assert cell == "[unbounded, +0.2000], 84 of 2000 draws undefined"


def test_the_rendered_table_shows_the_cells_rich_would_read_as_markup():
    from rich.console import Console

    from sinkfix.lmeval.report import render

    report = _report(_metric(items=1, ci_low=math.nan, ci_high=math.nan))
    report["timing_s"] = {"total": 1.0}
    out = io.StringIO()
    render(report, Console(file=out, width=200))
    assert "n/a: one item" in out.getvalue()


@pytest.mark.parametrize("confidence, label", [(0.95, "95%"), (0.999, "99.9%"), (0.975, "97.5%"), (0.5, "50%")])
def test_the_confidence_label_is_never_rounded(confidence, label):
    assert confidence_label(confidence) == label
    assert f"{label} paired-bootstrap" in protocol_lines(_report(_metric(), confidence))[1]


def test_export_tasks_writes_nothing_when_one_target_cannot_be_written(tmp_path):
    (tmp_path / "sinkfix_cloze.jsonl").mkdir()
    with pytest.raises(OutputError, match="sinkfix_cloze.jsonl"):
        export_tasks(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["sinkfix_cloze.jsonl"]


@pytest.mark.parametrize("types, rolling", [(["multiple_choice"], False), (["loglikelihood"], False),
                                            (["multiple_choice", "loglikelihood_rolling"], True)])
def test_the_rolling_protocol_line_only_where_a_rolling_task_ran(types, rolling):
    report = _report(_metric())
    report["tasks"] = {f"t{i}": {"output_type": kind, "metrics": {"m": _metric()}} for i, kind in enumerate(types)}
    lines = protocol_lines(report)
    assert any(line.startswith("rolling log-likelihood") for line in lines) == rolling
    assert lines[-1] == "↑/↓: higher/lower is better"
