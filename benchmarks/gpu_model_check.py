"""End to end on a GPU: a Llama-3-8B-shaped model (random weights from a config, bf16, no download),
stock SDPA vs patched (identity, per-head profile), eager and compiled: prefill and decode ratios;
what live telemetry (``sinkfix.monitor``) costs on the fast path; and a host profile of decode steps.

    python benchmarks/gpu_model_check.py --out gpu-out/model.md          # CUDA, the full shape
    python benchmarks/gpu_model_check.py --tiny --device cpu              # a dry run of the code path

What it measures, per variant, in ABBA rounds after a warm-up round:
* prefill: one forward of ``--prompt`` tokens (default 4096) with a KV cache, last-position logits;
* decode: ``--new-tokens`` (default 128) greedy steps of ``generate``, each step timed (CUDA events
  are not needed: the step clock synchronises), eager with transformers' dynamic cache, compiled
  with a static cache and transformers' compiled decoding (``CompileConfig(fullgraph=True)``).
Ratios are patched / stock medians of the same run.

Mode ``monitored`` (eager): for each correcting variant, the patched model without telemetry and the
same model inside ``monitor.request()``, alternating: the prefill timed over the whole request (the
hooks, the prompt measures after the last layer and the end-of-request read, which synchronises),
then a greedy ``generate`` of ``--monitor-new-tokens`` new tokens inside one request, whose cached
decode steps (one fewer than the new tokens) are timed, the first dropped: 30 timed steps per
request by default, and per round one prefill and one such request per configuration. Ratios are on / off
medians of the same run, against the telemetry targets (prefill <= 1.03x, decode step <= 1.05x;
docs/monitoring.md). On a CUDA device the patch runs the Triton kernels, so the sink statistics
come from their statistics variants. The guard is not measured here (it needs a calibrated profile
with statistics; ``benchmarks/bench_monitor_overhead.py`` times it on the CPU).

Mode ``profile`` (eager, not timed against a target): where a patched decode step's extra host time
goes. Each variant (and the identity inside ``sinkfix.monitor``'s requests) runs ``--profile-steps`` decode steps after its prefill (the forward ``generate``
makes per step, with a dynamic cache) three times: unprofiled (the step time), under cProfile (each
Python function's own time per step) and under torch.profiler (torch operations and kernel launches
per step); the table sets each patched variant against stock: the functions whose own time grew most
and the operations it issues more often. An eager Llama-3-8B-shaped decode step on an H200 took
0.45-0.55 ms more per layer patched than stock, about three times what one patched attention call
costs the host there (benchmarks/RESULTS.md), so the rest is looked for in the whole step.

A phase that fails or runs out of its time budget is reported as such; the rest still runs (the GPU
is lent for minutes, not hours).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import sinkfix
from sinkfix.bench import alternate
from sinkfix.bench.timing import compiled_decoding, decode_step_times, synchronize

MODES = ("eager", "monitored", "compiled", "profile")
#: Telemetry on / off ratios the monitor is held to (docs/monitoring.md, "Targets").
MONITOR_TARGETS = {"prefill": 1.03, "decode": 1.05}
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=1024)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, torch_dtype=dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


def variants(model) -> dict:
    heads = model.config.num_attention_heads
    layers = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    profile = sinkfix.Policy(sink_scale=0.8 + 0.2 * torch.rand(layers, heads, generator=g),
                             virtual_sink_logit=torch.randn(layers, heads, generator=g) - 4)
    return {"stock": None, "identity": sinkfix.Policy(), "per-head profile": profile}


def _prefill_then_decode(model, forward, ids: torch.Tensor, new_tokens: int, request=contextlib.nullcontext,
                         **decode_kwargs) -> tuple[float, list[float]]:
    """One timed prefill through ``forward`` and the step times of one ``generate``, each inside
    its own ``request()`` context (a monitor's request: leaving it measures the prompt and reads the
    request once, inside the prefill's clock)."""
    with torch.no_grad():
        synchronize(ids.device)
        start = time.perf_counter()
        with request():
            forward(input_ids=ids, use_cache=True, logits_to_keep=1)
        synchronize(ids.device)
        prefill = time.perf_counter() - start
        with request():
            steps = decode_step_times(model, ids, new_tokens, 0, **decode_kwargs)[1:]
    return prefill, steps


def _medians(results: dict[str, list]) -> dict[str, dict[str, float]]:
    """{name: median prefill and median decode step} of ``alternate``'s (prefill, steps) runs."""
    return {name: {"prefill_s": statistics.median(p for p, _ in runs),
                   "decode_step_s": statistics.median(s for _, steps in runs for s in steps)}
            for name, runs in results.items()}


def measure(model, policies: dict, ids: torch.Tensor, mode: str, new_tokens: int, rounds: int,
            backend: str = "auto") -> dict:
    kwargs = {}
    forward = model
    if mode == "compiled":
        kwargs = compiled_decoding()
        forward = torch.compile(model, fullgraph=True, dynamic=False)

    def run(name):
        handle = sinkfix.patch(model, policies[name], backend=backend) if policies[name] is not None else None
        try:
            return _prefill_then_decode(model, forward, ids, new_tokens, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    return _medians(alternate(list(policies), run, repeats=rounds, warmup=1))


def measure_monitored(model, policies: dict, ids: torch.Tensor, new_tokens: int, rounds: int,
                      backend: str = "auto") -> dict:
    """Each correcting variant patched once, with and without ``sinkfix.monitor`` in ABBA rounds:
    {variant: {"off" | "on": {"prefill_s", "decode_step_s"}, "prefill_ratio", "decode_ratio"}}."""
    out = {}
    for name, policy in policies.items():
        if policy is None:  # the stock model: nothing to monitor it against
            continue
        with sinkfix.patch(model, policy, backend=backend):
            monitor = sinkfix.monitor(model)
            try:
                def run(config: str):
                    request = monitor.request if config == "on" else contextlib.nullcontext
                    return _prefill_then_decode(model, model, ids, new_tokens, request)

                row = _medians(alternate(["off", "on"], run, repeats=rounds, warmup=1))
            finally:
                monitor.close()
        row["prefill_ratio"] = row["on"]["prefill_s"] / row["off"]["prefill_s"]
        row["decode_ratio"] = row["on"]["decode_step_s"] / row["off"]["decode_step_s"]
        out[name] = row
    return out


def _decode_loop(model, ids: torch.Tensor):
    """A prefill with a fresh dynamic cache, then a function that runs one greedy decode step per
    call: the forward ``generate`` makes per step, without generate's own bookkeeping (the same for
    every variant)."""
    from transformers import DynamicCache

    from sinkfix.caches import cache_keyword

    keyword = cache_keyword(model)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits
    token = [logits[:, -1:].argmax(-1)]

    def step() -> None:
        out = model(input_ids=token[0], use_cache=True, logits_to_keep=1, **{keyword: cache})
        token[0] = out.logits[:, -1:].argmax(-1)

    return step


def _is_launch(event_name: str) -> bool:
    """A kernel launch as the host issues it, in the torch profiler's names of the CUDA runtime and
    driver calls (``cudaLaunchKernel``, ``cuLaunchKernel``, ``cuLaunchKernelEx``, ...): torch's own
    kernels go through the runtime, Triton's launcher through the driver."""
    return "LaunchKernel" in event_name


def _function_name(key: tuple) -> str:
    path, line, name = key
    if path == "~":  # a built-in: cProfile names it in full already
        return name
    parts = Path(path).parts
    short = "/".join(parts[parts.index("site-packages") + 1:] if "site-packages" in parts else parts[-2:])
    return f"{short}:{line}({name})"


def _profile_variant(model, ids: torch.Tensor, steps: int, request=contextlib.nullcontext) -> dict:
    """Host time per decode step by Python function (cProfile) and the torch operations and kernel
    launches each step issues (torch.profiler), over ``steps`` steps after a warm-up. Each pass (a
    prefill, then its steps) runs inside its own ``request()`` (a monitor's request: the steps are
    profiled, the end of the request after them is not)."""
    device = ids.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":  # the launch API calls are recorded with the CUDA activity
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = cProfile.Profile()
    with torch.no_grad():
        with request():
            warm = _decode_loop(model, ids)
            for _ in range(3):  # kernels compiled, allocator pools filled
                warm()
        with request():
            step = _decode_loop(model, ids)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            wall = (time.perf_counter() - start) / steps
        with request():
            step = _decode_loop(model, ids)
            synchronize(device)
            profiler.enable()
            for _ in range(steps):
                step()
            synchronize(device)
            profiler.disable()
        with request():
            step = _decode_loop(model, ids)
            synchronize(device)
            with torch.profiler.profile(activities=activities) as traced:
                for _ in range(steps):
                    step()
                synchronize(device)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, tottime, cumtime, callers)}
    functions = {_function_name(key): value[2] / steps * 1e6 for key, value in stats.items()}
    events = traced.key_averages()
    ops = {event.key: event.count / steps for event in events if event.key.startswith("aten::")}
    return {
        "step_ms": wall * 1e3,
        "profiled_step_ms": sum(value[2] for value in stats.values()) / steps * 1e3,
        "python_calls_per_step": sum(value[0] for value in stats.values()) / steps,
        "launches_per_step": sum(event.count for event in events if _is_launch(event.key)) / steps,
        "aten_ops_per_step": sum(ops.values()),
        "functions_us": functions,
        "aten_ops": ops,
    }


