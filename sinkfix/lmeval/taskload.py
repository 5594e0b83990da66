"""Finding and loading lm-eval tasks for ``sinkfix eval``: the built-in tasks, ``--include-path``
folders, and lm-eval's own catalogue, with every failure turned into one clear
:class:`~sinkfix.errors.EvaluationError` before any model is loaded.

lm-eval's catalogue has some 14,700 task names; indexing it costs about 15 s of CPU time (measured
here), so it is read only when a name is neither built in nor under an ``--include-path``.
"""

from __future__ import annotations

import contextlib
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

__all__ = ["LoadedTasks", "load_tasks", "check_data_files", "check_items", "data_files", "definition_files"]

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
        # utf-8-sig: a byte-order mark at the start (Windows editors write one) is dropped, as datasets'
        # JSON loader drops it; read as plain UTF-8 it was refused ("Unexpected UTF-8 BOM", line 1)
        text = path.read_text(encoding="utf-8-sig")
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


def _leaf_entries(manager: Any, name: str) -> list[tuple[dict[str, Any], Path | None]]:
    """The raw configs of the tasks that ``name`` stands for (itself, a tag's or a group's members),
    each with the YAML file that defines it (None for one lm-eval generates)."""
    entry = manager.task_index.get(name)
    if entry is None:
        return [(config, Path(name)) for config in _file_config(name)]
    if entry.kind is Kind.TASK:
        return [(entry.cfg or {}, entry.yaml_path)]
    if entry.kind is Kind.TAG:
        members = [n for n, e in manager.task_index.items() if name in e.tags]
    elif entry.kind is Kind.GROUP:
        members = [m for m in ((entry.cfg or {}).get("task") or []) if isinstance(m, str)]
    else:
        return []
    return [leaf for m in members if m != name for leaf in _leaf_entries(manager, m)]


def _leaf_configs(manager: Any, name: str) -> list[dict[str, Any]]:
    return [config for config, _ in _leaf_entries(manager, name)]


_FUNCTION_TAG = re.compile(r"!function\s+([A-Za-z_][\w.]*)")


def _definition_files(path: Path, seen: set[Path]) -> list[Path]:
    """A task's YAML file, the YAML files its ``include:`` names (recursively, relative to the file as
    lm-eval resolves them) and the Python modules beside it that its ``!function`` tags load."""
    path = path.expanduser().resolve()
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    found = [path]
    try:
        text = path.read_text(encoding="utf-8")
        config = load_yaml(path, resolve_func=False, recursive=False)
    except Exception:  # noqa: BLE001 - a file lm-eval cannot read fails in its own load, with its message
        return found
    for qualified in _FUNCTION_TAG.findall(text):
        module = qualified.rpartition(".")[0]
        helper = path.parent / f"{module.replace('.', '/')}.py"
        if module and helper.is_file():
            found.append(helper.resolve())
    includes = config.get("include") if isinstance(config, dict) else None
    for include in includes if isinstance(includes, list) else [includes] if includes else []:
        found += _definition_files(Path(str(include)) if Path(str(include)).is_absolute()
                                   else path.parent / str(include), seen)
    return found


def definition_files(manager: Any, names: Iterable[str]) -> list[Path]:
    """The files that define the named tasks: each one's YAML, the files it includes and the helper
    modules its ``!function`` tags load (an ``--out`` naming one replaced a task file or its code)."""
    seen: set[Path] = set()
    return [path for name in names for _, yaml_path in _leaf_entries(manager, name) if yaml_path is not None
            for path in _definition_files(Path(yaml_path), seen)]


def _needs_hub(manager: Any, names: Iterable[str]) -> bool:
    local = {None, "json", "csv", "text", "parquet", "arrow"}
    return any(c.get("dataset_path") not in local for n in names for c in _leaf_configs(manager, n))


