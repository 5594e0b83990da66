"""``sinkfix monitor``: live telemetry offline — replay requests, report on the log, guard ranges.

    sinkfix monitor run --model smollm2-135m --requests builtin --out telemetry.jsonl
    sinkfix monitor run --model smollm2-135m --requests reqs.jsonl --out t.jsonl --profile p.json --guard
    sinkfix monitor report telemetry.jsonl --out monitor-report/
    sinkfix monitor ranges --model smollm2-135m --profile old.json --out with-ranges.json
    sinkfix monitor requests --out requests.jsonl            # the built-in request set, as a file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

from sinkfix.commands import MAX_FLIPS_PRINTED, PATH_LINE, SUMMARIES, StoreOnce, bos_for_profile, set_threads
from sinkfix.errors import MonitorError

#: The figure of `sinkfix monitor report --out DIR`.
FIGURE_NAME = "sink_share_by_layer.png"

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "monitor", help=SUMMARIES["monitor"],
        description="Telemetry of a patched model serving requests (docs/monitoring.md in the source "
                    "distribution): `run` replays a request file with generation and writes a JSON-lines log, "
                    "`report` summarises a log by domain, `ranges` adds calibration statistics (for the guard) "
                    "to a profile, `requests` writes the built-in request set.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_run(sub)
    _add_report(sub)
    _add_ranges(sub)
    requests = sub.add_parser("requests", help="write the built-in request set (4 prompts from each built-in domain)")
    requests.add_argument("--out", required=True, help="request file to write (JSON lines)")
    requests.set_defaults(run=_run_requests)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    from sinkfix.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"offline model name, folder or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_run(sub) -> None:
    parser = sub.add_parser("run", help="replay a request file through the model with generation, write the log")
    _model_arguments(parser)
    parser.add_argument("--requests", required=True, metavar="FILE.jsonl",
                        help="one JSON object per line with a 'prompt' and an optional 'domain' and 'id'; "
                             "'builtin' = 4 prompts cut from each built-in domain's evaluation text")
    parser.add_argument("--out", required=True, metavar="LOG.jsonl", help="telemetry log (appended)")
    fix = parser.add_mutually_exclusive_group()
    fix.add_argument("--policy", action=StoreOnce, default=None, help="patch with this policy spec (default: identity)")
    fix.add_argument("--profile", action=StoreOnce, default=None, help="patch with this calibrated profile")
    parser.add_argument("--guard", action="store_true",
                        help="switch the correction off for requests outside the profile's calibration ranges")
    parser.add_argument("--guard-margin", type=float, default=None, help="guard margin in sink share (default 0.15)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    parser.add_argument("--batch-size", type=int, default=1, help="requests per batch, left-padded (default 1)")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start every prompt with the tokenizer's BOS token (default: as the --profile was "
                             "calibrated, else yes)")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, metavar="N",
                        help="prompts are cut to at most N tokens, the BOS token included (the prompt's own tokens "
                             "to N - 1 with --bos); at least 2 with --bos, 1 without (default 2048)")
    parser.add_argument("--sample-rows", type=int, default=None,
                        help="prompt rows behind the hidden-sink estimate (default 32, sinkfix.telemetry.SAMPLE_ROWS)")
    parser.add_argument("--prometheus-port", type=int, default=None,
                        help="also serve Prometheus metrics on 127.0.0.1:PORT while the run lasts")
    parser.set_defaults(run=_run_run)


def _add_report(sub) -> None:
    parser = sub.add_parser("report", help="summarise a telemetry log by domain, list heads that flip, draw figures")
    parser.add_argument("log", metavar="LOG.jsonl", help="telemetry log written by `sinkfix monitor run` or sinkfix.monitor")
    parser.add_argument("--out", default=None, help="folder for report.json and sink_share_by_layer.png")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="a head flips when its dormancy is this far on each side of the threshold (default 0.05)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG")
    parser.set_defaults(run=_run_report)


def _add_ranges(sub) -> None:
    from sinkfix.commands.inspect import add_common_arguments

    parser = sub.add_parser("ranges", help="add calibration statistics (the guard's ranges) to a profile")
    from sinkfix.commands.calibrate import STATISTICS_MIN_ROWS, STATISTICS_WINDOWS

    # the window protocol defaults to the profile's own (its calibration record): ranges measured with
    # other windows (BOS windows for a no-BOS profile) moved by up to 0.37 in sink share on SmolLM2, and
    # the guard compared live prompts with them, unsaid
    add_common_arguments(parser, default_max_tokens=8192, split="calib",
                         protocol_default="as the profile records its calibration; a different value needs "
                                          "--override-protocol",
                         # the profile's own texts, not every built-in domain; one calibrated on files needs --text
                         texts_default="the built-in domains the profile was calibrated on (a profile calibrated "
                                       "on files needs them here)")
    parser.add_argument("--profile", action=StoreOnce, required=True, help="the profile to measure (applied to the model)")
    parser.add_argument("--statistics-windows", type=int, default=None, metavar="N",
                        help="windows per domain the ranges are measured on, the first N (default: the profile's "
                             f"statistics' own count, else {STATISTICS_WINDOWS}, as sinkfix calibrate: the guard's "
                             "margin was chosen with that many)")
    parser.add_argument("--override-protocol", action="store_true",
                        help="measure with --seq-len / --bos / --max-tokens / --statistics-windows values other than "
                             "the profile records (a warning, and the new statistics record what differs)")
    parser.add_argument("--out", required=True, help="profile to write, with statistics")
    parser.add_argument("--min-rows", type=int, default=STATISTICS_MIN_ROWS,
                        help=f"shortest prefix measured, in rows (default {STATISTICS_MIN_ROWS}, as sinkfix calibrate)")
    parser.set_defaults(run=_run_ranges)


def run(args: argparse.Namespace) -> int:
    return args.run(args)


# -- run ------------------------------------------------------------------------------------------
def _correction(args):
    """The profile (read and validated) or the policy to patch with, before the model loads: a bad
    file or spec fails in a second, not after a model load. Checking the profile against the model
    stays for the patch."""
    import sinkfix
    from sinkfix.telemetry.monitor import refuse_content_sinks

    if args.profile is not None:
        correction = sinkfix.Profile.load(args.profile)
        where = f"--profile {args.profile}"
    else:
        if args.guard:
            raise MonitorError("--guard needs --profile: the guard compares live statistics with the ranges a "
                               "calibrated profile records")
        correction = sinkfix.Policy.parse("identity" if args.policy is None else args.policy)
        where = f"--policy {args.policy}"
    refuse_content_sinks(correction, where)  # refused by the monitor too, but after a model load
    return correction


def _token_ids(tokenizer, request) -> list[int]:
    ids = tokenizer(request.prompt, add_special_tokens=False, return_tensors="pt").input_ids[0].tolist()
    if not ids:
        raise MonitorError(f"request {request.id or ''} (line {request.line}): the prompt tokenizes to nothing")
    return ids


#: Tokens the BOS adds in front of every prompt with --bos (sinkfix.evaluate.bos_token_id: one id).
BOS_TOKENS = 1


def _check_prompt_limit(args) -> None:
    """--max-prompt-tokens counts the BOS: it must leave room for the BOS and one token of the prompt."""
    least = (BOS_TOKENS if args.bos else 0) + 1
    if args.max_prompt_tokens < least:
        with_bos = f" (the BOS token and one token of the prompt; --no-bos for {least - BOS_TOKENS})" if args.bos else ""
        raise MonitorError(f"--max-prompt-tokens {args.max_prompt_tokens} leaves no room for a prompt: it counts "
                           f"every token fed, the BOS included, and must be >= {least}{with_bos}")


def _batches(requests, tokenizer, args):
    """(requests, input_ids (B, S) left-padded, attention_mask) per batch. A prompt is at most
    --max-prompt-tokens tokens with its BOS: the text's tokens are cut to that minus the BOS (the cut
    was applied before the BOS was added, so --max-prompt-tokens 2048 fed 2049 tokens, one past a
    2048-position model)."""
    import torch

    from sinkfix.evaluate import bos_token_id

    bos = [bos_token_id(tokenizer)] if args.bos else []
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    keep = args.max_prompt_tokens - len(bos)  # >= 1: _check_prompt_limit
    for start in range(0, len(requests), args.batch_size):
        group = requests[start:start + args.batch_size]
        ids = [bos + _token_ids(tokenizer, r)[:keep] for r in group]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        yield group, input_ids, mask


def _serve(monitor, model, tokenizer, requests, args) -> None:
    import torch
    from tqdm.auto import tqdm

    from sinkfix.evaluate import model_device

    device = model_device(model)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    # each line of the file is a request: one without an id gets SESSION-N by its place in the file,
    # the id it gets with --batch-size 1 (the monitor numbers its request() blocks so); the monitor's
    # own id is the batch's, which gave every row of a batch the same one
    ids_of = [r.id if r.id is not None else f"{monitor.session}-{i}" for i, r in enumerate(requests)]
    done = 0
    with tqdm(total=len(requests), desc="monitor run", unit="request") as bar, torch.no_grad():
        for group, ids, mask in _batches(requests, tokenizer, args):
            ids, mask = ids.to(device), mask.to(device)
            row_ids, done = ids_of[done:done + len(group)], done + len(group)
            with monitor.request([r.domain for r in group], request_id=row_ids):
                if args.max_new_tokens > 0:
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                   min_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
                else:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            bar.update(len(group))


def _run_run(args: argparse.Namespace) -> int:
    import sinkfix
    from sinkfix.commands.inspect import wide_console
    from sinkfix.files import check_writable
    from sinkfix.telemetry import DEFAULT_MARGIN, SAMPLE_ROWS, Guard
    from sinkfix.telemetry.monitor import check_sample_rows
    from sinkfix.telemetry.outputs import check_log_file, check_port_free
    from sinkfix.telemetry.report import summarise
    from sinkfix.telemetry.requests import read_requests

    if args.batch_size < 1 or args.max_new_tokens < 0 or args.max_prompt_tokens < 1:
        raise MonitorError("--batch-size and --max-prompt-tokens must be >= 1, --max-new-tokens >= 0")
    correction = _correction(args)  # the profile file read before anything else: its protocol sets --bos
    args.bos, bos_note = bos_for_profile(args.bos, correction, args.profile)
    if bos_note is not None:
        print(f"note: {bos_note}", file=sys.stderr)
    _check_prompt_limit(args)
    sample_rows = SAMPLE_ROWS if args.sample_rows is None else check_sample_rows(args.sample_rows, "--sample-rows")
    if args.prometheus_port is not None:  # its range and whether it is free, before the model loads
        check_port_free(args.prometheus_port, name="--prometheus-port")
    set_threads(args.threads)
    console = wide_console()
    requests = read_requests(args.requests)  # before the model loads: a bad file fails in a second
    check_writable(args.out, append=True)  # the log, likewise (appended in place: a FIFO serves)
    check_log_file(args.out, requests=args.requests)  # not the request file, nor any other file but a log
    if args.guard_margin is not None and not args.guard:  # an option that would do nothing: refused
        raise MonitorError("--guard-margin sets the guard's margin: give it together with --guard")
    guard_margin = DEFAULT_MARGIN if args.guard_margin is None else args.guard_margin
    if args.guard:  # its statistics and margin, likewise (built again, against the model, by the monitor)
        Guard.from_profile(correction, margin=guard_margin)
    console.print(f"{len(requests)} requests from {args.requests}; loading {args.model} ...", **PATH_LINE)
    model, tokenizer = sinkfix.load_model(args.model)
    handle = sinkfix.patch(model, correction)
    guard = correction if args.guard else None
    monitor = sinkfix.monitor(model, log=args.out, prometheus_port=args.prometheus_port, guard=guard,
                              guard_margin=args.guard_margin, sample_rows=sample_rows)
    try:
        if monitor.prometheus_url:
            console.print(f"Prometheus metrics on {monitor.prometheus_url}", **PATH_LINE)
        records = []
        monitor.callback = records.append
        _serve(monitor, model, tokenizer, requests, args)
    finally:
        monitor.close()
        handle.remove()
    _print_summary(summarise(records), console)
    # the records that reached the log, as the monitor counted its writes: the callback also gets
    # those whose write failed (each a LogWriteWarning), and counting them said "appended 3 records"
    # with exit status 0 when 2 of the 3 never reached the log
    written, failed = monitor.records_logged, monitor.records_not_logged
    if failed:
        reason = " ".join(str(monitor.last_log_error).split())  # one line
        raise MonitorError(f"appended {written} of {written + failed} records to {args.out}; {failed} could not be "
                           f"written (the last because: {reason})")
    console.print(f"appended {written} records to {args.out}", **PATH_LINE)
    return 0


# -- report ---------------------------------------------------------------------------------------
def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def _nanmax(values) -> float:
    """The largest defined value; NaN when none is (an all-NaN domain read as a measured 0.000 before)."""
    defined = values[~values.isnan()]
    return float(defined.max()) if defined.numel() else float("nan")


def _peak_cell(peak) -> str:
    """"max (layer L)" over the layers whose peak is defined; "-" when none is (a domain of all-padding
    rows: nan_to_num(0) printed "0.0 (layer 0)", a ratio that is never below 1)."""
    defined = ~peak.isnan()
    if not defined.any():
        return "-"
    layer = int(peak.masked_fill(~defined, float("-inf")).argmax())
    return f"{_fmt(float(peak[layer]), 1)} (layer {layer})"


def _print_summary(report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    # domain labels and model names as written ("a[/b]" raised rich's MarkupError after the run)
    table = Table(title=escape(f"telemetry by domain: {', '.join(report.models)}"), title_justify="left")
    for column in ("domain", "requests", "tokens", "sink share\nmean / max head", "dormant heads\nper request",
                   "hidden sinks\nper request (est.)", "residual peak\nmax layer", "prompts outside\nguard ranges",
                   "served without\nthe correction"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for name, d in report.domains.items():
        share = d.sink_share
        table.add_row(escape(name), str(d.requests), str(d.tokens),
                      f"{_fmt(float(share.nanmean()))} / {_fmt(_nanmax(share))}",
                      _fmt(d.dormant_heads, 1), _fmt(float(d.hidden_sinks.sum()), 1),
                      _peak_cell(d.residual_peak), str(d.guard_trips), str(d.served_without_correction))
    console.print(table)


def _print_layers(report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    names = list(report.domains)
    table = Table(title="per layer: mean sink share / dormant heads", title_justify="left")
    table.add_column("layer", justify="right")
    for name in names:
        table.add_column(f"sink share\n{escape(name)}", justify="right")
        table.add_column(f"dormant\n{escape(name)}", justify="right")
    layers = next(iter(report.domains.values())).sink_share.shape[0]
    for layer in range(layers):
        row = [str(layer)]
        for name in names:
            d = report.domains[name]
            heads = d.dormancy[layer]
            row += [_fmt(float(d.sink_share[layer].nanmean())),
                    f"{int((heads >= 0.5).sum())}/{int((~heads.isnan()).sum())}"]
        table.add_row(*row)
    console.print(table)


def _print_flips(report, console, out: str | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table

    if len(report.domains) < 2:
        console.print("one domain in the log: no active/dormant comparison")
        return
    if not report.flips:
        console.print(f"no head is dormant on one domain and active on another (margin {report.margin})")
        return
    names = list(report.domains)
    table = Table(title=f"heads active on one domain and dormant on another (margin {report.margin})",
                  title_justify="left")
    for column in ("layer", "head", *[f"dormancy\n{escape(n)}" for n in names], "dormant on", "active on"):
        table.add_column(column)
    for flip in report.flips[:MAX_FLIPS_PRINTED]:
        table.add_row(str(flip["layer"]), str(flip["head"]), *[_fmt(flip["scores"].get(n, float("nan"))) for n in names],
                      escape(", ".join(flip["dormant_on"])), escape(", ".join(flip["active_on"])))
    console.print(table)
    if len(report.flips) > MAX_FLIPS_PRINTED:  # the table is cut: say so, and where the rest is
        where = (f"all of them are in {Path(out) / 'report.json'}" if out
                 else "--out DIR writes all of them to DIR/report.json")
        console.print(f"{MAX_FLIPS_PRINTED} of {len(report.flips)} heads shown; {where}", markup=False, highlight=False)


def _run_report(args: argparse.Namespace) -> int:
    from sinkfix.commands.inspect import wide_console
    from sinkfix.telemetry.report import check_margin, read_log, summarise, write_figure

    margin = check_margin(args.margin, "--margin")  # before reading a long log
    if args.no_figures and not args.out:  # no figure is drawn without --out: the option would change nothing
        from sinkfix.errors import UsageError

        raise UsageError("--no-figures applies to the figure written with --out; without --out none is drawn: "
                         "drop --no-figures, or give --out DIR")
    if args.out:  # likewise the output folder and the files in it: refused before the report is read and printed
        from sinkfix.files import check_writable

        check_writable(args.out, folder=True)
        check_writable(Path(args.out) / "report.json")
        if not args.no_figures:
            check_writable(Path(args.out) / FIGURE_NAME)
        if not args.no_figures:  # and the figure's matplotlib
            from sinkfix.analysis.plots import check_matplotlib

            check_matplotlib()
    console = wide_console()
    report = summarise(read_log(args.log), margin=margin)
    if len(report.policies) > 1:  # each domain's numbers mix them, unsaid before
        print(f"note: the log holds requests served with {len(report.policies)} corrections "
              f"({'; '.join(report.policies)}): each domain pools them; report one log per correction to compare",
              file=sys.stderr)
    _print_summary(report, console)
    _print_layers(report, console)
    _print_flips(report, console, args.out)
    if args.out:
        from sinkfix.files import atomic_write_text

        out = Path(args.out)
        console.print(f"wrote {atomic_write_text(out / 'report.json', json.dumps(report.to_dict(), indent=1))}",
                      **PATH_LINE)
        if not args.no_figures:
            console.print(f"wrote {write_figure(report, out / FIGURE_NAME)}", **PATH_LINE)
        else:  # an earlier run's figure beside this report.json would read as this run's
            from sinkfix.files import remove_unwritten

            for path in remove_unwritten(out, [FIGURE_NAME], []):
                console.print(f"removed {path} (an earlier run's figure; this run did not draw it)",
                              markup=False, highlight=False)
    return 0


# -- ranges / requests ------------------------------------------------------------------------------
#: `monitor ranges` options that set the window protocol: dest -> (flag, key in the recorded protocol).
_PROTOCOL_FLAGS = {"seq_len": ("--seq-len", "seq_len"), "bos": ("--bos", "bos"),
                   "max_tokens": ("--max-tokens", "max_tokens"),
                   "statistics_windows": ("--statistics-windows", "windows_per_text")}

#: What `monitor ranges` measures with where the profile records nothing (a profile made in code):
#: the defaults of `sinkfix calibrate`.
_RANGES_DEFAULTS = {"seq_len": 512, "bos": True, "max_tokens": 8192}


def _recorded_protocol(profile) -> dict:
    """dest -> value of the window protocol the profile records: seq_len and bos from its calibration
    record's ``protocol``, max_tokens from its ``hyper`` (null: every token), the windows per text from
    its statistics' protocol (calibrate records them there); a key the profile does not record is absent."""
    record = profile.calibration or {}
    protocol = record.get("protocol") if isinstance(record.get("protocol"), dict) else {}
    hyper = record.get("hyper") if isinstance(record.get("hyper"), dict) else {}
    stats = profile.statistics.protocol if profile.statistics is not None else {}
    found = {}
    def recorded(source: dict, key: str) -> bool:  # null: not recorded, except max_tokens (every token)
        return key in source and (source[key] is not None or key == "max_tokens")

    for dest, source in (("seq_len", protocol), ("bos", protocol), ("max_tokens", hyper)):
        if recorded(source, dest):
            found[dest] = source[dest]
        elif recorded(stats, dest):  # a profile whose ranges were measured, without a calibration record
            found[dest] = stats[dest]
    if recorded(stats, "windows_per_text"):
        found["statistics_windows"] = stats["windows_per_text"]
    return found


