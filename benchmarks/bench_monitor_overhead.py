"""What telemetry costs: the same patched model with and without ``sinkfix.monitor``, prefill and decode.

    python benchmarks/bench_monitor_overhead.py                       # SmolLM2-135M, CPU, 1 thread
    python benchmarks/bench_monitor_overhead.py --rounds 15 --json monitor-overhead.json

Targets (docs/monitoring.md): with telemetry on, a prefill takes at most 1.03x and a decode step at
most 1.05x the same patched model without it (ratio of medians in one run).

* One process, one model. For each policy the configurations (``off``: patched, no monitor; ``on``:
  inside ``monitor.request()``; ``on+guard``: the same with a guard, per-head policies only)
  alternate in ABBA order after a warm-up pass, so drift and other processes hit them alike: one
  prefill each in turn (``--rounds`` x ``--prefills`` passes), then one decode run each in turn
  (``--rounds`` passes).
* **Prefill**: one forward of a ``--prompt``-token prompt with a KV cache and last-position logits
  (what ``generate`` does first), the whole request included when on: hooks, the prompt measures
  and the end-of-request read and record.
* **Decode**: greedy ``generate`` of ``--new-tokens`` tokens after a ``--decode-prompt``-token
  prompt; each cached step is timed by a stopping criterion (the first ``--skip`` dropped).
* ``--compiled-decode``: the decode runs use transformers' compiled decoding (a static cache and a
  ``CompileConfig(fullgraph=True)``, inductor), the monitored and the unmonitored step each compiled
  once in the warm-up pass; no prefill is timed (transformers runs the prompt eagerly there).
* ``--compiled-prefill``: the prefills run ``torch.compile(model.forward, fullgraph=True)``
  (inductor) with the prompt's length already symbolic: the warm-up serves each configuration two
  shorter prompts (3/16 and 5/16 of ``--prompt``) first, so dynamo turns the length dynamic before
  the timed prompt, the way a server meets prompts of many lengths; no decode step is timed.
* Both clocks: wall time (``perf_counter``) and the main thread's CPU time (``thread_time``; with
  one torch thread all the work runs on it), which other processes on a shared machine disturb
  less. The verdict uses CPU time; wall ratios are printed next to it.
* Every CPU-time ratio comes with a 95% paired-bootstrap interval (``sinkfix.bench.stats``): for
  prefills ``ratio_of_medians``, the passes drawn with replacement, both configurations'
  measurements of a pass together; for decode steps ``ratio_of_block_medians``, whole decode runs
  drawn (the steps of one ``generate`` share its machine state, so drawing them one by one made the
  interval too narrow: the runs recorded before 2026-12-03 drew steps). On a machine whose
  single 512-token prefill varies by several percent, a run's ratio can land on either side of 1.03
  while the overhead itself stays put; the summary says how many cells meet their target and how
  many do so with the whole interval below it.
* ``--processes N`` repeats the whole measurement in N fresh processes, one after another, and
  prints every process's ratios and their spread: what one process measures can differ from the
  next by more than its own interval (docs/monitoring.md).
* Every prefill also counts the process's minor page faults (``getrusage``): with glibc's default
  heap settings a pass that finds the heap trimmed by the one before faults its pages in again
  (about 8,800 faults, 34 MB, for a 512-token SmolLM2 prefill), and monitored passes did so more
  often than unmonitored ones (docs/monitoring.md, "The heap"). ``--heap no-trim`` fixes glibc's
  thresholds for the whole process (``mallopt``: no trimming, no blocks mapped on their own), a
  setting a CPU server can run with, so that both configurations reuse their memory pass after
  pass; the default keeps glibc's own behaviour, the protocol the targets are judged by (runs P,
  Q and T of the run log used ``no-trim``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sinkfix
from sinkfix.bench import alternate, prefill_kwargs
from sinkfix.memory import keep_freed_heap
from sinkfix.bench.provenance import provenance, provenance_line
from sinkfix.bench.stats import ratio_of_block_medians, ratio_of_medians
from sinkfix.bench.timing import compiled_decoding
from sinkfix.evaluate import bos_token_id, tokenize
from sinkfix.telemetry import SAMPLE_ROWS
from sinkfix.texts import domain_text

TARGETS = {"prefill": 1.03, "decode": 1.05}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _minor_faults() -> int:
    """The process's minor page faults so far (0 where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _heap_without_trimming() -> None:
    """``--heap no-trim``: :func:`sinkfix.memory.keep_freed_heap` at 1 GiB for the whole
    process, or SystemExit where glibc's mallopt is missing or refuses it."""
    if not keep_freed_heap(1 << 30):
        raise SystemExit("--heap no-trim needs glibc's mallopt, which is missing here or refused the thresholds")