def data_files(manager: Any, names: Iterable[str]) -> list[Path]:
    """The local data files the named tasks read (``dataset_kwargs.data_files``, globs expanded)."""
    return [path for name in names for config in _leaf_configs(manager, name) for path in _data_files(config)]


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
_BARE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")
_ROLLING = "loglikelihood_rolling"


@dataclass(frozen=True)
class _Field:
    """A record field a task's template reads."""

    name: str
    bare: bool  # named outright (``doc_to_choice: choices``), not inside a Jinja template
    #: read whatever the record holds, so it must be there (refused by name when absent); a field read
    #: only in a condition or a branch may be absent (the rendering says whether that fails). Whether a
    #: null is used is not decided here but by rendering with probes (:func:`_null_problem`): a static
    #: reading took ``default(...)`` and ``is defined`` for null tests (both keep a null) and saw only
    #: top-level fields (review 57).
    required: bool


#: Nodes whose listed fields run only as the record decides (a condition, or a branch it opens).
_CONDITIONAL_FIELDS = {"If": ("test", "body", "elif_", "else_"), "CondExpr": ("test", "expr1", "expr2"),
                       "For": ("test", "body", "else_"), "Macro": ("body",), "CallBlock": ("body",)}


def _names_read(tree: Any) -> set[str]:
    """The names a parsed Jinja template reads whatever the record holds: outside every condition
    (an ``if`` or ternary test, a loop's filter, an ``and``/``or`` operand, a test such as ``is
    defined``, a ``default`` filter) and every branch (``if``/``else`` bodies, ternary results, a loop
    body, a macro)."""
    from jinja2 import nodes

    read: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, nodes.Name):
            if node.ctx == "load":
                read.add(node.name)
            return
        if isinstance(node, (nodes.And, nodes.Or, nodes.Test)) or (
                isinstance(node, nodes.Filter) and node.name in ("default", "d")):
            return  # what is below runs, or is used, only as a condition decides
        conditional = _CONDITIONAL_FIELDS.get(type(node).__name__, ())
        for key, value in node.iter_fields():
            if key in conditional:
                continue
            for child in (value if isinstance(value, list) else [value]):
                if isinstance(child, nodes.Node):
                    visit(child)

    visit(tree)
    return read


@functools.lru_cache(maxsize=256)
def _jinja_fields(template: str) -> tuple[_Field, ...]:
    """The names a Jinja template reads from the record, in the order they first appear. Jinja's own
    analysis, not a pattern: a loop or ``set`` variable (``{% for c in choices %}{{ c }}``) is no
    field (``c`` is in no record: counted as a field, a valid task would be refused as missing it),
    nor is a global of lm-eval's template environment (``range``).

    A field read whatever the record holds is required; one read only in a condition or a branch
    (gsm8k-cot's ``answer.split(...) if answer is defined else target``: ``target`` only for its
    few-shot samples) is not (review 46: such tasks of lm-eval's catalogue were refused), and what
    such a branch needs and the record lacks still fails, in the rendering :func:`_item_problem`
    does. Cached: parsed once per template, not once per record."""
    from jinja2 import meta
    from lm_eval.utils import env

    try:
        tree = env.parse(template)
    except Exception:  # noqa: BLE001 - a template lm-eval cannot parse fails in its own load, with its message
        return tuple(_Field(name, False, True) for name in dict.fromkeys(_TEMPLATE_FIELD.findall(template)))
    names = meta.find_undeclared_variables(tree) - set(env.globals)
    read = _names_read(tree)

    def first(name: str) -> tuple[int, str]:
        found = re.search(rf"\b{re.escape(name)}\b", template)
        return (found.start() if found else len(template), name)

    return tuple(_Field(name, False, name in read) for name in sorted(names, key=first))


def _templates(task: Any, fewshot: bool = False) -> dict[str, Any]:
    """A task's prompt, answer and choices templates; for a few-shot example, those of its
    ``fewshot_config`` (lm-eval's ``fewshot_context`` renders the examples with them; they default
    to the task's own)."""
    config = getattr(task, "config", None)
    source = getattr(task, "fewshot_cfg", None) if fewshot else None
    return {key: getattr(source if source is not None else config, key, None) for key in _TEMPLATE_KEYS}


