"""Host time of one decode attention call: sinkfix's Triton path against torch's SDPA.

    python benchmarks/bench_host_overhead.py                 # CUDA when present, else the CPU stand-in
    python benchmarks/bench_host_overhead.py --profile 2000  # plus cProfile's top entries (per-head + statistics)
    python benchmarks/bench_host_overhead.py --json host.json

An eager decode step of a transformers model at batch 1 is bound by the host: every attention call's
Python work and kernel launches take longer than the GPU needs for the call itself (a Llama-3-8B-shaped
step on an H200 took 30 ms with SDPA and 44-48 ms patched, 0.45-0.55 ms more per layer:
benchmarks/RESULTS.md). This benchmark times what one call costs the host, on the call the patched
model makes in a decode step (``sinkfix.ops.attention.sink_attention`` with the first-column sink,
the Triton backend, a KV cache of ``--keys`` keys), for the identity, a per-head policy (beta and a
virtual logit), each with and without the monitor's statistics output:

* **CUDA**: real launches. ``host`` = wall time of N calls issued back to back after a
  synchronisation, without waiting for the GPU (the launch queue holds them); ``wall`` = the same
  with a synchronisation at the end, so ``wall`` > ``host`` means the GPU, not the host, set the pace.
  SDPA (``enable_gqa``) is timed the same way beside it.
* **CPU** (no GPU): the kernels' launches are replaced by stand-ins that take the launch arguments and
  do nothing, so what is timed is sinkfix's own Python and small tensor operations up to the launch,
  not Triton's launcher (which needs a GPU). No SDPA column: on the CPU it computes the attention.

Rounds alternate the configurations (ABBA, after a warm-up round); the median per-call time over
rounds is reported. Host time depends on the CPU, Python and library versions, all printed with the
numbers.

``--monitor-callbacks`` times something else: the host time ``sinkfix.monitor``'s own callbacks take
per eager decode step (the attention listener, the decoder layers' residual hooks with the
end-of-step fold, the start-of-forward hook, and the deferral test of each attention call), timed
inside them, on the CPU's PyTorch path of a SmolLM2-shaped model (30 layers, 9 / 3 heads of 64,
hidden 576) with a tiny MLP and vocabulary, random weights, after a 128-token prompt: per request 24
decode steps, median over requests. Timing wrappers add about a microsecond per call; what is left
out (the AttentionCall each monitored call builds, the hook dispatch of torch's modules) is the same
before and after a change to the callbacks.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from sinkfix.bench import alternate
from sinkfix.bench.timing import synchronize
from sinkfix.files import atomic_write_text

class _LaunchStandIn:
    """Stands in for a ``@triton.jit`` kernel on the CPU: ``kernel[grid](*args, **kwargs)`` does
    nothing. Named like triton's interpreter wrapper so that the launchers accept CPU tensors."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs) -> None:
        return None