def _prompt(tokenizer, length: int) -> torch.Tensor:
    ids = tokenize(tokenizer, domain_text("pydoc", "eval"))[: length - 1]
    return torch.cat([torch.tensor([bos_token_id(tokenizer)]), ids])[None]


def _policies(handle_layers: int, heads: int) -> dict[str, sinkfix.Policy]:
    g = torch.Generator().manual_seed(0)
    return {"identity": sinkfix.Policy(), "sink_scale=0.9": sinkfix.Policy(sink_scale=0.9),
            "per-head": sinkfix.Policy(sink_scale=0.8 + 0.2 * torch.rand(handle_layers, heads, generator=g),
                                       virtual_sink_logit=torch.randn(handle_layers, heads, generator=g) - 4)}


def _guard_profile(model, tokenizer, policy: sinkfix.Policy):
    """A profile of ``policy`` with statistics from two 512-token calibration windows."""
    from sinkfix.analysis.calibration import calibration_windows
    from sinkfix.profile import ModelIdentity, Profile
    from sinkfix.telemetry import calibration_statistics

    with sinkfix.patch(model, policy) as handle:
        layers, heads = handle.num_layers, max(handle.num_heads())
        identity = ModelIdentity.of(model)
        windows = calibration_windows(tokenizer, domain_text("pydoc", "calib"), seq_len=512, bos=True)[:2]
        stats = calibration_statistics(model, windows)
    beta = torch.as_tensor(policy.sink_scale, dtype=torch.float64).expand(layers, heads)
    logit = None if policy.virtual_sink_logit is None else torch.as_tensor(policy.virtual_sink_logit).double()
    return Profile(identity, beta.clone(), logit, statistics=stats)


