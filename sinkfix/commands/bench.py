"""``sinkfix bench``: perplexity, extreme-token metrics, speed and memory, stock vs patched, in one run.

With no arguments it benchmarks the offline SmolLM2-135M on the built-in pydoc and python texts
(Python documentation and Python source; `sinkfix.texts.QUICK_DOMAINS`):
stock, the identity patch, sink_scale=0.9 and drop. The defaults are sized for a few minutes on
an idle 2-core CPU (measured wall times: README, "Measured results").
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from typing import Callable, Iterator

from sinkfix.commands import PATH_LINE, StoreOnce, SUMMARIES
from sinkfix.bench.config import DEFAULT_POLICIES, BenchConfig
from sinkfix.bench.runner import run_bench
from sinkfix.models import DEFAULT_MODEL, OFFLINE_MODELS
from sinkfix.texts import DATASET_HELP, QUICK_DOMAINS, TEXT_HELP


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    defaults = BenchConfig()
    p = subparsers.add_parser(
        "bench",
        help=SUMMARIES["bench"],
        description=(
            "Measure perplexity per domain, extreme-token metrics (sink share, residual peak, value drain), "
            "prefill/decode speed and peak memory of the stock model and of patched variants, in one process. "
            f"Without --policy/--profile the variants are: stock, identity, {', '.join(DEFAULT_POLICIES)}."
        ),
        epilog="The JSON layout is documented in sinkfix/bench/schema.md (schema 'sinkfix.bench/1').",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help=f"offline model ({', '.join(OFFLINE_MODELS)}), local folder or hub id (default: %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--profile", action=StoreOnce, metavar="FILE", help="a calibrated profile (sinkfix calibrate) to benchmark")
    which.add_argument("--policy", action="append", default=[], metavar="SPEC",
                       help="a policy such as sink_scale=0.9 or drop or virtual_sink_logit=0; repeatable")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", nargs="+", action="extend", default=[], metavar="FILE",
                        help=f"{TEXT_HELP} {', '.join(QUICK_DOMAINS)} (evaluation split); several files per option; "
                             "a stem 'all' is numbered (all-2): 'all' is the column of every text pooled")
    source.add_argument("--dataset", metavar="NAME[:CONFIG][@SPLIT]", action=StoreOnce, help=DATASET_HELP)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, metavar="N",
                   help="window length in tokens, BOS included (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None, metavar="N", help="window stride (default: non-overlapping)")
    p.add_argument("--max-windows", type=int, default=defaults.max_windows, metavar="N",
                   help="windows per domain, 0 = all (default: %(default)s)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend the tokenizer's BOS to every window (default: what the --profile was calibrated "
                        "with, else what the tokenizer does; SmolLM2 adds none)")
    p.add_argument("--batch", type=int, default=defaults.batch, metavar="N", help="batch size (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens, metavar="N",
                   help="new tokens per timed generate call, 0 = skip decode (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=defaults.repeats, metavar="N",
                   help="timed prefill rounds per variant (default: %(default)s)")
    # None = left out: given with --decode-tokens 0 it is refused (config_from_args), not recorded unused
    p.add_argument("--decode-repeats", type=int, default=None, metavar="N",
                   help=f"timed generate rounds per variant (default: {defaults.decode_repeats}; "
                        "not with --decode-tokens 0)")
    p.add_argument("--baseline", choices=("sdpa", "eager"), default=defaults.baseline,
                   help="attention of the stock model (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default=defaults.backend,
                   help="kernel backend of the patched model (default: %(default)s)")
    p.add_argument("--device", default=defaults.device, help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--out", metavar="DIR", help="write results.json, results.csv and PNG plots here "
                                                "(checked before the model loads)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout, nothing else")
    p.set_defaults(run=run)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from sinkfix.errors import UsageError

    decode_repeats = args.decode_repeats
    if decode_repeats is not None and args.decode_tokens == 0:
        # accepted, it was recorded in the results' config next to a decode that never ran
        raise UsageError(f"--decode-repeats {decode_repeats} has no effect with --decode-tokens 0 (no decode is "
                         "timed): leave one of the two out")
    return BenchConfig(
        model=args.model, policies=tuple(args.policy), profile=args.profile, texts=tuple(args.text),
        dataset=args.dataset, seq_len=args.seq_len, stride=args.stride, batch=args.batch,
        max_windows=args.max_windows, bos=args.bos, decode_tokens=args.decode_tokens, repeats=args.repeats,
        decode_repeats=BenchConfig.decode_repeats if decode_repeats is None else decode_repeats,
        baseline=args.baseline, backend=args.backend, device=args.device,
        threads=args.threads,
    )


def _progress_factory(console) -> Callable[[str, int], contextlib.AbstractContextManager]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def task(description: str, total: int) -> Iterator[Callable[[int], None]]:
        # one short-lived bar per step: no live display is active while the model loads (the GGUF
        # loader draws its own bar on stderr)
        columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            tid = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(tid, n)
            progress.update(tid, completed=total)

    return task


def _log_to(console) -> Callable[[str], None]:
    from rich.markup import escape

    # messages hold model and file names: "[...]" in them is text, not rich markup
    return lambda message: console.print(f"[dim]{escape(message)}[/dim]")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    config = config_from_args(args)
    if args.out:
        from sinkfix.bench.report import check_outputs

        check_outputs(args.out)  # the folder and every file it will hold, before the measurements
    err = Console(stderr=True, width=shutil.get_terminal_size((140, 24)).columns)
    interactive = sys.stderr.isatty()
    progress = _progress_factory(err) if interactive else None
    log = _log_to(err) if interactive else None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not interactive:
        # transformers draws tqdm bars on stderr while loading (GGUF de-quantisation, weights):
        # noise in a log file or CI, and it would bury the one-line error of a failed run
        hf_logging.disable_progress_bar()
    try:
        results = run_bench(config, progress=progress, log=log)
    finally:
        if bars and not interactive:
            hf_logging.enable_progress_bar()

    # the results reach the screen before any file is written: a write that fails anyway (a full
    # disk) ends the run with exit code 2, not with the measurements lost. A screen that goes away
    # first (`| head` closed the pipe) does not keep the files from being written: the CLI's standard
    # output then leads to the null device, and the CLI says so after the run (sinkfix.cli)
    _print_results(results, args.json)
    if args.out:
        from sinkfix.bench.report import write_outputs

        files, notes = write_outputs(args.out, results)
        for note in notes:  # what the folder lacks or lost is news in a log file too, not only on a terminal
            err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
        if not args.json:
            Console().print("wrote " + ", ".join(str(f) for f in files), **PATH_LINE)
    return 0


def _print_results(results: dict, as_json: bool) -> None:
    """Print the results: JSON, or the tables at least 100 columns wide."""
    if as_json:
        from sinkfix.bench.report import dumps

        sys.stdout.write(dumps(results) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console

    from sinkfix.bench.report import render

    render(results, Console(width=max(shutil.get_terminal_size((140, 24)).columns, 100)))
