"""Finding and loading lm-eval tasks for ``sinkfix eval``: the built-in tasks, ``--include-path``
folders, and lm-eval's own catalogue, with every failure turned into one clear
:class:`~sinkfix.errors.EvaluationError` before any model is loaded.

lm-eval's catalogue has some 14,700 task names; indexing it costs about 15 s of CPU time (measured
here), so it is read only when a name is neither built in nor under an ``--include-path``.
"""

from __future__ import annotations

import difflib
import functools
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sinkfix.errors import EvaluationError
from sinkfix.files import json_error, json_lines
from sinkfix.lmeval.builtin import TASKS_DIR

try:
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml
except ImportError:
    raise EvaluationError("downstream evaluation needs lm-evaluation-harness: pip install 'sinkfix[eval]'") from None

__all__ = ["LoadedTasks", "load_tasks", "check_data_files", "check_items"]

Log = Callable[[str], None]


@dataclass
class LoadedTasks:
    """Leaf tasks by name (groups and tags expanded) and the manager that found them."""

    tasks: dict[str, Any]
    manager: Any


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _include_paths(include: Iterable[str | Path]) -> list[Path]:
    paths = []
    for folder in include:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise EvaluationError(f"--include-path {folder}: {'not a folder' if path.exists() else 'no such folder'}")
        paths.append(path.resolve())
    return [TASKS_DIR, *paths]


def _known(manager: Any, name: str) -> bool:
    return name in manager.task_index or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


@functools.lru_cache(maxsize=4)
def _catalogue(paths: tuple[str, ...]) -> Any:
    """lm-eval's whole catalogue plus ``paths``, indexed once per process."""
    return TaskManager(include_path=list(paths))


def _manager(names: list[str], paths: list[Path], log: Log) -> Any:
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(_known(manager, name) for name in names):
        return manager
    log("indexing lm-eval's task catalogue (a name is neither built in nor under --include-path) ...")
    manager = _catalogue(tuple(str(p) for p in paths))
    for name in names:
        if not _known(manager, name):
            raise EvaluationError(_unknown_message(manager, name) + _unreadable_files(paths[1:]))
    return manager


def _unreadable_files(folders: list[Path]) -> str:
    """lm-eval's index skips a task file it cannot parse, silently: the task is then "unknown".
    Those files under the user's --include-path folders, named with their problem."""
    problems = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.y*ml")):
            try:
                load_yaml(path, resolve_func=False)
            except Exception as exc:  # noqa: BLE001 - any parse failure, reported with the file
                problems.append(f"{path}: {_first_line(exc)}")
    return f"; task files that could not be read: {'; '.join(problems)}" if problems else ""


def _unknown_message(manager: Any, name: str) -> str:
    try:
        manager.load([name])
        said = "not found"
    except (KeyError, ValueError) as exc:
        said = _first_line(exc)
    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list them with: lm-eval ls tasks"
    return f"unknown task {name!r} (lm-eval: {said}){hint}"


# -- local data files ---------------------------------------------------------------------------
def _data_files(config: dict[str, Any]) -> list[Path]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return []
    values = files.values() if isinstance(files, dict) else [files]
    flat = [f for v in values for f in (v if isinstance(v, list) else [v])]
    return [path for f in flat if "://" not in str(f) for path in _expand(Path(str(f)).expanduser())]


def _expand(path: Path) -> list[Path]:
    """A data_files entry as files: a glob pattern (as datasets accepts) gives what it matches."""
    if not any(c in str(path) for c in "*?["):
        return [path]
    matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
    if not matches:
        raise EvaluationError(f"no task data file matches {path}")
    return matches


