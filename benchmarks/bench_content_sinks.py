"""Extra cost of content-dependent sinks (ACT's rule) per attention call, PyTorch path or Triton kernels.

Per attention call, SmolLM2-135M's shape (9 query heads, 3 kv heads, head dim 64), batch 1:

* prefill (causal, Q = K = S): the positional policy (sink_scale=0.9 on token 0, one pass) vs the
  content policy deciding its sink set (stock pass + column-mass pass + correction pass), and, on
  the Triton backend, vs the content policy applying a given set (the correction pass alone);
* decode (Q = 1 against K = S cached keys): the positional policy vs the content policy applying a
  stored sink set (the PyTorch small-ops path on both backends).

Each row prints the median time of both and their ratio, measured in the same run, with the
device and versions. ``--backend torch`` (default) runs fp32 on the CPU; ``--backend triton`` needs
a CUDA GPU (it also runs under TRITON_INTERPRET=1 on the CPU, for checking the script, not for
timing) and takes ``--dtype``. Expected GPU cost: docs/formulas.md, "Content-dependent sinks".

    OMP_NUM_THREADS=1 python benchmarks/bench_content_sinks.py [--lengths 512 2048] [--repeats 20]
    python benchmarks/bench_content_sinks.py --backend triton --dtype bf16 --lengths 2048 8192
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sinkfix.bench.provenance import provenance, provenance_line
from sinkfix.errors import BackendUnavailableError
from sinkfix.ops.attention import resolve_backend, sink_attention_torch
from sinkfix.ops.content_attention import content_sink_attention_torch, content_sink_attention_triton

HEADS, KV_HEADS, DIM = 9, 3, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (and, on the Triton backend, compilation)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="key counts S (each at least 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per median (at least 1)")
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="input dtype (Triton backend)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if min(args.lengths) < 1:
        parser.error(f"--lengths must each be at least 1, got {min(args.lengths)}")
    triton_backend = args.backend == "triton"
    device = torch.device("cuda" if triton_backend and torch.cuda.is_available() else "cpu")
    if triton_backend:  # no CUDA and no TRITON_INTERPRET=1, or no usable triton: refused before any work
        try:
            resolve_backend(args.backend, device)
        except BackendUnavailableError as error:
            parser.error(f"--backend {args.backend}: {error}")
    dtype = DTYPES[args.dtype] if triton_backend else torch.float32
    torch.manual_seed(0)
    # the same header line as the other benchmark scripts: device, sinkfix / torch / transformers / triton
    print(provenance_line(provenance(device)) + f"; python {platform.python_version()}, {torch.get_num_threads()} "
          f"threads, backend {args.backend}, {args.dtype if triton_backend else 'fp32'}")
    print("| call | S | positional (ms) | content (ms) | ratio |")
    print("|---|---|---|---|---|")
    on = dict(device=device)
    beta = torch.full((HEADS,), 0.9, **on)
    hidden_beta = torch.full((HEADS,), 0.4, **on)
    sink0 = torch.zeros(1, 1, dtype=torch.long, **on)
    if triton_backend:
        from sinkfix.kernels import sink_attention_triton

        def positional_call(q, k, v, causal):
            return sink_attention_triton(q, k, v, causal=causal, sink_cols=sink0, beta=beta)

        content_call = content_sink_attention_triton
    else:
        def positional_call(q, k, v, causal):
            return sink_attention_torch(q, k, v, causal=causal, first_column_sink=True, beta=beta)

        content_call = content_sink_attention_torch
    with torch.no_grad():
        for length in args.lengths:
            q = torch.randn(1, HEADS, length, DIM, **on)
            k = torch.randn(1, KV_HEADS, length, DIM, **on)
            v = torch.randn(1, KV_HEADS, length, DIM, **on)
            k[:, :, 0] += 3 * q.mean((1, 2))
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            positional = _median_ms(lambda: positional_call(q, k, v, True), args.repeats, device)
            decided = content_call(q, k, v, hidden_beta=hidden_beta, threshold=0.1, causal=True, sink_cols=sink0)
            content = _median_ms(lambda: content_call(q, k, v, hidden_beta=hidden_beta, threshold=0.1, causal=True,
                                                      sink_cols=sink0), args.repeats, device)
            print(f"| prefill | {length} | {positional:.3f} | {content:.3f} | {content / positional:.2f} |")
            if triton_backend:
                given = _median_ms(lambda: content_call(q, k, v, hidden_beta=hidden_beta, hidden=decided.hidden,
                                                        causal=True, sink_cols=sink0), args.repeats, device)
                print(f"| prefill, given set | {length} | {positional:.3f} | {given:.3f} | {given / positional:.2f} |")
            q1 = q[:, :, -1:]
            positional = _median_ms(lambda: positional_call(q1, k, v, False), args.repeats, device)
            content = _median_ms(lambda: content_call(q1, k, v, hidden_beta=hidden_beta, hidden=decided.hidden,
                                                      sink_cols=sink0), args.repeats, device)
            print(f"| decode step | {length} | {positional:.3f} | {content:.3f} | {content / positional:.2f} |")


if __name__ == "__main__":
    main()