class _Steps:
    """A stopping criterion that stamps both clocks after every generated token."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(_clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _decode(model, ids: torch.Tensor, new_tokens: int, skip: int, compiled: bool = False) -> list[tuple[float, float]]:
    from transformers import GenerationConfig, StoppingCriteriaList

    clock = _Steps()
    # transformers' default mode, as in the recorded run (bench_decode.py uses "default")
    settings = compiled_decoding(mode="reduce-overhead") if compiled else {}
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0, eos_token_id=None, use_cache=True, **settings)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                   stopping_criteria=StoppingCriteriaList([clock]))
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(clock.stamps, clock.stamps[1:])]
    return steps[skip:]


def _measure(model, handle, monitors: dict[str, Any], prompt, decode_prompt, args):
    """Prefills first, one prefill per configuration in turn (ABBA over ``rounds x prefills``
    passes), then the decode runs (ABBA over ``rounds``): a configuration's prefills are never more
    than one prefill per configuration away from the others', so a drift of the machine's speed
    hits them alike. Returns {name: {"prefill": [(wall, cpu, minor page faults)], "step_runs": [[(wall, cpu)] per decode
    run]}}."""
    extra = prefill_kwargs(model)

    def request(name: str):
        """One whole monitored request when on, nothing when off."""
        monitor = monitors[name]
        return contextlib.nullcontext() if monitor is None else monitor.request()

    def prefill(name: str) -> tuple[float, float, int]:
        with torch.no_grad():
            faults, start = _minor_faults(), _clock()
            with request(name):
                model(input_ids=prompt, use_cache=True, **extra)
            end = _clock()
        return end[0] - start[0], end[1] - start[1], _minor_faults() - faults

    def decode(name: str) -> list[tuple[float, float]]:
        with torch.no_grad(), request(name):
            return _decode(model, decode_prompt, args.new_tokens, args.skip, args.compiled_decode)

    if args.compiled_prefill:  # every configuration's graph for a symbolic length, before any timing
        for length in (args.prompt * 3 // 16, args.prompt * 5 // 16):
            for name in monitors:
                with torch.no_grad(), request(name):
                    model(input_ids=prompt[:, :length], use_cache=True, **extra)
    prefills = ({name: [] for name in monitors} if args.compiled_decode
                else alternate(list(monitors), prefill, repeats=args.rounds * args.prefills, warmup=1))
    decodes = ({name: [] for name in monitors} if args.compiled_prefill
               else alternate(list(monitors), decode, repeats=args.rounds, warmup=1))
    return {name: {"prefill": prefills[name], "step_runs": decodes[name]} for name in monitors}


def _ratios(results: dict[str, list], base: str = "off") -> dict[str, dict]:
    """Ratio of medians to ``base`` (the verdict) with its 95% interval, plus the median of the
    paired ratios: each prefill against ``base``'s prefill of the same pass, which a change of the
    machine's speed between passes moves less than the medians."""
    out = {}
    for name, runs in results.items():
        prefills, steps = runs["prefill"], [step for run in runs["step_runs"] for step in run]
        # no prefill timed (--compiled-decode): NaN, left out of the verdict
        prefill_wall = statistics.median(p[0] for p in prefills) if prefills else float("nan")
        prefill_cpu = statistics.median(p[1] for p in prefills) if prefills else float("nan")
        # no decode step timed (--compiled-prefill): NaN, left out of the verdict
        decode_wall = statistics.median(s[0] for s in steps) if steps else float("nan")
        decode_cpu = statistics.median(s[1] for s in steps) if steps else float("nan")
        out[name] = {"prefill_ms": 1e3 * prefill_wall, "prefill_cpu_ms": 1e3 * prefill_cpu,
                     "decode_ms": 1e3 * decode_wall, "decode_cpu_ms": 1e3 * decode_cpu, "steps": len(steps),
                     "prefill_cpu_samples_ms": [round(1e3 * p[1], 2) for p in prefills],
                     "prefill_minor_faults": [p[2] for p in prefills if len(p) > 2],
                     "decode_cpu_runs_ms": [[round(1e3 * s[1], 3) for s in run] for run in runs["step_runs"]]}
    base_prefills = out[base]["prefill_cpu_samples_ms"]
    for name, row in out.items():
        for key in ("prefill_ms", "prefill_cpu_ms", "decode_ms", "decode_cpu_ms"):
            row[key.replace("_ms", "_ratio")] = row[key] / out[base][key]
        row["prefill_cpu_paired_ratio"] = statistics.median(
            a / b for a, b in zip(row["prefill_cpu_samples_ms"], base_prefills)) if base_prefills else float("nan")
        if name != base:  # passes of the same round, drawn together (ratio_of_medians says why)
            if results[name]["prefill"]:
                row["prefill_cpu_interval"] = ratio_of_medians(
                    [t[1] for t in results[name]["prefill"]], [t[1] for t in results[base]["prefill"]]).to_dict()
            # whole decode runs drawn together (ratio_of_block_medians)
            if results[name]["step_runs"]:
                row["decode_cpu_interval"] = ratio_of_block_medians(
                    [[t[1] for t in run] for run in results[name]["step_runs"]],
                    [[t[1] for t in run] for run in results[base]["step_runs"]]).to_dict()
    return out


def _faults(row: dict) -> str:
    """The prefills' minor page faults: their median and how many passes faulted (more than 1,000)."""
    faults = row.get("prefill_minor_faults") or []
    if not faults:
        return "faults -"
    return (f"faults median {statistics.median(faults):.0f}, "
            f"{sum(f > 1000 for f in faults)} of {len(faults)} passes > 1000")


