"""The built-in tasks' items, made from sinkfix's offline text (:mod:`sinkfix.texts`, evaluation split).

Three tasks run with no network and no data files (their YAML files sit in ``sinkfix/lmeval/tasks``
and load these functions through lm-eval's ``custom_dataset`` hook):

* ``sinkfix_prose`` / ``sinkfix_code``: documents cut from the built-in prose (Python language
  reference) and code (standard-library source) at blank lines, spread evenly over the text and
  scored by lm-eval's ``loglikelihood_rolling`` (word / byte perplexity, bits per byte): perplexity
  through lm-eval's own code path.
* ``sinkfix_cloze``: a **synthetic** multiple-choice task made here, not a published benchmark. Each
  item is a passage of the language reference cut just before a frequent word; the choices are that
  word and three other frequent words, taken from the same passage where it has enough of them. It
  exercises the accuracy path (acc, acc_norm, McNemar's test) offline.

The text comes from the running Python installation, so the items differ between Python versions
(the eval report records a hash of the items it used). :func:`export_tasks` writes the same items
as JSONL files plus plain lm-eval task files that read them (``dataset_path: json``).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sinkfix.files import atomic_write_text, check_writable
from sinkfix.texts import domain_text

__all__ = ["documents", "cloze_items", "prose_dataset", "code_dataset", "cloze_dataset", "export_tasks",
           "BUILTIN_TASKS", "DOCUMENTS", "DOC_CHARS", "CLOZE_ITEMS", "CLOZE_CONTEXT_CHARS"]

BUILTIN_TASKS = ("sinkfix_prose", "sinkfix_code", "sinkfix_cloze")
# Sized so that stock + corrected over all three tasks fit the default `sinkfix eval` run on
# SmolLM2-135M on 2 CPU cores (timing: README, "Downstream evaluation").
DOCUMENTS = 12  # per domain
DOC_CHARS = 1500  # a document ends at the first blank line after this many characters (~400 tokens)
CLOZE_ITEMS = 100
CLOZE_CONTEXT_CHARS = 500  # ~120 tokens of passage before the blank
_CLOZE_VOCABULARY = 300  # the candidate words: the most frequent lowercase words of 4-12 letters
_CLOZE_WORD = re.compile(r"(?<= )[a-z]{4,12}(?=[ .,;:\n])")


def _pieces(text: str, chars: int) -> list[str]:
    """Consecutive pieces of ``text`` that end at the first blank line after ``chars`` characters
    (or at a line end after ``2 * chars`` where no blank line comes)."""
    pieces, lines, size = [], [], 0
    for line in text.splitlines():
        lines.append(line)
        size += len(line) + 1
        if (size >= chars and not line.strip()) or size >= 2 * chars:
            pieces.append("\n".join(lines).strip())
            lines, size = [], 0
    if lines and "\n".join(lines).strip():
        pieces.append("\n".join(lines).strip())
    return [p for p in pieces if p]


def _spread(items: list, count: int) -> list:
    """``count`` items evenly spread over ``items`` (the middle of each of ``count`` equal strata)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int((k + 0.5) * step)] for k in range(count)]


# The tasks keep their names; the built-in domains they read are now called pydoc and python.
_BUILTIN_DOMAIN = {"prose": "pydoc", "code": "python"}


def documents(domain: str, count: int = DOCUMENTS, chars: int = DOC_CHARS) -> list[dict[str, Any]]:
    """``count`` documents of about ``chars`` characters from the built-in ``domain`` evaluation text."""
    pieces = _pieces(domain_text(_BUILTIN_DOMAIN.get(domain, domain), "eval"), chars)
    return [{"text": piece, "domain": domain} for piece in _spread(pieces, count)]


def _passage(text: str, end: int, chars: int) -> str:
    """The ``chars`` characters before ``end``, starting at a word boundary, without the trailing space."""
    start = max(0, end - chars)
    while start > 0 and not text[start - 1].isspace():
        start += 1
    return text[start:end].rstrip()


