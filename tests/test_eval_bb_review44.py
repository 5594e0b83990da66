"""Review 44: ``sinkfix eval`` checks the few-shot pool and fields no record has, refuses an ``--out``
that is one of its inputs and reads a BOM'd JSONL file; ``sinkfix bb`` leaves a consistent folder
when its figures fail and draws a null measure as "n/a", not as a bar of height 0."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sinkfix.cli import main
from sinkfix.errors import EvaluationError, UsageError
from sinkfix.lmeval import builtin
from sinkfix.lmeval.config import EvalConfig
from sinkfix.lmeval.paired import apply_fewshot, run_eval
from sinkfix.lmeval.taskload import _check_json_file, check_items, load_tasks

from .test_lmeval import builtin_tasks  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def _cloze_task(tmp_path: Path, name: str, rows: list[dict], *, edit=lambda text: text, bom: bool = False,
                extra: str = "") -> Path:
    """A copy of the exported cloze task named ``name`` reading ``rows`` from its own JSONL file; ``edit``
    changes its YAML text. Returns the task's folder (an --include-path)."""
    exported = tmp_path / "exported"
    if not exported.exists():
        builtin.export_tasks(exported)
    folder = tmp_path / name
    folder.mkdir()
    data = folder / "data.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in rows)
    data.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    yaml = (exported / "sinkfix_cloze_jsonl.yaml").read_text()
    yaml = yaml.replace("task: sinkfix_cloze_jsonl", f"task: {name}").replace("tag: [sinkfix_jsonl]", "tag: []")
    yaml = yaml.replace(str(exported / "sinkfix_cloze.jsonl"), str(data))
    assert str(data) in yaml
    (folder / f"{name}.yaml").write_text(edit(yaml) + extra)
    return folder


def _cloze_rows(count: int) -> list[dict]:
    """The first ``count`` built-in cloze items (context, four choices, gold index), as JSON records."""
    return [json.loads(json.dumps(row)) for row in builtin.cloze_items()[:count]]


# -- 1. the few-shot pool ------------------------------------------------------------------------------

def test_a_bad_record_only_drawn_as_a_few_shot_example_is_refused_before_the_model_loads(tmp_path):
    """Records 2-4 lack their choices; --limit 2 scores records 0-1 only, but --num-fewshot 3 draws the
    examples from the whole test split. Before: the check passed and lm-eval failed mid-run on
    'AssertionError: Answer is not a string! : 0' (14 frames, rc 1, after the model had loaded)."""
    rows = _cloze_rows(5)
    for row in rows[2:]:
        row["choices"] = None
    folder = _cloze_task(tmp_path, "t_fs", rows)
    loaded = load_tasks(["t_fs"], include=[folder])
    check_items(loaded, limit=2)  # zero-shot (the task sets no count): the records past --limit are never read
    assert apply_fewshot(loaded, 3) == {"t_fs": 3}
    with pytest.raises(EvaluationError, match=r"^task t_fs, few-shot example: item 2 of its test_split 'test', "
                                              r"which lm-eval may draw as one of the 3 examples: field 'choices' "
                                              r"is missing \(null\)"):
        check_items(loaded, limit=2)
    # through the whole run: the model named does not exist, so reaching it would fail otherwise
    config = EvalConfig(model=str(tmp_path / "no-such-model"), tasks=("t_fs",), include_paths=(str(folder),),
                        limit=2, num_fewshot=3)
    with pytest.raises(EvaluationError, match=r"few-shot example: item 2 "):
        run_eval(config)


def test_the_few_shot_pool_is_the_fewshot_split_when_the_task_names_one(tmp_path):
    """lm-eval draws from fewshot_split when a task gives one (else its training, validation or test
    split, the first it has): a bad record there is named with that split."""
    rows = _cloze_rows(4)
    good, bad = rows[:2], [rows[2], {**rows[3], "gold": 9}]

    def two_splits(yaml: str) -> str:
        shots = tmp_path / "t_split" / "shots.jsonl"
        shots.write_text("".join(json.dumps(row) + "\n" for row in bad))
        return yaml.replace("    test: ", f"    train: \"{shots}\"\n    test: ")

    folder = _cloze_task(tmp_path, "t_split", good, edit=two_splits, extra="fewshot_split: train\n")
    loaded = load_tasks(["t_split"], include=[folder])
    apply_fewshot(loaded, 1)
    with pytest.raises(EvaluationError, match=r"^task t_split, few-shot example: item 1 of its fewshot_split "
                                              r"'train', .*the answer index 9 is outside the 4 choices"):
        check_items(loaded)