def _referenced_fields(task: Any, fewshot: bool = False) -> list[_Field]:
    """The record fields a task's prompt, answer and choices read: a field named outright
    (``doc_to_choice: choices``) or a name a Jinja template reads (``"{{text}}"``).

    A template without Jinja markup is a field name only when it is one word, as lm-eval reads it:
    ``doc_to_text: context`` is the record's ``context`` when the data has that column, and otherwise
    the literal text "context" (lm-eval's ``doc_to_text``: a key of the record, else a template).
    Text with spaces or punctuation (``"Answer:"``, ``"['yes', 'no']"``, ``""``) is a literal and reads
    no field."""
    fields: dict[str, _Field] = {}
    for value in _templates(task, fewshot).values():
        if not isinstance(value, str):
            continue
        if any(mark in value for mark in ("{{", "{%", "{#")):
            found = list(_jinja_fields(value))
        elif _BARE_NAME.fullmatch(value):
            found = [_Field(value, True, True)]
        else:
            found = []
        for field in found:  # a field several templates use is required when one of them requires it
            if field.name not in fields or (field.required and not fields[field.name].required):
                fields[field.name] = field
    return list(fields.values())


def _field_problem(task: Any, doc: Any, fewshot: bool) -> str | None:
    """A field missing from the record, or a null where lm-eval would use it: a bare field name's null
    here, a null a Jinja template uses (at any depth of the record) by :func:`_null_problem`."""
    if not isinstance(doc, dict):
        return None
    for field in _referenced_fields(task, fewshot):
        if not field.required and field.name not in doc:
            continue  # absent where a condition decides: the rendering says whether that fails
        if not field.bare and field.name in doc:
            continue  # its value, null or not, is the probe rendering's to judge
        if field.name not in doc:
            # no JSON record has it (datasets gives every record each column some record has): lm-eval
            # scored every item on the bare name as literal text ("context"), or failed on the template
            literal = f" (lm-eval would read {field.name!r} as literal text)" if field.bare else ""
            return f"field {field.name!r} is missing{literal}"
        if doc[field.name] is None:  # absent from this JSON record only: a template renders it as "None"
            return f"field {field.name!r} is missing (null)"
    return None


class _NullUsed(Exception):
    """A record's null was used for its value while :func:`_null_problem` rendered the templates.
    Not a TypeError or ValueError: Jinja's ``int`` and ``float`` filters turn those into 0."""

    #: what the template did with the null, for the message
    HOW = {"shown": "shows it (lm-eval would write None)",
           "decided": "decides on it (lm-eval would silently take one branch)",
           "used": "computes with it"}

    def __init__(self, path: str, how: str = "used") -> None:
        super().__init__(path)
        self.path, self.how = path, how


class _NullProbe:
    """Stands in for one null of a record while :func:`_null_problem` renders its templates. Like
    None it is falsy, passes Jinja's ``none`` test, equals None and is replaced by ``default(...,
    true)``; any use of its value (printed, joined, compared, measured, indexed, iterated, converted,
    an attribute read) raises :class:`_NullUsed` naming where it sits, which is where lm-eval would
    have put "None" into a prompt or an answer, or silently picked a branch (``label == 0``).
    ``strict`` (the answer and choices templates) makes a truth test a use too: ``'yes' if label
    else 'no'`` turned a null label into "no"."""

    __slots__ = ("_path", "_strict")

    def __init__(self, path: str, strict: bool) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_strict", strict)

    def _used(self, *args: Any, **kwargs: Any) -> Any:
        raise _NullUsed(self._path)

    def _shown(self, *args: Any, **kwargs: Any) -> Any:
        raise _NullUsed(self._path, "shown")

    def _decided(self, *args: Any, **kwargs: Any) -> Any:
        raise _NullUsed(self._path, "decided")

    def __bool__(self) -> bool:
        if self._strict:
            raise _NullUsed(self._path, "decided")
        return False

    def __eq__(self, other: Any) -> bool:  # ``x == None`` is a null test, as for None
        if other is None or isinstance(other, _NullProbe):
            return True
        raise _NullUsed(self._path, "decided")

    def __ne__(self, other: Any) -> bool:
        return not self.__eq__(other)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # hasattr(x, "__html__") and the like: absent, as on None
            raise AttributeError(name)
        raise _NullUsed(self._path)

    __str__ = __repr__ = __format__ = _shown
    __lt__ = __le__ = __gt__ = __ge__ = _decided
    __hash__ = __len__ = __iter__ = __getitem__ = __contains__ = __int__ = __float__ = __index__ = __call__ = _used
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __mod__ = __rmod__ = _used


