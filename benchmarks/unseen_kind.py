"""Calibrated profiles on a kind of text that no calibration choice ever saw: Debian changelogs.

    python benchmarks/unseen_kind.py --model smollm2-135m --bos --candidate "mean x1" --candidate "mean x0.5"

The leave-one-domain-out tables (`benchmarks/calibration_lodo.py`) hold each domain out of the
fits and of the selection, but the defaults themselves (the learning rate, the candidate pool) were
chosen by reading those tables, on the same five domains. This script scores the profiles built
from all five domains' saved fits (``--fits-dir``, a ``calibration_lodo.py run`` output) on text of
a sixth kind that none of those choices involved: the changelogs of the Debian packages installed
on the measuring machine (``/usr/share/doc/PACKAGE/changelog.Debian.gz`` or ``changelog.gz``:
English release notes, maintainer lines, bug numbers), the first ``--chars-per-package`` characters
of each package's file in package-name order, so that many packages contribute. It is not a
built-in domain: it exists on Debian-based systems only, and the script says so when it is absent.

Protocol: the calibration's windows (512 tokens, BOS first or not, as the fits were made),
non-overlapping, each token scored once, the first ``--windows`` windows. Next to the unpatched
model and the global betas of the leave-one-domain-out tables. Writes JSON and Markdown to
``--out`` with the package list and a digest of the text.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import sinkfix
from sinkfix.analysis.calibration import DomainFits
from sinkfix.analysis.lodo import GLOBAL_SWEEP, evaluate_parameters
from sinkfix.analysis.robust import candidate_parameters, candidates
from sinkfix.evaluate import bos_token_id, make_windows, tokenize
from sinkfix.files import atomic_write_text

DOC_ROOT = Path("/usr/share/doc")
DEFAULT_FITS = Path(__file__).parent / "results" / "calibration_lodo" / "mean-x0.5-pool"
DEFAULT_OUT = Path(__file__).parent / "results" / "unseen_kind"


def changelog_text(root: Path, chars_per_package: int, total_chars: int) -> tuple[str, list[str]]:
    """The first ``chars_per_package`` characters of each package's changelog, in package order,
    until ``total_chars``; returns the text and the packages used."""
    parts, used, size = [], [], 0
    for package in sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for name in ("changelog.Debian.gz", "changelog.gz"):
            path = root / package / name
            if path.is_file():
                with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                    chunk = handle.read(chars_per_package)
                parts.append(chunk.strip() + "\n")
                used.append(package)
                size += len(parts[-1])
                break
        if size >= total_chars:
            break
    if not parts:
        raise SystemExit(f"no package changelogs under {root}: this measurement needs a Debian-based system")
    return "\n".join(parts), used


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--candidate", action="append", help="a pool candidate built from all five fits "
                        "(default: every combination of the default pool)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--chars-per-package", type=int, default=1500)
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
    text, packages = changelog_text(DOC_ROOT, args.chars_per_package, args.windows * settings.seq_len * 4)
    ids = tokenize(tokenizer, text)
    windows = make_windows(ids, settings.seq_len, None, bos_token_id(tokenizer) if settings.bos else None, args.windows)
    if len(windows) < args.windows:
        raise SystemExit(f"only {len(windows)} windows of changelog text; asked for {args.windows}")
    shape, every = fits.shape, [fits.fits[d].parameters for d in fits.domains]
    names = args.candidate or [c.name for c in candidates() if c.uses_fits]
    jobs = {"unpatched": ((torch.ones(shape), None), "changelog")}
    jobs.update({f"global {b:g}": ((torch.full(shape, b), None), "changelog") for b in GLOBAL_SWEEP})
    for name in names:
        rule, _, shrink = name.partition(" x")
        try:
            candidate = candidates([(rule, float(shrink))], global_betas=())[-1]
        except ValueError as error:
            raise SystemExit(f"candidate {name!r}: RULE xSHRINK, e.g. 'mean x0.5' ({error})") from None
        jobs[name] = candidate_parameters(candidate, every, shape), "changelog"
    started = time.perf_counter()
    nll = evaluate_parameters(model, fits, {"changelog": windows}, jobs)
    seconds = time.perf_counter() - started
    change = {k: math.exp(v - nll["unpatched"]) - 1 for k, v in nll.items()}
    tokens = sum(int((w.labels[1:] != -100).sum()) for w in windows)
    record = {"model": args.model, "bos": bool(settings.bos), "protocol": {**settings.protocol(), "eval_windows": len(windows)},
              "text": {"source": f"{DOC_ROOT}/PACKAGE/changelog(.Debian).gz, first {args.chars_per_package} characters "
                       "each, package-name order", "packages": packages, "chars": len(text),
                       "sha256": hashlib.sha256(text.encode()).hexdigest(), "scored_tokens": tokens,
                       "system": platform.platform()},
              "fits": str(args.fits_dir), "nll": nll, "change": change, "seconds": round(seconds, 1),
              "threads": args.threads, "versions": {"torch": torch.__version__, "sinkfix": sinkfix.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"changelog-{tag}.json", json.dumps(record, indent=1) + "\n")
    lines = [f"**{args.model}, {'BOS' if settings.bos else 'no BOS'}**, Debian changelogs ({len(packages)} packages, "
             f"{tokens} scored tokens, {len(windows)} windows of {settings.seq_len}); unpatched perplexity "
             f"{math.exp(nll['unpatched']):.3f}", "", "| parameters (from all five domains' fits) | perplexity change |",
             "|---|---|"]
    lines += [f"| {k} | {100 * v:+.2f}% |" for k, v in change.items() if k != "unpatched"]
    atomic_write_text(out / f"changelog-{tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