_LaunchStandIn.__name__ = "InterpretedFunction"


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """Replace the decode and prefill kernels by :class:`_LaunchStandIn` (CPU runs only) while the
    block runs, and put the real ones back after it: left in place, every later Triton call of the
    process (main() called from a test, say, under TRITON_INTERPRET=1) returned garbage."""
    from sinkfix.kernels import attention_decode, attention_prefill

    names = [(attention_decode, "_sink_attn_decode_split"), (attention_decode, "_sink_attn_decode_reduce"),
             (attention_prefill, "_sink_attn_fwd")]
    saved = [(module, name, getattr(module, name)) for module, name in names]
    try:
        for module, name in names:
            setattr(module, name, _LaunchStandIn())
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` for the block, the caller's restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _replaced(target, name: str, value) -> Iterator[None]:
    """``target.name`` set to ``value`` for the block, the original put back after it (also on an
    error), so that a second run times the callbacks once, not through nested wrappers."""
    original = target.__dict__[name] if isinstance(target, type) else getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


def calls(device: torch.device, dtype: torch.dtype, keys: int, q_heads: int, kv_heads: int,
          head_dim: int) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per configuration, each one decode attention call."""
    from sinkfix.ops.attention import sink_attention
    from sinkfix.ops.custom_ops import prepare_first_column_sink

    prepare_first_column_sink(device)  # as patch() does for the Triton backend
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, q_heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2)  # as transformers hands it
    k = torch.randn(1, kv_heads, keys, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(1, kv_heads, keys, head_dim, generator=gen).to(device, dtype)
    beta = torch.full((q_heads,), 0.9, device=device)
    virtual = torch.zeros(q_heads, device=device)

    def sinkfix_call(**policy):
        return lambda: sink_attention(q, k, v, backend="triton", first_column_sink=True, **policy)

    out = {
        "identity": sinkfix_call(),
        "identity + statistics": sinkfix_call(need_sink_stats=True),
        "per-head": sinkfix_call(beta=beta, virtual_sink_logit=virtual),
        "per-head + statistics": sinkfix_call(beta=beta, virtual_sink_logit=virtual, need_sink_stats=True),
    }
    if device.type == "cuda":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = {"sdpa": lambda: sdpa(q, k, v, enable_gqa=True), **out}
    return out


def time_calls(fn: Callable[[], object], device: torch.device, count: int) -> tuple[float, float]:
    """(host, wall) microseconds per call over ``count`` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        fn()
    host = time.perf_counter() - start
    synchronize(device)
    wall = time.perf_counter() - start
    return host / count * 1e6, wall / count * 1e6


def measure(fns: dict[str, Callable[[], object]], device: torch.device, count: int, rounds: int) -> dict:
    """``rounds`` timings of every configuration in ABBA order, after one warm-up round (compiles,
    allocator pools, lazy imports)."""
    samples = alternate(list(fns), lambda name: time_calls(fns[name], device, count), repeats=rounds, warmup=1)
    return {name: {"host_us": statistics.median(h for h, _ in s), "wall_us": statistics.median(w for _, w in s),
                   "host_us_rounds": [round(h, 2) for h, _ in s]} for name, s in samples.items()}


def profile(fn: Callable[[], object], count: int, top: int = 20) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def monitor_callbacks(policy: str, requests: int = 15, steps: int = 24) -> dict[str, float]:
    """Microseconds per decode step spent inside the monitor's callbacks (module docstring)."""
    import functools
    import importlib

    monitor_module = importlib.import_module("sinkfix.telemetry.monitor")
    attention_module = importlib.import_module("sinkfix.integrations.attention")
    spent: dict[str, float] = {}

    def timed(name: str, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return inner

    monitor_class = monitor_module.Monitor
    residual_hook = monitor_class._residual_hook
    with contextlib.ExitStack() as undo:  # every wrapper, the patch and the monitor undone on the way out
        undo.enter_context(_replaced(monitor_class, "_on_attention",
                                     timed("attention listener", monitor_class._on_attention)))
        undo.enter_context(_replaced(monitor_class, "_before_layers",
                                     timed("start of forward", monitor_class._before_layers)))
        undo.enter_context(_replaced(monitor_class, "_residual_hook", lambda self, layer, last: timed(
            "residual hooks + fold", residual_hook(self, layer, last))))
        undo.enter_context(_replaced(attention_module, "defers_sink_stats",
                                     timed("deferral test", attention_module.defers_sink_stats)))
        return _time_callbacks(policy, requests, steps, spent, undo)


def _time_callbacks(policy: str, requests: int, steps: int, spent: dict[str, float],
                    undo: contextlib.ExitStack) -> dict[str, float]:
    """The measurement of :func:`monitor_callbacks`, its callbacks already wrapped to fill ``spent``."""
    import sinkfix
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    handle = sinkfix.patch(model, sinkfix.Policy.parse(policy))
    undo.callback(handle.remove)
    monitor = sinkfix.monitor(model)
    undo.callback(monitor.close)  # closed before the patch is removed (callbacks run last in, first out)
    prompt = torch.randint(0, config.vocab_size, (1, 128))

    def request() -> dict[str, float]:
        with torch.no_grad(), monitor.request():
            cache = DynamicCache(config=config)
            token = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            spent.clear()
            for _ in range(steps):
                token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return {name: seconds / steps * 1e6 for name, seconds in spent.items()}

    request()  # warm-up
    rows = [request() for _ in range(requests)]
    out = {name: statistics.median(row.get(name, 0.0) for row in rows) for name in rows[0]}
    out["total"] = sum(out.values())
    return out


def environment(device: torch.device) -> dict:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cpu": platform.processor() or platform.machine(), "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        try:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                              if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        env["launches"] = "stand-ins (no GPU): sinkfix's host work up to the launch, Triton's launcher excluded"
    return env


# The attention-call options and their defaults. Their parser defaults are None, so that
# --monitor-callbacks (a fixed SmolLM2-shaped model on the CPU) can refuse them when given instead
# of ignoring them silently.
CALL_DEFAULTS = {"device": "auto", "keys": 4096, "heads": (32, 8, 128), "calls": 500, "profile": 0}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None, help="default auto")
    parser.add_argument("--keys", type=int, default=None, help="keys in the cache (default 4096)")
    parser.add_argument("--heads", type=int, nargs=3, default=None, metavar=("HQ", "HKV", "D"),
                        help="query heads, kv heads, head dim (default: Llama-3-8B's 32 8 128)")
    parser.add_argument("--calls", type=int, default=None, help="calls per timing (default 500)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds, configurations alternated (default 9)")
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="also profile N calls of per-head + statistics with cProfile")
    parser.add_argument("--monitor-callbacks", metavar="POLICY", nargs="?", const="identity",
                        help="instead: the monitor's own host time per decode step (CPU, a fixed SmolLM2-shaped "
                             "model; default policy identity; --rounds requests; not with --device, --keys, "
                             "--heads, --calls or --profile)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    given = [f"--{name}" for name in CALL_DEFAULTS if getattr(args, name) is not None]
    if args.monitor_callbacks is not None and given:
        parser.error(f"--monitor-callbacks times a fixed model on the CPU: {', '.join(given)} would be ignored")
    for name, default in CALL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    # everything this run changes in the process (thread count, kernels, monitor methods) is put back
    # on the way out: main() is also called in-process (tests), where it used to leave them changed
    with contextlib.ExitStack() as undo:
        return _run(args, undo)


def _run(args: argparse.Namespace, undo: contextlib.ExitStack) -> int:
    if args.monitor_callbacks is not None:
        undo.enter_context(_threads(1))
        spent = monitor_callbacks(args.monitor_callbacks, requests=args.rounds)
        env = environment(torch.device("cpu"))
        env.pop("launches", None)
        print(f"sinkfix.monitor callbacks, policy {args.monitor_callbacks}, SmolLM2-shaped model on the CPU, "
              f"us per decode step (median of {args.rounds} requests of 24 steps)")
        print(" ".join(f"{key} {value}" for key, value in env.items()))
        for name, micros in spent.items():
            print(f"{name:24s} {micros:8.1f}")
        _write(args.json, {"environment": env, "policy": args.monitor_callbacks, "us_per_step": spent})
        return 0

    wanted = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device(wanted)
    if device.type == "cpu":
        undo.enter_context(stub_launches())
    undo.enter_context(_threads(1))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q_heads, kv_heads, head_dim = args.heads
    fns = calls(device, dtype, args.keys, q_heads, kv_heads, head_dim)
    results = measure(fns, device, args.calls, args.rounds)
    env = environment(device)
    print(f"decode attention call, batch 1, {q_heads}/{kv_heads} heads of {head_dim}, {args.keys} keys, {dtype}; "
          f"{args.rounds} rounds of {args.calls} calls")
    print(" ".join(f"{key} {value}" for key, value in env.items()))
    base = results.get("sdpa")
    print(f"{'configuration':24s} {'host us/call':>13s} {'wall us/call':>13s}" + (" host / sdpa" if base else ""))
    for name, r in results.items():
        ratio = f" {r['host_us'] / base['host_us']:10.2f}x" if base else ""
        print(f"{name:24s} {r['host_us']:13.1f} {r['wall_us']:13.1f}{ratio}")
    report = {"environment": env, "keys": args.keys, "heads": [q_heads, kv_heads, head_dim], "dtype": str(dtype),
              "calls": args.calls, "rounds": args.rounds, "results": results}
    if args.profile:
        report["profile"] = profile(fns["per-head + statistics"], args.profile)
        print(report["profile"])
    _write(args.json, report)
    return 0


def _write(path: Path | None, report: dict) -> None:
    if path is not None:
        atomic_write_text(path, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
