"""Review 81: a log-likelihood answer the tokenizer merges into the prompt, large numbers in the printed
table, and a bootstrap with too few draws for the confidence asked."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sinkfix.cli import main
from sinkfix.lmeval.config import EvalConfig
from sinkfix.lmeval.report import table_rows

from .test_eval_bb_review44 import _yaml_task
from .test_lmeval import tiny_folder, tiny_lm  # noqa: F401 - fixtures

_LL = ('output_type: loglikelihood\ntest_split: test\ndoc_to_text: "{{ctx}}"\ndoc_to_target: "{{tgt}}"\n'
       'metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n')


def _merging_pair(tokenizer) -> tuple[str, str]:
    """A prompt and an answer whose joint encoding has no token past the prompt's own: found in this
    tokenizer's merges, not assumed."""
    for context, answer in (("def main(", ")"), ("x = [", "]"), ("return self", "."), ("import o", "s")):
        whole = tokenizer.encode(context + answer, add_special_tokens=False)
        alone = tokenizer.encode(context, add_special_tokens=False)
        if len(whole) == len(alone):
            return context, answer
    pytest.skip("the tiny tokenizer merges none of the candidate answers into its prompt")


def test_an_answer_merged_into_the_prompt_is_named_before_any_is_scored(tiny_folder, tiny_lm, tmp_path,  # noqa: F811
                                                                       capsys, monkeypatch):
    """lm-eval scores the tokens past the prompt's own: an answer the tokenizer merges into the
    prompt's last token left none, and lm-eval failed on a bare AssertionError after the stock run."""
    context, answer = _merging_pair(tiny_lm.tokenizer)
    rows = [{"ctx": "The sky is", "tgt": " blue"}, {"ctx": context, "tgt": answer}]
    folder = _yaml_task(tmp_path, "t_merged", _LL, {"test": rows})
    scored = []
    from sinkfix.lmeval.model import SinkfixLM

    original = SinkfixLM._loglikelihood_tokens
    monkeypatch.setattr(SinkfixLM, "_loglikelihood_tokens",
                        lambda self, requests, *a, **k: scored.append(len(requests)) or original(self, requests, *a, **k))
    code = main(["eval", "--model", str(tiny_folder), "--tasks", "t_merged", "--include-path", str(folder),
                 "--device", "cpu", "--bootstrap", "100"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"task t_merged, item 1: the answer {answer!r} gives no token of its own after the prompt ending " \
           f"{context!r}: the tokenizer merges it into the prompt's last token" in err
    assert "Traceback" not in err and scored == []  # refused before any request was scored
    # the same answer with its own leading space is scored
    assert tiny_lm._encoding_problem(context, " " + answer) is None
    assert tiny_lm._encoding_problem("The sky is", " blue") is None


def test_an_empty_prompt_or_answer_that_encodes_to_nothing_is_named(tiny_lm):  # noqa: F811
    assert tiny_lm._encoding_problem("", "") == "the answer '' gives no token to score (the prompt is empty)"
    prefix = tiny_lm.tokenizer.decode([tiny_lm.prefix_token_id])
    # lm-eval takes a leading prefix token of the answer as the context: nothing is left to score
    assert tiny_lm._encoding_problem("", prefix) is not None
    assert tiny_lm._encoding_problem("", " blue") is None
    assert tiny_lm._encoding_problem("   ", "x").startswith("the prompt '   ' gives no token")


def test_large_numbers_keep_their_magnitude_in_the_table():
    """A word perplexity of 2.26e38 (text without spaces) printed as 42 fixed-point characters, which
    the table cropped to "22588639603395789…"."""
    metric = {"higher_is_better": False, "items": 3, "stock": 2.258863960339579e38, "corrected": 1.487e38,
              "delta": -7.72e37, "ci_low": -9e37, "ci_high": 1.5e6, "test": "sign-flip-exact", "p_value": 0.25,
              "iterations": 40, "undefined_draws": 0}
    row = table_rows({"tasks": {"t": {"metrics": {"word_perplexity": metric}}}})[0]
    assert row[3:7] == ["2.2589e+38", "1.4870e+38", "-7.7200e+37", "[-9.0000e+37, +1.5000e+06]"]
    small = {**metric, "stock": 105.51, "corrected": 999_999.0, "delta": -0.0042, "ci_low": -0.01, "ci_high": 0.5}
    assert table_rows({"tasks": {"t": {"metrics": {"m": small}}}})[0][3:7] == ["105.51", "999999.00", "-0.0042",
                                                                                "[-0.0100, +0.5000]"]


@pytest.mark.parametrize("iterations, confidence, noted", [
    (50, 0.999, True), (2000, 0.999, True), (2001, 0.999, False), (39, 0.95, True), (40, 0.95, True),
    (41, 0.95, False), (2000, 0.95, False), (1, 0.5, True), (4, 0.5, True), (5, 0.5, False)])
def test_too_few_bootstrap_draws_for_the_level_are_noted(iterations, confidence, noted):
    """np.quantile puts the lower bound at (1 - confidence) / 2 x (N - 1) of the sorted draws: below 1
    it lies between the smallest draw and the next (50 draws at 99.9% gave [-0.996, -0.171] where
    20,000 gave [-1, 0])."""
    notes = EvalConfig(iterations=iterations, confidence=confidence).interval_notes()
    assert bool(notes) == noted
    if noted:
        tail = (1 - confidence) / 2
        assert notes[0].startswith(f"--bootstrap {iterations} is too few draws for a")
        assert f"use --bootstrap {round(1 / tail) + 1} or more" in notes[0]


def test_the_bootstrap_note_reaches_stderr_and_the_report(tiny_folder, tmp_path, capsys, one_thread):  # noqa: F811
    out = tmp_path / "report.json"
    code = main(["eval", "--model", str(tiny_folder), "--tasks", "sinkfix_cloze", "--limit", "2", "--device", "cpu",
                 "--bootstrap", "50", "--confidence", "0.999", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    note = EvalConfig(iterations=50, confidence=0.999).interval_notes()[0]
    assert json.loads(out.read_text())["notes"] == [note]
    assert f"note: {note}" in err


def test_the_merged_answer_is_refused_before_a_rolling_task_listed_first_is_scored(tiny_folder, tiny_lm,  # noqa: F811
                                                                                  tmp_path, capsys, monkeypatch):
    """lm-eval scores request types in the order the tasks bring them: a rolling task listed first was
    scored whole before the check of the log-likelihood answers ran."""
    context, answer = _merging_pair(tiny_lm.tokenizer)
    folder = _yaml_task(tmp_path, "t_merged", _LL, {"test": [{"ctx": context, "tgt": answer}]})
    from sinkfix.lmeval.model import SinkfixLM

    rolled = []
    monkeypatch.setattr(SinkfixLM, "loglikelihood_rolling", lambda self, requests, *a, **k: rolled.append(1) or [])
    code = main(["eval", "--model", str(tiny_folder), "--tasks", "sinkfix_code,t_merged", "--include-path",
                 str(folder), "--device", "cpu", "--limit", "2", "--bootstrap", "100"])
    assert code == 2 and "task t_merged, item 0:" in capsys.readouterr().err
    assert rolled == []


def test_the_report_keeps_the_task_order_asked_for(tiny_folder, tmp_path, capsys, one_thread):  # noqa: F811
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_folder), "--tasks", "sinkfix_code,sinkfix_cloze", "--limit", "2",
                 "--device", "cpu", "--bootstrap", "100", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["tasks"]) == ["sinkfix_code", "sinkfix_cloze"]