def test_a_few_shot_pool_too_small_for_the_count_is_refused(tmp_path):
    """random.sample past the pool's size raised ValueError in the middle of the stock run."""
    folder = _cloze_task(tmp_path, "t_small", _cloze_rows(2))
    loaded = load_tasks(["t_small"], include=[folder])
    apply_fewshot(loaded, 3)
    with pytest.raises(EvaluationError, match=r"^task t_small runs 3-shot, but its test_split 'test' holds 2 "
                                              r"record\(s\) to draw the examples from \(lm-eval needs 3\)"):
        check_items(loaded, limit=1)
    apply_fewshot(loaded, 2)
    check_items(loaded, limit=1)  # 2 records, 2 examples: lm-eval may draw the scored item itself


# -- 2. a field no record has ---------------------------------------------------------------------

def test_a_bare_field_name_no_record_has_is_refused_not_scored_as_literal_text(tmp_path):
    """``doc_to_text: context`` over records keyed ``ctx``: lm-eval read the bare name as the literal
    prompt "context" and scored every item after that one word, rc 0 (the "{{context}}" spelling of the
    same mistake was refused, as lm-eval cannot render it)."""
    rows = [{"ctx": r["context"], "choices": r["choices"], "gold": r["gold"]} for r in _cloze_rows(3)]
    folder = _cloze_task(tmp_path, "t_ctx", rows, edit=lambda y: y.replace('doc_to_text: "{{context}}"',
                                                                          "doc_to_text: context"))
    loaded = load_tasks(["t_ctx"], include=[folder])
    assert loaded.tasks["t_ctx"].doc_to_text(loaded.tasks["t_ctx"].eval_docs[0]) == "context"  # lm-eval's reading
    with pytest.raises(EvaluationError, match=r"^task t_ctx, item 0: field 'context' is missing \(lm-eval would "
                                              r"read 'context' as literal text\)"):
        check_items(loaded)


@pytest.mark.parametrize("template", [
    '"Passage: {{context}}"',  # a template
    '"{% for c in choices %}{{ c }} {% endfor %}{{context}}"',  # a loop variable is no field
    '"{{context if context is defined else extra}}"',  # a field the template tests itself
])
def test_valid_templates_are_not_refused(tmp_path, template):
    rows = _cloze_rows(3)
    for row in rows:
        row["extra"] = "x"
    name = "t_ok"
    folder = _cloze_task(tmp_path, name, rows, edit=lambda y: y.replace('doc_to_text: "{{context}}"',
                                                                       f"doc_to_text: {template}"))
    loaded = load_tasks([name], include=[folder])
    check_items(loaded)
    apply_fewshot(loaded, 2)
    check_items(loaded)  # and as few-shot examples


def test_the_built_in_and_exported_tasks_pass_every_check(tmp_path, builtin_tasks):  # noqa: F811
    check_items(builtin_tasks)
    builtin.export_tasks(tmp_path)
    exported = ["sinkfix_prose_jsonl", "sinkfix_code_jsonl", "sinkfix_cloze_jsonl"]
    for loaded in (load_tasks(list(builtin.BUILTIN_TASKS)), load_tasks(exported, include=[tmp_path])):
        check_items(loaded)  # zero-shot
        assert sorted(apply_fewshot(loaded, 5).values()) == [0, 0, 5]  # the cloze task 5-shot, the rolling ones 0
        check_items(loaded)


# -- 4. --out naming one of the run's inputs -----------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_out_naming_the_profile_is_refused_and_the_profile_kept(tmp_path, capsys):
    """Before: the report replaced the profile (rc 0), and the next run said "not a sinkfix profile"."""
    profile = tmp_path / "p.json"
    profile.write_text('{"format": "sinkfix-profile"}\n')
    (tmp_path / "link.json").symlink_to(profile)
    for out in (str(tmp_path / "link.json"), str(tmp_path / "." / "p.json")):
        code = main(["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "sinkfix_cloze", "--limit", "1",
                     "--profile", str(profile), "--out", out])
        assert code == 2
        assert _one_error_line(capsys) == (f"sinkfix eval: error: --out {out} is the --profile file: the report "
                                           "would replace it; write the report to another file")
    assert profile.read_text() == '{"format": "sinkfix-profile"}\n'


