"""Text that exists offline on any machine with Python and sinkfix's dependencies, split by domain and purpose.

Five built-in domains (:data:`DOMAINS`), each with a *calibration* split and a disjoint *evaluation*
split drawn from different sources, so that a profile calibrated on one is judged on text it has
never seen, and so that a profile can be judged on a whole domain it was not calibrated on
(leave-one-domain-out, ``docs/calibration.md``):

========  =====================================  =============================================
domain    calibration split                      evaluation split
========  =====================================  =============================================
pydoc     docstrings of 17 standard-library      the language-reference help topics of
          modules (English about Python)         ``pydoc_data`` (written separately)
python    source of 12 standard-library modules  source of 6 other standard-library modules
readme    long descriptions (README, Markdown)   the same of other packages (rich, tqdm, numpy,
          of torch, transformers, accelerate,    sympy, regex, networkx, jinja2, mpmath, fsspec)
          huggingface_hub, tokenizers, ...
legal     the license files torch ships          license files of numpy, sympy, packaging, ...
          (its own and its third-party code's)   and Python's LICENSE.txt, less every paragraph
                                                 that also occurs in the calibration split
cpp       C++ headers of PyTorch's c10 library   numpy's C API headers
========  =====================================  =============================================

Package texts come from the installed distributions (``importlib.metadata``), so they follow the
installed versions; :func:`domain_source` names what was read. A package that is not installed is
skipped and left out of that line. The old names ``prose`` (= ``pydoc``: it was never general prose)
and ``code`` (= ``python``) still work and warn.

Users can pass their own files (:func:`read_text_file`) or a ``datasets`` text set instead.
:func:`load_texts` is the one loader behind ``sinkfix bench``, ``inspect`` and ``calibrate``: files, a
dataset spec (``NAME[:CONFIG][@SPLIT]``, see :func:`parse_dataset_spec`), or built-in domains, each
text returned with a line saying where it came from.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

from sinkfix.errors import SinkfixError
from sinkfix.files import UTF16_BOMS, nul_problem, utf8_problem

__all__ = [
    "DOMAINS", "QUICK_DOMAINS", "DOMAIN_ALIASES", "domain_text", "domain_source", "resolve_domain", "read_text_file",
    "TextError", "TextSource", "DatasetSpec", "load_texts", "parse_dataset_spec", "load_dataset_text",
    "builtin_texts", "mixed_text", "MIXED", "unique_name", "POOLED_NAME", "DATASET_MAX_CHARS", "DATASET_DEFAULT_SPLIT", "DATASET_HELP", "TEXT_HELP",
]

Split = Literal["calib", "eval"]
SPLITS = ("calib", "eval")

_CODE_MODULES = {
    "calib": ["json.decoder", "csv", "difflib", "shutil", "configparser", "calendar", "string", "queue",
              "pprint", "gettext", "locale", "tarfile"],
    "eval": ["argparse", "textwrap", "fractions", "heapq", "statistics", "dataclasses"],
}
_PROSE_DOC_MODULES = ["collections", "typing", "functools", "re", "os", "subprocess", "logging",
                      "unittest.case", "email.message", "http.client", "asyncio.tasks", "decimal", "pathlib",
                      "inspect", "threading", "socket", "zipfile"]
# Every package named here is a dependency of sinkfix or of one of its dependencies (torch, transformers).
_README_PACKAGES = {
    "calib": ["torch", "transformers", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "gguf"],
    "eval": ["rich", "tqdm", "numpy", "sympy", "regex", "networkx", "jinja2", "mpmath", "fsspec"],
}
_LICENSE_PACKAGES = {
    "calib": ["torch"],
    "eval": ["numpy", "sympy", "packaging", "typing_extensions", "tqdm", "rich", "jinja2", "markupsafe",
             "networkx", "mpmath", "regex", "filelock", "fsspec", "pyyaml", "transformers", "huggingface_hub"],
}
_LICENSE_FILE = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE)[^/]*$", re.IGNORECASE)
# The c10 headers alone are 1.7 MB; a calibration reads at most a few hundred kB of any domain.
_MAX_FILE_CHARS = 400_000


class TextError(SinkfixError, ValueError):
    """A text source is missing, unreadable or empty."""


# -- sources ------------------------------------------------------------------------------------
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


def _pydoc(split: Split) -> tuple[str, str]:
    if split == "calib":
        text = "\n\n".join(doc for name in _PROSE_DOC_MODULES for doc in _docstrings(_module_source(name)))
        return text, f"docstrings of {len(_PROSE_DOC_MODULES)} standard-library modules"
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise TextError("pydoc_data.topics is missing from this Python installation") from None
    return "\n\n".join(topics[key] for key in sorted(topics)), "Python language reference (pydoc_data.topics)"


def _python(split: Split) -> tuple[str, str]:
    names = _CODE_MODULES[split]
    return "\n\n".join(_module_source(name) for name in names), f"source of standard-library {', '.join(names)}"


def _installed(names: Iterable[str]) -> list[importlib.metadata.Distribution]:
    found = []
    for name in names:
        try:
            found.append(importlib.metadata.distribution(name))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _describe(dists: list[importlib.metadata.Distribution]) -> str:
    return ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists)


def _readme(split: Split) -> tuple[str, str]:
    dists = [d for d in _installed(_README_PACKAGES[split]) if len(_long_description(d)) > 200]
    text = "\n\n".join(_long_description(d) for d in dists)
    return text, f"package long descriptions (METADATA) of {_describe(dists)}"


def _long_description(dist: importlib.metadata.Distribution) -> str:
    meta = dist.metadata
    return (meta.get_payload() or meta.get("Description") or "").strip()


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _paragraph_key(paragraph: str) -> str:
    return " ".join(paragraph.split()).lower()


def _license_paragraphs(dists: list[importlib.metadata.Distribution], extra: list[Path]) -> list[str]:
    """Paragraphs of every license file, each distinct paragraph once (torch ships ten Apache 2.0 copies)."""
    seen, out = set(), []
    for path in [*extra, *(Path(d.locate_file(f)) for d in dists for f in sorted(d.files or [], key=str)
                          if _LICENSE_FILE.search(str(f)))]:
        if not path.is_file():
            continue
        for paragraph in _paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            key = _paragraph_key(paragraph)
            if key not in seen:
                seen.add(key)
                out.append(paragraph)
    return out


def _legal(split: Split) -> tuple[str, str]:
    calib = _installed(_LICENSE_PACKAGES["calib"])
    if split == "calib":
        where = f"license files of {_describe(calib)} (third-party included)"
        return "\n\n".join(_license_paragraphs(calib, [])), where
    python_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    dists = _installed(_LICENSE_PACKAGES["eval"])
    seen = {_paragraph_key(p) for p in _license_paragraphs(calib, [])}
    kept = [p for p in _license_paragraphs(dists, [python_license]) if _paragraph_key(p) not in seen]
    python = "Python (LICENSE.txt), " if python_license.is_file() else ""
    return "\n\n".join(kept), (f"license files of {python}{_describe(dists)}, without the paragraphs that "
                                f"also occur in the calibration split")


def _header_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".h", ".hpp") and p.is_file())


def _header_root(split: Split) -> tuple[Path, Path, str]:
    """(folder, its package's folder, what it is): torch's c10 headers to calibrate on, numpy's C API
    headers to evaluate on."""
    if split == "calib":
        import torch

        package = Path(torch.__file__).parent
        return package / "include" / "c10", package, "C++ headers of PyTorch's c10 library"
    import numpy

    package = Path(numpy.__file__).parent
    candidates = (package / "_core" / "include" / "numpy", package / "core" / "include" / "numpy")  # numpy 2 / 1
    return next((r for r in candidates if r.is_dir()), candidates[0]), package, "C API headers of numpy"


def _cpp(split: Split) -> tuple[str, str]:
    root, package, what = _header_root(split)
    parts, size = [], 0
    for path in _header_files(root) if root.is_dir() else []:
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size > _MAX_FILE_CHARS:
            break
    return "\n\n".join(parts), f"{what} ({len(parts)} files under {root.relative_to(package.parent)})"


@dataclass(frozen=True)
class _Domain:
    name: str
    kind: str  # one line: what kind of text it is
    build: Callable[[Split], tuple[str, str]]  # split -> (text, where it came from)


_DOMAINS = {d.name: d for d in (
    _Domain("pydoc", "English documentation of Python", _pydoc),
    _Domain("python", "Python source code", _python),
    _Domain("readme", "package READMEs (Markdown / reStructuredText)", _readme),
    _Domain("legal", "license texts", _legal),
    _Domain("cpp", "C and C++ headers", _cpp),
)}
DOMAINS = tuple(_DOMAINS)
# The two Python domains: what `sinkfix bench` scores by default (it runs every variant on every domain).
QUICK_DOMAINS = ("pydoc", "python")
# Old names: "prose" was Python documentation all along, "code" Python source.
DOMAIN_ALIASES = {"prose": "pydoc", "code": "python"}


def resolve_domain(name: str) -> str:
    """The built-in domain ``name`` stands for; old names warn, unknown names are a :class:`TextError`."""
    if name in DOMAIN_ALIASES:
        new = DOMAIN_ALIASES[name]
        # FutureWarning, not DeprecationWarning: Python's default filters hide the latter outside
        # __main__, so someone typing `--domain prose` would never learn of the new name.
        warnings.warn(f"built-in domain {name!r} is now called {new!r}", FutureWarning, stacklevel=3)
        return new
    if name not in _DOMAINS:
        raise TextError(f"unknown domain {name!r}; built-in domains: {', '.join(DOMAINS)}")
    return name


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TextError(f"split must be 'calib' or 'eval', got {split!r}")


@functools.lru_cache(maxsize=None)
def _built(domain: str, split: Split) -> tuple[str, str]:
    text, where = _DOMAINS[domain].build(split)
    if not text.strip():
        raise TextError(f"built-in domain {domain!r} ({split} split) found no text: {where}")
    return text, where


def domain_text(domain: str, split: Split = "eval", max_chars: int | None = None) -> str:
    """The built-in text of ``domain`` (one of :data:`DOMAINS`) for ``split`` ("calib" or "eval")."""
    domain = resolve_domain(domain)
    _check_split(split)
    text = _built(domain, split)[0]
    return text if max_chars is None else text[:max_chars]


def domain_source(domain: str, split: Split = "eval") -> str:
    """One line of provenance: which files or packages the built-in text of ``domain`` / ``split`` is."""
    domain = resolve_domain(domain)
    _check_split(split)
    return f"built-in {domain} ({_DOMAINS[domain].kind}, {split} split): {_built(domain, split)[1]}"


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
    nul = data.find(b"\x00")
    if nul >= 0 and not data.startswith(UTF16_BOMS):
        # checked before decoding: a tar archive or UTF-16 without a byte-order mark can decode and was
        # calibrated on, its padding as validation windows; a program (ELF) fails to decode further on
        # and was named as text with one stray byte to convert
        raise TextError(f"{p} is not UTF-8 text: {nul_problem(data, nul)}")
    try:
        # utf-8-sig: a byte-order mark at the start (Windows editors write one) is not text; read as
        # UTF-8 it was tokenized as three byte tokens before the first word (and without a BOS token
        # became the sink: SmolLM2, 63 tokens, sink_scale=0.9 changed perplexity by +6.31% against
        # -0.95% without the mark)
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # where: a Latin-1 "é" deep in a long file is found by its line
        raise TextError(f"{p} is not UTF-8 text: {utf8_problem(data)}; convert the file to UTF-8 first "
                        "(iconv -f ITS-ENCODING -t utf-8)") from None
    if not text.strip():
        raise TextError(f"text file {p} is empty")
    return text


# -- one loader for every command -----------------------------------------------------------------
# A dataset contributes at most this many characters: about 1M tokens at 4 characters per token,
# far more than a default run scores (bench: 4 windows of 512 tokens per domain), while a large set
# is never read whole.
DATASET_MAX_CHARS = 4_000_000
DATASET_DEFAULT_SPLIT = "test"  # held-out data: bench and inspect report on it, nothing is fitted to it

TEXT_FILE_HELP = ("UTF-8 text file, one domain each, named by the file stem (a repeated stem becomes NAME-2, "
                  "NAME-3, ..., never another file's stem)")
TEXT_HELP = f"{TEXT_FILE_HELP}; default: the built-in domains"
DATASET_HELP = (f"a text set of the `datasets` package, NAME[:CONFIG][@SPLIT], e.g. wikitext:wikitext-2-raw-v1 "
                f"or wikitext:wikitext-2-raw-v1@validation (split default '{DATASET_DEFAULT_SPLIT}'); the text "
                f"column's first {DATASET_MAX_CHARS // 1_000_000}M characters make one domain named NAME; needs "
                "the datasets package and network access")

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


def _offline_if_unreachable() -> bool:
    """:func:`sinkfix.models.offline_if_unreachable` while it still matters: before ``datasets`` is
    first imported (it reads the switches then). Returns whether it switched."""
    from sinkfix.models import offline_if_unreachable

    return "datasets" not in sys.modules and offline_if_unreachable()


def load_dataset_text(spec: str | DatasetSpec, max_chars: int = DATASET_MAX_CHARS) -> TextSource:
    """The first ``max_chars`` characters of a dataset's text column, non-empty rows joined by newlines.

    Needs the optional ``datasets`` package and, unless the set is cached, the network; every
    failure (package missing, offline, unknown name or split, no text column) is one :class:`TextError`.
    """
    parsed = spec if isinstance(spec, DatasetSpec) else parse_dataset_spec(spec)
    unreachable = _offline_if_unreachable()
    try:
        import datasets  # optional dependency
    except ImportError:
        raise TextError(f"dataset {parsed} needs the 'datasets' package (pip install datasets) and network "
                        "access; use --text FILE for local text") from None
    try:
        data = datasets.load_dataset(parsed.name, parsed.config, split=parsed.split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad split: all one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = "; the hub cannot be reached from here: use --text FILE, or a dataset already cached" if unreachable else ""
        raise TextError(f"could not load dataset {parsed}: {first}{hint}") from None
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


def builtin_texts(split: Split = "eval", domains: Iterable[str] | None = None) -> dict[str, TextSource]:
    """Built-in domains (default: all of :data:`DOMAINS`) for ``split``: "calib" to fit on, "eval" to judge on."""
    _check_split(split)
    names = [resolve_domain(d) for d in (DOMAINS if domains is None else domains)]
    if len(set(names)) != len(names):
        raise TextError(f"a built-in domain is named twice: {', '.join(names)}")
    return {d: TextSource(domain_text(d, split), domain_source(d, split)) for d in names}


MIXED = "mixed"


def mixed_text(split: Split = "eval", domains: Iterable[str] | None = None, seed: int = 0) -> TextSource:
    """Every paragraph of the built-in domains' ``split`` text, in one random order drawn with ``seed``.

    A long text whose kind does not drift along its length: any stretch of a few thousand tokens is
    a random sample of the same paragraphs, so perplexity measured along a stream changes with the
    model or the cache, not because the text gets easier (a single document usually does: the
    language reference's perplexity falls by a fifth from its first 4k tokens to its fifth), or
    because one kind of text comes in a long run (interleaving whole blocks of each domain in turn
    left segment perplexities between 3.6 and 7.4 on SmolLM2)."""
    import random

    _check_split(split)
    names = [resolve_domain(d) for d in (DOMAINS if domains is None else domains)]
    paragraphs = [p for d in names for p in _paragraphs(domain_text(d, split))]
    random.Random(seed).shuffle(paragraphs)
    return TextSource("\n\n".join(paragraphs), f"built-in {MIXED} ({split} split): the paragraphs of "
                      f"{', '.join(names)} in one random order (seed {seed})")


# the name of every domain's scored tokens pooled (sinkfix bench's "all" column): no text domain takes it
POOLED_NAME = "all"


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
    domains: Iterable[str] | None = None,
    reserved: Iterable[str] = (),
) -> dict[str, TextSource]:
    """Domain name -> :class:`TextSource`, from text files, a dataset spec, or the built-in domains.

    * ``files``: one domain per file, named by its stem; a repeated stem gets ``-2``, ``-3``, ... (the
      first not taken by any file's stem), as does a stem in ``reserved`` (a name the caller uses itself: ``sinkfix bench`` reserves
      :data:`POOLED_NAME`, its column of every domain pooled), numbered past every other file's stem;
    * ``dataset``: ``NAME[:CONFIG][@SPLIT]`` (split default "test"), one domain named NAME with at
      most :data:`DATASET_MAX_CHARS` characters (:func:`load_dataset_text`);
    * neither: the built-in ``domains`` (default: all of :data:`DOMAINS`) of ``split`` ("eval" or "calib").

    Files, a dataset and built-in ``domains``: more than one of them is an error, as is anything
    missing, unreadable or empty: one
    :class:`TextError` each, raised before any model is loaded.
    """
    _check_split(split)
    if dataset is not None and not str(dataset).strip():
        # an unset shell variable (--dataset "$DATA") measured the built-in texts, unsaid
        raise TextError("--dataset is empty: name a dataset, or leave the option out for the built-in texts")
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if any(not str(path).strip() for path in files):
        # an unset shell variable (--text "$FILE") was read as the path "." and refused as "a directory"
        raise TextError("--text is empty: name a text file, or leave the option out for the built-in texts")
    if files and dataset:
        raise TextError("give --text or --dataset, not both")
    if (files or dataset) and domains is not None:
        raise TextError("give --text, --dataset or --domain, not more than one")
    reserved = list(reserved)
    if dataset:
        spec = parse_dataset_spec(dataset)
        return {unique_name(spec.name, reserved): load_dataset_text(spec)}
    if not files:
        return builtin_texts(split, domains)
    stems = [Path(path).stem or "text" for path in files]
    texts: dict[str, TextSource] = {}
    for path, stem in zip(files, stems):
        # a file keeps its own stem unless an earlier file or the caller took it; a repeated or reserved
        # stem is numbered past every stem given (all.txt beside all-2.txt is all-3; d1/x.txt, d2/x.txt
        # and x-2.txt are x, x-3 and x-2 in any order): a numbered name never takes another file's stem
        taken = stem in texts or stem in reserved
        name = unique_name(stem, [*texts, *reserved, *stems]) if taken else stem
        texts[name] = TextSource(read_text_file(path), str(path))
    return texts
