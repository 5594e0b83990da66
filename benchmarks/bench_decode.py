"""Decode and prefill speed of the patched model against the stock model, eager and compiled.

    python benchmarks/bench_decode.py                          # SmolLM2-135M, CPU, 1 and 2 threads
    python benchmarks/bench_decode.py --threads 1 --modes eager --json decode.json
    python benchmarks/bench_decode.py --rounds 9 --prefills 3 --json decode.json   # the README numbers

Targets: per-token decode step, patched / stock, ratio of medians in one run: eager sink_scale=0.9
<= 1.10x; compiled patched / compiled stock <= 1.05x; 512-token prefill <= 1.05x.

* **Decode**: greedy ``generate`` of ``--new-tokens`` tokens after a ``--prompt``-token prompt; the
  KV-cached steps are timed one by one (a stopping criterion reads the clock after each token), the
  first ``--skip`` steps dropped. Eager: transformers' dynamic cache. Compiled: a static cache with
  transformers' own compiled decoding (``CompileConfig(fullgraph=True, dynamic=False)``, inductor),
  for the stock model and for every patched variant alike; a warm-up round compiles every variant
  before anything is timed.
* **Prefill**: one forward of the prompt with a KV cache and last-position logits (what generate
  does first); compiled with ``torch.compile(model, fullgraph=True, dynamic=False)`` in the
  compiled mode.
* Variants run in ABBA rounds (the order reverses every round) so drift hits all alike; the ratio
  is of medians over all timed steps of all rounds; the load average and thread count are printed
  next to every number.
* Every ratio comes with a 95% interval that draws whole rounds with replacement
  (``sinkfix.bench.stats.ratio_of_block_medians``): a decode step's time moves more from one
  ``generate`` to the next than within one, so the rounds, not the steps, are the independent
  draws. With 5 rounds the interval is rough; a verdict that holds is one whose whole interval is
  below the target. The JSON keeps every sample, round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

import torch

import sinkfix
from sinkfix.bench import alternate, prefill_kwargs
from sinkfix.bench.stats import ratio_of_block_medians
from sinkfix.bench.timing import CLOCKS, compiled_decoding, decode_step_times, time_prefill

TARGETS = {("decode", "eager"): 1.10, ("decode", "compiled"): 1.05, ("prefill", "eager"): 1.05,
           ("prefill", "compiled"): 1.05}
MODES = ("eager", "compiled")


def _policies(model, profile: sinkfix.Profile | None) -> dict[str, Any]:
    """stock (None), identity, sink_scale=0.9 and a per-head policy (a profile, loaded and checked
    against the model by main, or per-head beta and virtual logits drawn once with a fixed seed, as a
    calibrated profile has)."""
    variants: dict[str, Any] = {"stock": None, "identity": sinkfix.Policy(), "sink_scale=0.9": sinkfix.Policy(sink_scale=0.9)}
    if profile is not None:
        variants["profile"] = profile
    else:
        handle = sinkfix.patch(model, sinkfix.Policy())
        layers, heads = handle.num_layers, max(handle.num_heads())
        handle.remove()
        g = torch.Generator().manual_seed(0)
        variants["per-head"] = sinkfix.Policy(sink_scale=0.8 + 0.2 * torch.rand(layers, heads, generator=g),
                                              virtual_sink_logit=torch.randn(layers, heads, generator=g) - 4)
    return variants


def _measure(model, variants: dict[str, Any], ids: torch.Tensor, mode: str, args) -> dict[str, dict[str, list[float]]]:
    pad = model.generation_config.pad_token_id or 0
    extra = prefill_kwargs(model)
    decode_kwargs: dict[str, Any] = {}
    prefill_model = model
    if mode == "compiled":
        # a new thread count is a new global state to dynamo: every variant's graphs would be
        # compiled again on top of the previous thread count's and hit the recompile limit
        torch._dynamo.reset()
        decode_kwargs = compiled_decoding()
        prefill_model = torch.compile(model, fullgraph=True, dynamic=False)

    def run(name: str) -> dict[str, list[float]]:
        policy = variants[name]
        handle = sinkfix.patch(model, policy) if policy is not None else None
        try:
            with torch.no_grad():
                prefill = [time_prefill(prefill_model, ids, extra, clock=args.clock) for _ in range(args.prefills)]
                steps = decode_step_times(model, ids, args.new_tokens, pad, clock=args.clock, **decode_kwargs)[args.skip:]
        finally:
            if handle is not None:
                handle.remove()
        return {"prefill": prefill, "decode": steps}

    rounds = alternate(list(variants), run, repeats=args.rounds, warmup=1)
    return {name: {kind: [r[kind] for r in runs] for kind in ("prefill", "decode")} for name, runs in rounds.items()}


def _rows(results: dict, mode: str, clock: str, threads: int, load: float) -> list[dict]:
    """One row per variant and kind; ``results[variant][kind]`` holds each round's samples."""
    rows = []
    for name, by_round in results.items():
        for kind in ("prefill", "decode"):
            rounds = by_round[kind]
            median = statistics.median(x for r in rounds for x in r)
            target = TARGETS[(kind, mode)] if name != "stock" else None
            row = dict(mode=mode, clock=clock, threads=threads, load=load, variant=name, kind=kind, median_ms=1e3 * median,
                       n=sum(len(r) for r in rounds), rounds=len(rounds), ratio=1.0, target=target, met=None,
                       samples_ms=[[1e3 * x for x in r] for r in rounds])
            if target is not None:
                interval = ratio_of_block_medians(rounds, results["stock"][kind])
                # one round has no interval (stats.Ratio): null in the JSON, never "below the target"
                row.update(ratio=interval.value,
                           interval=[interval.low, interval.high] if interval.has_interval else None,
                           met=interval.value <= target,
                           interval_below_target=interval.has_interval and interval.high <= target)
            rows.append(row)
    return rows