def test_out_naming_a_file_of_the_model_folder_or_a_task_file_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = str(model / ".." / "model" / "config.json")
    assert main(["eval", "--model", str(model), "--tasks", "sinkfix_cloze", "--out", out]) == 2
    assert _one_error_line(capsys).endswith(f"--out {out} is the file config.json of the --model folder: the report "
                                            "would replace it; write the report to another file")
    assert (model / "config.json").read_text() == "{}"
    builtin.export_tasks(tmp_path / "tasks")
    task_file = tmp_path / "tasks" / "sinkfix_cloze_jsonl.yaml"
    before = task_file.read_text()
    assert main(["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "sinkfix_cloze_jsonl",
                 "--include-path", str(tmp_path / "tasks"), "--out", str(task_file)]) == 2
    assert f"--out {task_file} is the task file {task_file} (--include-path)" in _one_error_line(capsys)
    assert task_file.read_text() == before


def test_out_naming_a_tasks_data_file_is_refused_before_the_model_loads(tmp_path, capsys):
    """Before: the report replaced the task's 100 cloze records (rc 0); the task no longer loaded."""
    builtin.export_tasks(tmp_path / "tasks")
    data = tmp_path / "tasks" / "sinkfix_cloze.jsonl"
    before = data.read_text()
    out = str(tmp_path / "tasks" / "." / "sinkfix_cloze.jsonl")
    assert main(["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "sinkfix_cloze_jsonl",
                 "--include-path", str(tmp_path / "tasks"), "--limit", "1", "--out", out]) == 2
    assert _one_error_line(capsys) == (f"sinkfix eval: error: --out {out} is a data file of task sinkfix_cloze_jsonl "
                                       f"({data}): the report would replace it; write the report to another file")
    assert data.read_text() == before


def test_a_new_out_file_beside_the_inputs_is_no_input():
    from sinkfix.files import check_out_is_no_input

    profile = ROOT / "pyproject.toml"
    check_out_is_no_input(str(ROOT / "no-such-report.json"), [("the --profile file", profile)])
    with pytest.raises(UsageError, match="is the --profile file"):
        check_out_is_no_input(str(ROOT / "sinkfix" / ".." / "pyproject.toml"), [("the --profile file", profile)])


# -- 5. a byte-order mark --------------------------------------------------------------------------

def test_a_jsonl_data_file_starting_with_a_bom_is_accepted(tmp_path):
    """datasets reads such a file (3 records, the right columns); the pre-check refused it at line 1
    ("Unexpected UTF-8 BOM")."""
    folder = _cloze_task(tmp_path, "t_bom", _cloze_rows(3), bom=True)
    assert (folder / "data.jsonl").read_bytes()[:3] == b"\xef\xbb\xbf"
    _check_json_file(folder / "data.jsonl")
    loaded = load_tasks(["t_bom"], include=[folder])
    docs = loaded.tasks["t_bom"].eval_docs
    assert len(docs) == 3 and sorted(docs[0]) == ["choices", "context", "gold"]
    check_items(loaded)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n{"text": \n')
    with pytest.raises(EvaluationError, match=r"bad.jsonl, line 2: not valid JSON"):  # lines still counted from 1
        _check_json_file(bad)


# -- 3. bb: figures that fail after the training --------------------------------------------------

TINY = ["--steps", "2", "--layers", "1", "--width", "8", "--seq-len", "8", "--batch", "2", "--eval-every", "1",
        "--threads", "1"]


@pytest.fixture
def broken_matplotlib(tmp_path, monkeypatch):
    """A matplotlib that is found (find_spec sees it) but fails to import, as a broken install does."""
    fake = tmp_path / "fake_site"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text('raise ImportError("simulated broken matplotlib")\n')
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake))


