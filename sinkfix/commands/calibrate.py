"""``sinkfix calibrate``: fit a per-head profile on calibration text and save it as JSON.

    sinkfix calibrate --model smollm2-135m --out smollm2.profile.json       # every built-in domain
    sinkfix calibrate --model smollm2-135m --out p.json --evaluate          # + leave-one-domain-out table
    sinkfix calibrate --model smollm2-135m --text notes.txt --text src.py --out p.json
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from sinkfix.commands.inspect import add_common_arguments, describe_texts, texts_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "calibrate", help="fit per-head sink scaling to next-token NLL and save a profile",
        description="Fit one sink-scaling beta and one virtual sink logit per (layer, head) by gradient descent on "
                    "next-token NLL of calibration text (model weights frozen), with held-out validation windows and "
                    "early stopping, and save the result as a versioned JSON profile for `sinkfix.patch`. By default "
                    "each domain is fitted on its own and the fits are combined so that no domain is traded for "
                    "another, chosen by leave-one-domain-out on the validation windows (docs/calibration.md).",
    )
    add_common_arguments(parser, default_max_tokens=8192, split="calib")
    parser.add_argument("--out", default=None, help="profile path (default ./<model>.profile.json)")
    parser.add_argument("--rule", choices=("robust", "pooled"), default="robust",
                        help="robust (default): one fit per domain, combined by leave-one-domain-out selection; "
                             "pooled: one fit on all texts together (not domain-robust)")
    parser.add_argument("--steps", type=int, default=150,
                        help="Adam steps in all, one window each (default 150; the robust rule splits them evenly "
                             "among the domains)")
    parser.add_argument("--lr", type=float, default=0.2, help="Adam learning rate on logit(beta) (default 0.2)")
    parser.add_argument("--reg", type=float, default=0.05, help="pull toward beta = 1 (default 0.05)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="held-out share of each text (default 0.25)")
    parser.add_argument("--virtual-logits", action=argparse.BooleanOptionalAction, default=True,
                        help="also fit one virtual sink logit per head (default: yes)")
    parser.add_argument("--virtual-on-sink-rows", action=argparse.BooleanOptionalAction, default=None,
                        help="let the virtual logits act on the sink's own row too (default: only with --bos, "
                             "where that row is the BOS token)")
    parser.add_argument("--evaluate", action="store_true",
                        help="afterwards, rebuild the profile without each domain in turn and compare perplexity on "
                             "that domain's evaluation text (leave-one-domain-out; costs about as much again as "
                             "the calibration)")
    parser.add_argument("--eval-windows", type=int, default=8, help="windows per domain for --evaluate (default 8)")
    parser.add_argument("--statistics", action=argparse.BooleanOptionalAction, default=True,
                        help="record the sink-share ranges seen on the calibration text in the profile, for the "
                             "telemetry guard (one more forward pass over the windows; default: yes)")
    parser.set_defaults(run=run)
    return parser


def _with_statistics(profile, model, tokenizer, texts: dict[str, str], args: argparse.Namespace):
    """The profile plus the sink-share ranges its patched model shows on the calibration windows
    (sinkfix.telemetry.calibration_statistics), kept apart from the fit itself."""
    import sinkfix
    from sinkfix.analysis.calibration import calibration_windows
    from sinkfix.telemetry import calibration_statistics

    windows = [w for text in texts.values() for w in calibration_windows(
        tokenizer, text, seq_len=args.seq_len, bos=args.bos, max_tokens=args.max_tokens)]
    protocol = {"seq_len": args.seq_len, "bos": args.bos, "max_tokens": args.max_tokens, "texts": list(texts)}
    with sinkfix.patch(model, profile):
        return profile.with_statistics(calibration_statistics(model, windows, protocol=protocol))


def _fits_table(record: dict, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("domain", "calib windows", "val windows", "best step", "val NLL unpatched", "val NLL fit",
                "val ppl change"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, fit in record["fits"].items():
        table.add_row(name, str(fit["calib_windows"]), str(fit["val_windows"]),
                      f"{fit['best_step']} of {fit['steps_run']}", f"{fit['val_nll_before']:.4f}", f"{fit['val_nll_after']:.4f}",
                      "-" if fit["val_ppl_change"] is None else f"{100 * fit['val_ppl_change']:+.2f}%")
    return table


def _selection_table(record: dict):
    from rich.table import Table

    selection = record["selection"]
    changes = selection["changes"]
    domains = list(record["texts"])
    table = Table(title="candidates, each rebuilt without the domain it is scored on (validation windows); "
                        "chosen: the best worst case", title_justify="left")
    table.add_column("candidate")
    for d in domains:
        table.add_column(d, justify="right")
    table.add_column("worst", justify="right")
    for name, per_domain in changes.items():
        worst = max(per_domain.values())
        table.add_row(name, *[f"{100 * per_domain[d]:+.2f}%" for d in domains], f"{100 * worst:+.2f}%",
                      style="bold" if name == selection["chosen"] else None)
    return table


def _lodo_table(result):
    from rich.table import Table

    p = result.protocol
    table = Table(title=f"leave-one-domain-out: {'BOS + ' if p['bos'] is True else 'no BOS, '}{p['seq_len']}-token "
                        f"windows, first {p['eval_windows']} of each domain's evaluation text; perplexity change vs "
                        "unpatched", title_justify="left")
    for col in ("domain", "scored on", "tokens", "ppl unpatched", "best global beta",
                "unseen: profile without it", "calibrated: profile with it"):
        table.add_column(col, justify="left" if col in ("domain", "scored on") else "right")
    for r in result.rows():
        table.add_row(r["domain"], r["source"], str(r["tokens"]), f"{r['stock_ppl']:.3f}",
                      f"{100 * r['best_global_change']:+.2f}% ({r['best_global_beta']:g})",
                      f"{100 * r['without_change']:+.2f}% ({r['without_chosen']})", f"{100 * r['with_change']:+.2f}%")
    return table


def _pooled_table(record: dict):
    from rich.table import Table

    table = Table(title="validation windows of the calibrated domains (not leave-one-domain-out: rule pooled)",
                  title_justify="left")
    table.add_column("domain")
    table.add_column("val ppl change", justify="right")
    for name, change in record["ppl_change"]["val_per_domain"].items():
        table.add_row(name, "-" if change != change else f"{100 * change:+.2f}%")
    return table


def run(args: argparse.Namespace) -> int:
    import torch

    import sinkfix
    from sinkfix.analysis.calibration import (CalibrationSettings, calibrate, fit_domains, require_two_domains,
                                              robust_profile)
    from sinkfix.analysis.lodo import require_three_domains
    from sinkfix.commands.inspect import wide_console

    if args.threads:
        torch.set_num_threads(args.threads)
    console = wide_console()
    texts = texts_from_args(args, "calib")
    console.print(describe_texts(texts), markup=False)
    out = args.out or f"{args.model.replace('/', '_')}.profile.json"
    settings = CalibrationSettings(seq_len=args.seq_len, bos=args.bos, max_tokens=args.max_tokens,
                                   val_fraction=args.val_fraction, steps=args.steps, lr=args.lr, reg=args.reg,
                                   virtual_logits=args.virtual_logits,
                                   virtual_logit_on_sink_rows=args.virtual_on_sink_rows)
    plain = {name: t.text for name, t in texts.items()}
    if args.rule == "robust":  # the clear errors, before the model is loaded
        require_two_domains(list(plain))
        if args.evaluate:
            require_three_domains(list(plain))
    console.print(f"loading {args.model} ...")
    model, tokenizer = sinkfix.load_model(args.model)
    fits = None
    if args.rule == "pooled":
        profile = calibrate(model, tokenizer, plain, rule="pooled", **asdict(settings), log=console.print)
    else:
        fits = fit_domains(model, tokenizer, plain, settings, log=console.print)
        profile = robust_profile(model, fits, log=console.print)
    if args.statistics:
        profile = _with_statistics(profile, model, tokenizer, plain, args)
    path = profile.save(out)
    record = profile.calibration
    protocol = record["protocol"]
    windows = f"{'BOS + ' if protocol['bos'] is True else 'no BOS, '}{protocol['seq_len']}-token windows"
    console.print(_fits_table(record, f"{profile.model.describe()}: {windows}"))
    if fits is not None:
        console.print(_selection_table(record))
    else:
        console.print(_pooled_table(record))
    console.print(f"{profile.describe()}\n{record['seconds']} s; wrote {path}")
    if args.evaluate:
        _evaluate(console, model, tokenizer, fits, profile, texts, args)
    return 0


def _evaluate(console, model, tokenizer, fits, profile, texts, args) -> None:
    """Leave-one-domain-out for the robust rule; calibrated domains only for the pooled one."""
    from sinkfix.analysis.lodo import leave_one_domain_out
    from sinkfix.texts import DOMAINS, domain_text

    eval_texts = {name: domain_text(name, "eval") if name in DOMAINS and not args.text and not args.dataset else None
                  for name in texts}
    if fits is None:
        console.print("--evaluate with --rule pooled: the table above is all there is (held-out windows of the "
                      "calibrated domains); leave-one-domain-out needs --rule robust")
        return
    result = leave_one_domain_out(model, tokenizer, fits, eval_texts, eval_windows=args.eval_windows)
    console.print(_lodo_table(result))
    if any(v is None for v in eval_texts.values()):
        console.print("domains without an evaluation text are scored on their validation windows: the rebuilt "
                      "profile never saw them, the profile from all domains used them for early stopping")
    worse = [r["domain"] for r in result.rows() if r["without_change"] > 0]
    if worse:
        console.print(f"[bold]left out of the calibration, these domains got worse: {', '.join(worse)}[/bold]")
