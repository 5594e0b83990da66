"""``sinkfix calibrate``: fit a per-head profile on calibration text and save it as JSON.

    sinkfix calibrate --model smollm2-135m --out smollm2.profile.json       # every built-in domain
    sinkfix calibrate --model smollm2-135m --out p.json --evaluate          # + leave-one-domain-out table
    sinkfix calibrate --model smollm2-135m --text notes.txt --text src.py --out p.json
    sinkfix calibrate --model smollm2-135m --sinks combined --out p.json    # + hidden (content) sinks
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from sinkfix.commands import PATH_LINE, SUMMARIES, set_threads
from sinkfix.analysis.robust import DEFAULT_SELECTION_RULE, NOT_SCORED_REASONS, SCORE_DESCRIPTIONS, SELECTION_RULES
from sinkfix.commands.inspect import add_common_arguments, describe_texts, texts_from_args

__all__ = ["add_parser", "run", "STATISTICS_WINDOWS", "default_out", "check_profile_out"]

#: Evaluation windows per domain of ``--evaluate`` (the leave-one-domain-out table).
EVAL_WINDOWS = 8

#: Calibration windows per domain behind a profile's guard statistics (the first ones). The guard's
#: default margin (sinkfix.telemetry.guard.DEFAULT_MARGIN) was chosen with ranges from 8 windows per
#: domain; all 16 of the default 8192 tokens took 80 forward passes, about 60 s of a calibration.
STATISTICS_WINDOWS = 8

#: Query rows (that see a non-sink key) a window prefix needs before the guard statistics count it:
#: calibration_statistics' default, which `sinkfix monitor ranges` measures with too.
STATISTICS_MIN_ROWS = 32


def _mark_given(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    given = dict(getattr(namespace, "given_options", None) or {})
    given[dest] = option_string or "--" + dest.replace("_", "-")
    namespace.given_options = given


class _Given(argparse.Action):
    """Store the value, and remember that the option was given (``args.given_options``: dest -> the
    flag as typed): the positional-fit options keep their real defaults on the parser (the CLI's
    defaults are the library's, tests/test_calibrate.py), yet one given with --sinks hidden is refused."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest, option_string)


class _GivenBool(argparse.BooleanOptionalAction):
    """``--flag / --no-flag``, remembered as given like :class:`_Given`."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark_given(namespace, self.dest, option_string)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "calibrate", help=SUMMARIES["calibrate"],
        description="Fit one sink-scaling beta and one virtual sink logit per (layer, head) by gradient descent on "
                    "next-token NLL of calibration text (model weights frozen), with held-out validation windows and "
                    "early stopping, and save the result as a versioned JSON profile for `sinkfix.patch`. By default "
                    "each domain is fitted on its own and the fits are combined so that no domain is traded for "
                    "another, chosen by leave-one-domain-out on the validation windows (docs/calibration.md in "
                    "the source distribution).",
    )
    add_common_arguments(parser, default_max_tokens=8192, split="calib",
                         dataset_note="; one domain, so with --rule pooled (the default robust rule needs two)")
    parser.add_argument("--out", default=None, help="profile path (default ./<model>.profile.json; a local model folder by its own name)")
    parser.add_argument("--rule", choices=("robust", "pooled"), default="robust",
                        help="robust (default): one fit per domain, combined by leave-one-domain-out selection; "
                             "pooled: one fit on all texts together (not domain-robust)")
    parser.add_argument("--selection", choices=SELECTION_RULES, default=None,
                        help="how the robust rule chooses among its candidates, each scored on the held-out domains' "
                             "validation windows: safe-mean (default) = the best mean change among the candidates "
                             "that made no held-out domain worse; worst = the best worst domain (the default before "
                             f"2026-12-03). Default {DEFAULT_SELECTION_RULE}; not with --rule pooled or --sinks hidden")
    parser.add_argument("--steps", type=int, default=150, action=_Given,
                        help="Adam steps in all, one window each (default 150; the robust rule splits them evenly "
                             "among the domains, the first ones taking one more where they do not divide)")
    parser.add_argument("--lr", type=float, default=0.5, action=_Given,
                        help="Adam learning rate on logit(beta) and the virtual logits (default 0.5)")
    parser.add_argument("--reg", type=float, default=0.05, action=_Given, help="pull toward beta = 1 (default 0.05)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="held-out share of each text (default 0.25)")
    parser.add_argument("--virtual-logits", action=_GivenBool, default=True,
                        help="also fit one virtual sink logit per head (default: yes)")
    parser.add_argument("--virtual-on-sink-rows", action=_GivenBool, default=None,
                        help="let the virtual logits act on the sink's own row too (default: only with --bos, "
                             "where that row is the BOS token)")
    parser.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto", action=_Given,
                        help="matrix products of the fitting steps: auto (default) = bfloat16 where the CPU or GPU "
                             "multiplies it natively, else float32; validation and selection always run in float32")
    parser.add_argument("--evaluate", action="store_true",
                        help="afterwards, rebuild the profile without each domain in turn and compare perplexity on "
                             "that domain's evaluation text (leave-one-domain-out; costs about as much again as "
                             "the calibration; needs at least three domains)")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help=f"windows per domain for --evaluate (default {EVAL_WINDOWS})")
    parser.add_argument("--sinks", choices=("positional", "hidden", "combined"), default="positional",
                        help="which sinks to calibrate: positional (default: beta and virtual logit of the first-token "
                             "sink), hidden (per-head beta of ACT's content-dependent hidden sinks, heads whose beta "
                             "stays near 1 switched off), combined (positional first, then hidden sinks on top with "
                             "the positional parameters frozen); the same per-domain fits and domain-robust selection "
                             "(docs/calibration.md in the source distribution)")
    parser.add_argument("--hidden-threshold", type=float, default=None,
                        help="hidden sinks: ACT's criterion, mean attention over the rows that see a key, in (0, 1) "
                             "(default 0.1)")
    parser.add_argument("--hidden-steps", type=int, default=None,
                        help="hidden sinks: Adam steps in all, split evenly among the domains (default 150)")
    parser.add_argument("--hidden-lr", type=float, default=None, help="hidden sinks: Adam learning rate (default 0.2)")
    parser.add_argument("--hidden-init-beta", type=float, default=None,
                        help="hidden sinks: starting beta of every head, in (0, 1) (default 0.9)")
    parser.add_argument("--statistics", action=argparse.BooleanOptionalAction, default=None,
                        help="record the sink-share ranges seen on the calibration text in the profile, for the "
                             "telemetry guard (one more forward pass over the windows; default: yes, except "
                             "with --sinks hidden|combined, whose profiles the monitor does not serve)")
    parser.add_argument("--statistics-windows", type=int, default=None, metavar="N",
                        help="calibration windows per domain the statistics are measured on, the first N "
                             f"(default {STATISTICS_WINDOWS}: the guard's margin was chosen with ranges from that many)")
    parser.set_defaults(run=run)
    return parser


#: The largest existing file ``--out`` reads to tell whether it is a sinkfix profile (and so may be
#: replaced): a profile is a few MB at most (a [layers][heads] matrix per policy entry and domain); a
#: larger file is not one, and is not read whole to find that out.
PROFILE_CHECK_BYTES = 64 << 20


def check_profile_out(out, flag: str = "--out", inputs=()) -> None:
    """UsageError (one line, before any model loads or fit runs) when writing a profile to ``out`` would
    destroy a file that is not a profile: ``out`` is one of the ``inputs`` (the ``--text`` files, under
    any spelling of the path), or an existing non-empty file that is not a sinkfix profile (a text, a
    log, a result). An existing profile is replaced, as ever, and an empty file holds nothing to lose.
    ``sinkfix calibrate --out code.txt --text code.txt`` wrote the profile over its own calibration text."""
    import json
    from pathlib import Path

    from sinkfix.errors import UsageError
    from sinkfix.files import same_file
    from sinkfix.profile import FORMAT

    target = Path(out)
    if not target.is_file():  # missing (written new); a FIFO or a device is check_writable's to refuse
        return
    for given in inputs:
        if same_file(target, given):  # an input that cannot be read is the text loader's to refuse
            raise UsageError(f"{flag} {out} is the text {given} (--text): writing the profile there would replace "
                             "it; write the profile to another file")
    size = target.stat().st_size
    if size == 0:
        return
    found = "a larger file than any profile"
    if size <= PROFILE_CHECK_BYTES:
        try:
            data = json.loads(target.read_bytes().decode("utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            data, found = None, "not JSON"
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return
        if data is not None:
            found = "JSON without \"format\": \"sinkfix-profile\""
    raise UsageError(f"{flag} {out} exists and is not a sinkfix profile ({found}): writing the profile would "
                     "replace it; write it to another file, or remove that one first")


def refuse_content_statistics(profile, given: str) -> None:
    """UsageError for guard statistics of a content-mode profile: they are measured through the
    monitor's attention listener, which content-dependent sinks do not have (the pass failed with a
    traceback once a layer had a hidden-sink head), and the monitor does not serve such a profile."""
    from sinkfix.errors import UsageError

    if profile.content_sinks is not None:
        raise UsageError(f"{given} is a content-mode profile: the guard's sink-share ranges are measured and used by "
                         "the monitor, which does not serve content-dependent sinks; use a positional profile")


def with_statistics(profile, model, tokenizer, texts: dict[str, str], args: argparse.Namespace):
    """The profile plus the sink-share ranges its patched model shows on the calibration windows
    (sinkfix.telemetry.calibration_statistics), kept apart from the fit itself: the first
    ``args.statistics_windows`` windows of each text, prefixes of at least ``args.min_rows`` rows
    (:data:`STATISTICS_MIN_ROWS` when the command has no such option). ``sinkfix monitor ranges``
    measures the same way. A positional profile only (:func:`refuse_content_statistics`)."""
    from tqdm.auto import tqdm

    import sinkfix
    from sinkfix.analysis.calibration import calibration_windows
    from sinkfix.telemetry import calibration_statistics

    refuse_content_statistics(profile, "the profile")
    per_text = {name: calibration_windows(tokenizer, text, seq_len=args.seq_len, bos=args.bos,
                                          max_tokens=args.max_tokens)[:args.statistics_windows]
                for name, text in texts.items()}
    windows = [w for ws in per_text.values() for w in ws]
    # windows_per_text is the number asked for (the first N of each text); a text with fewer gives all it
    # has, so windows_used records what each text gave (500 asked for, 67 and 123 measured, once unsaid)
    protocol = {"seq_len": args.seq_len, "bos": args.bos, "max_tokens": args.max_tokens, "texts": list(texts),
                "windows_per_text": args.statistics_windows,
                "windows_used": {name: len(ws) for name, ws in per_text.items()}}
    with (sinkfix.patch(model, profile),
          tqdm(total=len(windows), desc="guard statistics", unit="win") as bar):
        return profile.with_statistics(calibration_statistics(model, windows,
                                                              min_rows=getattr(args, "min_rows", STATISTICS_MIN_ROWS),
                                                              protocol=protocol, progress=bar.update))


def _fits_table(record: dict, title: str):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for col in ("domain", "calib windows", "val windows", "best step", "val NLL unpatched", "val NLL fit",
                "val ppl change"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, fit in record["fits"].items():
        # a domain is named by its file's stem, which rich read as markup: notes[i] was printed as notes
        table.add_row(escape(name), str(fit["calib_windows"]), str(fit["val_windows"]),
                      f"{fit['best_step']} of {fit['steps_run']}", _nll_cell(fit["val_nll_before"]),
                      _nll_cell(fit["val_nll_after"]),
                      "-" if fit["val_ppl_change"] is None else f"{100 * fit['val_ppl_change']:+.2f}%")
    return table


def _nll_cell(nll: float | None) -> str:
    """A validation NLL, or "-" for a fit without validation windows (rule pooled, --val-fraction 0)."""
    return "-" if nll is None or nll != nll else f"{nll:.4f}"


def _selection_table(record: dict):
    from rich.markup import escape
    from rich.table import Table

    selection = record["selection"]
    changes = selection["changes"]
    domains = list(record["texts"])
    rule = selection.get("rule", "worst")  # profiles from before 2026-12-03 were chosen by the worst case
    table = Table(title="candidates, each rebuilt without the domain it is scored on (validation windows); "
                        f"chosen: the best {SCORE_DESCRIPTIONS[rule]}", title_justify="left")
    table.add_column("candidate")
    for d in domains:
        table.add_column(escape(d), justify="right")
    table.add_column("worst", justify="right")
    table.add_column("mean", justify="right")
    for name, per_domain in changes.items():
        worst = max(per_domain.values())
        complete = all(d in per_domain for d in domains)
        mean = f"{100 * sum(per_domain.values()) / len(per_domain):+.2f}%" if complete else "-"
        # a candidate whose scoring stopped early: its worst is at least what was scored, "-" elsewhere
        table.add_row(escape(name), *[f"{100 * per_domain[d]:+.2f}%" if d in per_domain else "-" for d in domains],
                      f"{'' if complete else '>= '}{100 * worst:+.2f}%", mean,
                      style="bold" if name == selection["chosen"] else None)
    if "not_scored" in selection:
        table.caption = f"-: not scored; {NOT_SCORED_REASONS[rule]}"
    return table


def _lodo_table(result):
    from rich.markup import escape
    from rich.table import Table

    p = result.protocol
    asked = p["eval_windows"]
    rows = result.rows()
    # windows scored per domain: a text shorter than --eval-windows windows gives all it has (the title
    # said "the first 100" where 32, 29 and 31 were scored)
    scored = {d: len(next(iter(per.values()))) for d, per in result.windows.items()}
    fewer = [r["domain"] for r in rows if scored.get(r["domain"], asked) < asked]
    first = f"the first {asked}" + (" (fewer where a text has fewer: 'windows')" if fewer else "")
    table = Table(title=f"leave-one-domain-out: {'BOS + ' if p['bos'] is True else 'no BOS, '}{p['seq_len']}-token "
                        f"windows, {first} of each domain's evaluation text (or of its validation windows: "
                        "'scored on'); perplexity change vs unpatched", title_justify="left")
    found = result.intervals()
    columns = ["domain", "scored on", "tokens", "ppl unpatched", "best global beta", "unseen: profile without it",
               "calibrated: profile with it"]
    if scored:
        columns.insert(2, "windows")
    single = [d for d, n in scored.items() if n < 2]
    if found:
        columns.insert(columns.index("calibrated: profile with it"), "unseen − best global beta, points [95%]")
        table.caption = ("[95%]: percentile interval over each domain's scored windows drawn with replacement "
                         "(the best global beta chosen again in each draw); an interval that holds 0 cannot tell "
                         "the profile from the best global beta on this much text"
                         + ("; n/a: one scored window, no interval" if single else ""))
    for col in columns:
        table.add_column(escape(col), justify="left" if col in ("domain", "scored on") else "right")
    for r in rows:
        d = r["domain"]
        cells = [escape(d), r["source"], str(r["tokens"]), f"{r['stock_ppl']:.3f}",
                 f"{100 * r['best_global_change']:+.2f}% ({r['best_global_beta']:g})",
                 f"{100 * r['without_change']:+.2f}% ({escape(r['without_chosen'])})",
                 f"{100 * r['with_change']:+.2f}%"]
        if scored:
            cells.insert(2, str(scored[d]))
        if found:
            gap = found[d]["without"]["minus_best_baseline"]
            # one window drawn with replacement is that window every time: a zero-width "interval"
            # ([+0.43, +0.43]) that read as certainty
            cells.insert(columns.index("unseen − best global beta, points [95%]"),
                         escape(f"{100 * gap.value:+.2f} [n/a: {scored[d]} window]") if d in single else
                         f"{100 * gap.value:+.2f} [{100 * gap.low:+.2f}, {100 * gap.high:+.2f}]")
        table.add_row(*cells)
    return table


def _pooled_table(record: dict):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="validation windows of the calibrated domains (not leave-one-domain-out: rule pooled)",
                  title_justify="left")
    table.add_column("domain")
    table.add_column("val ppl change", justify="right")
    for name, change in record["ppl_change"]["val_per_domain"].items():
        table.add_row(escape(name), "-" if change is None or change != change else f"{100 * change:+.2f}%")
    if "validation" in record:
        table.caption = escape(f"validation: {record['validation']}")
    return table


def run(args: argparse.Namespace) -> int:
    import sinkfix
    from sinkfix.analysis.calibration import (CalibrationSettings, calibrate, domain_windows, fit_domains,
                                              require_two_domains, robust_profile)
    from sinkfix.analysis.lodo import require_three_domains
    from sinkfix.commands.inspect import wide_console
    from sinkfix.errors import UsageError
    from sinkfix.evaluate import check_positions
    from sinkfix.files import check_writable

    set_threads(args.threads)
    console = wide_console()
    # options that contradict each other are known from the flags alone: refused before the texts are
    # read and listed (the list printed first made a one-line refusal seven lines)
    _check_option_combinations(args)
    if args.dataset and args.dataset.strip() and args.rule == "robust":  # an empty one: texts_from_args says so
        # one domain, known from the spec: refused before the set is downloaded, not after
        from sinkfix.texts import parse_dataset_spec

        require_two_domains([parse_dataset_spec(args.dataset).name])
    texts = texts_from_args(args, "calib")
    console.print(describe_texts(texts), markup=False)
    _check_numbers(args, len(texts))  # each flag named in its error, before CalibrationSettings' own checks
    _refuse_duplicate_texts(texts)
    if args.out is not None and not args.out.strip():
        # "--out ''" wrote ./<model>.profile.json (args.out or default_out), which Profile.load('') refuses
        raise UsageError("--out is empty: give the profile's path, or leave --out out for ./<model>.profile.json")
    out = check_writable(args.out or default_out(args.model))  # before the fits, not after
    check_profile_out(out, "--out" if args.out else "the default --out", args.text or ())
    args.out = str(out)  # the path written, for what the CLI says after the run
    settings = CalibrationSettings(seq_len=args.seq_len, bos=args.bos, max_tokens=args.max_tokens,
                                   val_fraction=args.val_fraction, steps=args.steps, lr=args.lr, reg=args.reg,
                                   virtual_logits=args.virtual_logits,
                                   virtual_logit_on_sink_rows=args.virtual_on_sink_rows, precision=args.precision)
    plain = {name: t.text for name, t in texts.items()}
    hidden = _hidden_settings(args)  # the clear errors, before the model is loaded
    _check_selection(args)
    if args.rule == "robust":
        require_two_domains(list(plain))
        if args.evaluate:
            require_three_domains(list(plain))
    console.print(f"loading {args.model} ...", markup=False)
    model, tokenizer = sinkfix.load_model(args.model)
    # the model's position limit is known only now, and every window is --seq-len tokens long
    check_positions(args.seq_len, model.config, "--seq-len", args.model)
    # the windows need the tokenizer: a text too short is named here, and one text twice refused
    _refuse_duplicate_windows(texts, domain_windows(tokenizer, plain, settings))

    def log(message: str) -> None:  # the library's lines name domains, which rich read as markup
        console.print(message, markup=False)

    fits = None
    if hidden is not None:
        profile = _content_profile(console, model, tokenizer, plain, settings, hidden, args.sinks, args.selection, log)
    elif args.rule == "pooled":
        profile = calibrate(model, tokenizer, plain, rule="pooled", **asdict(settings), log=log)
    else:
        fits = fit_domains(model, tokenizer, plain, settings, log=log)
        profile = robust_profile(model, fits, log=log, selection_rule=args.selection)
    if args.statistics:
        profile = with_statistics(profile, model, tokenizer, plain, args)
    path = profile.save(out)
    record = profile.calibration
    protocol = record["protocol"]
    windows = f"{'BOS + ' if protocol['bos'] is True else 'no BOS, '}{protocol['seq_len']}-token windows"
    if hidden is not None:
        if "positional_fits" in record:
            console.print(_fits_table({"fits": record["positional_fits"]}, f"{profile.model.describe()}: {windows}, "
                                                                             "positional sink"))
        console.print(_hidden_fits_table(record, f"{profile.model.describe()}: {windows}, hidden sinks"))
        console.print(_selection_table(record))
    elif fits is not None:
        console.print(_fits_table(record, f"{profile.model.describe()}: {windows}"))
        console.print(_selection_table(record))
    else:
        console.print(_fits_table(record, f"{profile.model.describe()}: {windows}"))
        console.print(_pooled_table(record))
    console.print(f"{profile.describe()}\n{record['seconds']} s; wrote {path}", **PATH_LINE)
    if args.evaluate:
        _evaluate(console, model, tokenizer, fits, profile, texts, args)
    return 0


def default_out(model: str) -> str:
    """The profile path without ``--out``: ``<model>.profile.json`` in the working folder. A local folder
    (``../lm/tiny_full``, ``./m/``) is named by its own name (``tiny_full``), never by the path (that gave
    the hidden file ``.._lm_tiny_full.profile.json``); a registry name or hub id keeps its name, ``/`` as ``_``
    (``HuggingFaceTB_SmolLM2-135M``)."""
    from pathlib import Path

    path = Path(model).expanduser()
    if path.exists():
        name = path.resolve().name or "model"
    else:
        name = model.strip("/").replace("/", "_") or "model"
    return f"{name}.profile.json"


def _check_numbers(args: argparse.Namespace, n_domains: int) -> None:
    """The numeric options, each refused by its flag's name where its value means nothing: before the
    texts are tokenized or the model is loaded, never as torch's error or a crash at save."""
    from sinkfix.analysis.calibration import check_finite, min_seq_len, tokens_needed
    from sinkfix.errors import UsageError

    shortest = min_seq_len(args.bos)
    if args.seq_len < shortest:
        raise UsageError(f"--seq-len must be >= {shortest} {'with' if args.bos else 'without'} --bos (two text "
                         f"tokens per window at the least, one predicted from the other), got {args.seq_len}")
    if args.statistics and args.seq_len - 1 < STATISTICS_MIN_ROWS:
        # known now, not after every fit and the selection (the statistics are the last step)
        raise UsageError(f"--seq-len {args.seq_len} gives windows with {args.seq_len - 1} rows that see a non-sink key; "
                         f"the guard statistics need {STATISTICS_MIN_ROWS}: use --seq-len {STATISTICS_MIN_ROWS + 1} "
                         "or more, or --no-statistics")
    check_finite(args.lr, "--lr (Adam learning rate)", 0, inclusive=False, error=UsageError)
    check_finite(args.reg, "--reg (weight of the pull toward beta = 1)", 0, inclusive=True, error=UsageError)
    if not 0 <= args.val_fraction < 1:  # NaN too
        raise UsageError(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    if args.rule == "robust" and args.val_fraction == 0:
        raise UsageError("--val-fraction must be > 0 with --rule robust: each domain's fit stops early on its held-out "
                         "windows, and the selection scores the other domains' fits on them")
    if args.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {args.steps}")
    robust_positional = args.rule == "robust" and args.sinks in ("positional", "combined")
    for flag, steps, applies in (("--steps", args.steps, robust_positional),
                                 ("--hidden-steps", args.hidden_steps, args.sinks != "positional")):
        if applies and 0 < steps < n_domains:
            raise UsageError(f"{flag} {steps} split evenly among {n_domains} domains leaves {n_domains - steps} of them 0 "
                             f"steps, so their fits would be the identity; give at least {n_domains} (or 0 on purpose)")
    if args.max_tokens is not None:
        if args.max_tokens < 1:
            raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        windows, needed = tokens_needed(args.seq_len, args.bos, args.val_fraction)
        if args.max_tokens < needed:
            raise UsageError(f"--max-tokens {args.max_tokens} cannot give a text the {windows} full "
                             f"{args.seq_len}-token window(s) a calibration{' and validation split' * (windows == 2)} "
                             f"needs: that takes at least {needed} tokens; raise --max-tokens or lower --seq-len")
    if args.eval_windows is not None and not args.evaluate:  # an option that would do nothing: refused
        raise UsageError("--eval-windows sets how --evaluate scores each domain: give it together with --evaluate")
    if args.eval_windows is None:
        args.eval_windows = EVAL_WINDOWS
    if args.eval_windows < 1:
        raise UsageError(f"--eval-windows must be >= 1, got {args.eval_windows}")


#: The hidden-sink options and their defaults: given or not, each value is checked; given with
#: --sinks positional, which fits no hidden sinks, they are refused, never ignored.
HIDDEN_DEFAULTS = {"hidden_threshold": 0.1, "hidden_steps": 150, "hidden_lr": 0.2, "hidden_init_beta": 0.9}

#: The positional-sink fit's options, the same way round: given with --sinks hidden, which fits no
#: positional parameters (only the window settings --seq-len, --bos, --max-tokens and --val-fraction
#: reach its fits), they are refused; they were accepted, unused, and recorded in the profile's
#: calibration.hyper as if used. Their defaults stay on the parser; _Given records which were given.
POSITIONAL_OPTIONS = ("steps", "lr", "reg", "precision", "virtual_logits", "virtual_on_sink_rows")

#: What a --sinks hidden profile's calibration.hyper records: the settings its fits read.
HIDDEN_HYPER = ("val_fraction", "max_tokens")


def _check_option_combinations(args: argparse.Namespace) -> None:
    """Every value checked whether or not the mode uses it, and options the run would ignore refused
    (as --eval-windows without --evaluate is), before the texts are tokenized or the model loaded;
    the defaults of options left out are filled in here."""
    from sinkfix.analysis.calibration import check_finite
    from sinkfix.errors import UsageError

    given = [name for name in HIDDEN_DEFAULTS if getattr(args, name) is not None]
    for name, default in HIDDEN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    given_options = getattr(args, "given_options", None) or {}
    positional_given = [given_options[name] for name in POSITIONAL_OPTIONS if name in given_options]
    if positional_given and args.sinks == "hidden":
        flags = ", ".join(positional_given)
        one = len(positional_given) == 1
        raise UsageError(f"{flags} set{'s' * one} the positional-sink fit of --sinks positional or combined; "
                         f"--sinks hidden fits no positional parameters (its own are --hidden-*): drop "
                         f"{'it' if one else 'them'}, or choose --sinks positional|combined")
    if args.evaluate and args.rule == "pooled":
        # it printed a note and did nothing (and --eval-windows went unused): refused, as --evaluate is
        # with --sinks hidden|combined
        raise UsageError("--evaluate rebuilds the profile without each domain (leave-one-domain-out), which needs "
                         "--rule robust; --rule pooled's own table already shows its validation windows: drop "
                         "--evaluate")
    for flag, what, value in (("--hidden-threshold", "the hidden-sink threshold", args.hidden_threshold),
                              ("--hidden-init-beta", "the starting hidden-sink beta", args.hidden_init_beta)):
        if not 0 < value < 1:  # NaN too
            raise UsageError(f"{flag}: {what} must lie in (0, 1), got {value}")
    check_finite(args.hidden_lr, "--hidden-lr (hidden sinks' Adam learning rate)", 0, inclusive=False, error=UsageError)
    if args.hidden_steps < 0:
        raise UsageError(f"--hidden-steps must be >= 0, got {args.hidden_steps}")
    if given and args.sinks == "positional":
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"{flags} set{'s' * (len(given) == 1)} the hidden-sink fits of --sinks hidden or combined; "
                         f"--sinks positional fits none: drop {'it' if len(given) == 1 else 'them'}, or choose "
                         "--sinks hidden|combined")
    content = args.sinks != "positional"
    if args.statistics is None:
        args.statistics = not content
    elif args.statistics and content:
        # the guard statistics are measured through the monitor's attention listener, which content-
        # dependent sinks do not have: the pass failed with a traceback after every fit and the selection
        raise UsageError(f"--statistics records the sink-share ranges the monitor's guard reads, and the monitor does "
                         f"not serve content-dependent sinks (--sinks {args.sinks}): drop --statistics")
    if content and args.statistics_windows is not None:
        raise UsageError(f"--statistics-windows sets the windows of the guard statistics, which --sinks {args.sinks} "
                         "profiles do not carry (the monitor does not serve content-dependent sinks): drop it")
    if args.statistics_windows is not None:
        if args.statistics_windows < 1:
            raise UsageError(f"--statistics-windows must be >= 1, got {args.statistics_windows} "
                             "(use --no-statistics for a profile without guard statistics)")
        if not args.statistics:
            raise UsageError("--statistics-windows sets the windows the guard statistics are measured on; "
                             "--no-statistics measures none: give one or the other")
    else:
        args.statistics_windows = STATISTICS_WINDOWS
    if not args.virtual_logits and args.virtual_on_sink_rows is not None:
        flag = "--virtual-on-sink-rows" if args.virtual_on_sink_rows else "--no-virtual-on-sink-rows"
        raise UsageError(f"{flag} says where the virtual sink logits act; --no-virtual-logits fits none: "
                         "give one or the other")


