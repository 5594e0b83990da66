"""Review 57: nulls that reach a prompt or an answer, found by rendering the templates with each null
replaced by a probe, at any depth of the record; and nulls the template tests itself, accepted."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("lm_eval")

from sinkfix.errors import EvaluationError
from sinkfix.lmeval.paired import apply_fewshot
from sinkfix.lmeval.taskload import check_items, load_tasks

from .test_eval_bb_review44 import _lm_eval_builds, _yaml_task

_MC = 'output_type: multiple_choice\ntest_split: test\ndoc_to_choice: ["a", "b"]\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n'
_LL = 'output_type: loglikelihood\ntest_split: test\ndoc_to_text: "Q: {{q}}"\nmetric_list:\n  - metric: acc\n'


def _task(tmp_path, body: str, rows: list[dict], name: str = "t_probe"):
    return load_tasks([name], include=[_yaml_task(tmp_path, name, body, {"test": rows})])


@pytest.mark.parametrize("text, null_row, field", [
    # default() keeps a null (it is defined): lm-eval showed "Q: y None"
    ("Q: {{q}} {{ hint | default('') }}", {"hint": None}, "hint"),
    ("Q: {{q}}{% if hint is defined %} Hint: {{hint}}{% endif %}", {"hint": None}, "hint"),
    ("Q: {{ a or b }}", {"a": None, "b": None}, "b"),  # the right operand is the value shown
    ("Q: {{ a and b }}", {"a": None}, "a"),  # a falsy left operand is the value shown
    ("Q: {{ meta.q }}", {"meta": {"q": None}}, "meta.q"),  # nested
    ("Q: {% for c in opts %}{{ c }};{% endfor %}", {"opts": [None, "y"]}, "opts[0]"),  # in a list
    ("Q: {{ n | int }}", {"n": None}, "n"),  # Jinja's int filter turned a null into 0
])
def test_a_null_the_prompt_shows_is_refused_at_any_depth(tmp_path, text, null_row, field):
    good = {"q": "x", "hint": "h", "a": "x", "b": "y", "meta": {"q": "x"}, "opts": ["x", "y"], "n": 3}
    loaded = _task(tmp_path, f'doc_to_text: "{text}"\n{_MC}', [good, {**good, **null_row}])
    with pytest.raises(EvaluationError, match=rf"^task t_probe, item 1: field '{re.escape(field)}' is missing \(null\), and the "
                                              "prompt template (shows|computes with) it"):
        check_items(loaded)
    check_items(_task(tmp_path / "ok", f'doc_to_text: "{text}"\n{_MC}', [good, good]))  # sound records pass


@pytest.mark.parametrize("target, null_row, field", [
    ("{{ ' ' ~ (ans | default('unknown')) }}", {"ans": None}, "ans"),
    ("{{ ' ' ~ answers.text[0] }}", {"answers": {"text": [None]}}, "answers.text[0]"),  # squad-style
])
def test_a_null_in_a_scored_continuation_is_refused(tmp_path, target, null_row, field):
    good = {"q": "x", "ans": "a", "answers": {"text": ["a"]}}
    loaded = _task(tmp_path, f'doc_to_target: "{target}"\n{_LL}', [good, {**good, **null_row}])
    with pytest.raises(EvaluationError, match=rf"item 1: field '{re.escape(field)}' is missing \(null\), and the answer template"):
        check_items(loaded)


def test_a_nested_null_a_condition_compares_is_refused_in_the_answer(tmp_path):
    # ``1 if meta.label == 'yes' else 0`` took the 0 branch for a null label; refused at the top level already
    body = 'doc_to_text: "{{q}}"\ndoc_to_target: "{{ 1 if meta.label == \'yes\' else 0 }}"\n' + _MC.replace(
        "doc_to_target: 0\n", "")
    good = {"q": "x", "meta": {"label": "yes"}}
    with pytest.raises(EvaluationError, match=r"field 'meta.label' is missing \(null\), and the answer template"):
        check_items(_task(tmp_path, body, [good, {"q": "y", "meta": {"label": None}}]))


@pytest.mark.parametrize("text", [
    "{{q}}{% if ctx is not none and ctx|length > 0 %} Context: {{ctx}}{% endif %}",  # refused before
    "{{q}}{{ ' ' ~ ctx if ctx is not none else '' }}",
    "{{q}} {{ ctx | default('', true) }}",
    "{{q}}{% if meta.ctx %} {{ meta.ctx }}{% endif %}",
    "{{q}}{% if ctx == None %}!{% endif %}",
    "{{q}}{% if ctx is iterable and ctx is not string %} {{ ctx | join(' ') }}{% endif %}",  # review 58
    "{{q}}{% if not (ctx is sameas none) %} {{ ctx }}{% endif %}",
])
def test_a_null_the_template_tests_itself_is_accepted(tmp_path, text):
    rows = [{"q": "x", "ctx": "c", "meta": {"ctx": "c"}}, {"q": "y", "ctx": None, "meta": {"ctx": None}}]
    loaded = _task(tmp_path, f'doc_to_text: "{text}"\n{_MC}', rows)
    check_items(loaded)
    assert "None" not in loaded.tasks["t_probe"].doc_to_text(loaded.tasks["t_probe"].eval_docs[1])
    _lm_eval_builds(loaded, "t_probe", 0, 2)


def test_a_null_few_shot_field_shown_through_default_is_refused(tmp_path):
    body = f'doc_to_text: "Q: {{{{q}}}}"\n{_MC}fewshot_config:\n  doc_to_text: "Ex: {{{{ q }}}} {{{{ extra | default(\'\') }}}}"\n'
    rows = [{"q": "x", "extra": None}, {"q": "y", "extra": "e"}, {"q": "z", "extra": "e"}]
    loaded = _task(tmp_path, body, rows)
    apply_fewshot(loaded, 1)
    with pytest.raises(EvaluationError, match=r"few-shot example.*field 'extra' is missing \(null\)"):
        check_items(loaded)


def test_out_naming_an_included_task_file_or_a_function_module_is_refused(tmp_path, capsys):
    """Review 57 F3: an ``include:`` target outside --include-path (the README's lambada pattern) and a
    ``!function`` helper module were replaced by the report (rc 0)."""
    from sinkfix.cli import main
    from sinkfix.lmeval import builtin

    builtin.export_tasks(tmp_path / "base")
    base = tmp_path / "base" / "sinkfix_cloze_jsonl.yaml"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "helpers.py").write_text("def text(doc):\n    return doc['context']\n")
    (mine / "mine.yaml").write_text("include: ../base/sinkfix_cloze_jsonl.yaml\ntask: mine\ntag: []\n"
                                    "doc_to_text: !function helpers.text\n")
    kept = {path: path.read_text() for path in (base, mine / "helpers.py")}
    for path in kept:
        out = str(path.parent / "." / path.name)
        assert main(["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "mine", "--include-path", str(mine),
                     "--limit", "1", "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out} is a file defining task mine ({path})" in err[0], err
    assert {path: path.read_text() for path in kept} == kept


def test_a_null_select_drops_from_the_choices_is_accepted(tmp_path):
    # review 58: select keeps items by truth, and the answer templates' probes refused any truth test
    body = ('doc_to_text: "{{q}}"\ndoc_to_choice: "{{ opts | select | list }}"\ndoc_to_target: 0\n'
            'output_type: multiple_choice\ntest_split: test\nmetric_list:\n  - metric: acc\n')
    loaded = _task(tmp_path, body, [{"q": "x", "opts": ["a", "b"]}, {"q": "y", "opts": ["a", "b", None]}])
    check_items(loaded)
    assert loaded.tasks["t_probe"].doc_to_choice(loaded.tasks["t_probe"].eval_docs[1]) == ["a", "b"]
    _lm_eval_builds(loaded, "t_probe", 0, 2)


@pytest.mark.parametrize("target, says", [
    ("{{ ans }}", "shows it (lm-eval would write None)"),
    ("{{ ans or 'unknown' }}", "decides on it"),  # lm-eval writes 'unknown': no None, a silent choice
    ("{{ 1 if ans == 'yes' else 0 }}", "decides on it"),
])
def test_the_refusal_says_what_the_template_does_with_the_null(tmp_path, target, says):
    body = f'doc_to_target: "{target}"\n{_LL}'
    loaded = _task(tmp_path, body, [{"q": "x", "ans": "yes"}, {"q": "y", "ans": None}])
    with pytest.raises(EvaluationError, match=re.escape(f"field 'ans' is missing (null), and the answer template {says}")):
        check_items(loaded)