def _distractors(target: str, passage: str, vocabulary: list[str], rng: random.Random) -> list[str]:
    in_passage = sorted({w for w in _CLOZE_WORD.findall(" " + passage) if w in vocabulary and w != target})
    chosen = rng.sample(in_passage, 3) if len(in_passage) >= 3 else in_passage
    others = [w for w in vocabulary if w != target and w not in chosen]
    return chosen + rng.sample(others, 3 - len(chosen))


def cloze_items(count: int = CLOZE_ITEMS, context_chars: int = CLOZE_CONTEXT_CHARS,
                seed: int = 0) -> list[dict[str, Any]]:
    """Synthetic next-word items from the built-in prose: ``{"context", "choices", "gold"}``."""
    text = domain_text("pydoc", "eval")
    words = list(_CLOZE_WORD.finditer(text))
    vocabulary = sorted(w for w, _ in Counter(m.group() for m in words).most_common(_CLOZE_VOCABULARY))
    known = set(vocabulary)
    spots = [m for m in words if m.group() in known and m.start() > context_chars]
    items = []
    for k, spot in enumerate(_spread(spots, count)):
        rng = random.Random(seed * 1_000_003 + k)
        passage = _passage(text, spot.start(), context_chars)
        choices = [spot.group(), *_distractors(spot.group(), passage, vocabulary, rng)]
        rng.shuffle(choices)
        items.append({"context": passage, "choices": choices, "gold": choices.index(spot.group())})
    return items


def _dataset(rows: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# lm-eval calls a task's custom_dataset with the task's metadata as keyword arguments (its version,
# the model arguments, anything given with --metadata): none of them changes the items.
def prose_dataset(**_: Any):
    """``custom_dataset`` of ``sinkfix_prose``."""
    return _dataset(documents("prose"))


def code_dataset(**_: Any):
    """``custom_dataset`` of ``sinkfix_code``."""
    return _dataset(documents("code"))


def cloze_dataset(**_: Any):
    """``custom_dataset`` of ``sinkfix_cloze``."""
    return _dataset(cloze_items())


_ROWS = {"sinkfix_prose": lambda: documents("prose"), "sinkfix_code": lambda: documents("code"),
         "sinkfix_cloze": cloze_items}
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _json_task(builtin_yaml: str, name: str, data_file: Path) -> str:
    """The built-in task file rewritten to read ``data_file`` (``dataset_path: json``) under the name
    ``<name>_jsonl``: the task's prompt and metrics stay defined in one place."""
    out = []
    for line in builtin_yaml.splitlines():
        if line.startswith("task:"):
            out.append(f"task: {name}_jsonl")
        elif line.startswith("tag:"):
            out.append("tag: [sinkfix_jsonl]")
        elif line.startswith("custom_dataset:"):
            out += ["dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:",
                    f"    test: {json.dumps(str(data_file))}"]
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def export_tasks(folder: str | Path) -> list[Path]:
    """Write the built-in tasks' items as ``<task>.jsonl`` and, next to them, ``<task>_jsonl.yaml``
    task files that read them through ``dataset_path: json``. Returns the written paths.

    The folder then works as ``--include-path`` of ``sinkfix eval`` or of lm-eval itself (tasks
    ``sinkfix_prose_jsonl``, ``sinkfix_code_jsonl``, ``sinkfix_cloze_jsonl``, tag ``sinkfix_jsonl``),
    and is a template for tasks on local data. The task files name their data files by absolute path
    (``datasets`` reads a relative ``data_files`` path from the working directory, not from the task
    file): the folder works where it was written; on another machine, or moved, export it again there
    (a copy reads the original's data while that exists, and fails once it does not).
    """
    target = Path(folder).resolve()
    # every file checked before the first is written: a folder standing where the third goes left the
    # first two written (over any earlier export), unsaid
    for name in _ROWS:
        check_writable(target / f"{name}.jsonl")
        check_writable(target / f"{name}_jsonl.yaml")
    written = []
    for name, rows in _ROWS.items():
        data = target / f"{name}.jsonl"
        written.append(atomic_write_text(data, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows())))
        builtin_yaml = (TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        written.append(atomic_write_text(target / f"{name}_jsonl.yaml", _json_task(builtin_yaml, name, data)))
    return written
