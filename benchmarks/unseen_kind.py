"""Calibrated profiles on kinds of text that no calibration choice ever saw: Debian changelogs,
shell scripts, manual pages.

    python benchmarks/unseen_kind.py --model smollm2-135m --bos --candidate "mean x1" --candidate "mean x0.5"
    python benchmarks/unseen_kind.py --kind shell --model smollm2-135m --no-bos

The leave-one-domain-out tables (`benchmarks/calibration_lodo.py`) hold each domain out of the
fits and of the selection, but the defaults themselves (the learning rate, the candidate pool) were
chosen by reading those tables, on the same five domains. This script scores the profiles built
from all five domains' saved fits (``--fits-dir``, a ``calibration_lodo.py run`` output) on text of
a kind that none of those choices involved (``--kind``), found on the measuring machine, the first
``--chars-per-file`` characters of each file in name order, so that many files contribute:

* ``changelog``: the changelogs of the installed Debian packages
  (``/usr/share/doc/PACKAGE/changelog.Debian.gz`` or ``changelog.gz``: English release notes,
  maintainer lines, bug numbers);
* ``shell``: the shell scripts among the programs in ``/usr/bin`` and ``/usr/sbin`` (files whose first
  line runs ``sh``, ``bash`` or ``dash``; code in a language none of the five domains holds);
* ``man``: the English manual pages of sections 1 and 8 as installed
  (``/usr/share/man/man1``, ``man8``: roff source from each page's title line, documentation with
  its markup; links and ``.so`` redirections left out).

None is a built-in domain: they exist on some systems only (Debian-based ones for changelogs), and
the script says so when the text is absent.

Protocol: the calibration's windows (512 tokens, BOS first or not, as the fits were made),
non-overlapping, each token scored once, the first ``--windows`` windows. Next to the unpatched
model and the global betas of the leave-one-domain-out tables. Writes JSON and Markdown to
``--out`` (``KIND-MODEL-bos|nobos.json`` and ``.md``) with the list of files and a digest of the text.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import sinkfix
from sinkfix.analysis.calibration import DomainFits
from sinkfix.analysis.lodo import baseline_jobs, evaluate_parameters
from sinkfix.analysis.robust import candidate_parameters, candidates
from sinkfix.evaluate import bos_token_id, make_windows, tokenize
from sinkfix.files import atomic_write_text

DOC_ROOT = Path("/usr/share/doc")
SCRIPT_ROOTS = (Path("/usr/bin"), Path("/usr/sbin"))
MAN_ROOTS = (Path("/usr/share/man/man1"), Path("/usr/share/man/man8"))
# "#!/bin/sh", "#! /bin/bash -e", "#!/usr/bin/env bash"; not perl, python, ...
_SHELL_LINE = re.compile(r"#!\s*\S*/(?:env\s+)?(?:ba|da)?sh(?:\s|$)")
DEFAULT_FITS = Path(__file__).parent / "results" / "calibration_lodo" / "mean-x0.5-pool"
DEFAULT_OUT = Path(__file__).parent / "results" / "unseen_kind"


def changelog_text(root: Path, chars_per_package: int, total_chars: int) -> tuple[str, list[str]]:
    """The first ``chars_per_package`` characters of each package's changelog (the Debian one where
    there is one), in package order, until ``total_chars``; returns the text and the packages used."""
    packages = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = (next((path for path in (root / package / "changelog.Debian.gz", root / package / "changelog.gz")
                   if path.is_file()), None) for package in packages)
    changelogs = [path for path in found if path is not None]
    text, used = _file_heads(changelogs, lambda path, head: True, chars_per_package, total_chars)
    if not used:
        raise SystemExit(f"no package changelogs under {root}: this measurement needs a Debian-based system")
    return text, [Path(path).parent.name for path in used]


def _read_head(path: Path, chars: int) -> str:
    """The first ``chars`` characters of a text file, gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return handle.read(chars)


def _file_heads(paths: list[Path], keep: Callable[[Path, str], bool], chars_per_file: int,
                total_chars: int, body: Callable[[str], str] | None = None) -> tuple[str, list[str]]:
    """The first ``chars_per_file`` characters of each path that ``keep`` accepts, or of ``body`` of it
    (``body`` sees the file's first 64 kB), in the given order, until ``total_chars``; returns the text
    and the paths used."""
    parts, used, size = [], [], 0
    for path in paths:
        try:  # without a body only the head is read (most of /usr/bin is programs, not scripts)
            head = _read_head(path, chars_per_file if body is None else 65536)
        except (OSError, EOFError, ValueError):  # unreadable, truncated or not gzip after all: not text we can use
            continue
        if not head.strip() or not keep(path, head):
            continue
        if body is not None:
            head = body(head)[:chars_per_file]
        parts.append(head.strip() + "\n")
        used.append(str(path))
        size += len(parts[-1])
        if size >= total_chars:
            break
    return "\n".join(parts), used


def _regular_files(roots: tuple[Path, ...]) -> list[Path]:
    """Regular files (no links: a linked file would be read twice) under each root, name order per root."""
    return [path for root in roots if root.is_dir()
            for path in sorted(root.iterdir(), key=lambda p: p.name) if path.is_file() and not path.is_symlink()]


def _is_shell_script(path: Path, head: str) -> bool:
    return bool(_SHELL_LINE.match(head.partition("\n")[0]))


def shell_text(chars_per_file: int, total_chars: int) -> tuple[str, list[str]]:
    """Shell scripts among the installed programs (``SCRIPT_ROOTS``)."""
    text, used = _file_heads(_regular_files(SCRIPT_ROOTS), _is_shell_script, chars_per_file, total_chars)
    if not used:
        raise SystemExit(f"no shell scripts under {', '.join(map(str, SCRIPT_ROOTS))}")
    return text, used