def test_bb_figures_failing_after_training_leave_a_consistent_folder(tmp_path, capsys, broken_matplotlib,
                                                                     one_thread):
    """Before: the new bb.json beside the previous run's figures and a bb.partial.json, the error said
    "pip install" (matplotlib was installed), and the next run into the folder was refused as if this
    one had not completed."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("bb_dynamics.png", "bb_final.png"):
        (out / name).write_bytes(b"an earlier run's figure")
    assert main(["bb", *TINY, "--variants", "adam,sgd", "--json", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last == (f"sinkfix bb: error: the results are in {out / 'bb.json'}, but the figures could not be drawn "
                    "(figures need matplotlib, which is installed but does not import (ImportError: simulated broken "
                    "matplotlib): repair it, or pass --no-figures); no figure kept")
    assert sorted(p.name for p in out.iterdir()) == ["bb.json"]
    report = json.loads((out / "bb.json").read_text())
    assert report == json.loads(captured.out) and report["config"]["steps"] == 2 and set(report) >= {"adam", "sgd"}
    # the next run into the folder is not refused as if this one had not completed
    assert main(["bb", *TINY, "--variants", "adam", "--json", "--out", str(out), "--no-figures"]) == 0


# -- 6. bb: a null measure in bb_final.png --------------------------------------------------------

def _variant(description: str, **final) -> dict:
    keys = ("bos_attention_nontrigger", "prev_token_attention_trigger", "bos_value_ratio", "bos_residual_ratio",
            "bos_logit_gap", "loss")
    history = [{"step": step, **{k: 0.5 for k in keys}, "bos_residual_ratio_by_layer": [1.0]} for step in (0, 1)]
    return {"description": description, "history": history, **final}


def test_bb_final_draws_a_null_measure_as_na_not_as_a_zero_bar(tmp_path, monkeypatch):
    """A ReLU head with no weight on any row has no attention share (null in bb.json, "-" in the table);
    bb_final.png drew it as a bar of height 0, which reads as "no attention on BOS"."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    import sinkfix.files
    from sinkfix.bb.report import write_figures

    figures = {}

    def keep(fig, path, **_):
        figures[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr(sinkfix.files, "save_figure", keep)
    report = {
        "adam": _variant("softmax + AdamW", bos_attention_nontrigger=0.9, bos_attention_trigger=0.05,
                         prev_token_attention_trigger=0.8, bos_value_ratio=0.2, bos_residual_ratio=1.5),
        "relu": _variant("ReLU + AdamW", bos_attention_nontrigger=None, bos_attention_trigger=None,
                         prev_token_attention_trigger=0.7, bos_value_ratio=0.4, bos_residual_ratio=float("nan")),
    }
    assert [p.name for p in write_figures(report, tmp_path)] == ["bb_dynamics.png", "bb_final.png"]
    try:
        shares, norms = figures["bb_final.png"].axes
        bars = {c.get_label(): [round(p.get_height(), 6) for p in c.patches] for c in shares.containers}
        assert bars == {"adam": [0.9, 0.05, 0.8], "relu": [0.7]}  # before: relu [0.0, 0.0, 0.7]
        assert [t.get_text() for t in shares.texts] == ["n/a", "n/a"]
        # the x positions of the marks are relu's slots of the two null shares
        assert [round(t.get_position()[0], 6) for t in shares.texts] == [0.4, 1.4]
        # ratios: bars from 1 (the median) to the value
        norm_bars = {c.get_label(): [round(p.get_y() + p.get_height(), 6) for p in c.patches] for c in norms.containers}
        assert norm_bars == {"adam": [0.2, 1.5], "relu": [0.4]} and [t.get_text() for t in norms.texts] == ["n/a"]
        assert {round(p.get_y(), 6) for p in norms.patches} == {1.0}
    finally:
        for fig in figures.values():
            plt.close(fig)


# -- 7. docs/bb.md timings ------------------------------------------------------------------------

def test_docs_say_which_run_each_timing_belongs_to():
    """The results table gives 422 / 165 / 289 s (the 2026-12-05 run); "Timing and threads" said
    217-307 s per variant and 2.5 minutes on an idle core without saying these came from the
    2026-11-27 runs."""
    text = (ROOT / "docs" / "bb.md").read_text()
    section = text[text.index("## Timing and threads"):text.index("## Known limitation")]
    runs = {date: section.index(f"**The {date} run") for date in ("2026-12-05", "2026-11-27")}
    assert "422 s (adam), 165 s (sgd) and 289 s (relu)" in section[runs["2026-12-05"]:runs["2026-11-27"]]
    assert "217-307 s per" in section[runs["2026-11-27"]:] and "2.5 minutes" in section[runs["2026-11-27"]:]


# -- review 46: over-refusals of the field analysis, multiple-input tasks, a report in the model folder -------

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).resolve().parent / "tasks"