#: The profile mode's monitored variant: the identity policy inside ``sinkfix.monitor``'s requests.
MONITORED_IDENTITY = "identity + monitor"


def measure_profile(model, policies: dict, ids: torch.Tensor, steps: int, backend: str = "auto",
                    top: int = 15) -> dict:
    """Where a patched decode step's extra host time goes: each variant's decode steps profiled
    (:func:`_profile_variant`), the identity also inside a monitor's requests (the monitored decode
    step on the H200 took 1.139x the unmonitored one), and against the stock model the Python
    functions whose own time per step grew most and the torch operations issued more often. The
    profilers' own cost inflates every number (``profiled_step_ms`` against ``step_ms``); the
    differences between variants are what to read."""
    profiles = {}
    for name, policy in policies.items():
        handle = sinkfix.patch(model, policy, backend=backend) if policy is not None else None
        try:
            profiles[name] = _profile_variant(model, ids, steps)
            if name == "identity":
                monitor = sinkfix.monitor(model)
                try:
                    profiles[MONITORED_IDENTITY] = _profile_variant(model, ids, steps, monitor.request)
                finally:
                    monitor.close()
        finally:
            if handle is not None:
                handle.remove()
    stock = profiles["stock"]
    out = {}
    for name, found in profiles.items():
        row = {key: found[key] for key in ("step_ms", "profiled_step_ms", "python_calls_per_step",
                                            "launches_per_step", "aten_ops_per_step")}
        row["top_functions_us"] = dict(sorted(found["functions_us"].items(), key=lambda kv: -kv[1])[:top])
        if name != "stock":
            added = {fn: us - stock["functions_us"].get(fn, 0.0) for fn, us in found["functions_us"].items()}
            row["added_functions_us"] = {fn: round(us, 2) for fn, us in sorted(added.items(), key=lambda kv: -kv[1])[:top]}
            more = {op: n - stock["aten_ops"].get(op, 0.0) for op, n in found["aten_ops"].items()}
            row["added_aten_ops"] = {op: n for op, n in sorted(more.items(), key=lambda kv: -kv[1])[:top] if n > 0}
        out[name] = row
    return out


