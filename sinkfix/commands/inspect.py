"""``sinkfix inspect``: per-layer / per-head extreme-token report, JSON and PNG figures.

    sinkfix inspect --model smollm2-135m                       # every built-in domain
    sinkfix inspect --model smollm2-135m --text a.txt --text b.py --out report/
    sinkfix inspect --dataset wikitext:wikitext-2-raw-v1@validation   # needs `datasets` and network
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sinkfix.commands import MAX_FLIPS_PRINTED, PATH_LINE, StoreOnce, SUMMARIES, bos_for_profile, set_threads
from sinkfix.errors import SinkfixError
from sinkfix.texts import DATASET_HELP, DOMAIN_ALIASES, DOMAINS, TEXT_FILE_HELP, Split, TextError, TextSource, load_texts

if TYPE_CHECKING:  # torch is imported where a command runs, not when the CLI starts
    import torch

__all__ = ["add_parser", "run", "add_common_arguments", "texts_from_args", "describe_texts", "TextSourceError"]

# The error of a text source used to be defined here; it is sinkfix.texts.TextError now.
TextSourceError = TextError


def add_common_arguments(parser: argparse.ArgumentParser, *, default_max_tokens: int | None,
                         split: Split = "eval", protocol_default: str | None = None,
                         bos_default: str | None = None, texts_default: str | None = None,
                         dataset_note: str = "") -> None:
    """Options shared by ``inspect`` and ``calibrate``; ``split`` is the built-in texts' split the command uses.

    ``protocol_default`` (a phrase) makes the window protocol's options (--seq-len, --bos,
    --max-tokens) default to None, described by that phrase: the command fills them in itself;
    ``bos_default`` does so for --bos alone, ``texts_default`` for the texts (--text, --domain: without
    either, the command chooses; default: every built-in domain). ``dataset_note`` ends --dataset's help."""
    from sinkfix.models import DEFAULT_MODEL

    def protocol(value, help_text: str) -> dict:
        if protocol_default is None:
            return {"default": value, "help": f"{help_text} ({'default: yes' if value is True else f'default {value}'})"}
        return {"default": None, "help": f"{help_text} (default: {protocol_default})"}

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"offline model name (smollm2-135m, gemma3-270m), local folder or hub id (default {DEFAULT_MODEL})")
    source = parser.add_mutually_exclusive_group()
    text_help = f"{TEXT_FILE_HELP}; default: {texts_default or 'the built-in domains'}"
    source.add_argument("--text", action="append", metavar="FILE", default=None,
                        help=f"{text_help} ({'calibration' if split == 'calib' else 'evaluation'} split); repeatable")
    dataset_help = DATASET_HELP
    if split == "calib":
        dataset_help += "; to calibrate on a training split, name it (NAME[:CONFIG]@train)"
    dataset_help += dataset_note
    # once: a second --dataset replaced the first, unsaid
    source.add_argument("--dataset", metavar="NAME[:CONFIG][@SPLIT]", default=None, action=StoreOnce, help=dataset_help)
    source.add_argument("--domain", action="append", default=None, choices=DOMAINS + tuple(DOMAIN_ALIASES),
                        metavar="NAME", help=f"a built-in domain ({', '.join(DOMAINS)}); repeatable; default: "
                                             f"{texts_default or 'all'}")
    parser.add_argument("--seq-len", type=int, **protocol(512, "window length in tokens"))
    bos_help = "start every window with the tokenizer's BOS token"
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction,
                        **(protocol(True, bos_help) if bos_default is None else
                           {"default": None, "help": f"{bos_help} (default: {bos_default})"}))
    parser.add_argument("--max-tokens", type=int, **protocol(default_max_tokens, "text tokens used per domain"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def texts_from_args(args: argparse.Namespace, split: Split) -> dict[str, TextSource]:
    """The texts named by --text / --dataset, or the built-in domains (--domain, default all) of ``split``."""
    return load_texts(args.text or (), getattr(args, "dataset", None), split, getattr(args, "domain", None))


def describe_texts(texts: dict[str, TextSource]) -> str:
    return "texts: " + "; ".join(f"{name} ({text.source}, {len(text.text):,} characters)"
                                 for name, text in texts.items())


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect", help=SUMMARIES["inspect"],
        description="Stream texts through the model and report, per layer and head, the sink share, hidden "
                    "sinks, value drain, residual peak and active/dormant state; list heads whose state flips "
                    "between domains. Writes report.json and PNG figures to --out (and removes figures an earlier "
                    "run left there that this run does not draw).",
    )
    add_common_arguments(parser, default_max_tokens=4096, split="eval",
                         bos_default="as the --profile was calibrated, else yes")
    parser.add_argument("--out", default="sinkfix-inspect", help="output folder (default ./sinkfix-inspect)")
    parser.add_argument("--hidden-sink-threshold", type=float, default=0.1,
                        help="ACT criterion: mean attention over the rows that see a key (default 0.1)")
    parser.add_argument("--policy", action=StoreOnce, default=None, help="inspect the model patched with this policy spec, e.g. sink_scale=0.9")
    parser.add_argument("--profile", action=StoreOnce, default=None, help="inspect the model patched with this calibrated profile")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.set_defaults(run=run)
    return parser


def _short(token: str, width: int = 12) -> str:
    text = repr(token)
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def _defined(values) -> "torch.Tensor":
    """The defined (not NaN) entries of a tensor, flattened."""
    return values[~values.isnan()]


def _max(values) -> float:
    """The largest defined entry, NaN (printed "-") when there is none: an undefined sink share
    (n_sink=0) printed as "0.00" while report.json had null."""
    defined = _defined(values)
    return float(defined.max()) if defined.numel() else float("nan")


def _min(values) -> float:
    """The smallest defined entry, NaN (printed "-") when there is none: an undefined value drain
    printed as "inf"."""
    defined = _defined(values)
    return float(defined.min()) if defined.numel() else float("nan")


def print_report(report, console=None, out=None) -> None:
    """Readable per-layer table and the domain-flip table (rich). ``out``: the folder report.json is
    written to, named where the flip table is cut."""
    from pathlib import Path

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    # names, tokens and the model's name as written: a token "[i]" of Python code was read as rich's
    # italic tag and vanished from its cell, a folder "m[/x]" raised MarkupError
    names = list(report.domains)
    overall = report.overall
    p = report.protocol
    table = Table(title=escape(f"{report.model.get('name')} ({report.model.get('architecture')}): "
                               f"{'BOS + ' if p['bos'] else 'no BOS, '}{p['seq_len']}-token windows, "
                               f"{overall.tokens} tokens, policy {p['policy']}"), title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("sink share\nmean / max", justify="right")
    table.add_column("hidden\nsinks/seq", justify="right")
    table.add_column("hidden-sink tokens", overflow="fold", max_width=40)
    table.add_column("drain\nmin", justify="right")
    table.add_column("resid.\npeak x", justify="right")
    table.add_column("peak at", overflow="fold", max_width=18)
    for name in names:
        table.add_column(f"dormant\n{escape(name)}", justify="right")
    for layer in range(overall.num_layers):
        share = overall.sink_share[layer]
        hidden = "-" if overall.hidden_sink_rate is None else _fmt(float(overall.hidden_sink_rate[layer].nanmean()), 1)
        tokens = escape(", ".join(_short(report.token(t)) for t in list(overall.hidden_sink_tokens[layer])[:3])) \
            if layer < len(overall.hidden_sink_tokens) else ""
        drain = overall.value_drain[layer]
        pos = overall.peak_positions[layer]
        tok = overall.peak_tokens[layer]
        row = [
            str(layer), f"{_fmt(float(share.nanmean()))} / {_fmt(_max(share))}", hidden, tokens,
            _fmt(_min(drain)), _fmt(float(overall.residual_peak[layer]), 1),
            escape(f"{pos} {_short(report.token(tok))}") if pos >= 0 else "-",
        ]
        for name in names:
            dormancy = report.domains[name].dormancy
            if dormancy is None:
                row.append("-")
            else:
                heads = dormancy[layer]
                row.append(f"{int((heads >= p['dormant_threshold']).sum())}/{int((~heads.isnan()).sum())}")
        sink = float(share.nan_to_num(0).max()) >= 0.4
        table.add_row(*row, style="bold" if sink else None)
    console.print(table)
    console.print(f"sink layers (a head with >= 0.4 on the sink tokens): {report.sink_layers()}; "
                  f"largest residual peaks: {report.peak_layers()}")
    if len(names) > 1:
        flips = Table(title=f"Heads whose state changes between domains (margin {p['flip_margin']})",
                      title_justify="left")
        flips.add_column("layer", justify="right")
        flips.add_column("head", justify="right")
        for name in names:
            flips.add_column(f"dormancy {escape(name)}", justify="right")
        flips.add_column("dormant on")
        for flip in report.flips[:MAX_FLIPS_PRINTED]:
            flips.add_row(str(flip["layer"]), str(flip["head"]),
                          *[_fmt(flip["scores"].get(n, float("nan")), 3) for n in names],
                          escape(", ".join(flip["dormant_on"])))
        # the margin named here too: the per-domain dormant counts above use the bare threshold, and
        # "no head changes state" under counts that differ read as a contradiction
        console.print(flips if report.flips else
                      f"no head changes state between domains by the margin ({p['flip_margin']} on each side of "
                      f"the dormant threshold {p['dormant_threshold']}; the dormant counts above use the threshold alone)")
        if len(report.flips) > MAX_FLIPS_PRINTED:
            # the table is cut (as monitor report's is): said, and where the rest is; a 64-flip report
            # printed 30 rows and nothing else
            where = Path(out) / "report.json" if out is not None else "report.json"
            console.print(f"... and {len(report.flips) - MAX_FLIPS_PRINTED} more (all in {where})",
                          markup=False, highlight=False)


def wide_console():
    """A rich console; when stdout is not a terminal (a log file, a pipe) rich would wrap the tables
    at 80 columns, so give it room for the full per-layer table."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=150)


def run(args: argparse.Namespace) -> int:
    import sinkfix
    from sinkfix.analysis.inspection import check_windows, inspect
    from sinkfix.analysis.metrics import check_hidden_sink_threshold
    from sinkfix.errors import UsageError
    from sinkfix.evaluate import check_positions
    from sinkfix.files import check_writable

    set_threads(args.threads)
    if args.profile is not None and args.policy is not None:
        raise SinkfixError("give --profile or --policy, not both")
    check_hidden_sink_threshold(args.hidden_sink_threshold, "--hidden-sink-threshold")
    # the profile file read and validated (or the policy parsed) before the texts are read and the model
    # loads, as bench and eval do; whether the profile fits the model is checked when it is applied
    correction = sinkfix.Profile.load(args.profile) if args.profile is not None else \
        sinkfix.Policy.parse(args.policy) if args.policy is not None else None
    args.bos, bos_note = bos_for_profile(args.bos, correction, args.profile)
    check_windows(args.seq_len, args.bos, args.max_tokens, flags=True)
    if correction is not None and correction.content_sinks is not None and not correction.content_sinks.is_identity:
        # inspect measures through attention observers, which content-dependent sinks do not have (a
        # content part that corrects no head patches the positional path alone and is measured as such)
        # (docs/formulas.md): known from the file or spec, so refused before the model loads
        given = f"--profile {args.profile} is a content-mode profile" if args.profile is not None else \
            f"--policy {args.policy} has content-dependent (hidden) sinks"
        raise UsageError(f"{given}; inspect cannot measure a model patched with content-dependent sinks (not "
                         "implemented): inspect the stock model or a positional policy or profile")
    console = wide_console()
    if bos_note is not None:
        print(f"note: {bos_note}", file=sys.stderr)
    texts = texts_from_args(args, "eval")
    console.print(describe_texts(texts), markup=False)
    out = check_writable(args.out, folder=True)  # before the measurements, not after them
    # and every file it will hold: a folder named report.json (or like a figure) was found only after
    # the model loaded and every window ran, with report.json left beside the missing figures
    check_writable(out / "report.json")
    if not args.no_figures:
        from sinkfix.analysis.plots import FIGURE_NAMES, check_matplotlib

        # domain_flips.png is drawn only with two domains or more (one-domain runs merely remove a stale
        # one, and leave a folder of that name alone)
        for name in FIGURE_NAMES if len(texts) > 1 else [n for n in FIGURE_NAMES if n != "domain_flips.png"]:
            check_writable(out / name)
        check_matplotlib()  # matplotlib missing: said now, not after every measurement
    console.print(f"loading {args.model} ...", **PATH_LINE)
    model, tokenizer = sinkfix.load_model(args.model)
    # the model's position limit is known only now; the longest window is --seq-len tokens, or the
    # BOS and --max-tokens text tokens where that is shorter
    longest = args.seq_len if args.max_tokens is None else min(args.seq_len, args.max_tokens + int(args.bos))
    what = "--seq-len" if longest == args.seq_len else \
        f"--seq-len {args.seq_len} with --max-tokens {args.max_tokens}: window length"
    check_positions(longest, model.config, what, args.model)
    handle = None if correction is None else sinkfix.patch(model, correction)
    try:
        report = inspect(model, tokenizer, {name: t.text for name, t in texts.items()}, seq_len=args.seq_len, bos=args.bos, max_tokens=args.max_tokens,
                         hidden_sink_threshold=args.hidden_sink_threshold)
    finally:
        if handle is not None:
            handle.remove()
    if args.profile is not None:  # which profile was inspected: the policy string alone did not say (review 82)
        report.protocol["profile"] = {"file": str(Path(args.profile).resolve()), "description": correction.describe()}
    print_report(report, console, out)
    path = report.save_json(out / "report.json")
    console.print(f"wrote {path}", **PATH_LINE)
    from sinkfix.analysis.plots import remove_stale_figures, write_figures

    written = [] if args.no_figures else write_figures(report, out)
    for figure in written:
        console.print(f"wrote {figure}", **PATH_LINE)
    for figure in remove_stale_figures(out, written):
        console.print(f"removed {figure} (an earlier run's figure; this run did not draw it)", **PATH_LINE)
    return 0
