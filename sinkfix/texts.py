"""Text that exists offline on any machine with Python, split by domain and by purpose.

Two domains, each with a *calibration* split and a disjoint *evaluation* split drawn from different
sources, so that a profile calibrated on one is judged on text it has never seen:

* ``prose``: calibration = docstrings of a set of standard-library modules; evaluation = the
  language-reference help topics of ``pydoc_data`` (English prose written separately).
* ``code``: calibration = source of one set of standard-library modules; evaluation = source of
  another, disjoint set.

Users can pass their own files (:func:`read_text_file`) or a ``datasets`` text set instead.
:func:`load_texts` is the one loader behind ``sinkfix bench``, ``inspect`` and ``calibrate``: files, a
dataset spec (``NAME[:CONFIG][@SPLIT]``, see :func:`parse_dataset_spec`), or the built-in domains, each
text returned with a line saying where it came from.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from sinkfix.errors import SinkfixError

__all__ = [
    "DOMAINS", "domain_text", "read_text_file", "TextError", "TextSource", "DatasetSpec", "load_texts",
    "parse_dataset_spec", "load_dataset_text", "builtin_texts", "unique_name", "DATASET_MAX_CHARS",
    "DATASET_DEFAULT_SPLIT", "DATASET_HELP", "TEXT_HELP",
]

DOMAINS = ("prose", "code")
Split = Literal["calib", "eval"]

_CODE_MODULES = {
    "calib": ["json.decoder", "csv", "difflib", "shutil", "configparser", "calendar", "string", "queue",
              "pprint", "gettext", "locale", "tarfile"],
    "eval": ["argparse", "textwrap", "fractions", "heapq", "statistics", "dataclasses"],
}
_PROSE_DOC_MODULES = ["collections", "typing", "functools", "re", "os", "subprocess", "logging",
                      "unittest.case", "email.message", "http.client", "asyncio.tasks", "decimal", "pathlib",
                      "inspect", "threading", "socket", "zipfile"]


class TextError(SinkfixError, ValueError):
    """A text source is missing, unreadable or empty."""


def _module_source(name: str) -> str:
    # Read the file from the standard library folder rather than through the import system: some
    # modules (os, codecs, ...) are frozen into the interpreter and report no source file.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    stem = stdlib.joinpath(*name.split("."))
    for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise TextError(f"standard-library module {name} has no Python source under {stdlib}")


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                docs.append(doc)
    return docs


def domain_text(domain: str, split: Split = "eval", max_chars: int | None = None) -> str:
    """The built-in text of ``domain`` ("prose" or "code") for ``split`` ("calib" or "eval")."""
    if domain not in DOMAINS:
        raise TextError(f"unknown domain {domain!r}; built-in domains: {', '.join(DOMAINS)}")
    if split not in ("calib", "eval"):
        raise TextError(f"split must be 'calib' or 'eval', got {split!r}")
    if domain == "code":
        text = "\n\n".join(_module_source(name) for name in _CODE_MODULES[split])
    elif split == "calib":
        text = "\n\n".join(doc for name in _PROSE_DOC_MODULES for doc in _docstrings(_module_source(name)))
    else:
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise TextError("pydoc_data.topics is missing from this Python installation") from None
        text = "\n\n".join(topics[key] for key in sorted(topics))
    return text if max_chars is None else text[:max_chars]


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file with a clear error for missing, unreadable, binary or empty files."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise TextError(f"text file not found: {p}") from None
    except IsADirectoryError:
        raise TextError(f"text path is a directory, not a file: {p}") from None
    except OSError as exc:
        raise TextError(f"cannot read text file {p}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TextError(f"{p} is not UTF-8 text") from None
    if not text.strip():
        raise TextError(f"text file {p} is empty")
    return text


# -- one loader for every command -----------------------------------------------------------------
# A dataset contributes at most this many characters: about 1M tokens at 4 characters per token,
# far more than a default run scores (bench: 4 windows of 512 tokens per domain), while a large set
# is never read whole.
DATASET_MAX_CHARS = 4_000_000
DATASET_DEFAULT_SPLIT = "test"  # held-out data: bench and inspect report on it, nothing is fitted to it

TEXT_HELP = ("UTF-8 text file, one domain each, named by the file stem (a repeated stem becomes NAME-2, "
             "NAME-3, ...); default: the built-in prose and code texts")
DATASET_HELP = (f"a text set of the `datasets` package, NAME[:CONFIG][@SPLIT], e.g. wikitext:wikitext-2-raw-v1 "
                f"or wikitext:wikitext-2-raw-v1@validation (split default '{DATASET_DEFAULT_SPLIT}'); the text "
                f"column's first {DATASET_MAX_CHARS // 1_000_000}M characters make one domain named NAME; needs "
                "the datasets package and network access")

_BUILTIN_SOURCES = {
    ("prose", "eval"): "built-in prose: Python language reference (pydoc_data.topics)",
    ("code", "eval"): "built-in code: Python standard-library source (eval split)",
    ("prose", "calib"): "built-in prose: Python standard-library docstrings (calib split)",
    ("code", "calib"): "built-in code: Python standard-library source (calib split)",
}


@dataclass(frozen=True)
class TextSource:
    """One domain's text and a line of provenance (file path, dataset spec, built-in source)."""

    text: str
    source: str


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``NAME[:CONFIG][@SPLIT]``; ``str()`` gives the spec back with the split spelled out."""

    name: str
    config: str | None = None
    split: str = DATASET_DEFAULT_SPLIT

    def __str__(self) -> str:
        return self.name + (f":{self.config}" if self.config else "") + f"@{self.split}"


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """``NAME[:CONFIG][@SPLIT]`` -> :class:`DatasetSpec`; anything else is a :class:`TextError`.

    The split is cut off first, at the first "@", so a sliced split such as ``train[:1000]`` keeps
    its colon; NAME may contain "/" (``owner/name`` on the hub).
    """
    name_config, at, split = spec.strip().partition("@")
    name, colon, config = name_config.partition(":")
    parts = [name] + ([config] if colon else []) + ([split] if at else [])
    if not all(part and part == part.strip() and not any(c.isspace() for c in part) for part in parts):
        raise TextError(f"dataset spec {spec!r} is not NAME[:CONFIG][@SPLIT], "
                        "e.g. wikitext:wikitext-2-raw-v1@validation")
    return DatasetSpec(name, config or None, split or DATASET_DEFAULT_SPLIT)


def _text_column(data, spec: DatasetSpec) -> str:
    if "text" in data.column_names:
        return "text"
    for column, feature in data.features.items():
        if getattr(feature, "dtype", None) == "string":
            return column
    raise TextError(f"dataset {spec} has no text column (columns: {', '.join(data.column_names)})")


def load_dataset_text(spec: str | DatasetSpec, max_chars: int = DATASET_MAX_CHARS) -> TextSource:
    """The first ``max_chars`` characters of a dataset's text column, non-empty rows joined by newlines.

    Needs the optional ``datasets`` package and, unless the set is cached, the network; every
    failure (package missing, offline, unknown name or split, no text column) is one :class:`TextError`.
    """
    parsed = spec if isinstance(spec, DatasetSpec) else parse_dataset_spec(spec)
    try:
        import datasets  # optional dependency
    except ImportError:
        raise TextError(f"dataset {parsed} needs the 'datasets' package (pip install datasets) and network "
                        "access; use --text FILE for local text") from None
    try:
        data = datasets.load_dataset(parsed.name, parsed.config, split=parsed.split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad split: all one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TextError(f"could not load dataset {parsed}: {first}") from None
    column = _text_column(data, parsed)
    parts, size = [], 0
    for row in data:  # row by row: indexing the column would read all of it, however large the set
        value = row[column]
        if value:
            parts.append(value)
            size += len(value) + 1
            if size > max_chars:
                break
    joined = "\n".join(parts)
    if not joined.strip():
        raise TextError(f"dataset {parsed} column {column!r} is empty")
    cut = f", first {max_chars} characters" if len(joined) > max_chars else ""
    return TextSource(joined[:max_chars], f"dataset {parsed}, column {column!r}{cut}")


def builtin_texts(split: Split = "eval") -> dict[str, TextSource]:
    """The built-in domains (:data:`DOMAINS`) for ``split``: "calib" to fit on, "eval" to judge on."""
    return {domain: TextSource(domain_text(domain, split), _BUILTIN_SOURCES[domain, split]) for domain in DOMAINS}


def unique_name(base: str, taken: Iterable[str]) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first not in ``taken``."""
    taken = set(taken)
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def load_texts(
    files: Iterable[str | os.PathLike[str]] = (),
    dataset: str | None = None,
    split: Split = "eval",
) -> dict[str, TextSource]:
    """Domain name -> :class:`TextSource`, from text files, a dataset spec, or the built-in domains.

    * ``files``: one domain per file, named by its stem; a repeated stem gets ``-2``, ``-3``, ...
    * ``dataset``: ``NAME[:CONFIG][@SPLIT]`` (split default "test"), one domain named NAME with at
      most :data:`DATASET_MAX_CHARS` characters (:func:`load_dataset_text`);
    * neither: the built-in prose and code texts of ``split`` ("eval" or "calib").

    Files and a dataset together are an error, as is anything missing, unreadable or empty: one
    :class:`TextError` each, raised before any model is loaded.
    """
    if split not in ("calib", "eval"):
        raise TextError(f"split must be 'calib' or 'eval', got {split!r}")
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if files and dataset:
        raise TextError("give --text or --dataset, not both")
    if dataset:
        spec = parse_dataset_spec(dataset)
        return {spec.name: load_dataset_text(spec)}
    if not files:
        return builtin_texts(split)
    texts: dict[str, TextSource] = {}
    for path in files:
        name = unique_name(Path(path).stem or "text", texts)
        texts[name] = TextSource(read_text_file(path), str(path))
    return texts