def _refuse_duplicate_texts(texts) -> None:
    """The same text twice (one file given twice, or two files with one content) is refused, as a
    built-in domain named twice is (sinkfix.texts): each copy's fit would be validated and, left out,
    scored on the other copy, so the selection and leave-one-domain-out would treat one text as two domains."""
    from sinkfix.analysis.calibration import duplicate_texts
    from sinkfix.errors import UsageError

    pairs = duplicate_texts({name: t.text for name, t in texts.items()})
    if pairs:
        named = "; ".join(f"{b!r} ({texts[b].source}) is the same text as {a!r} ({texts[a].source})" for a, b in pairs)
        raise UsageError(f"a calibration text is given twice: {named}; give each text once")


def _refuse_duplicate_windows(texts, windows) -> None:
    """Two domains whose windows are mostly the same token runs are one text twice, however their
    strings differ: a copy with one more trailing newline or one leading space, or a file that only
    goes on past --max-tokens tokens, was calibrated as a second domain (:func:`_refuse_duplicate_texts`
    compares strings, before the tokenizer is loaded)."""
    from sinkfix.analysis.calibration import duplicate_windows
    from sinkfix.errors import UsageError

    found = duplicate_windows(windows)
    if found:
        named = "; ".join(
            (f"{d.copy!r} ({texts[d.copy].source}) is a part of {d.first!r} ({texts[d.first].source})" if d.contained
             else f"{d.copy!r} ({texts[d.copy].source}) is the same text as {d.first!r} ({texts[d.first].source})")
            + f": {d.share:.0%} of {d.copy!r}'s token runs recur in {d.first!r}" for d in found)
        raise UsageError(f"a calibration text is given twice: {named} (in the windows a calibration reads); each "
                         "would be scored on a fit that saw its text; give each text once")