def _yaml_task(tmp_path: Path, name: str, body: str, splits: dict[str, list[dict]]) -> Path:
    """A task folder: ``splits`` (split name -> records) as local JSONL files read by ``dataset_path: json``,
    and ``body`` (the task's YAML without its name and data) after them. Returns the folder."""
    folder = tmp_path / name
    folder.mkdir(parents=True)
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        head += f"    {split}: {folder / f'{split}.jsonl'}\n"
    (folder / f"{name}.yaml").write_text(head + body)
    return folder


def _lm_eval_builds(loaded, name: str, shots: int, limit: int) -> None:
    """lm-eval itself builds the first ``limit`` items' prompts (few-shot examples included) and requests."""
    task = loaded.tasks[name]
    for index, doc in enumerate(list(task.eval_docs)[:limit]):
        task.construct_requests(doc=doc, ctx=task.fewshot_context(doc, shots), metadata=(name, index, 1))


def test_lm_evals_own_gsm8k_cot_template_on_local_data_is_accepted(tmp_path):
    """gsm8k-cot's answer template reads ``target`` only when ``answer`` is undefined (its few-shot samples
    have ``target``, the scored records ``answer``): review 46 F1, every item was refused as "field 'target'
    is missing" (as were mmlu flan_cot_fewshot, gsm8k-cot-llama, ...), which lm-eval renders fine."""
    rows = [{"question": f"What is {i}+{i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"} for i in range(4)]
    yaml = (LM_EVAL_TASKS / "gsm8k" / "gsm8k-cot.yaml").read_text()
    assert "if answer is defined else target}}" in yaml
    yaml = re.sub(r"^((task|dataset_path|dataset_name): .*|tag:(\n- .*)*)\n", "", yaml, flags=re.M)
    folder = _yaml_task(tmp_path, "t_gsm_cot", yaml, {"test": rows})
    loaded = load_tasks(["t_gsm_cot"], include=[folder])
    assert apply_fewshot(loaded, None) == {"t_gsm_cot": 8}  # the task's own 8 samples (target, no answer)
    check_items(loaded, limit=2)
    _lm_eval_builds(loaded, "t_gsm_cot", 8, 2)
    assert apply_fewshot(loaded, 0) == {"t_gsm_cot": 0}
    check_items(loaded)
    # a record whose answer is null still fails: lm-eval cannot render it (None has no split)
    bad = _yaml_task(tmp_path / "bad", "t_gsm_cot", yaml, {"test": [rows[0], {**rows[1], "answer": None}]})
    loaded = load_tasks(["t_gsm_cot"], include=[bad])
    with pytest.raises(EvaluationError, match=r"^task t_gsm_cot, item 1: "):
        check_items(loaded)


