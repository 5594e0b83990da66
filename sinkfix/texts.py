"""Text that exists offline on any machine with Python, split by domain and by purpose.

Two domains, each with a *calibration* split and a disjoint *evaluation* split drawn from different
sources, so that a profile calibrated on one is judged on text it has never seen:

* ``prose``: calibration = docstrings of a set of standard-library modules; evaluation = the
  language-reference help topics of ``pydoc_data`` (English prose written separately).
* ``code``: calibration = source of one set of standard-library modules; evaluation = source of
  another, disjoint set.

Users can pass their own files (:func:`read_text_file`) instead.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Literal

from sinkfix.errors import SinkfixError

__all__ = ["DOMAINS", "domain_text", "read_text_file", "TextError"]

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
