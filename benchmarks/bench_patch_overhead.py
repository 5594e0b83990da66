"""What the patch costs: prefill time and peak memory, stock sdpa vs identity vs sink_scale=0.9.

    python benchmarks/bench_patch_overhead.py                # SmolLM2-135M, CPU, the defaults below
    python benchmarks/bench_patch_overhead.py --threads 2 --repeats 21 --json overhead.json

Targets (from the patch's acceptance criteria): at 512-token prefill the patched model takes at most
1.10x the stock sdpa time; at 2048 tokens its peak memory is at most 1.10x stock.

* **Time**: one process, one model; stock / identity / sink_scale=0.9 prefills interleaved in ABBA
  rounds after warm-up rounds, so drift and other processes hit all three alike. Reported: min /
  median / max per configuration, the ratio of medians, and the spread of the per-round paired
  ratios. A prefill here is what ``generate`` does first: one forward with a KV cache and logits
  for the last position only.
* **Memory**: each configuration in its own fresh process (the resident high-water mark is per
  process and never goes down by itself). The child loads the model, runs one warm-up prefill,
  trims the heap, resets the kernel's high-water mark (``/proc/self/clear_refs``) and measures the
  peak above the pre-call resident size during one 2048-token prefill; the process-wide peak
  (``VmHWM``, weights included) is reported next to it. The children run with glibc's mmap
  threshold pinned (``MALLOC_MMAP_THRESHOLD_``), so that every activation is its own mapping and
  the resident peak is the peak of live tensors, not of heap fragmentation.

Exit status 0 when every ratio is within target, 1 otherwise (noise on a shared machine can do
that: the load average is printed next to the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

import sinkfix
from sinkfix.bench import Spread, alternate, measure_peak_memory, prefill_kwargs, release_memory, time_prefill
from sinkfix.bench.provenance import provenance, provenance_line
from sinkfix.errors import ModelLoadError, UsageError
from sinkfix.evaluate import check_positions, tokenize
from sinkfix.texts import domain_text

CONFIGS = {"stock": None, "identity": "identity", "sink_scale=0.9": "sink_scale=0.9"}
TIME_TARGET = 1.10
MEMORY_TARGET = 1.10
_MIB = 1024 * 1024


def _ids(tokenizer, length: int) -> torch.Tensor:
    ids = tokenize(tokenizer, domain_text("pydoc", "eval"))
    if ids.numel() < length:
        ids = ids.repeat(length // ids.numel() + 1)
    return ids[:length][None]


def _apply(model, config: str):
    spec = CONFIGS[config]
    return None if spec is None else sinkfix.patch(model, sinkfix.Policy.parse(spec))


def _load(name: str):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = sinkfix.load_model(name)
    model.set_attn_implementation("sdpa")
    return model, tokenizer


# -- memory: one configuration per fresh process ------------------------------------------------------
def memory_child(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args.model)
    ids = _ids(tokenizer, args.mem_seq_len)
    extra = prefill_kwargs(model)
    handle = _apply(model, args.child)
    time_prefill(model, ids, extra)  # warm-up: one-time allocations (thread pools, kernel caches)
    release_memory()
    peak = measure_peak_memory(lambda: time_prefill(model, ids, extra))
    with open("/proc/self/status") as fh:
        hwm_kb = next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    if handle is not None:
        handle.remove()
    print(json.dumps({"config": args.child, "peak_bytes": peak.peak_bytes, "baseline_bytes": peak.baseline_bytes,
                      "method": peak.method, "process_peak_bytes": hwm_kb * 1024}))


def measure_memory(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for round_ in range(args.mem_rounds):
        order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--model", args.model,
                   "--mem-seq-len", str(args.mem_seq_len)]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            # pinned mmap threshold: see sinkfix.bench.runner.pin_mmap_threshold (without it two
            # identical stock runs read 168 and 238 MiB; with it 153.7 and 153.5 MiB)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"memory child {name} failed:\n{proc.stderr[-2000:]}")
            out[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  memory {name}: {out[name][-1]['peak_bytes'] / _MIB:.1f} MiB above baseline", flush=True)
    return out


# -- time: all configurations in one process, ABBA ---------------------------------------------------
def _check_positions(model, args: argparse.Namespace) -> None:
    """Raise UsageError, naming the option, for a prompt beyond the model's positions (past them a
    model's outputs are garbage, not an error: the run would time something else than the model)."""
    check_positions(args.seq_len, model.config, "--seq-len", args.model)
    if not args.skip_memory:
        check_positions(args.mem_seq_len, model.config, "--mem-seq-len", args.model)