def _check_json_file(path: Path) -> None:
    if not path.is_file():
        raise EvaluationError(f"task data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"cannot read task data file {path}: {exc}") from None
    try:
        json.loads(text)  # one JSON document (an array of records, or {"data": [...]})
        return
    except json.JSONDecodeError:
        pass
    if not text.strip():
        raise EvaluationError(f"task data file {path} holds no record (it is empty)")
    for number, line in enumerate(json_lines(text), start=1):  # at "\n" only (json_lines says why)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path}, line {number}: not valid JSON ({json_error(exc)})") from None
        if not isinstance(record, dict):
            raise EvaluationError(f"{path}, line {number}: a record must be a JSON object, got {type(record).__name__}")


def _file_config(name: str) -> list[dict[str, Any]]:
    """The config of a task given as a YAML file path (lm-eval reports a file it cannot parse)."""
    if not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
        return []
    try:
        config = load_yaml(Path(name), resolve_func=False)
    except Exception:  # noqa: BLE001 - lm-eval's own load names the problem
        return []
    return [config] if isinstance(config, dict) and "task" in config else []


def _leaf_configs(manager: Any, name: str) -> list[dict[str, Any]]:
    """The raw configs of the tasks that ``name`` stands for (itself, a tag's or a group's members)."""
    entry = manager.task_index.get(name)
    if entry is None:
        return _file_config(name)
    if entry.kind is Kind.TASK:
        return [entry.cfg or {}]
    if entry.kind is Kind.TAG:
        members = [n for n, e in manager.task_index.items() if name in e.tags]
    elif entry.kind is Kind.GROUP:
        members = [m for m in ((entry.cfg or {}).get("task") or []) if isinstance(m, str)]
    else:
        return []
    return [c for m in members if m != name for c in _leaf_configs(manager, m)]


def _needs_hub(manager: Any, names: Iterable[str]) -> bool:
    local = {None, "json", "csv", "text", "parquet", "arrow"}
    return any(c.get("dataset_path") not in local for n in names for c in _leaf_configs(manager, n))


def check_data_files(manager: Any, names: Iterable[str]) -> None:
    """Check every local JSON data file the named tasks read: present, readable, and either one JSON
    document or one JSON object per line; the first problem is an EvaluationError naming the line."""
    for name in names:
        for config in _leaf_configs(manager, name):
            if config.get("dataset_path") == "json":
                for path in _data_files(config):
                    _check_json_file(path)


def load_tasks(names: list[str], include: Iterable[str | Path] = (), log: Log = lambda _: None) -> LoadedTasks:
    """Find and build the named tasks (datasets included); every failure is one EvaluationError."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise EvaluationError("no task given; e.g. --tasks sinkfix_prose,sinkfix_cloze")
    manager = _manager(names, _include_paths(include), log)
    check_data_files(manager, names)
    try:
        loaded = manager.load(names)
    except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types; all mean "cannot load"
        hint = (" (without network, point the task at a local copy of its data: README, \"Downstream evaluation\")"
                if _needs_hub(manager, names) else "")
        raise EvaluationError(f"could not load task(s) {', '.join(names)}: {_first_line(exc)}{hint}") from exc
    return LoadedTasks(dict(loaded["tasks"]), manager)


_TEMPLATE_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)")


def _referenced_fields(task: Any) -> list[str]:
    """The record fields a task's prompt, answer and choices read: a field named outright
    (``doc_to_choice: choices``) or the first name of a Jinja expression (``"{{text}}"``)."""
    config = getattr(task, "config", None)
    fields: list[str] = []
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = getattr(config, key, None)
        if not isinstance(value, str):
            continue
        names = _TEMPLATE_FIELD.findall(value) if "{{" in value else [value.strip()]
        fields += [name for name in names if name not in fields]
    return fields


def _item_problem(task: Any, doc: Any) -> str | None:
    """What keeps lm-eval from scoring one item as meant, or None. lm-eval builds a task's requests
    with the model loaded and fails there with a bare TypeError on a record that lacks its field
    (a cloze record without choices), or scores it quietly wrong: a document without text as an
    empty one (one word, no bytes, in the weighted perplexities), a gold index past the choices as a
    wrong answer in both runs."""
    missing = [field for field in _referenced_fields(task) if isinstance(doc, dict) and field in doc
               and doc[field] is None]
    if missing:  # a field absent from one JSON record is null there, and a template renders it as "None"
        return f"field {missing[0]!r} is missing (null)"
    kind = task.OUTPUT_TYPE
    if kind == "loglikelihood_rolling":
        text = task.doc_to_target(doc)
        return None if isinstance(text, str) and text.strip() else f"no text to score (got {text!r:.60})"
    prompt = task.doc_to_text(doc)
    if not isinstance(prompt, (str, int)):
        return f"the prompt is {type(prompt).__name__} {prompt!r:.60}, not text"
    if kind != "multiple_choice":
        return None
    choices = task.doc_to_choice(doc)
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
        return f"the choices are {choices!r:.60}, not a non-empty list of strings"
    gold = task.doc_to_target(doc)
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    for one in golds:
        if isinstance(one, str):
            if one not in choices:
                return f"the answer {one!r:.40} is not one of the {len(choices)} choices"
        elif isinstance(one, bool) or not isinstance(one, int) or not 0 <= one < len(choices):
            return f"the answer index {one!r:.40} is outside the {len(choices)} choices (0..{len(choices) - 1})"
    return None


def check_items(loaded: LoadedTasks, limit: int | None = None) -> None:
    """Check the items each task will score (the first ``limit``), before any model loads: every
    problem is an EvaluationError naming the task and the item (its position in the task's data)."""
    for name, task in loaded.tasks.items():
        docs = task.eval_docs
        count = len(docs) if limit is None else min(limit, len(docs))
        for index in range(count):
            try:
                problem = _item_problem(task, docs[index])
            except Exception as exc:  # noqa: BLE001 - a template or a !function on a record that does not fit
                problem = f"{type(exc).__name__}: {_first_line(exc)}"
            if problem is not None:
                raise EvaluationError(f"task {name}, item {index}: {problem} (check the task's data file: each "
                                      "record needs the fields the task reads)")
