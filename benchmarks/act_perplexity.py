"""Perplexity change of ACT's rule (content-dependent sinks) against the stock model.

Text: sinkfix's built-in domains, "eval" split (prose: the pydoc topics of the Python standard
library; code: the source of six standard-library modules, sinkfix.texts). Protocol: windows of
``--seq-len`` tokens, stride = window body, first ``--windows`` windows of each domain, both BOS
protocols. Nothing is fitted here: ACT's defaults (beta 0.4, threshold 0.1, every head) and
variants given on the command line, so no domain is "seen".

    OMP_NUM_THREADS=1 python benchmarks/act_perplexity.py --model smollm2-135m --windows 8
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import sinkfix
from sinkfix import ContentSinks, Policy
from sinkfix.bench.provenance import provenance, provenance_line
from sinkfix.errors import UsageError
from sinkfix.evaluate import check_positions, perplexity
from sinkfix.texts import DOMAINS, domain_text


def _policies() -> dict[str, Policy]:
    return {
        "ACT defaults (beta 0.4, threshold 0.1, all heads)": Policy.act(),
        "ACT, keys seen by >= 32 rows judged": Policy(content_sinks=ContentSinks(0.1, 0.4, min_rows=32)),
        "ACT, beta 0.8": Policy.act(beta=0.8),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="window tokens (at least 3: the BOS protocol's window holds the BOS and 2 text tokens)")
    parser.add_argument("--windows", type=int, default=8, help="windows per domain (at least 1)")
    args = parser.parse_args(argv)
    # both BOS protocols run: the stricter one (sinkfix.evaluate.make_windows with a BOS) sets the minimum,
    # checked now rather than after the whole no-BOS half of the table
    if args.seq_len < 3:
        parser.error(f"--seq-len must be at least 3 (the BOS protocol's window holds the BOS and 2 text tokens), "
                     f"got {args.seq_len}")
    if args.windows < 1:
        parser.error(f"--windows must be at least 1, got {args.windows}")
    torch.set_num_threads(1)
    try:
        model, tokenizer = sinkfix.load_model(args.model)
    except sinkfix.ModelLoadError as error:
        parser.error(f"--model {args.model}: {error}")
    try:
        check_positions(args.seq_len, model.config, "--seq-len", args.model)
    except UsageError as error:
        parser.error(str(error))
    print(provenance_line(provenance(torch.device("cpu"))), flush=True)
    print(f"model {args.model}, CPU fp32, torch {torch.__version__}, python {platform.python_version()}")
    print(f"text: built-in domains, eval split; {args.seq_len}-token windows, first {args.windows} per domain\n")
    print("| policy | BOS | domain | stock ppl | corrected ppl | change |")
    print("|---|---|---|---|---|---|")
    for bos in (False, True):
        for domain in DOMAINS:
            text = domain_text(domain, "eval")
            start = time.perf_counter()
            stock = perplexity(model, tokenizer, text, seq_len=args.seq_len, bos=bos, max_windows=args.windows)
            for name, policy in _policies().items():
                with sinkfix.patch(model, policy, backend="torch"):
                    got = perplexity(model, tokenizer, text, seq_len=args.seq_len, bos=bos, max_windows=args.windows)
                change = 100 * (got.ppl / stock.ppl - 1)
                print(f"| {name} | {'yes' if bos else 'no'} | {domain} | {stock.ppl:.3f} | {got.ppl:.3f} | "
                      f"{change:+.2f}% |", flush=True)
            print(f"<!-- {domain}, bos={bos}: {stock.protocol()}, {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
