"""Extra cost of content-dependent sinks (ACT's rule) on the PyTorch path, CPU.

Per attention call, SmolLM2-135M's shape (9 query heads, 3 kv heads, head dim 64), fp32, batch 1:

* prefill (causal, Q = K = S): the positional policy (sink_scale=0.9 on token 0, one fused pass)
  vs the content policy deciding its sink set (stock pass + column-mass pass + rest pass);
* decode (Q = 1 against K = S cached keys): the positional policy vs the content policy applying a
  stored sink set (stock pass + rest pass).

Each row prints the median time of both and their ratio, measured in the same run, with the
device and versions. Expected GPU cost: docs/formulas.md, "Content-dependent sinks".

    OMP_NUM_THREADS=1 python benchmarks/bench_content_sinks.py [--lengths 512 2048] [--repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sinkfix.ops.attention import sink_attention_torch
from sinkfix.ops.content_attention import content_sink_attention_torch

HEADS, KV_HEADS, DIM = 9, 3, 64


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: CPU ({platform.processor() or platform.machine()}), threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print("| call | S | positional (ms) | content (ms) | ratio |")
    print("|---|---|---|---|---|")
    beta = torch.full((HEADS,), 0.9)
    hidden_beta = torch.full((HEADS,), 0.4)
    with torch.no_grad():
        for length in args.lengths:
            q = torch.randn(1, HEADS, length, DIM)
            k = torch.randn(1, KV_HEADS, length, DIM)
            v = torch.randn(1, KV_HEADS, length, DIM)
            k[:, :, 0] += 3 * q.mean((1, 2))
            sink0 = torch.zeros(1, 1, dtype=torch.long)
            positional = _median_ms(lambda: sink_attention_torch(q, k, v, causal=True, first_column_sink=True,
                                                                 beta=beta), args.repeats)
            decided = content_sink_attention_torch(q, k, v, hidden_beta=hidden_beta, threshold=0.1, causal=True,
                                                   sink_cols=sink0)
            content = _median_ms(lambda: content_sink_attention_torch(
                q, k, v, hidden_beta=hidden_beta, threshold=0.1, causal=True, sink_cols=sink0), args.repeats)
            print(f"| prefill | {length} | {positional:.2f} | {content:.2f} | {content / positional:.2f} |")
            q1 = q[:, :, -1:]
            positional = _median_ms(lambda: sink_attention_torch(q1, k, v, first_column_sink=True, beta=beta),
                                    args.repeats)
            content = _median_ms(lambda: content_sink_attention_torch(
                q1, k, v, hidden_beta=hidden_beta, hidden=decided.hidden, sink_cols=sink0), args.repeats)
            print(f"| decode step | {length} | {positional:.3f} | {content:.3f} | {content / positional:.2f} |")


if __name__ == "__main__":
    main()
