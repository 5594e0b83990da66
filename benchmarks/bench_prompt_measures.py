"""What the monitor's prompt measures cost after a real prefill, by how they are computed.

    python benchmarks/bench_prompt_measures.py                  # SmolLM2-135M, 512 tokens, 1 thread
    python benchmarks/bench_prompt_measures.py --rounds 20 --json prompt-measures.json

A monitored request measures its prompt once, after the forward's last decoder layer
(``sinkfix.telemetry.prompt``): for every layer a block of sampled probability rows rebuilt from
the call's own log-sum-exp. This benchmark times that step inside real monitored prefills, the
methods alternating from one prefill to the next (so the caches are as a request leaves them, not
warmed by repeating the step):

* ``layer, one part``: one layer at a time, every sampled row on every key;
* ``layer, parts``: one layer at a time, the rows in parts scored on the keys they may see;
* ``together`` (what the monitor does): the layers merged in batches of at most
  ``MERGED_BLOCK_ELEMENTS`` block entries, in parts.

Main-thread CPU time of the step alone (``thread_time``), median over ``--rounds`` prefills per
method, with each method's ratio to the first and its 95% paired-bootstrap interval. All three
compute the same numbers; the largest difference between their results is printed and checked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sinkfix
from sinkfix.bench import prefill_kwargs
from sinkfix.bench.stats import ratio_of_medians
from sinkfix.evaluate import bos_token_id, tokenize
from sinkfix.telemetry import SAMPLE_ROWS
from sinkfix.telemetry import prompt as measures
from sinkfix.texts import domain_text

METHODS = ("layer, one part", "layer, parts", "together")


def _one_part(call: measures.SampledCall) -> measures.SampledCall:
    rows, keys = call.lse.shape[-1], call.key.shape[2]
    return call._replace(layout=call.layout._replace(chunks=((0, rows, keys),)))


def _measure(method: str, sampled: list, threshold: float, workspace=None) -> list:
    """Every method writes into the monitor's workspace, as the shipped one does."""
    if method == "layer, one part":
        return [measures.measure_sampled(_one_part(call), threshold=threshold, workspace=workspace) for call in sampled]
    if method == "layer, parts":
        return [measures.measure_sampled(call, threshold=threshold, workspace=workspace) for call in sampled]
    return measures.measure_sampled_many(sampled, threshold=threshold, workspace=workspace)


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, NaN in both counted as equal (value drain past a layer's kv
    heads) and NaN in one only as infinite, so that a method losing a number fails the check."""
    both_nan = a.isnan() & b.isnan()
    return float(torch.where(both_nan, 0.0, (a - b).abs().nan_to_num(float("inf"))).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20, help="monitored prefills per method")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length (tokens)")
    parser.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    monitor_module = sys.modules["sinkfix.telemetry.monitor"]

    model, tokenizer = sinkfix.load_model(args.model)
    ids = tokenize(tokenizer, domain_text("pydoc", "eval"))[: args.prompt - 1]
    prompt = torch.cat([torch.tensor([bos_token_id(tokenizer)]), ids])[None]
    extra = prefill_kwargs(model)
    spent: dict[str, list[float]] = {method: [] for method in METHODS}
    results: dict[str, list] = {}
    current = {"method": METHODS[0], "keep": False}

    def timed(sampled, *, threshold, workspace=None):
        start = time.thread_time()
        out = _measure(current["method"], sampled, threshold, workspace)
        spent[current["method"]].append(time.thread_time() - start)
        if current["keep"]:  # the first timed round: every method's numbers, to compare
            results[current["method"]] = [torch.cat([f.flatten().double() for f in m]) for m in out]
        return out

    original = monitor_module.measure_sampled_many
    monitor_module.measure_sampled_many = timed  # the monitor calls it through its module
    try:
        with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.9)), \
                sinkfix.monitor(model, sample_rows=args.sample_rows) as monitor, torch.no_grad():
            def prefill(method: str) -> None:
                current["method"] = method
                with monitor.request():
                    model(input_ids=prompt, use_cache=True, **extra)

            for method in METHODS:  # warm-up
                prefill(method)
            for samples in spent.values():
                samples.clear()
            for round_index in range(args.rounds):
                current["keep"] = round_index == 0
                for method in METHODS:
                    prefill(method)
    finally:
        monitor_module.measure_sampled_many = original

    difference = max(_largest_difference(a, b) for method in METHODS[1:]
                     for a, b in zip(results[method], results[METHODS[0]]))
    base = spent[METHODS[0]]
    print(f"{args.model}, {args.prompt}-token prompt, {args.sample_rows} sampled rows, sink_scale=0.9, "
          f"{args.threads} thread(s), {args.rounds} prefills per method; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}")
    rows = {}
    for method in METHODS:
        median = 1e3 * statistics.median(spent[method])
        ratio = ratio_of_medians(spent[method], base)
        rows[method] = {"median_ms": median, "ratio": ratio.to_dict(),
                        "samples_ms": [round(1e3 * t, 3) for t in spent[method]]}
        # one prefill per method has no interval (sinkfix.bench.stats.Ratio): say so, do not format None
        interval = f"[{ratio.low:.3f}, {ratio.high:.3f}]" if ratio.has_interval else "no interval (1 round)"
        print(f"  {method:16s} {median:7.2f} ms   x{ratio.value:.3f} {interval}")
    print(f"  largest difference between the methods' measures: {difference:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "prompt": args.prompt, "sample_rows": args.sample_rows, "threads": args.threads,
            "rounds": args.rounds, "torch": torch.__version__, "merged_block_elements": measures.MERGED_BLOCK_ELEMENTS,
            "causal_row_chunks": measures.CAUSAL_ROW_CHUNKS, "methods": rows, "largest_difference": difference,
        }, indent=1) + "\n", encoding="utf-8")
    return 0 if difference <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
