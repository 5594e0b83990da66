"""``sinkfix eval``: downstream tasks through lm-evaluation-harness, stock vs corrected, paired.

    sinkfix eval                                              # built-in offline tasks, SmolLM2, sink_scale=0.9
    sinkfix eval --profile smollm2.profile.json --json
    sinkfix eval --tasks lambada_local --include-path ./my_tasks --policy sink_scale=0.8 --limit 200

Needs the optional extra: ``pip install 'sinkfix[eval]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from typing import Iterator

from sinkfix.commands import PATH_LINE, StoreOnce, SUMMARIES
from sinkfix.errors import EvaluationError
from sinkfix.lmeval.builtin import BUILTIN_TASKS
from sinkfix.lmeval.config import DEFAULT_POLICY, EvalConfig
from sinkfix.lmeval.stats import DEFAULT_CONFIDENCE, DEFAULT_ITERATIONS
from sinkfix.models import DEFAULT_MODEL, OFFLINE_MODELS, offline_if_unreachable

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help=SUMMARIES["eval"],
        description="Run lm-evaluation-harness tasks on the stock and on the corrected model (one model load; the "
                    "patch is applied and removed between the runs) and print, per task and metric, stock, "
                    "corrected, delta, a paired-bootstrap interval of the delta and a p-value (McNemar's exact "
                    "test for accuracy, a paired sign-flip test otherwise).",
        epilog="Built-in offline tasks: sinkfix_prose, sinkfix_code (rolling log-likelihood = perplexity), "
               "sinkfix_cloze (synthetic multiple choice); tag 'sinkfix' = all three. JSON layout: "
               "sinkfix/lmeval/schema.md (schema 'sinkfix.eval/1').",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help=f"offline model ({', '.join(OFFLINE_MODELS)}), local folder or hub id (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(BUILTIN_TASKS), metavar="T1,T2",
                   help="lm-eval task, group or tag names, or task YAML files, comma-separated (default: the "
                        "built-in offline tasks, %(default)s)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAML files, as lm-eval's --include_path; repeatable")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--policy", action=StoreOnce, metavar="SPEC", help=f"the correction as a policy spec (default: {DEFAULT_POLICY})")
    which.add_argument("--profile", action=StoreOnce, metavar="FILE", help="the correction as a calibrated profile (sinkfix calibrate)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N items of each task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="N",
                   help="few-shot examples (default: each task's; a task whose config says 0 stays at 0, "
                        "with a note)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="lm-eval batch size (default: %(default)s; on SmolLM2 the built-in tasks give the "
                        "batch-1 results to 4 significant digits, 16%% faster on one CPU thread; a correction "
                        "that pools over a sequence's tokens, content sinks or a relative clip, scores "
                        "log-likelihoods one sequence at a time, with a note)")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="lm-eval's window length in tokens (default: the model's maximum)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_ITERATIONS, metavar="N",
                   help="paired-bootstrap draws (default: %(default)s)")
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, help="interval level (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="kernel backend of the corrected model (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE (atomically)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout, nothing else")
    p.add_argument("--export-tasks", metavar="DIR",
                   help="write the built-in tasks' items as JSONL plus lm-eval task files that read them "
                        "(dataset_path: json) to DIR, and exit")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's own log messages")
    p.set_defaults(run=run)
    return p


@contextlib.contextmanager
def _quiet(verbose: bool, json_only: bool, interactive: bool) -> Iterator[None]:
    """lm-eval's INFO/WARNING messages off unless --verbose; transformers' loading bars only on a
    terminal (in a log they bury a one-line error); with --json, stdout carries only the JSON (anything
    the libraries print goes to stderr)."""
    from transformers.utils import logging as hf_logging

    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars, data_bars = logger.level, hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    if not verbose:
        logger.setLevel(logging.ERROR)
        datasets.disable_progress_bars()  # "Generating test split" for every task
    if not interactive:
        hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr) if json_only else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        if data_bars:
            datasets.enable_progress_bars()


def _config(args: argparse.Namespace) -> EvalConfig:
    extra = {} if args.max_length is None else {"max_length": args.max_length}
    return EvalConfig(
        model=args.model, tasks=tuple(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip())),  # each task once
        include_paths=tuple(args.include_path), policy=args.policy, profile=args.profile, limit=args.limit,
        batch_size=args.batch_size, device=args.device, kernel=args.backend, iterations=args.bootstrap,
        confidence=args.confidence, seed=args.seed, threads=args.threads, num_fewshot=args.num_fewshot, extra=extra,
    )


def _import_lmeval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvaluationError("sinkfix eval needs lm-evaluation-harness: pip install 'sinkfix[eval]'") from None


def _stage_log(console):
    from rich.markup import escape  # a model folder named "m[/x]" raised rich's MarkupError

    return lambda message: console.print(f"[dim]{escape(message)}[/dim]", highlight=False)


def _export(folder: str, console) -> int:
    from sinkfix.lmeval.builtin import export_tasks

    for path in export_tasks(folder):
        console.print(f"wrote {path}", **PATH_LINE)
    return 0


def _check_export_alone(args: argparse.Namespace) -> None:
    """``--export-tasks`` writes files and exits: an evaluation option next to it would be ignored
    (and a bad one never checked), so it is refused, as an empty folder name is."""
    if not args.export_tasks.strip():
        raise EvaluationError("--export-tasks needs a folder, got an empty name")
    defaults = vars(add_parser(argparse.ArgumentParser().add_subparsers()).parse_args([]))
    given = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
             if name in defaults and name not in ("export_tasks", "verbose", "run") and value != defaults[name]]
    if given:
        raise EvaluationError(f"--export-tasks writes the built-in tasks and exits; {', '.join(given)} would be "
                              "ignored: run the export alone")


def _emit(report: dict, args: argparse.Namespace) -> None:
    """The report: to --out (atomically), then as JSON or as the table on stdout."""
    from rich.console import Console

    from sinkfix.files import atomic_write_text
    from sinkfix.lmeval.report import dumps, render

    if args.out:
        atomic_write_text(args.out, dumps(report) + "\n")
    if args.json:
        sys.stdout.write(dumps(report) + "\n")
        return
    render(report, Console(width=max(shutil.get_terminal_size((140, 24)).columns, 120)))
    if args.out:
        print(f"wrote {args.out}")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    err = Console(stderr=True, width=shutil.get_terminal_size((140, 24)).columns)
    if args.export_tasks is not None:
        _check_export_alone(args)
        return _export(args.export_tasks, err)
    config = _config(args)
    config.validate()  # bad arguments fail before lm-eval's imports (several seconds)
    if args.out:
        from sinkfix.files import check_out_is_no_input, check_writable

        check_writable(args.out)  # before the evaluation, not after it
        check_out_is_no_input(args.out, config.input_files())  # the tasks' data files: in run_eval, with the index
    # before lm-eval (and with it datasets) is imported, which reads the switches
    offline_if_unreachable()
    _import_lmeval()
    from sinkfix.lmeval.paired import run_eval

    interactive = sys.stderr.isatty()
    with _quiet(args.verbose, args.json, interactive):
        # notes (a setting not applied as asked) reach stderr in a log file too, not only on a terminal
        report = run_eval(config, log=_stage_log(err) if interactive else lambda _: None,
                          note=lambda text: err.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True),
                          out=args.out)
    _emit(report, args)
    return 0