def measure_time(args: argparse.Namespace) -> dict[str, list[float]]:
    """Raises ModelLoadError for a model that does not load and UsageError for sequence lengths beyond
    its positions, both before anything is timed."""
    model, tokenizer = _load(args.model)
    _check_positions(model, args)
    ids = _ids(tokenizer, args.seq_len)
    extra = prefill_kwargs(model)

    def once(name: str) -> float:
        handle = _apply(model, name)
        try:
            return time_prefill(model, ids, extra)
        finally:
            if handle is not None:
                handle.remove()

    return alternate(list(CONFIGS), once, repeats=args.repeats, warmup=args.warmup)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512, help="prompt tokens of the timed prefill (at least 1)")
    parser.add_argument("--mem-seq-len", type=int, default=2048,
                        help="prompt tokens of the memory prefill (at least 1)")
    # the verdict is on medians, and the paired per-round ratios show how far noise moved them
    parser.add_argument("--repeats", type=int, default=15, help="timed ABBA rounds (at least 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (0 or more)")
    parser.add_argument("--mem-rounds", type=int, default=1,
                        help="fresh processes per configuration for the memory (at least 1; see --skip-memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (at least 1; default: torch's)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers here")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before the model loads, what would fail later (or run something else than asked)."""
    for name, least in (("seq_len", 1), ("mem_seq_len", 1), ("repeats", 1), ("mem_rounds", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.json and not args.child:  # a path that cannot be written fails now, not after the whole run
        from sinkfix.files import OutputError, check_writable

        try:
            check_writable(args.json)
        except OutputError as error:
            parser.error(str(error))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return 0

    load_start = os.getloadavg()
    origin = provenance(torch.device("cpu"))
    print(provenance_line(origin), flush=True)
    print(f"sinkfix patch overhead: {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_start[0]:.2f}", flush=True)
    started = time.perf_counter()
    try:
        times = measure_time(args)
    except ModelLoadError as error:
        parser.error(f"--model {args.model}: {error}")
    except UsageError as error:  # check_positions: the message names the option and the value
        parser.error(str(error))
    stock = Spread(tuple(times["stock"]))
    report: dict[str, Any] = {"model": args.model, "threads": torch.get_num_threads(), "seq_len": args.seq_len,
                              "mem_seq_len": args.mem_seq_len, "repeats": args.repeats, "provenance": origin, "time": {},
                              "memory": {}}
    ok = True
    print(f"\nprefill {args.seq_len} tokens, {args.repeats} ABBA rounds after {args.warmup} warm-up rounds (ms)")
    print(f"{'config':<16}{'min':>9}{'median':>9}{'max':>9}{'ratio':>9}   paired ratio min/median/max")
    for name, samples in times.items():
        s = Spread(tuple(samples))
        ratio = s.median / stock.median
        paired = Spread(tuple(a / b for a, b in zip(samples, times["stock"])))
        within = name == "stock" or ratio <= TIME_TARGET
        ok &= within
        print(f"{name:<16}{s.min * 1e3:9.1f}{s.median * 1e3:9.1f}{s.max * 1e3:9.1f}{ratio:9.3f}   "
              f"{paired.min:.3f}/{paired.median:.3f}/{paired.max:.3f}" + ("" if within else "   ABOVE TARGET"))
        report["time"][name] = {"seconds": s.to_dict(), "ratio_of_medians": ratio, "paired_ratio": paired.to_dict()}

    if not args.skip_memory:
        print(f"\npeak memory, {args.mem_seq_len}-token prefill, one fresh process per configuration", flush=True)
        memory = measure_memory(args)
        base = Spread(tuple(m["peak_bytes"] for m in memory["stock"])).median
        base_proc = Spread(tuple(m["process_peak_bytes"] for m in memory["stock"])).median
        print(f"{'config':<16}{'peak above baseline MiB':>25}{'ratio':>8}{'process peak MiB':>19}{'ratio':>8}")
        for name, runs in memory.items():
            peak = Spread(tuple(m["peak_bytes"] for m in runs)).median
            proc_peak = Spread(tuple(m["process_peak_bytes"] for m in runs)).median
            ratio = peak / base if base else float("nan")
            within = name == "stock" or ratio <= MEMORY_TARGET
            ok &= within
            print(f"{name:<16}{peak / _MIB:25.1f}{ratio:8.3f}{proc_peak / _MIB:19.1f}{proc_peak / base_proc:8.3f}"
                  + ("" if within else "   ABOVE TARGET"))
            report["memory"][name] = {"runs": runs, "peak_bytes": peak, "ratio": ratio,
                                      "process_peak_bytes": proc_peak, "process_ratio": proc_peak / base_proc}
    load_end = os.getloadavg()
    report["load_average"] = [load_start[0], load_end[0]]
    report["wall_time_s"] = time.perf_counter() - started
    print(f"\nload average {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} CPUs; "
          f"{report['wall_time_s']:.0f} s; {'all within target' if ok else 'SOME RATIOS ABOVE TARGET'}")
    if args.json:  # atomically: a failed write leaves no half-written file in the old one's place
        from sinkfix.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