def _interval(row: dict, kind: str) -> str:
    interval = row.get(f"{kind}_cpu_interval")
    if interval is None:
        return ""
    if interval.get("low") is None or interval.get("high") is None:  # one resampling unit (stats.Ratio)
        pairs = interval.get("pairs")
        unit = "round" if kind == "decode" else "pass"
        return f" no interval ({pairs} {unit})"
    return f" [{interval['low']:.3f}, {interval['high']:.3f}]"


def _settled(interval: dict, target: float) -> bool:
    """The whole interval below ``target``; never where there is no interval (fewer than 2 units)."""
    return interval.get("high") is not None and interval["high"] <= target


def _verdict(policies: dict[str, dict]) -> list[str]:
    """Per target: the monitored cells within it, and those whose whole interval is."""
    lines = []
    for kind, target in TARGETS.items():
        cells = [row for table in policies.values() for name, row in table.items()
                 if name != "off" and f"{kind}_cpu_interval" in row]
        if not cells:
            continue
        met = sum(row[f"{kind}_cpu_ratio"] <= target for row in cells)
        sure = sum(_settled(row[f"{kind}_cpu_interval"], target) for row in cells)
        none = sum(row[f"{kind}_cpu_interval"].get("high") is None for row in cells)
        lines.append(f"{kind} <= {target:.2f}x: {met} of {len(cells)} cells; the whole 95% interval below it in "
                     f"{sure} of {len(cells)}" + (f" (no interval in {none}: fewer than 2 rounds)" if none else ""))
    return lines


def _intervals_of(paths: list[str]) -> int:
    """The prefill intervals of saved runs (their JSON keeps every prefill's CPU time, paired by pass;
    decode steps are kept as medians only). Runs saved before the samples were kept are named."""
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            print(f"{path}: cannot read it ({error})", file=sys.stderr)
            return 2
        if "runs" in saved and "policies" not in saved:  # a --processes file: every process's run, in turn
            tables = [(f"process {i + 1}", run) for i, run in enumerate(saved["runs"])]
            print(f"{path} ({saved.get('processes', len(tables))} processes)")
        else:
            tables = [(None, saved)]
        for label, run in tables:
            _print_intervals(run, label or path)
    return 0