def _ranges_protocol(args: argparse.Namespace, profile) -> dict:
    """Fill the protocol options of `monitor ranges` from the profile's record (each left out is None);
    an option given with another value than the record is a UsageError, unless --override-protocol,
    which warns on stderr. Returns {flag: {"recorded", "used"}} for the values that differ."""
    import sys

    from sinkfix.commands.calibrate import STATISTICS_WINDOWS
    from sinkfix.errors import UsageError

    recorded = _recorded_protocol(profile)
    differ = {}
    for dest, (flag, _) in _PROTOCOL_FLAGS.items():
        given = getattr(args, dest)
        if dest not in recorded:
            if given is None:
                setattr(args, dest, STATISTICS_WINDOWS if dest == "statistics_windows" else _RANGES_DEFAULTS[dest])
            continue
        if given is None:
            setattr(args, dest, recorded[dest])
        elif given != recorded[dest]:
            differ[flag] = {"recorded": recorded[dest], "used": given}
    if differ and not args.override_protocol:
        named = ", ".join(f"{flag} {_flag_value(flag, v['used'])} (the profile's: {_flag_value(flag, v['recorded'])})"
                          for flag, v in differ.items())
        raise UsageError(f"{named}: the guard's ranges are measured with the window protocol the profile was "
                         "calibrated with; leave the option out, or add --override-protocol to measure with it anyway")
    if args.override_protocol and not differ:  # a permission with nothing to permit: said, not silently kept
        print("sinkfix monitor ranges: note: --override-protocol changes nothing: no window option (--seq-len, "
              "--bos, --max-tokens, --statistics-windows) differs from what the profile records", file=sys.stderr)
    if differ:
        used = ", ".join(f"{flag} {_flag_value(flag, v['used'])}" for flag, v in differ.items())
        print(f"sinkfix monitor ranges: warning: measuring with another window protocol than the profile's "
              f"calibration ({used}); the new statistics record it (protocol.overrides)", file=sys.stderr)
    if not recorded:
        print("sinkfix monitor ranges: note: the profile records no calibration protocol; measuring with "
              f"--seq-len {args.seq_len}, {'--bos' if args.bos else '--no-bos'}, --max-tokens {args.max_tokens}",
              file=sys.stderr)
    return differ


