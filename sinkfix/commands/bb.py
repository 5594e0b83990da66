"""``sinkfix bb``: train small transformers on Bigram-Backcopy and report the extreme-token quantities.

    sinkfix bb                          # the default experiment, a table on stdout
    sinkfix bb --json                   # one JSON object on stdout, progress on stderr
    sinkfix bb --out bb_run/            # bb.json + bb_dynamics.png + bb_final.png
    sinkfix bb --out bb_run/ --no-figures   # bb.json only (no matplotlib needed)
    sinkfix bb --variants adam --steps 300 --layers 1
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from sinkfix.commands import SUMMARIES

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from sinkfix.bb.data import SOURCES
    from sinkfix.bb.train import VARIANTS, TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    parser = subparsers.add_parser(
        "bb",
        help=SUMMARIES["bb"],
        description=(
            "Train small transformers (real transformers models) on the Bigram-Backcopy task of Guo et al. "
            "2024 in three variants (softmax + AdamW, softmax + SGD, ReLU attention + AdamW) and report "
            "attention on BOS for trigger / non-trigger rows, BOS value and residual norm ratios, the BOS "
            "logit gap and the active/dormant detector's accuracy."
        ),
    )
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--steps", type=int, default=defaults["steps"], help=f"training steps (default {defaults['steps']})")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="seed of model init and data (default 0)")
    parser.add_argument("--layers", type=int, default=defaults["layers"], help=f"layers (default {defaults['layers']})")
    parser.add_argument("--width", type=int, default=defaults["width"],
                        help=f"model width, also the one head's width: even with --arch llama (default {defaults['width']})")
    parser.add_argument("--seq-len", type=int, default=defaults["seq_len"],
                        help=f"training / evaluation sequence length, BOS included (default {defaults['seq_len']})")
    parser.add_argument("--batch", type=int, default=defaults["batch"], help=f"batch size (default {defaults['batch']})")
    parser.add_argument("--arch", choices=("gpt2", "llama"), default=defaults["arch"],
                        help=f"transformers architecture (default {defaults['arch']})")
    parser.add_argument("--source", choices=SOURCES, default="prose",
                        help="bigram statistics: built-in prose / code text, or a seeded random Markov matrix")
    parser.add_argument("--eval-every", type=int, default=defaults["eval_every"],
                        help=f"steps between training-dynamics measurements (default {defaults['eval_every']})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    parser.add_argument("--out", metavar="DIR", default=None, help="write bb.json and the PNG figures to DIR")
    parser.add_argument("--no-figures", action="store_true", help="with --out: write bb.json only, no PNG figures")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from sinkfix.bb.report import (
        FIGURE_NAMES, remove_stale_figures, run_experiment, summary_table, to_json, write_figures,
    )
    from sinkfix.bb.train import VARIANTS, TrainConfig, check_width
    from sinkfix.errors import SinkfixError, UsageError
    from sinkfix.files import atomic_write_text, check_writable

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants:  # an empty list would train nothing and report an empty table
        raise UsageError("--variants names no variant; choose from " + ", ".join(VARIANTS))
    for name, value in (("--steps", args.steps), ("--layers", args.layers),
                        ("--batch", args.batch), ("--eval-every", args.eval_every), ("--threads", args.threads)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    check_width(args.arch, args.width, "--width", "--arch")
    if args.seq_len < 4:
        raise UsageError(f"--seq-len must be >= 4, got {args.seq_len}")
    if not -2 ** 63 <= args.seed <= 2 ** 64 - 8:  # torch's generators take [-2**63, 2**64); the task's is seed + 7
        raise UsageError(f"--seed must be in [-2**63, 2**64 - 8], got {args.seed}")
    if args.no_figures and args.out is None:  # no figure is drawn without --out: the option would change nothing
        raise UsageError("--no-figures applies to the figures of --out; without --out no figure is drawn: "
                         "drop --no-figures, or give --out DIR")
    if args.out is not None:
        check_writable(args.out, folder=True)  # before the training, not after it
        for name in (PARTIAL_NAME, "bb.json", *([] if args.no_figures else FIGURE_NAMES)):
            check_writable(Path(args.out) / name)  # a folder in a file's place, likewise
        if (Path(args.out) / PARTIAL_NAME).exists():  # an earlier run's finished variants: kept, not overwritten
            raise UsageError(f"{Path(args.out) / PARTIAL_NAME} holds the finished variants of an earlier run that "
                             "did not complete: move it away, or choose another --out")
        if not args.no_figures:
            from sinkfix.analysis.plots import check_matplotlib

            check_matplotlib()  # likewise: the figures come after the whole training
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        steps=args.steps, seed=args.seed, layers=args.layers, width=args.width, seq_len=args.seq_len,
        batch=args.batch, arch=args.arch, eval_every=min(args.eval_every, args.steps),
    )

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    partial = None if args.out is None else Path(args.out) / PARTIAL_NAME

    def keep_finished(report: dict) -> None:
        """The finished variants, kept while later ones train (an interrupted or failed run of the
        three default variants, ~5 minutes each, lost all of them)."""
        if partial is not None and len(variants) > 1:
            atomic_write_text(partial, to_json(report) + "\n")

    try:
        report = run_experiment(config, variants, source=args.source, progress=progress, on_variant=keep_finished)
    except FloatingPointError as exc:  # a variant diverged: say which, and where its predecessors are
        raise UsageError(f"training diverged: {exc}{_kept(partial)}") from None
    except KeyboardInterrupt:
        if partial is not None and partial.exists():
            progress(f"interrupted{_kept(partial)}")
        raise
    text = to_json(report)
    # the results reach stdout before the files: a file that cannot be written loses nothing printed
    if args.json:
        print(text, flush=True)
    else:
        print(summary_table(report), flush=True)
    if args.out is not None:
        out = Path(args.out)
        atomic_write_text(out / "bb.json", text + "\n")
        progress(f"wrote {out / 'bb.json'}")
        # the run is complete once bb.json holds it: a partial file left beside it (when drawing failed)
        # made the next run into this folder refuse, as if this one had not finished
        partial.unlink(missing_ok=True)
        written: list[Path] = []
        failure = None
        if not args.no_figures:
            try:
                write_figures(report, out, written)
            except Exception as exc:  # noqa: BLE001 - matplotlib broken, a full disk: bb.json is kept, said below
                failure = exc
        for path in written:
            progress(f"wrote {path}")
        # also when drawing failed: an earlier run's figures beside this run's bb.json read as this run's
        for path in remove_stale_figures(out, written):
            progress(f"removed {path} (an earlier run's figure; this run did not draw it)")
        if failure is not None:
            from sinkfix.analysis.plots import PlotError

            reason = str(failure) if isinstance(failure, SinkfixError) else f"{type(failure).__name__}: {failure}"
            drawn = f"; drawn: {', '.join(p.name for p in written)}" if written else "; no figure kept"
            raise PlotError(f"the results are in {out / 'bb.json'}, but the figures could not be drawn "
                             f"({reason}){drawn}")
    return 0


#: The finished variants of a run in progress (removed when the run completes).
PARTIAL_NAME = "bb.partial.json"


def _kept(partial: Path | None) -> str:
    return f"; the finished variants are in {partial}" if partial is not None and partial.exists() else ""