def _check_selection(args: argparse.Namespace) -> None:
    """``--selection`` chooses among the positional robust rule's candidates: refused where no such
    selection is made (never silently ignored); otherwise the default fills in."""
    from sinkfix.errors import UsageError

    if args.selection is not None and args.rule == "pooled":
        raise UsageError("--selection chooses among the robust rule's candidates; --rule pooled makes no selection")
    if args.selection is not None and args.sinks == "hidden":
        raise UsageError("--selection applies to the positional selection (--sinks positional or combined); the "
                         "hidden-sink selection chooses by the worst case")
    if args.selection is None:
        args.selection = DEFAULT_SELECTION_RULE


def _hidden_settings(args: argparse.Namespace):
    """The hidden-sink settings of ``--sinks hidden|combined`` (None for positional), checked before
    anything is loaded; option combinations that do not exist are refused."""
    from sinkfix.analysis.content_calibration import HiddenSettings
    from sinkfix.errors import UsageError

    if args.sinks == "positional":
        return None
    if args.rule != "robust":
        raise UsageError(f"--sinks {args.sinks} uses the domain-robust rule only; drop --rule {args.rule}")
    if args.evaluate:
        raise UsageError(f"--evaluate is not implemented for --sinks {args.sinks}; the leave-one-domain-out table of "
                         "hidden and combined profiles is made by benchmarks/content_lodo.py (in the source "
                         "distribution, not installed with the package)")
    return HiddenSettings(threshold=args.hidden_threshold, steps=args.hidden_steps, lr=args.hidden_lr,
                          init_beta=args.hidden_init_beta)