def _flag_value(flag: str, value) -> str:
    if flag == "--bos":
        return {True: "on", False: "off"}.get(value, repr(value))
    return "all tokens" if value is None else str(value)


def _recorded_domains(profile) -> list[str] | None:
    """The text names the profile was calibrated on (its calibration record's ``texts``, else its
    statistics' protocol), None when it records none."""
    record = profile.calibration if isinstance(profile.calibration, dict) else {}
    names = record.get("texts")
    if not isinstance(names, (dict, list)) and profile.statistics is not None:
        names = profile.statistics.protocol.get("texts")
    names = list(names) if isinstance(names, (dict, list)) else None
    return names if names and all(isinstance(n, str) for n in names) else None


class _OtherTexts(NamedTuple):
    """`monitor ranges` measuring on texts other than the profile's calibration texts: the option that
    chose them, both lists (recorded in protocol.overrides) and the warning to print."""

    option: str
    recorded: list[str]
    used: list[str]
    warning: str


def _ranges_domains(args: argparse.Namespace, profile) -> _OtherTexts | None:
    """Default the texts of `monitor ranges` to those the profile was calibrated on: measured on all
    five built-in domains, a Gemma3 profile fitted on pydoc + python got ranges up to 0.15 wider (the
    guard's whole margin) and one fitted on two text files up to 0.25, unsaid. A profile fitted on
    files needs them again (--text), or a knowing --domain choice. Returns what differs where the
    texts measured are not the recorded ones, else None; the caller
    prints the warning once the texts are known to be valid (a domain named twice is one error
    line, not a warning about it and then the error)."""
    from sinkfix.errors import UsageError
    from sinkfix.texts import DOMAIN_ALIASES, DOMAINS

    recorded = _recorded_domains(profile)
    if recorded is None:
        return None
    built_in = all(name in DOMAINS for name in recorded)
    if not args.text and not getattr(args, "dataset", None) and args.domain is None:
        if not built_in:
            raise UsageError(f"--profile {Path(args.profile).name} was calibrated on texts that are not built-in "
                             f"domains ({', '.join(recorded)}): pass those files with --text, or choose built-in "
                             "domains with --domain (the new statistics then record it in protocol.overrides)")
        args.domain = list(recorded)
        print(f"sinkfix monitor ranges: note: measuring on the domains the profile was calibrated on "
              f"({', '.join(recorded)}); --domain to choose others", file=sys.stderr)
        return None
    if args.domain is not None:
        option, used = "--domain", list(dict.fromkeys(DOMAIN_ALIASES.get(name, name) for name in args.domain))
        same = built_in and sorted(used) == sorted(recorded)
        measured = f"the built-in domains {', '.join(used)}"
    elif args.text:
        # files named as the profile's calibration files are taken for them (their text is not recorded)
        option, used = "--text", [Path(t).stem for t in args.text]
        same = not built_in and sorted(used) == sorted(recorded)
        measured = f"the files {', '.join(Path(t).name for t in args.text)}"
    else:
        option, used, same = "--dataset", [str(args.dataset)], False
        measured = f"the dataset {args.dataset}"
    if same:
        return None
    calibrated = f"the built-in domains {', '.join(recorded)}" if built_in else f"the texts {', '.join(recorded)}"
    return _OtherTexts(option, recorded, used,
                       f"sinkfix monitor ranges: warning: measuring on {measured}; the profile was calibrated on "
                       f"{calibrated}; the new statistics record it (protocol.overrides)")


