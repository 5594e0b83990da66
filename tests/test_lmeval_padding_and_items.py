"""``sinkfix eval``: corrections that pool over a sequence's tokens scored without lm-eval's padding,
records a task cannot score refused before the model loads, the per-item values in the report, and
each task run once."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sinkfix.cli import main
from sinkfix.errors import EvaluationError
from sinkfix.lmeval import builtin
from sinkfix.lmeval.config import Correction, EvalConfig
from sinkfix.lmeval.paired import evaluate_once, run_eval
from sinkfix.lmeval.taskload import check_items, load_tasks

from .test_lmeval import builtin_tasks, tiny_folder, tiny_lm  # noqa: F401 - fixtures


def _per_item_scores(results, task):
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in results["samples"][task]}


# -- corrections that pool over a sequence's tokens ------------------------------------------------------

@pytest.mark.parametrize("spec", ["hidden_sink_threshold=0.02,hidden_sink_scale=0", "clip=1.2"])
def test_a_pooling_correction_scores_the_same_at_every_batch_size(tiny_lm, builtin_tasks, spec):  # noqa: F811
    """lm-eval right-pads a batch and passes no mask: the padding rows joined the column means of
    content-dependent sinks and the median of a relative clip (before: 0.015 nats between batch 1
    and 4 on this model's cloze items, 4.2 nats on SmolLM2 with ACT)."""
    scores = {}
    try:
        tiny_lm.apply(Correction.from_args(spec))
        assert tiny_lm.scores_alone
        for batch in (1, 4):
            tiny_lm.batch_size_per_gpu = batch
            scores[batch] = _per_item_scores(evaluate_once(tiny_lm, builtin_tasks, limit=8), "sinkfix_cloze")
            assert tiny_lm.batch_size_per_gpu == batch  # set aside for the corrected run, then restored
    finally:
        tiny_lm.batch_size_per_gpu = 1
        tiny_lm.apply(None)
    assert scores[1] == scores[4]


def test_a_positional_correction_keeps_its_batches(tiny_lm):  # noqa: F811
    try:
        tiny_lm.apply(Correction.from_args("sink_scale=0.5,virtual_sink_logit=1,clip_abs=50"))
        assert not tiny_lm.scores_alone  # per-row arithmetic, unaffected by right padding
    finally:
        tiny_lm.apply(None)
    assert not tiny_lm.scores_alone


def test_run_eval_says_the_corrected_run_went_one_sequence_at_a_time(tiny_folder, one_thread):  # noqa: F811
    config = EvalConfig(model=str(tiny_folder), tasks=("sinkfix_cloze",), policy="clip=1.2", limit=4, batch_size=4,
                        iterations=20, device="cpu")
    report = run_eval(config)
    assert any("one sequence at a time" in note for note in report["notes"])
    assert report["protocol"]["batch_size"] == 4


# -- records a task cannot score ---------------------------------------------------------------------

def _exported_with(tmp_path, task: str, bad_record: dict):
    """The built-in task files exported, ``task``'s data with ``bad_record`` appended as item 2."""
    folder = tmp_path / "tasks"
    builtin.export_tasks(folder)
    data = folder / f"{task}.jsonl"
    lines = data.read_text().splitlines()[:2] + [json.dumps(bad_record)]
    data.write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("task, record, problem", [
    ("sinkfix_cloze", {"context": "x y z", "gold": 0}, "field 'choices' is missing"),  # before: a traceback mid-run
    ("sinkfix_cloze", {"context": "x y z", "choices": ["a", "b"], "gold": 7}, "the answer index 7 is outside the 2 choices"),  # before: counted wrong
    ("sinkfix_cloze", {"context": "x y z", "choices": [], "gold": 0}, "the choices are \\[\\], not a non-empty list"),
    ("sinkfix_prose", {"domain": "prose"}, "field 'text' is missing"),  # before: scored as the text "None"
    ("sinkfix_prose", {"text": "   ", "domain": "prose"}, "no text to score"),
])
def test_a_record_the_task_cannot_score_is_refused_before_the_model_loads(tmp_path, task, record, problem):
    folder = _exported_with(tmp_path, task, record)
    loaded = load_tasks([f"{task}_jsonl"], include=[folder])
    with pytest.raises(EvaluationError, match=f"task {task}_jsonl, item 2: {problem}"):
        check_items(loaded)
    check_items(loaded, limit=2)  # the items a --limit leaves out are not checked
    # through the whole run: the model named does not exist, so reaching it would fail otherwise
    config = EvalConfig(model=str(tmp_path / "no-such-model"), tasks=(f"{task}_jsonl",), include_paths=(str(folder),))
    with pytest.raises(EvaluationError, match="item 2"):
        run_eval(config)


def test_the_built_in_items_pass(builtin_tasks):  # noqa: F811
    check_items(builtin_tasks)


# -- per-item values in the report, each task once ---------------------------------------------------------

def test_the_report_holds_the_values_its_statistics_came_from(tiny_folder, tmp_path, capsys, one_thread):  # noqa: F811
    out = tmp_path / "report.json"
    code = main(["eval", "--model", str(tiny_folder), "--tasks", "sinkfix_prose,sinkfix_cloze,sinkfix_prose",
                 "--limit", "3", "--bootstrap", "50", "--device", "cpu", "--policy", "sink_scale=0.5",
                 "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["tasks"] == ["sinkfix_prose", "sinkfix_cloze"]  # before: sinkfix_prose twice
    bits = report["tasks"]["sinkfix_prose"]["metrics"]["bits_per_byte"]
    items = bits["per_item"]
    assert items["doc_id"] == [0, 1, 2]
    for run in ("stock", "corrected"):  # lm-eval's bits_per_byte, recomputed from the items
        ll, size = sum(v[0] for v in items[run]), sum(v[1] for v in items[run])
        assert bits[run] == pytest.approx(-ll / size / math.log(2), rel=1e-12)
    assert bits["test"] == "sign-flip-exact" and bits["p_value"] >= 2 / 2 ** 3
    acc = report["tasks"]["sinkfix_cloze"]["metrics"]["acc"]
    assert acc["corrected"] == pytest.approx(sum(acc["per_item"]["corrected"]) / 3)


def test_the_printed_p_column_names_the_test_that_made_it():
    """Before: every p that was not McNemar's printed as "<=0.001 bootstrap" (an exact sign-flip
    p of 0.00098 included), where the report held the sign-flip test's value."""
    import pathlib

    from sinkfix.lmeval.report import table_rows

    saved = pathlib.Path(__file__).resolve().parents[1] / "benchmarks/results/eval/default-profile-lr0.5-2t-signflip.json"
    rows = {(row[0], row[1].split()[0]): row[-1] for row in table_rows(json.loads(saved.read_text()))}
    assert rows[("sinkfix_prose", "bits_per_byte")] == "0.000488 sign-flip"  # 2 / 4096
    assert rows[("sinkfix_code", "bits_per_byte")] == "0.000977 sign-flip"  # 4 / 4096
    assert rows[("sinkfix_cloze", "acc_norm")].startswith("0.625 McNemar")


def test_a_task_data_line_holding_a_raw_line_separator_is_valid_json(tmp_path):
    """JSON allows U+2028 / U+2029 / U+0085 raw inside a string; str.splitlines() broke a line there
    and the task file was refused as "not valid JSON" (with the later line numbers shifted)."""
    from sinkfix.lmeval.taskload import _check_json_file

    data = tmp_path / "items.jsonl"
    data.write_text('{"text": "one\u2028two"}\n{"text": "three\u0085four"}\n', encoding="utf-8")
    _check_json_file(data)
    data.write_text('{"text": "ok"}\n{"text": "unterminated}\n', encoding="utf-8")
    with pytest.raises(EvaluationError, match=r"line 2: not valid JSON \(Unterminated string starting at column"):
        _check_json_file(data)