def _profile_lines(rows: dict) -> list[str]:
    """Markdown of the profile mode: per variant the step's counts, then what each patched variant adds."""
    lines = ["", "Decode step profile (eager, host side; the profilers' cost inflates every time, compare the rows)", "",
             "| variant | step ms | profiled step ms | Python calls | kernel launches | torch ops |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['step_ms']:.3f} | {row['profiled_step_ms']:.3f} | {row['python_calls_per_step']:.0f} "
                     f"| {row['launches_per_step']:.1f} | {row['aten_ops_per_step']:.1f} |")
    for name, row in rows.items():
        if "added_functions_us" not in row:
            continue
        lines += ["", f"{name}: own time per step added against stock (us), largest first", ""]
        lines += [f"- {us:.1f} us {fn}" for fn, us in row["added_functions_us"].items()]
        if row["added_aten_ops"]:
            lines.append("- torch ops issued more often per step: "
                         + ", ".join(f"{op} +{n:g}" for op, n in row["added_aten_ops"].items()))
    return lines


def _measured(rows: dict) -> bool:
    return "failed" not in rows and "skipped" not in rows


def _table(report: dict) -> list[str]:
    """The markdown lines of every mode: patched vs stock, then telemetry on vs off."""
    lines = ["| mode | variant | prefill ms | ratio | decode step ms | ratio |", "|---|---|---|---|---|---|"]
    monitored = []
    for mode, rows in report["modes"].items():
        if not _measured(rows):
            lines.append(f"| {mode} | {next(iter(rows))}: {next(iter(rows.values()))[:120]} | | | | |")
            continue
        if mode == "monitored":
            monitored = list(rows.items())
            continue
        if mode == "profile":
            continue
        stock = rows["stock"]
        for name, row in rows.items():
            lines.append(f"| {mode} | {name} | {1e3 * row['prefill_s']:.2f} | {row['prefill_s'] / stock['prefill_s']:.3f} "
                         f"| {1e3 * row['decode_step_s']:.3f} | {row['decode_step_s'] / stock['decode_step_s']:.3f} |")
    if monitored:
        targets = MONITOR_TARGETS
        lines += ["", f"Telemetry (sinkfix.monitor, eager): on / off, targets prefill <= {targets['prefill']:.2f}x, "
                  f"decode step <= {targets['decode']:.2f}x", "",
                  "| variant | prefill ms off | on | ratio | decode step ms off | on | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in monitored:
            off, on = row["off"], row["on"]
            lines.append(f"| {name} | {1e3 * off['prefill_s']:.2f} | {1e3 * on['prefill_s']:.2f} | "
                         f"{row['prefill_ratio']:.3f} | {1e3 * off['decode_step_s']:.3f} | "
                         f"{1e3 * on['decode_step_s']:.3f} | {row['decode_ratio']:.3f} |")
    profile = report["modes"].get("profile")
    if profile is not None and _measured(profile):
        lines += _profile_lines(profile)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the code path anywhere")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="eager,monitored,compiled",
                        help="comma-separated: eager, monitored (telemetry on vs off), compiled, profile (where a "
                             "decode step's host time goes, per variant)")
    parser.add_argument("--monitor-new-tokens", type=int, default=32,
                        help="new tokens per monitored-mode request (default 32): one generate per configuration "
                             "and round, its cached steps (new tokens - 1) timed less the first, so 30 by default")
    parser.add_argument("--profile-steps", type=int, default=24,
                        help="decode steps each variant is profiled over in the profile mode (default 24)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                        help="sinkfix.patch's backend (auto: the Triton kernels on CUDA); triton on the CPU needs "
                             "TRITON_INTERPRET=1 (a dry run of the kernels' path)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; later phases are skipped after it")
    parser.add_argument("--out", default=None, help="markdown table (and a .json next to it)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    started = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --tiny --device cpu for a dry run)")
        return 2
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = build_model(TINY if args.tiny else LLAMA3_8B, args.device, dtype)
    prompt = min(args.prompt, model.config.max_position_embeddings - args.new_tokens)
    ids = torch.randint(100, model.config.vocab_size, (1, prompt), device=args.device,
                        generator=torch.Generator(device=args.device).manual_seed(0))
    policies = variants(model)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    report = {"device": device_name, "backend": args.backend, "torch": torch.__version__, "shape": "tiny" if args.tiny else "Llama-3-8B",
              "dtype": str(dtype), "prompt": prompt, "new_tokens": args.new_tokens, "modes": {}}
    for mode in modes:
        if time.perf_counter() - started > args.budget:
            report["modes"][mode] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            continue
        try:
            if mode == "profile":
                report["modes"][mode] = measure_profile(model, policies, ids, args.profile_steps, args.backend)
            elif mode == "monitored":
                report["modes"][mode] = measure_monitored(model, policies, ids, args.monitor_new_tokens,
                                                          args.rounds, args.backend)
            else:
                report["modes"][mode] = measure(model, policies, ids, mode, args.new_tokens, args.rounds,
                                                args.backend)
        except Exception as exc:  # report the failure and keep the other mode's numbers
            report["modes"][mode] = {"failed": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(json.dumps({mode: report["modes"][mode]}, default=str), flush=True)
    lines = [f"{report['shape']} ({dtype}), {device_name}, backend {args.backend}, torch {torch.__version__}, "
             f"prompt {prompt}, "
             f"{args.new_tokens} decode steps ({args.monitor_new_tokens} per monitored request)", "", *_table(report)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if all(_measured(rows) for rows in report["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
