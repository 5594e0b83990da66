"""Instructions a monitored prefill executes against the same prefill unmonitored, counted by callgrind.

    python benchmarks/count_monitor_instructions.py                   # SmolLM2-135M, 512 tokens
    python benchmarks/count_monitor_instructions.py --policies identity --prefills 3

``bench_monitor_overhead.py`` times the monitor, and on a shared 2-core machine one 512-token
prefill varies by 40-60 ms from one run to the next, so a run's ratio lands on either side of the
1.03x target while the monitor's own work stays put (docs/monitoring.md). This script measures the
same comparison with a count that does not move: the instructions the process executes, counted by
valgrind's callgrind between two markers around each prefill (``callgrind_markers.c``, compiled
here and called through ctypes). The same inputs give the same count whatever else the machine is
doing; repeated prefills of one configuration show how close to exact that is here.

What it is and is not: the ratio of instruction counts is the share of extra *work*, not of extra
*time*. The monitor's operations are small and run between the model's layers on cold caches, so
they may retire fewer instructions per cycle than the model's matrix products and cost more time
than their share of the count; the count bounds nothing, it removes the machine's noise from one
of the two factors. The target stays a time target, measured by ``bench_monitor_overhead.py``.

Protocol: one process under ``valgrind --tool=callgrind --instr-atstart=no`` (no cache
simulation; instructions retired, ``Ir``), one torch thread, the model patched with each policy;
per policy ``--warmups`` prefills of each configuration uncounted (1), then ``--prefills`` counted
prefills of each, alternating (ABBA). A prefill is what ``bench_monitor_overhead.py`` times: one
forward of the ``--prompt``-token prompt (BOS + held-out Python documentation) with a KV cache and
last-position logits, inside ``monitor.request()`` when on (hooks, prompt measures, the
end-of-request read and record). Needs valgrind with its headers (Debian: ``valgrind``) and a C
compiler. Counting is slow: with ``--prompt 64`` the whole run took 46 minutes on a 2-core AMD EPYC
(sharing it with a test run); a 512-token count
would take hours here (docs/monitoring.md, "Counted instead of timed").
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "monitor"
POLICIES = ("identity", "sink_scale=0.9", "per-head")
_CHILD_ENV = "SINKFIX_COUNT_CHILD"  # set for the process valgrind runs: it measures, the parent reports
_MARKERS_ENV = "SINKFIX_COUNT_MARKERS"
_LABEL = re.compile(r"^desc: Trigger: Client Request: (?P<label>.+)$", re.M)
_TOTAL = re.compile(r"^(?:summary|totals): (?P<ir>\d+)", re.M)


def _label(policy: str, config: str, index: int) -> str:
    """The trigger label of one counted prefill: the child writes it, the summary looks it up."""
    return f"{policy}|{config}|{index}"


def _build_markers(work: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler found (cc or gcc): the callgrind markers are C")
    library = work / "libsinkfix_markers.so"
    done = subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(library), str(HERE / "callgrind_markers.c")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not compile callgrind_markers.c (valgrind's headers, valgrind/callgrind.h, "
                         f"are needed):\n{done.stderr}")
    return library


def _read_counts(work: Path) -> dict[str, int]:
    """{label: instructions} from every callgrind dump in ``work``."""
    counts = {}
    for path in sorted(work.glob("callgrind.out*")):
        text = path.read_text(encoding="utf-8", errors="replace")
        label, total = _LABEL.search(text), _TOTAL.search(text)
        if label and total:
            counts[label.group("label").strip()] = int(total.group("ir"))
    return counts


def _launch(args, argv: list[str]) -> int:
    """Run this script under callgrind, then read its dumps and report."""
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sinkfix-callgrind-")))
        else:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
            if any(work.glob("callgrind.out*")):
                print(f"{work} already holds callgrind dumps: give an empty folder", file=sys.stderr)
                return 2
        library = _build_markers(work)
        env = dict(os.environ, **{_CHILD_ENV: "1", _MARKERS_ENV: str(library), "PYTHONHASHSEED": "0",
                                  "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-line=no",
                   f"--callgrind-out-file={work / 'callgrind.out'}", sys.executable, str(Path(__file__).resolve()),
                   *argv, "--child-json", str(work / "child.json")]
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            kept = f"; what it counted is in {work} (--from-dumps)" if args.work_dir else ""
            print(f"the counted process failed (exit {done.returncode}){kept}", file=sys.stderr)
            return done.returncode or 1
        data = _summarise_dir(work, partial=False)
    return _report(data, Path(args.out))


def _summarise_dir(work: Path, partial: bool) -> dict:
    try:
        child = json.loads((work / "child.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"{work}: no readable child.json, the counted run's description ({error})") from None
    return summarise(child, _read_counts(work), partial=partial)


def _report(data: dict, out: Path) -> int:
    from sinkfix.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    tag = f"instructions-{data['model']}-{data['prompt_tokens']}tokens"
    atomic_write_text(out / f"{tag}.json", json.dumps(data, indent=1) + "\n")
    text = markdown(data)
    atomic_write_text(out / f"{tag}.md", text + "\n")
    print(text)
    return 0


def summarise(child: dict, counts: dict[str, int], partial: bool = False) -> dict:
    """Per policy and configuration: every counted prefill, the median, the spread, and the ratio on / off.

    ``partial``: a run that stopped early; only the pairs counted in both configurations are used,
    and a policy without one is left out (``pairs`` says how many each row rests on)."""
    policies = {}
    for policy in child["policies"]:
        indices = range(child["prefills"])
        if partial:
            indices = [i for i in indices if _label(policy, "off", i) in counts and _label(policy, "on", i) in counts]
            if not indices:
                continue
        rows: dict = {"pairs": len(indices)}
        for config in ("off", "on"):
            samples = [counts[_label(policy, config, i)] for i in indices if _label(policy, config, i) in counts]
            if len(samples) != len(indices):
                raise SystemExit(f"{policy} {config}: {len(samples)} of {len(indices)} counts found in the dumps")
            median = statistics.median(samples)
            rows[config] = {"instructions": samples, "median": median,
                            "spread": (max(samples) - min(samples)) / median}
        rows["ratio_on_to_off"] = rows["on"]["median"] / rows["off"]["median"]
        rows["added_instructions"] = rows["on"]["median"] - rows["off"]["median"]
        policies[policy] = rows
    if not policies:
        raise SystemExit("no prefill was counted in both configurations")
    return {"model": child["model"], "prompt_tokens": child["prompt"], "prefills": child["prefills"],
            "warmups": child["warmups"], "complete": not partial, "sample_rows": child["sample_rows"],
            "policies": policies, "provenance": child["provenance"]}


def markdown(data: dict) -> str:
    prov = data["provenance"]
    lines = [f"**{data['model']}**, {data['prompt_tokens']}-token prefill, instructions retired (callgrind `Ir`), "
             f"{data['prefills']} counted prefills per configuration after {data['warmups']} uncounted, one torch thread, "
             f"{data['sample_rows']} sampled rows", "",
             "| policy | counted pairs | unmonitored (M instructions) | monitored | added (M) | **ratio on / off** | "
             "spread of repeats (off / on) |",
             "|---|---|---|---|---|---|---|"]
    for policy, row in data["policies"].items():
        lines.append(f"| {policy} | {row['pairs']} | {row['off']['median'] / 1e6:,.1f} | {row['on']['median'] / 1e6:,.1f} | "
                     f"{row['added_instructions'] / 1e6:,.1f} | **{row['ratio_on_to_off']:.4f}x** | "
                     f"{100 * row['off']['spread']:.3f}% / {100 * row['on']['spread']:.3f}% |")
    if not data["complete"]:
        lines += ["", "The run stopped before it had counted every prefill: the rows rest on the pairs counted."]
    lines += ["", f"Device: {prov['device_name']}; torch {prov['versions'].get('torch')}, transformers "
                  f"{prov['versions'].get('transformers')}; valgrind's CPU is the host's, run one instruction at a time."]
    return "\n".join(lines)


def _child(args) -> int:
    """The measurement, run under callgrind: counts only between the markers."""
    import torch

    import sinkfix
    from sinkfix.bench import prefill_kwargs
    from sinkfix.bench.provenance import provenance

    sys.path.insert(0, str(HERE))
    from bench_monitor_overhead import _policies, _prompt  # the timing benchmark's prompt and policies

    if args.sample_rows is None:
        from sinkfix.telemetry import SAMPLE_ROWS

        args.sample_rows = SAMPLE_ROWS
    markers = ctypes.CDLL(os.environ[_MARKERS_ENV])
    markers.sinkfix_count_end.argtypes = [ctypes.c_char_p]
    if not markers.sinkfix_under_valgrind():
        print("the counting child is not running under valgrind", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    model, tokenizer = sinkfix.load_model(args.model)
    prompt = _prompt(tokenizer, args.prompt)
    extra = prefill_kwargs(model)

    def prefill(monitor, label: str | None) -> None:
        request = contextlib.nullcontext() if monitor is None else monitor.request()
        with torch.no_grad():
            if label is not None:
                markers.sinkfix_count_begin()
            with request:
                model(input_ids=prompt, use_cache=True, **extra)
            if label is not None:
                markers.sinkfix_count_end(label.encode())

    # the run's description goes first, so that a run stopped part of the way can still be read
    child = {"model": args.model, "prompt": args.prompt, "prefills": args.prefills, "warmups": args.warmups,
             "sample_rows": args.sample_rows, "policies": list(args.policies),
             "provenance": provenance(torch.device("cpu"))}
    Path(args.child_json).write_text(json.dumps(child), encoding="utf-8")
    shape = None
    for policy_name in args.policies:
        if shape is None:
            with sinkfix.patch(model) as handle:
                shape = handle.num_layers, max(handle.num_heads())
        policy = _policies(*shape)[policy_name]
        with sinkfix.patch(model, policy):
            monitors = {"off": None, "on": sinkfix.monitor(model, sample_rows=args.sample_rows)}
            for _ in range(args.warmups):
                for monitor in monitors.values():
                    prefill(monitor, None)
            for index in range(args.prefills):
                order = ("off", "on") if index % 2 == 0 else ("on", "off")
                for config in order:
                    prefill(monitors[config], _label(policy_name, config, index))
                print(f"{policy_name}: prefill pair {index + 1} of {args.prefills} counted", file=sys.stderr, flush=True)
            monitors["on"].close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens, BOS included (default 512)")
    parser.add_argument("--prefills", type=int, default=2, help="counted prefills per configuration (default 2)")
    parser.add_argument("--warmups", type=int, default=1,
                        help="uncounted prefills per configuration before counting (default 1)")
    parser.add_argument("--sample-rows", type=int, default=None, help="the monitor's sampled rows (default: its own)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="keep callgrind's dumps in DIR (an empty folder) instead of a temporary one")
    parser.add_argument("--from-dumps", default=None, metavar="DIR",
                        help="count nothing: report on the dumps a run kept in DIR, even one stopped part of the way")
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get(_CHILD_ENV) == "1":
        return _child(args)
    if args.from_dumps is not None:
        work = Path(args.from_dumps)
        return _report(_summarise_dir(work, partial=True), Path(args.out))
    return _launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