_HINT_MC = """output_type: multiple_choice
test_split: test
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def _hint_rows() -> list[dict]:
    """Multiple-choice records whose ``hint`` is null in every other one (item 1 the first)."""
    return [{"question": f"q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4, "hint": None if i % 2 else "h"}
            for i in range(6)]


@pytest.mark.parametrize("template", [
    r'"{% if hint %}Hint given.\n{% endif %}Q: {{question}}"',
    r'''"{{ ('Hint: ' + hint + '\n') if hint else '' }}Q: {{question}}"''',
    r'"{{ hint or \"\" }}Q: {{question}}"',
])
def test_a_null_field_the_template_tests_itself_is_accepted_one_read_unguarded_refused(tmp_path, template):
    """Review 46 F2: a field tested for truth (``{% if hint %}``, ``x if hint else ''``, ``hint or ''``) and null
    in some records was refused as "field 'hint' is missing (null)"; lm-eval renders every item. The same
    field read without a test (``Hint: {{hint}}``) is still refused: lm-eval writes "Hint: None", quietly."""
    folder = _yaml_task(tmp_path, "t_hint", f"doc_to_text: {template}\n{_HINT_MC}", {"test": _hint_rows()})
    loaded = load_tasks(["t_hint"], include=[folder])
    check_items(loaded)
    _lm_eval_builds(loaded, "t_hint", 0, 6)
    apply_fewshot(loaded, 2)
    check_items(loaded)  # and as few-shot examples
    unguarded = _yaml_task(tmp_path / "u", "t_hint", f'doc_to_text: "Hint: {{{{hint}}}}\\nQ: {{{{question}}}}"\n'
                           f"{_HINT_MC}", {"test": _hint_rows()})
    loaded = load_tasks(["t_hint"], include=[unguarded])
    assert loaded.tasks["t_hint"].doc_to_text(loaded.tasks["t_hint"].eval_docs[1]) == "Hint: None\nQ: q1?"
    with pytest.raises(EvaluationError, match=r"^task t_hint, item 1: field 'hint' is missing \(null\)"):
        check_items(loaded)


def _wino_task(tmp_path: Path, train: list[dict], validation: list[dict], edit=lambda text: text) -> Path:
    """lm-eval's own winogrande task (its YAML and preprocess_winogrande.py, the latter through ``edit``)
    on local records, 3-shot from the training split."""
    yaml = (LM_EVAL_TASKS / "winogrande" / "default.yaml").read_text()
    yaml = re.sub(r"^(task|dataset_path|dataset_name): .*\n", "", yaml, flags=re.M) + "num_fewshot: 3\n"
    folder = _yaml_task(tmp_path, "t_wino", yaml, {"train": train, "validation": validation})
    code = (LM_EVAL_TASKS / "winogrande" / "preprocess_winogrande.py").read_text()
    (folder / "preprocess_winogrande.py").write_text(edit(code))
    return folder


def _wino_rows(count: int) -> list[dict]:
    return [{"sentence": f"The cup did not fit in the bag because _ was too big {i}.", "option1": "the cup",
             "option2": "the bag", "answer": "12"[i % 2]} for i in range(count)]


def test_a_multiple_input_task_winogrande_is_checked_as_lm_eval_uses_it(tmp_path):
    """Review 46 F3: for winogrande the prompt is the gold index into the contexts (the choices) and the
    answer the continuation shared by them, never a choice: every item was refused as "the answer 'was too
    big 0.' is not one of the 2 choices". Accepted now, scored items and few-shot examples; a record lm-eval
    cannot use is still refused."""
    folder = _wino_task(tmp_path, _wino_rows(6), _wino_rows(4))
    loaded = load_tasks(["t_wino"], include=[folder])
    task = loaded.tasks["t_wino"]
    assert task.multiple_input == 2
    assert apply_fewshot(loaded, None) == {"t_wino": 3}
    check_items(loaded)
    _lm_eval_builds(loaded, "t_wino", 3, 4)
    # a bad scored record: an option null (lm-eval fails building its contexts)
    bad = _wino_task(tmp_path / "b1", _wino_rows(6), [*_wino_rows(2), {**_wino_rows(3)[2], "option2": None}])
    with pytest.raises(EvaluationError, match=r"^task t_wino, item 2: TypeError"):
        check_items(load_tasks(["t_wino"], include=[bad]))
    # a bad few-shot record: no blank in the sentence
    bad = _wino_task(tmp_path / "b2", [*_wino_rows(3), {**_wino_rows(4)[3], "sentence": "no blank"}], _wino_rows(2))
    with pytest.raises(EvaluationError, match=r"^task t_wino, few-shot example: item 3 of its training_split 'train'"):
        check_items(load_tasks(["t_wino"], include=[bad]))
    # a gold index past the contexts: lm-eval scores it as a wrong answer in both runs
    past = _wino_task(tmp_path / "b3", _wino_rows(6), [*_wino_rows(1), {**_wino_rows(2)[1], "answer": "3"}],
                      edit=lambda code: code.replace('{"1": 0, "2": 1}', '{"1": 0, "2": 1, "3": 2}'))
    with pytest.raises(EvaluationError, match=r"^task t_wino, item 1: the answer index 2 is outside the 2 "):
        check_items(load_tasks(["t_wino"], include=[past]))


def test_rerunning_eval_with_its_report_in_the_model_folder_is_not_refused(tmp_path, capsys):
    """Review 46 F4: ``--out ckpt/eval.json`` with ``--model ckpt``: the report of the first run made the same
    command's second run fail ("--out ckpt/eval.json is the file eval.json of the --model folder"), though no
    model load reads it. The files the load reads are still inputs."""
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "eval.json").write_text('{"format": "an earlier sinkfix eval report"}')
    config = EvalConfig(model=str(model), tasks=("sinkfix_cloze",), limit=1)
    described = {path.name: what for what, path in config.input_files()}
    assert described == {"config.json": "the file config.json of the --model folder",
                         "model.safetensors": "the file model.safetensors of the --model folder"}
    code = main(["eval", "--model", str(model), "--tasks", "sinkfix_cloze", "--limit", "1",
                 "--out", str(model / "eval.json")])
    assert code == 2  # got past the --out check: the (fake) model folder fails to load
    line = _one_error_line(capsys)
    assert "--out" not in line and "has no tokenizer files" in line, line
    assert (model / "eval.json").read_text() == '{"format": "an earlier sinkfix eval report"}'
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(UsageError, match=f"is the file {name} of the --model folder"):
            from sinkfix.files import check_out_is_no_input

            check_out_is_no_input(str(model / name), config.input_files())


_NULL_ANSWER_MC = """output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
metric_list:
  - metric: acc