def _from_title(page: str) -> str:
    """A manual page from its title line (``.TH``) on: generated pages (Pod::Man, help2man) open with the
    same roff preamble, which would make the sample mostly one repeated block."""
    title = re.search(r"^\.TH ", page, flags=re.MULTILINE)
    return page if title is None else page[title.start():]


def man_text(chars_per_file: int, total_chars: int) -> tuple[str, list[str]]:
    """English manual pages of sections 1 and 8 (``MAN_ROOTS``), roff source from each page's title
    line; ``.so`` redirections (a page that only points at another) are left out."""
    text, used = _file_heads(_regular_files(MAN_ROOTS), lambda path, head: not head.startswith(".so "),
                             chars_per_file, total_chars, body=_from_title)
    if not used:
        raise SystemExit(f"no manual pages under {', '.join(map(str, MAN_ROOTS))}: this system has none installed")
    return text, used


class _Kind(NamedTuple):
    name: str  # in the Markdown table's title
    source: str  # the record's description of the text; {chars} is the characters per file
    unit: str  # what one entry of the record's list is
    read: Callable[[int, int], tuple[str, list[str]]]  # (chars per file, total chars) -> (text, entries)


KINDS = {
    "changelog": _Kind("Debian changelogs", f"{DOC_ROOT}/PACKAGE/changelog(.Debian).gz, first {{chars}} characters each, "
                       "package-name order", "packages", lambda chars, total: changelog_text(DOC_ROOT, chars, total)),
    "shell": _Kind("shell scripts", f"shell scripts (first line runs sh, bash or dash) in "
                   f"{', '.join(map(str, SCRIPT_ROOTS))}, first {{chars}} characters each, name order", "files", shell_text),
    "man": _Kind("manual pages (sections 1 and 8)", f"manual pages in {', '.join(map(str, MAN_ROOTS))} (roff source "
                 "from the .TH line, no links or .so redirections), first {chars} characters each, name order", "files",
                 man_text),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--candidate", action="append", help="a pool candidate built from all five fits "
                        "(default: every combination of the default pool)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--kind", choices=sorted(KINDS), default="changelog", help="the text (module docstring)")
    parser.add_argument("--chars-per-file", "--chars-per-package", dest="chars_per_file", type=int, default=1500,
                        help="characters read from the start of each file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fits-dir", default=str(DEFAULT_FITS))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tag = f"{args.model}-{'bos' if args.bos else 'nobos'}"
    saved = json.loads((Path(args.fits_dir) / f"fits-{tag}.json").read_text())
    model, tokenizer = sinkfix.load_model(args.model)
    fits = DomainFits.from_dict(saved, tokenizer)
    settings = fits.settings
    # enough characters for the windows at about 3 characters per token, with room to spare
    kind = KINDS[args.kind]
    text, packages = kind.read(args.chars_per_file, args.windows * settings.seq_len * 4)
    ids = tokenize(tokenizer, text)
    windows = make_windows(ids, settings.seq_len, None, bos_token_id(tokenizer) if settings.bos else None, args.windows)
    if len(windows) < args.windows:
        raise SystemExit(f"only {len(windows)} windows of {kind.name}; asked for {args.windows}")
    shape, every = fits.shape, [fits.fits[d].parameters for d in fits.domains]
    names = args.candidate or [c.name for c in candidates() if c.uses_fits]
    # the leave-one-domain-out tables' baselines, named as this record has always named them
    jobs = {"unpatched" if name == "stock" else name: job for (name, _), job in baseline_jobs(shape, args.kind).items()}
    for name in names:
        rule, _, shrink = name.partition(" x")
        try:
            candidate = candidates([(rule, float(shrink))], global_betas=())[-1]
        except ValueError as error:
            raise SystemExit(f"candidate {name!r}: RULE xSHRINK, e.g. 'mean x0.5' ({error})") from None
        jobs[name] = candidate_parameters(candidate, every, shape), args.kind
    started = time.perf_counter()
    nll = evaluate_parameters(model, fits, {args.kind: windows}, jobs)
    seconds = time.perf_counter() - started
    change = {k: math.exp(v - nll["unpatched"]) - 1 for k, v in nll.items()}
    tokens = sum(int((w.labels[1:] != -100).sum()) for w in windows)
    record = {"model": args.model, "bos": bool(settings.bos), "protocol": {**settings.protocol(), "eval_windows": len(windows)},
              "text": {"kind": args.kind, "source": kind.source.format(chars=args.chars_per_file),
                       kind.unit: packages, "chars": len(text),
                       "sha256": hashlib.sha256(text.encode()).hexdigest(), "scored_tokens": tokens,
                       "system": platform.platform()},
              "fits": str(args.fits_dir), "nll": nll, "change": change, "seconds": round(seconds, 1),
              "threads": args.threads, "versions": {"torch": torch.__version__, "sinkfix": sinkfix.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{args.kind}-{tag}.json", json.dumps(record, indent=1) + "\n")
    lines = [f"**{args.model}, {'BOS' if settings.bos else 'no BOS'}**, {kind.name} ({len(packages)} {kind.unit}, "
             f"{tokens} scored tokens, {len(windows)} windows of {settings.seq_len}); unpatched perplexity "
             f"{math.exp(nll['unpatched']):.3f}", "", "| parameters (from all five domains' fits) | perplexity change |",
             "|---|---|"]
    lines += [f"| {k} | {100 * v:+.2f}% |" for k, v in change.items() if k != "unpatched"]
    atomic_write_text(out / f"{args.kind}-{tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