def _print_intervals(saved: dict, label: str) -> None:
    """The prefill intervals of one process's saved results (``_intervals_of``)."""
    print(f"{label} ({saved.get('rounds')} rounds x {saved.get('prefills')} prefills)")
    if not saved.get("policies"):
        print("  no policies in this file")
    for policy, table in saved.get("policies", {}).items():
        base = table.get("off", {}).get("prefill_cpu_samples_ms")
        if base is None:
            print(f"  {policy}: no prefill samples kept in this file")
            continue
        for config, row in table.items():
            if config != "off":
                r = ratio_of_medians(row["prefill_cpu_samples_ms"], base)
                interval = f"[{r.low:.3f}, {r.high:.3f}]" if r.has_interval else "no interval"
                print(f"  {policy:15s} {config:16s} prefill x{r.value:.3f} {interval} ({r.pairs} passes)")


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value (``--option V`` or ``--option=V``), also where it is
    spelt as a prefix of itself (``--proc 2``): the parser is built with ``allow_abbrev=False`` so
    that no abbreviation reaches here, but a child that kept one would see ``--processes`` again and
    spawn children of its own without end. Everything after a bare ``--`` is left alone."""
    def spelt(arg: str) -> bool:
        name = arg.split("=", 1)[0]
        return len(name) > 2 and name.startswith("--") and option.startswith(name)

    out, skip, positional = [], False, False
    for arg in argv:
        if skip:
            skip = False
        elif positional or arg == "--":
            positional = True
            out.append(arg)
        elif spelt(arg):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def _across_processes(argv: list[str], processes: int, json_path: str | None) -> int:
    """The same measurement in ``processes`` fresh processes, one after another; every process's
    ratios, their median and range, and per target how many processes met it in every cell."""
    import subprocess
    import tempfile

    child = _without_option(_without_option(argv, "--processes"), "--json")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sinkfix-overhead-") as folder:
        for index in range(processes):
            path = Path(folder) / f"process-{index}.json"
            print(f"--- process {index + 1} of {processes}", flush=True)
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child, "--json", str(path)])
            if not path.exists():
                print(f"process {index + 1} wrote no results (exit code {done.returncode})", file=sys.stderr)
                return 2
            runs.append(json.loads(path.read_text(encoding="utf-8")))
    summary: dict[str, dict] = {}
    print(f"\nacross {processes} processes (main-thread CPU time, ratio of medians of each process):")
    for policy, table in runs[0]["policies"].items():
        for config in table:
            if config == "off":
                continue
            cell: dict[str, Any] = {}
            for kind in TARGETS:
                ratios = [run["policies"][policy][config][f"{kind}_cpu_ratio"] for run in runs]
                if any(math.isnan(r) for r in ratios):
                    continue
                cell[kind] = {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios),
                              "max": max(ratios), "met": sum(r <= TARGETS[kind] for r in ratios)}
            summary[f"{policy} | {config}"] = cell
            print(f"{policy:15s} {config:16s} " + " | ".join(
                f"{kind} median x{c['median']:.3f} [{c['min']:.3f}-{c['max']:.3f}], <= {TARGETS[kind]:.2f}x in "
                f"{c['met']} of {processes}: " + " ".join(f"{r:.3f}" for r in c["ratios"])
                for kind, c in cell.items()), flush=True)
    if json_path:
        from sinkfix.files import atomic_write_text

        atomic_write_text(json_path, json.dumps({"processes": processes, "summary": summary, "runs": runs}, indent=1))
    every = all(c["met"] == processes for cell in summary.values() for c in cell.values())
    return 0 if every else 1


POLICIES = ("identity", "sink_scale=0.9", "per-head")  # the names _policies builds


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --processes re-runs this script with its own option removed, which only
    # works for the full spelling (an abbreviation such as --proc spawned processes without end)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--prefills", type=int, default=3, help="prefill requests timed per configuration and round")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length (tokens)")
    parser.add_argument("--decode-prompt", type=int, default=128, help="prompt before the timed decode steps")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--skip", type=int, default=2, help="decode steps dropped at the start of each run")
    parser.add_argument("--sample-rows", type=int, nargs="+", default=[SAMPLE_ROWS],
                        help="one monitored configuration per value; the guard's uses the first")
    # choices: an unknown name used to fail with a KeyError after the policies before it were measured
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES,
                        help="policies measured, in this order (default: all of them)")
    parser.add_argument("--compiled-decode", action="store_true",
                        help="time the decode steps of transformers' compiled decoding (static cache, inductor); "
                             "no prefill")
    parser.add_argument("--compiled-prefill", action="store_true",
                        help="time the prefills of torch.compile(model.forward, fullgraph=True) with the prompt's "
                             "length already symbolic (inductor); no decode step is timed")
    parser.add_argument("--heap", choices=["default", "no-trim"], default="default",
                        help="glibc's heap: its own behaviour (default), or never trimmed and no block mapped on "
                             "its own, for the whole process (mallopt; docs/monitoring.md, 'The heap')")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--processes", type=int, default=1,
                        help="repeat the whole measurement in this many fresh processes, one after another, and "
                             "summarise every process's ratios")
    parser.add_argument("--intervals-of", nargs="+", metavar="JSON", default=None,
                        help="measure nothing: print the prefill intervals of earlier runs' saved samples")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.intervals_of:
        return _intervals_of(args.intervals_of)
    for name in ("rounds", "prefills", "new_tokens", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.compiled_prefill and args.compiled_decode:
        parser.error("--compiled-prefill and --compiled-decode time different things: choose one")
    if args.compiled_prefill and args.prompt < 16:
        parser.error(f"--compiled-prefill warms up on 3/16 and 5/16 of --prompt: it must be at least 16, got {args.prompt}")
    if args.skip >= args.new_tokens - 1:
        parser.error(f"--skip {args.skip} leaves no timed decode step of --new-tokens {args.new_tokens}")
    if args.json:  # a path that cannot be written fails now, not after the measurement
        from sinkfix.files import OutputError, check_writable

        try:
            check_writable(args.json)
        except OutputError as error:
            parser.error(str(error))
    if args.processes > 1:
        return _across_processes(sys.argv[1:] if argv is None else list(argv), args.processes, args.json)
    if args.heap == "no-trim":  # before the model's memory is allocated
        _heap_without_trimming()
    torch.set_num_threads(args.threads)
    origin = provenance(torch.device("cpu"))
    print(provenance_line(origin), flush=True)
    model, tokenizer = sinkfix.load_model(args.model)
    prompt, decode_prompt = _prompt(tokenizer, args.prompt), _prompt(tokenizer, args.decode_prompt)
    with sinkfix.patch(model) as handle:
        layers, heads = handle.num_layers, max(handle.num_heads())
    results: dict[str, Any] = {"threads": args.threads, "load_before": os.getloadavg(), "policies": {},
                               "torch": torch.__version__, "model": args.model, "prompt": args.prompt,
                               "decode_prompt": args.decode_prompt, "new_tokens": args.new_tokens,
                               "rounds": args.rounds, "prefills": 0 if args.compiled_decode else args.prefills,
                               "compiled_decode": args.compiled_decode, "compiled_prefill": args.compiled_prefill,
                               "heap": args.heap,
                               "provenance": origin}
    for name in args.policies:
        if args.compiled_decode or args.compiled_prefill:  # each policy's graphs anew: dynamo's recompile limit counts them all
            torch._dynamo.reset()
        policy = _policies(layers, heads)[name]
        profile = _guard_profile(model, tokenizer, policy) if name == "per-head" else None
        with sinkfix.patch(model, profile if profile is not None else policy) as handle:
            monitors: dict[str, Any] = {"off": None}
            for rows in args.sample_rows:
                monitors[f"on (sample {rows})"] = sinkfix.monitor(model, sample_rows=rows)
            if profile is not None:
                monitors["on+guard"] = sinkfix.monitor(model, guard=profile, sample_rows=args.sample_rows[0])
            eager_forward = model.forward
            if args.compiled_prefill:
                # one compiled callable serves every configuration (off, on, on+guard: each its own
                # graphs, a static one for the first length and a dynamic one after), more than
                # dynamo's default limit of 8 graphs per callable allows for three configurations
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
                model.forward = torch.compile(eager_forward, fullgraph=True)
            try:
                raw = _measure(model, handle, monitors, prompt, decode_prompt, args)
            finally:
                model.forward = eager_forward
            for monitor in monitors.values():
                if monitor is not None:
                    monitor.close()
        table = _ratios(raw)
        results["policies"][name] = table
        for config, row in table.items():
            print(f"{name:15s} {config:16s} prefill {row['prefill_ms']:8.1f} ms (cpu {row['prefill_cpu_ms']:8.1f}) "
                  f"x{row['prefill_cpu_ratio']:.3f}{_interval(row, 'prefill')} cpu "
                  f"(paired x{row['prefill_cpu_paired_ratio']:.3f}) / "
                  f"x{row['prefill_ratio']:.3f} wall, {_faults(row)} | decode step "
                  f"{row['decode_ms']:6.2f} ms (cpu {row['decode_cpu_ms']:6.2f}) x{row['decode_cpu_ratio']:.3f}"
                  f"{_interval(row, 'decode')} cpu / "
                  f"x{row['decode_ratio']:.3f} wall", flush=True)
    results["load_after"] = os.getloadavg()
    results["verdict"] = _verdict(results["policies"])
    print("\n".join(results["verdict"]))
    print(f"threads {args.threads}, load average before {results['load_before'][0]:.1f}, after "
          f"{results['load_after'][0]:.1f}")
    if args.json:
        from sinkfix.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1))
    worst = max(max(row["prefill_cpu_ratio"] / TARGETS["prefill"] if not args.compiled_decode else 0.0,
                    row["decode_cpu_ratio"] / TARGETS["decode"] if not args.compiled_prefill else 0.0)
                for table in results["policies"].values() for row in table.values())
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