"""


@pytest.mark.parametrize("target, choices, row, field", [
    ('"{{ 0 if label == 0 else 1 }}"', '["yes", "no"]', {"label": None}, "label"),  # assin_entailment
    ('"{{ \'yes\' if label else \'no\' }}"', '["yes", "no"]', {"label": None}, "label"),
    ('"{{ a if correct == \'A\' else b }}"', '"{{[a, b]}}"', {"correct": None, "a": "x", "b": "y"}, "correct"),
    ('"{% if answer is not none %}{{answer}}{% else %}{{number}}{% endif %}"', '["1", "2", "None"]',
     {"answer": None, "number": None}, "number"),  # mgsm's fallback
])
def test_a_null_answer_field_a_condition_reads_is_refused(tmp_path, target, choices, row, field):
    """Review 47 F2: with every field named in a condition counted as optional, a null answer field
    silently took a branch (``0 if label == 0 else 1``: a null label scored as answer 1) or rendered as
    "None" in a fallback branch; lm-eval scores such items against an answer the data never gave."""
    good = {"question": "q?", "label": 0, "a": "x", "b": "y", "correct": "A", "answer": "1", "number": "1"}
    rows = [good, {**good, **row}]
    body = f"doc_to_target: {target}\ndoc_to_choice: {choices}\n{_NULL_ANSWER_MC}"
    loaded = load_tasks(["t_null"], include=[_yaml_task(tmp_path, "t_null", body, {"test": rows})])
    with pytest.raises(EvaluationError, match=rf"^task t_null, item 1: field '{field}' is missing \(null\)"):
        check_items(loaded)
    loaded = load_tasks(["t_null"], include=[_yaml_task(tmp_path / "ok", "t_null", body, {"test": [good, good]})])
    check_items(loaded)  # sound records pass


def test_a_null_field_in_a_branch_the_record_keeps_shut_is_accepted(tmp_path):
    """The mgsm-style fallback reads ``number`` only when ``answer`` is null: a record with an answer
    and a null number renders the same whatever the number is, and is accepted."""
    body = ('doc_to_target: "{% if answer is not none %}{{answer}}{% else %}{{number}}{% endif %}"\n'
            'doc_to_choice: ["1", "2"]\n' + _NULL_ANSWER_MC)
    rows = [{"question": "q?", "answer": "0", "number": None}, {"question": "r?", "answer": "1", "number": None}]
    loaded = load_tasks(["t_shut"], include=[_yaml_task(tmp_path, "t_shut", body, {"test": rows})])
    check_items(loaded)


def test_a_field_read_outright_and_tested_elsewhere_must_not_be_null(tmp_path):
    """Review 47 F2: a question tested in one place and read outright in another was optional, and a
    null one was scored as the prompt "Q: None"."""
    body = ('doc_to_text: "{% if question %}(asked) {% endif %}Q: {{question}}"\ndoc_to_target: 0\n'
            'doc_to_choice: ["a", "b"]\ntest_split: test\noutput_type: multiple_choice\nmetric_list:\n  - metric: acc\n')
    rows = [{"question": "q?"}, {"question": None}]
    loaded = load_tasks(["t_q"], include=[_yaml_task(tmp_path, "t_q", body, {"test": rows})])
    with pytest.raises(EvaluationError, match=r"^task t_q, item 1: field 'question' is missing \(null\)"):
        check_items(loaded)