def _interval_text(row: dict) -> str:
    """A row's interval as printed: ``[low, high]``, or why there is none."""
    if row["interval"] is None:
        return f"no interval ({row['rounds']} round{'s' if row['rounds'] != 1 else ''})"
    return f"[{row['interval'][0]:.3f}, {row['interval'][1]:.3f}]"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", default=None, help="a profile file for the per-head variant")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each at least 1")
    parser.add_argument("--modes", default="eager,compiled", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens; with --new-tokens within the "
                        "model's max_position_embeddings")
    parser.add_argument("--new-tokens", type=int, default=34)
    parser.add_argument("--skip", type=int, default=1, help="decode steps dropped at the start of each generate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefills", type=int, default=3,
                        help="prefill forwards timed per variant and round (one per round left a 5%% question "
                             "to 3 samples)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: CPU seconds of the process (all threads), less "
                             "disturbed by other work on a shared machine")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before the model loads, what would fail only at the end of the run. Sets
    ``args.thread_counts`` and ``args.mode_list`` (the parsed --threads and --modes) and
    ``args.loaded_profile`` (the --profile file read, not yet checked against the model)."""
    for name in ("rounds", "prefills", "new_tokens", "prompt"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.skip < 0:
        parser.error(f"--skip must be at least 0, got {args.skip}")
    # generate times new_tokens - 1 cached steps (decode_step_times); dropping them all left no step
    # and the median of none failed after the whole run
    if args.skip >= args.new_tokens - 1:
        parser.error(f"--skip {args.skip} leaves no timed decode step of --new-tokens {args.new_tokens} "
                     f"({args.new_tokens - 1} cached steps)")
    args.mode_list = args.modes.split(",")
    unknown = [mode for mode in args.mode_list if mode not in MODES]
    if unknown:
        parser.error(f"--modes {args.modes!r}: unknown mode {unknown[0]!r} (choose from {', '.join(MODES)})")
    try:
        args.thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads {args.threads!r} is not a comma-separated list of whole numbers")
    if min(args.thread_counts) < 1:
        parser.error(f"--threads {args.threads!r}: every thread count must be at least 1")
    if args.json:  # a path that cannot be written fails now, not after the whole run
        from sinkfix.files import OutputError, check_writable

        try:
            check_writable(args.json)
        except OutputError as error:
            parser.error(f"--json: {error}")
    args.loaded_profile = None
    if args.profile is not None:
        try:
            args.loaded_profile = sinkfix.Profile.load(args.profile)
        except sinkfix.ProfileError as error:  # its message names the file
            parser.error(f"--profile: {error}")


def _check_model(parser: argparse.ArgumentParser, args: argparse.Namespace, model, ids: torch.Tensor) -> None:
    """Refuse, after the model loads and before anything is measured, what does not fit the model."""
    from sinkfix.errors import UsageError
    from sinkfix.evaluate import check_positions

    try:
        check_positions(args.prompt + args.new_tokens, model.config, "--prompt + --new-tokens", args.model)
    except UsageError as error:
        parser.error(f"{error} (--prompt {args.prompt}, --new-tokens {args.new_tokens})")
    if ids.shape[1] < args.prompt:
        parser.error(f"--prompt {args.prompt} is longer than the benchmark text ({ids.shape[1]} tokens)")
    if args.loaded_profile is not None:
        try:
            args.loaded_profile.check(model)
        except sinkfix.ProfileError as error:
            parser.error(f"--profile {args.profile}: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        model, tok = sinkfix.load_model(args.model)
    except sinkfix.ModelLoadError as error:
        parser.error(f"--model {args.model}: {error}")
    model.set_attn_implementation("sdpa")
    from sinkfix.texts import domain_text

    text = domain_text("pydoc", "eval")
    ids = tok(text, return_tensors="pt").input_ids[:, : args.prompt]
    _check_model(parser, args, model, ids)
    variants = _policies(model, args.loaded_profile)
    rows = []
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        for mode in args.mode_list:
            load = os.getloadavg()[0]
            results = _measure(model, variants, ids, mode, args)
            rows += _rows(results, mode, args.clock, threads, round(max(load, os.getloadavg()[0]), 2))
            for row in rows[-2 * len(variants):]:
                print(f"{row['mode']:8} {args.clock:4} {row['threads']}t load {row['load']:4.1f} {row['variant']:16} {row['kind']:7} "
                      f"{row['median_ms']:9.2f} ms (n={row['n']:3})  x{row['ratio']:.3f}"
                      + ("" if row["target"] is None else
                         f" {_interval_text(row)}  target <= {row['target']}: "
                         f"{'met' if row['met'] else 'MISSED'}{' (whole interval below)' if row['interval_below_target'] else ''}"),
                      flush=True)
    from sinkfix.bench.provenance import device_name, versions

    info = dict(model=args.model, profile=args.profile, device=device_name(torch.device("cpu")), versions=versions(),
                clock=args.clock, prompt=args.prompt, new_tokens=args.new_tokens, skip=args.skip, rounds=args.rounds,
                prefills=args.prefills)
    print(json.dumps(info))
    verdicts = [r for r in rows if r["target"] is not None]
    print(f"targets met in {sum(r['met'] for r in verdicts)} of {len(verdicts)} cells, the whole 95% interval "
          f"(rounds drawn with replacement) below the target in {sum(r['interval_below_target'] for r in verdicts)}")
    if args.json:
        from sinkfix.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["met"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