def _content_profile(console, model, tokenizer, texts: dict[str, str], settings, hidden, sinks: str,
                     selection_rule: str, log=None):
    """``--sinks hidden``: per-domain hidden-sink fits, selected domain-robustly; ``combined``: the
    positional calibration first, then hidden-sink fits on top of each domain's positional fit."""
    from sinkfix.analysis.calibration import fit_domains, robust_profile
    from sinkfix.analysis.content_calibration import content_profile, fit_hidden_domains
    from sinkfix.analysis.robust import candidates

    log = log or console.print
    if sinks == "hidden":
        fits = fit_hidden_domains(model, tokenizer, texts, settings, hidden, log=log)
        profile = content_profile(model, fits, log=log)
        # the positional settings (steps, lr, reg, precision, virtual logits) reach no hidden-sink fit:
        # recorded, they read as how the profile was made (the hidden ones are in "hidden")
        profile.calibration["hyper"] = {k: v for k, v in profile.calibration["hyper"].items() if k in HIDDEN_HYPER}
        return profile
    positional_fits = fit_domains(model, tokenizer, texts, settings, log=log)
    positional = robust_profile(model, positional_fits, log=log, selection_rule=selection_rule)
    chosen = positional.calibration["selection"]["chosen"]
    rule = next(c for c in candidates() if c.name == chosen)
    fits = fit_hidden_domains(model, tokenizer, texts, settings, hidden, log=log,
                              bases={d: f.parameters for d, f in positional_fits.fits.items()},
                              stock={d: f.val_before for d, f in positional_fits.fits.items()})
    profile = content_profile(model, fits, positional_fits, rule, log=log)
    profile.calibration["positional_selection"] = positional.calibration["selection"]
    profile.calibration["seconds"] = round(profile.calibration["seconds"] + positional.calibration["seconds"], 1)
    return profile