def _probed(value: Any, path: str, strict: bool) -> Any:
    """``value`` with every null, at any depth of dicts and lists, replaced by a :class:`_NullProbe`."""
    if value is None:
        return _NullProbe(path, strict)
    if isinstance(value, dict):
        return {key: _probed(item, f"{path}.{key}" if path else str(key), strict) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_probed(item, f"{path}[{i}]", strict) for i, item in enumerate(value))
    return value


def _holds_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_holds_null(item) for item in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_null(item) for item in value)


@contextlib.contextmanager
def _probe_environment():
    """lm-eval's template environment with Jinja's tests that look at a value's type (``none``,
    ``iterable``, ``sameas``, ``callable``) and the filters that test for null or truth (``default``,
    ``select`` and ``reject`` without a test) taking a :class:`_NullProbe` for the None it stands for;
    restored afterwards."""
    from lm_eval.utils import env

    from jinja2 import pass_context

    names = ("default", "d", "select", "reject")
    tests = ("none", "iterable", "sameas", "callable")
    saved_tests, saved = {name: env.tests[name] for name in tests}, {name: env.filters[name] for name in names}

    def default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
        if isinstance(value, _NullProbe):  # default() keeps a null (it is defined); default(..., true) replaces it
            return default_value if boolean else value
        return saved["default"](value, default_value, boolean)

    def by_truth(keep: bool, original: Callable) -> Callable:
        # select / reject without a test keep the items by truth: a null there is dropped (kept), as
        # None is, also in the answer and choices, whose probes otherwise refuse a truth test
        @pass_context
        def choose(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                return original(context, value, *args, **kwargs)
            return (item for item in value if (not isinstance(item, _NullProbe) and bool(item)) == keep)
        return choose

    def as_none(test: Callable, when_null: Callable[..., bool]) -> Callable:
        return lambda value, *args: when_null(*args) if isinstance(value, _NullProbe) else test(value, *args)

    # what each test says of None: none, not iterable, the same as none only, not callable
    env.tests["none"] = as_none(saved_tests["none"], lambda: True)
    env.tests["iterable"] = as_none(saved_tests["iterable"], lambda: False)
    env.tests["sameas"] = as_none(saved_tests["sameas"], lambda other: other is None or isinstance(other, _NullProbe))
    env.tests["callable"] = as_none(saved_tests["callable"], lambda: False)
    env.filters["default"] = env.filters["d"] = default
    env.filters["select"], env.filters["reject"] = by_truth(True, saved["select"]), by_truth(False, saved["reject"])
    try:
        yield
    finally:
        env.tests.update(saved_tests)
        env.filters.update(saved)


_RENDERED_AS = {"text": "prompt", "target": "answer", "choice": "choices"}


def _null_problem(task: Any, doc: Any, fewshot: bool) -> str | None:
    """A null of the record (at any depth) that one of the task's Jinja templates uses for its value:
    rendered with every null replaced by a :class:`_NullProbe`, a template that prints, compares or
    computes with one (or, in the answer and choices, tests one for truth) names it. A null the
    template tests for itself (``{% if hint %}``, ``is none``, ``default(..., true)``, a branch that
    does not run) passes. Templates given as functions see the real record elsewhere: a function may
    test ``x is None`` itself, which a probe would not pass."""
    if not isinstance(doc, dict) or not _holds_null(doc):
        return None
    configured = _templates(task, fewshot)
    templates = configured if fewshot else None
    for what, rendered_as in _RENDERED_AS.items():
        template = configured[f"doc_to_{what}"]
        if not isinstance(template, str) or not any(mark in template for mark in ("{{", "{%")):
            continue
        probed = _probed(doc, "", strict=what != "text")
        try:
            with _probe_environment():
                _rendered(task, what, probed, templates)
        except _NullUsed as used:
            return f"field {used.path!r} is missing (null), and the {rendered_as} template {_NullUsed.HOW[used.how]}"
        except Exception:  # noqa: BLE001 - failing for another reason: the item check renders the real record
            continue
    return None


def _rendered(task: Any, what: str, doc: Any, templates: dict[str, Any] | None) -> Any:
    """``task.doc_to_<what>(doc)``, with the few-shot template when ``templates`` are given."""
    method = getattr(task, f"doc_to_{what}")
    return method(doc) if templates is None else method(doc, templates[f"doc_to_{what}"])


def _item_problem(task: Any, doc: Any, fewshot: bool = False) -> str | None:
    """What keeps lm-eval from scoring one item as meant, or None. lm-eval builds a task's requests
    with the model loaded and fails there with a bare TypeError on a record that lacks its field
    (a cloze record without choices), or scores it quietly wrong: a document without text as an
    empty one (one word, no bytes, in the weighted perplexities), a gold index past the choices as a
    wrong answer in both runs, a prompt template naming a field no record has as that name's text.

    ``fewshot``: the record as a few-shot example, rendered with the few-shot templates; its answer
    must give text too (lm-eval's ``build_qa_turn`` fails on an assertion mid-run otherwise)."""
    problem = _field_problem(task, doc, fewshot) or _null_problem(task, doc, fewshot)
    if problem is not None:
        return problem
    kind = task.OUTPUT_TYPE
    if kind == _ROLLING:
        text = task.doc_to_target(doc)
        return None if isinstance(text, str) and text.strip() else f"no text to score (got {text!r:.60})"
    templates = _templates(task, True) if fewshot else None
    prompt = _rendered(task, "text", doc, templates)
    if not isinstance(prompt, (str, int)):
        return f"the prompt is {type(prompt).__name__} {prompt!r:.60}, not text"
    choices = None
    if kind == "multiple_choice":
        choices = _rendered(task, "choice", doc, templates)
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
            return f"the choices are {choices!r:.60}, not a non-empty list of strings"
        if getattr(task, "multiple_input", 0):
            # winogrande: the choices are the contexts, the prompt the gold index into them and the answer
            # the continuation they share (lm-eval's construct_requests and process_results)
            if fewshot:
                return _example_problem(task, doc, prompt, choices, templates)
            return _contexts_problem(prompt, choices, _rendered(task, "target", doc, templates))
        gold = _rendered(task, "target", doc, templates)
        golds = gold if isinstance(gold, (list, tuple)) else [gold]
        for one in golds:
            if isinstance(one, str):
                if one not in choices:
                    return f"the answer {one!r:.40} is not one of the {len(choices)} choices"
            elif isinstance(one, bool) or not isinstance(one, int) or not 0 <= one < len(choices):
                return f"the answer index {one!r:.40} is outside the {len(choices)} choices (0..{len(choices) - 1})"
    if fewshot:
        return _example_problem(task, doc, prompt, choices, templates)
    custom_score = callable(getattr(getattr(task, "config", None), "process_results", None))
    if kind == "loglikelihood" or (kind == "generate_until" and not custom_score):
        # lm-eval renders the answer for the request (loglikelihood) or to score the generated text: a record
        # whose answer it cannot render (gsm8k-cot's with a null answer) fails there, with the model loaded
        _rendered(task, "target", doc, None)
    return None


def _contexts_problem(gold: Any, contexts: list[str], continuation: Any) -> str | None:
    """A scored item of a multiple-input task, as lm-eval uses it: ``gold`` (the prompt) names the right
    context (an index, a list of indices, or the context's text) and ``continuation`` (the answer) is
    the text scored after each context (lm-eval formats it into the request whatever it is: None as
    "None")."""
    golds = gold if isinstance(gold, list) else [gold]
    for one in golds:
        if isinstance(one, str):
            if one not in contexts:
                return f"the prompt {one!r:.40} is not one of the {len(contexts)} contexts (a multiple-input task)"
        elif isinstance(one, bool) or not isinstance(one, int) or not 0 <= one < len(contexts):
            return (f"the answer index {one!r:.40} is outside the {len(contexts)} contexts (0..{len(contexts) - 1}) "
                    "(a multiple-input task: the prompt gives the index)")
    if isinstance(continuation, bool) or not isinstance(continuation, (str, int)):
        return f"the answer {continuation!r:.40} is no text to score after the contexts (a multiple-input task)"
    return None


def _example_problem(task: Any, doc: Any, prompt: Any, choices: Any, templates: dict[str, Any]) -> str | None:
    """What lm-eval's ``build_qa_turn`` asserts of a few-shot example: the prompt is text (an index
    into the choices for a multiple-input task: the context shown, and the answer then shown as it is,
    never as a choice's index) and the answer gives text (a choice's index, a list whose first entry
    is text, or text)."""
    if choices is None and templates["doc_to_choice"]:
        choices = _rendered(task, "choice", doc, templates)
    if getattr(task, "multiple_input", 0):  # lm-eval's fewshot_context: q = c[q]; c = None
        count = len(choices) if isinstance(choices, (list, tuple)) else 0
        if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < count:
            return (f"the prompt {prompt!r:.40} is no index into the {count} contexts (a multiple-input task: the "
                    "example shows the context it names)")
        prompt, choices = choices[prompt], None
    if not isinstance(prompt, str):
        return f"the prompt is {type(prompt).__name__} {prompt!r:.60}, not text"
    answer = _rendered(task, "target", doc, templates)
    if answer is None or answer == "":
        return None  # lm-eval shows the example without an answer
    if choices and isinstance(answer, int) and not isinstance(answer, bool):
        text = choices[answer] if 0 <= answer < len(choices) else None
    else:
        text = answer[0] if isinstance(answer, list) and answer else answer
    if not isinstance(text, str):
        return f"the answer {answer!r:.40} gives no text to show after the example"
    return None


def _checked(task: Any, doc: Any, fewshot: bool = False) -> str | None:
    try:
        return _item_problem(task, doc, fewshot)
    except Exception as exc:  # noqa: BLE001 - a template or a !function on a record that does not fit
        return f"{type(exc).__name__}: {_first_line(exc)}"


def _fewshot_source(task: Any) -> str:
    """Where lm-eval draws a task's few-shot examples from, in words (``ConfigurableTask.fewshot_docs``:
    the fewshot_split; else fewshot_config's samples; else ``Task.fewshot_docs``: the training split,
    else the validation split, else the test split)."""
    config, fewshot = getattr(task, "config", None), getattr(task, "fewshot_cfg", None)
    if fewshot is not None and fewshot.split is not None:
        return f"its fewshot_split {fewshot.split!r}"
    if fewshot is not None and getattr(config, "fewshot_config", None) is not None and fewshot.samples is not None:
        return "its fewshot_config samples"
    for has, key in (("has_training_docs", "training_split"), ("has_validation_docs", "validation_split"),
                     ("has_test_docs", "test_split")):
        if getattr(task, has, lambda: False)():
            return f"its {key} {getattr(config, key, None)!r}"
    return "its few-shot documents"


def _scored_among_examples(task: Any) -> bool:
    """Whether the few-shot pool is the evaluation split by name (fewshot_split == test_split): lm-eval
    then draws one example more and drops the item being scored (``fewshot_context``)."""
    fewshot, config = getattr(task, "fewshot_cfg", None), getattr(task, "config", None)
    return fewshot is not None and fewshot.split is not None and fewshot.split == getattr(config, "test_split", None)


def _fewshot_pool(task: Any, shots: int) -> list[tuple[int, Any]]:
    """The records lm-eval may draw a task's ``shots`` examples from, with their positions in the
    split: the sampler's whole pool (the default sampler draws at random from all of it, restricted
    to ``fewshot_indices`` when given); ``first_n`` takes the first ones in order (one more when the
    item being scored may be among them), ignoring the indices."""
    from lm_eval.api.samplers import FirstNSampler

    sampler = task.sampler
    pool = list(enumerate(sampler.df or []))
    if isinstance(sampler, FirstNSampler):
        return pool[:shots + _scored_among_examples(task)]
    indices = getattr(sampler, "fewshot_indices", None)
    if indices and not getattr(sampler, "_loaded", False):  # once loaded, df holds the indexed records
        pool = [pool[i] for i in indices]
    return pool


def _check_fewshot(name: str, task: Any, shots: int) -> None:
    """The few-shot side of :func:`check_items`: the pool exists, is large enough, and every record lm-eval
    may draw as an example renders as one. lm-eval builds the examples with the model loaded: a bad
    record drawn there was a 14-frame traceback in the middle of the stock run (review 44), also when
    the scored items (the first --limit) were all sound. The whole pool is checked, not the examples
    lm-eval will draw (its sampler's draws depend on its seeding and order): about 0.5 ms a record
    here (lm-eval renders every template anew; the 100 built-in cloze items as scored items and as
    examples: 113 ms on one thread)."""
    source = _fewshot_source(task)
    if getattr(task, "sampler", None) is None:
        raise EvaluationError(f"task {name} runs {shots}-shot, but has no split to draw the examples from (give "
                              "the task a fewshot_split, or run it with --num-fewshot 0)")
    pool = _fewshot_pool(task, shots)
    own = _scored_among_examples(task)
    if len(pool) < shots + own:
        raise EvaluationError(f"task {name} runs {shots}-shot, but {source} holds {len(pool)} record(s) to draw the "
                              f"examples from (lm-eval needs {shots + own}"
                              f"{', one being the item scored' if own else ''}): lower --num-fewshot")
    for index, doc in pool:
        problem = _checked(task, doc, fewshot=True)
        if problem is not None:
            raise EvaluationError(f"task {name}, few-shot example: item {index} of {source}, which lm-eval may draw "
                                  f"as one of the {shots} examples: {problem} (check the task's data file: each "
                                  "record needs the fields the task reads)")


def check_items(loaded: LoadedTasks, limit: int | None = None) -> None:
    """Check the items each task will score (the first ``limit``), before any model loads: every
    problem is an EvaluationError naming the task and the item (its position in the task's data).

    A task set to run few-shot (its ``num_fewshot`` > 0, as :func:`~sinkfix.lmeval.paired.apply_fewshot`
    sets it) also has every record it may draw the examples from checked, whatever ``limit`` says
    (the examples come from the whole split): each as the example lm-eval renders."""
    for name, task in loaded.tasks.items():
        docs = task.eval_docs
        count = len(docs) if limit is None else min(limit, len(docs))
        for index in range(count):
            problem = _checked(task, docs[index])
            if problem is not None:
                raise EvaluationError(f"task {name}, item {index}: {problem} (check the task's data file: each "
                                      "record needs the fields the task reads)")
        shots = int(task.get_config("num_fewshot") or 0) if hasattr(task, "get_config") else 0
        if shots > 0 and task.OUTPUT_TYPE != _ROLLING:  # a rolling task never uses its examples
            _check_fewshot(name, task, shots)
