"""Fit hidden-sink beta and heads (calibrate_hidden_sinks) on the built-in "calib" texts, then
measure perplexity on the built-in "eval" texts against the stock model.

Text: calibration on sinkfix's built-in domains, "calib" split (prose: docstrings of standard
library modules; code: the source of twelve standard-library modules); evaluation on the "eval"
split (prose: pydoc topics; code: six other modules). Same domains, different text: in-domain
held-out, not leave-one-domain-out.

    OMP_NUM_THREADS=1 python benchmarks/hidden_sink_calibration.py --model smollm2-135m --steps 20
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import sinkfix
from sinkfix.analysis.content_calibration import calibrate_hidden_sinks
from sinkfix.evaluate import perplexity
from sinkfix.texts import DOMAINS, domain_text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    # --seq-len used to look like it set the evaluation windows too, which were fixed at 512 tokens
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length (default 256); "
                        "the evaluation windows are --eval-seq-len")
    parser.add_argument("--eval-seq-len", type=int, default=512,
                        help="evaluation window length for the perplexities (default 512)")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bos", action="store_true")
    parser.add_argument("--out", default=None, help="save the profile here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = sinkfix.load_model(args.model)
    print(f"model {args.model}, CPU fp32, torch {torch.__version__}, python {platform.python_version()}", flush=True)
    start = time.perf_counter()
    texts = {d: domain_text(d, "calib") for d in DOMAINS}
    profile = calibrate_hidden_sinks(model, tokenizer, texts, seq_len=args.seq_len, bos=args.bos,
                                     max_tokens=args.calib_tokens, steps=args.steps, lr=args.lr, eval_every=5,
                                     progress=False)
    rec = profile.calibration
    print(f"fit: {time.perf_counter() - start:.0f} s, best step {rec['best_step']}, val NLL stock "
          f"{rec['val_nll_stock']:.4f}, init {rec['val_nll_init']:.4f}, best {rec['val_nll_best']:.4f}, heads "
          f"{rec['heads_chosen']}/{rec['heads_total']}", flush=True)
    if args.out:
        profile.save(args.out)
    print("| policy | BOS | domain (eval split) | stock ppl | corrected ppl | change |")
    print("|---|---|---|---|---|---|")
    for domain in DOMAINS:
        text = domain_text(domain, "eval")
        stock = perplexity(model, tokenizer, text, seq_len=args.eval_seq_len, bos=args.bos,
                           max_windows=args.eval_windows)
        with sinkfix.patch(model, profile, backend="torch"):
            got = perplexity(model, tokenizer, text, seq_len=args.eval_seq_len, bos=args.bos,
                             max_windows=args.eval_windows)
        print(f"| calibrated hidden-sink beta + heads | {'yes' if args.bos else 'no'} | {domain} | {stock.ppl:.3f} | "
              f"{got.ppl:.3f} | {100 * (got.ppl / stock.ppl - 1):+.2f}% |", flush=True)
        print(f"<!-- {stock.protocol()} -->", flush=True)


if __name__ == "__main__":
    main()