def _run_ranges(args: argparse.Namespace) -> int:
    import sinkfix
    from sinkfix.commands.calibrate import check_profile_out, refuse_content_statistics, with_statistics
    from sinkfix.commands.inspect import describe_texts, texts_from_args
    from sinkfix.errors import UsageError
    from sinkfix.files import check_writable

    for flag, value in (("--statistics-windows", args.statistics_windows), ("--min-rows", args.min_rows)):
        if value is not None and value < 1:  # None: --statistics-windows left to the profile's record
            raise UsageError(f"{flag} must be >= 1, got {value}")
    set_threads(args.threads)
    profile = sinkfix.Profile.load(args.profile)
    refuse_content_statistics(profile, f"--profile {args.profile}")  # known from the file: before the model loads
    other_texts = _ranges_domains(args, profile)
    texts = texts_from_args(args, "calib")
    if other_texts:
        print(other_texts.warning, file=sys.stderr)
    print(describe_texts(texts))
    overrides = _ranges_protocol(args, profile)
    if other_texts:
        overrides[other_texts.option] = {"recorded": other_texts.recorded, "used": other_texts.used}
    check_writable(args.out)  # before the measurements, not after them
    check_profile_out(args.out, "--out", args.text or ())  # not a --text file, nor any other file but a profile
    model, tokenizer = sinkfix.load_model(args.model)
    from sinkfix.evaluate import check_positions

    # as calibrate checks its windows: a profile without a protocol record falls back to 512-token
    # windows, which a model of fewer positions measured unchecked
    check_positions(args.seq_len, model.config, "--seq-len", args.model)
    # the same windows as calibrate's statistics (the first --statistics-windows of each text): the
    # guard's default margin was chosen with ranges from 8 per domain, and this command measured every
    # window of its 16384 tokens (32 per domain), ranges wide enough to make the guard less sensitive
    extended = with_statistics(profile, model, tokenizer, {name: t.text for name, t in texts.items()}, args)
    stats = extended.statistics
    if overrides:
        stats.protocol["overrides"] = overrides
    path = extended.save(args.out)
    print(f"sink-share ranges over {stats.windows} windows (and their prefixes of >= {stats.min_rows} rows): "
          f"widest {float((stats.high - stats.low).max()):.3f}; wrote {path}")
    return 0


def _run_requests(args: argparse.Namespace) -> int:
    from sinkfix.files import atomic_write_text
    from sinkfix.telemetry.requests import builtin_requests

    requests = builtin_requests()
    lines = [json.dumps({"prompt": r.prompt, "domain": r.domain, "id": r.id}) for r in requests]
    print(f"wrote {len(lines)} requests to {atomic_write_text(args.out, chr(10).join(lines) + chr(10))}")
    return 0