def _hidden_fits_table(record: dict, title: str):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for col in ("domain", "calib windows", "val windows", "best step", "val NLL unpatched", "val NLL base",
                "val NLL fit", "change vs base"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, fit in record["fits"].items():
        table.add_row(escape(name), str(fit["calib_windows"]), str(fit["val_windows"]), f"{fit['best_step']} of {fit['steps_run']}",
                      f"{fit['val_nll_stock']:.4f}", f"{fit['val_nll_base']:.4f}", f"{fit['val_nll_after']:.4f}",
                      f"{100 * fit['val_ppl_change_vs_base']:+.2f}%")
    return table


def _evaluate(console, model, tokenizer, fits, profile, texts, args) -> None:
    """Leave-one-domain-out for the robust rule (--evaluate with --rule pooled is refused up front)."""
    from rich.markup import escape

    from sinkfix.analysis.lodo import leave_one_domain_out
    from sinkfix.texts import DOMAINS, domain_text

    eval_texts = {name: domain_text(name, "eval") if name in DOMAINS and not args.text and not args.dataset else None
                  for name in texts}
    # --eval-windows holds for domains scored on their validation windows too (it was ignored there)
    result = leave_one_domain_out(model, tokenizer, fits, eval_texts, eval_windows=args.eval_windows,
                                  per_window=True, selection_rule=args.selection,
                                  validation_windows=args.eval_windows)
    console.print(_lodo_table(result))
    if any(v is None for v in eval_texts.values()):
        console.print("domains without an evaluation text are scored on their validation windows: the rebuilt "
                      "profile never saw them, the profile from all domains used them for early stopping")
    worse = [r["domain"] for r in result.rows() if r["without_change"] > 0]
    if worse:
        console.print(f"[bold]left out of the calibration, these domains got worse: "
                      f"{escape(', '.join(worse))}[/bold]")
