"""``sinkfix calibrate``: fit a per-head profile on calibration text and save it as JSON.

    sinkfix calibrate --model smollm2-135m --out smollm2.profile.json       # built-in prose + code
    sinkfix calibrate --model smollm2-135m --text notes.txt --text src.py --out p.json --evaluate
"""

from __future__ import annotations

import argparse

from sinkfix.commands.inspect import add_common_arguments, describe_texts, texts_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "calibrate", help="fit per-head sink scaling to next-token NLL and save a profile",
        description="Fit one sink-scaling beta per (layer, head) by gradient descent on next-token NLL of "
                    "calibration text (model weights frozen), with a held-out validation split and early "
                    "stopping, and save the result as a versioned JSON profile for `sinkfix.patch`.",
    )
    add_common_arguments(parser, default_max_tokens=16384, split="calib")
    parser.add_argument("--out", default=None, help="profile path (default ./<model>.profile.json)")
    parser.add_argument("--steps", type=int, default=120, help="Adam steps, one window each (default 120)")
    parser.add_argument("--lr", type=float, default=0.2, help="Adam learning rate on logit(beta) (default 0.2)")
    parser.add_argument("--reg", type=float, default=0.05, help="pull toward beta = 1 (default 0.05)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="held-out share of each text (default 0.25)")
    parser.add_argument("--virtual-logits", action=argparse.BooleanOptionalAction, default=True,
                        help="also fit one virtual sink logit per head (default: yes)")
    parser.add_argument("--virtual-on-sink-rows", action=argparse.BooleanOptionalAction, default=None,
                        help="let the virtual logits act on the sink's own row too (default: only with --bos, "
                             "where that row is the BOS token)")
    parser.add_argument("--evaluate", action="store_true",
                        help="afterwards, compare perplexity on the built-in held-out evaluation texts")
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


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    import sinkfix
    from sinkfix.analysis.calibration import calibrate
    from sinkfix.texts import domain_text
    from sinkfix.commands.inspect import wide_console
    from sinkfix.evaluate import perplexity
    from sinkfix.texts import DOMAINS

    if args.threads:
        torch.set_num_threads(args.threads)
    console = wide_console()
    texts = texts_from_args(args, "calib")
    console.print(describe_texts(texts), markup=False)
    out = args.out or f"{args.model.replace('/', '_')}.profile.json"
    console.print(f"loading {args.model} ...")
    model, tokenizer = sinkfix.load_model(args.model)
    plain = {name: t.text for name, t in texts.items()}
    profile = calibrate(model, tokenizer, plain, seq_len=args.seq_len, bos=args.bos, max_tokens=args.max_tokens,
                        val_fraction=args.val_fraction, steps=args.steps, lr=args.lr, reg=args.reg,
                        virtual_logits=args.virtual_logits, virtual_logit_on_sink_rows=args.virtual_on_sink_rows,
                        log=console.print)
    if args.statistics:
        profile = _with_statistics(profile, model, tokenizer, plain, args)
    path = profile.save(out)
    record = profile.calibration
    nll = record["nll"]
    protocol = record["protocol"]
    table = Table(title=f"{profile.model.describe()}: {'BOS + ' if protocol['bos'] else 'no BOS, '}"
                        f"{protocol['seq_len']}-token windows", title_justify="left")
    table.add_column("split")
    table.add_column("windows", justify="right")
    table.add_column("NLL unpatched", justify="right")
    table.add_column("NLL profile", justify="right")
    table.add_column("perplexity change", justify="right")
    windows = record["texts"]
    for split, key in (("calibration", "calib"), ("validation", "val")):
        before, after = nll[f"{key}_before"], nll[f"{key}_after"]
        count = sum(t[f"{key}_windows"] for t in windows.values())
        change = "-" if before != before else f"{100 * (torch.tensor(after - before).exp().item() - 1):+.2f}%"
        table.add_row(split, str(count), f"{before:.4f}", f"{after:.4f}", change)
    console.print(table)
    console.print(f"{profile.describe()}\nbest step {record['best_step']} of {record['steps_run']}, "
                  f"{record['seconds']} s; wrote {path}")
    if args.evaluate:
        ev = Table(title="held-out evaluation (built-in eval texts, sources not used for calibration)",
                   title_justify="left")
        for col in ("domain", "protocol", "ppl unpatched", "ppl profile", "change"):
            ev.add_column(col)
        for domain in DOMAINS:
            text = domain_text(domain, "eval")
            base = perplexity(model, tokenizer, text, seq_len=args.seq_len, bos=args.bos, max_windows=args.eval_windows)
            with sinkfix.patch(model, profile):
                fixed = perplexity(model, tokenizer, text, seq_len=args.seq_len, bos=args.bos,
                                   max_windows=args.eval_windows)
            ev.add_row(domain, base.protocol(), f"{base.ppl:.3f}", f"{fixed.ppl:.3f}",
                       f"{100 * (fixed.ppl / base.ppl - 1):+.2f}%")
        console.print(ev)
    return 0
