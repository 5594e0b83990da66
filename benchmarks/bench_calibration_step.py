"""One calibration fitting step in float32 against the same step with bfloat16 matrix products.

    python benchmarks/bench_calibration_step.py --model smollm2-135m --threads 2 --rounds 6

A fitting step of ``sinkfix calibrate`` is one forward and backward pass over a 512-token window
with the model's weights frozen and the gradient taken in the per-head sink parameters. Its time is
most of a calibration (150 steps against about 140 scoring passes), and most of the step is the
model's matrix products. ``--precision auto`` runs those products in bfloat16 under
``torch.autocast`` where the device multiplies bfloat16 natively; this script measures what that
buys and what it changes, on the same windows, in one process:

* time: the two precisions alternate step by step in ABBA order after one warm-up step each;
  medians of wall and process CPU time, and their ratio (bfloat16 / float32);
* gradient: per window, the cosine between the bfloat16 and the float32 gradients of the sink
  scales and of the virtual logits, and their relative difference ``|g16 - g32| / |g32|``;
* loss: the window's NLL in both (the float32 number is what validation would score).

Windows: the first calibration window of each built-in domain (the calibration protocol: 512
tokens, BOS first unless ``--no-bos``). Parameters: the calibration's starting point (every beta
0.97, the virtual logits 6 below each head's reference log-sum-exp, as ``calibrate`` starts), so
the step measured is the first step of a real fit. Writes JSON and Markdown to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import sinkfix
from sinkfix.analysis.calibration import CalibrationSettings, Calibrator, DomainWindows, _initial, domain_windows
from sinkfix.bench.provenance import load_average, provenance
from sinkfix.files import atomic_write_text
from sinkfix.texts import DOMAINS, domain_text

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "calibration_step"
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def _step(cal: Calibrator, theta0, logit0, ids) -> tuple[float, float, float, torch.Tensor, torch.Tensor]:
    theta, logit = theta0.clone().requires_grad_(True), logit0.clone().requires_grad_(True)
    wall, cpu = time.perf_counter(), time.process_time()
    cal.set(torch.sigmoid(theta), logit)
    nll = cal.step_nll(ids)
    nll.backward()
    return time.perf_counter() - wall, time.process_time() - cpu, float(nll.detach()), theta.grad, logit.grad


def _agreement(exact: torch.Tensor, approx: torch.Tensor) -> dict:
    cosine = torch.nn.functional.cosine_similarity(exact.flatten().double(), approx.flatten().double(), dim=0)
    return {"cosine": float(cosine), "relative_difference": float((approx - exact).norm() / exact.norm())}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    prov = provenance(torch.device("cpu"))  # the load average before anything runs
    model, tokenizer = sinkfix.load_model(args.model)
    settings = CalibrationSettings(bos=args.bos)
    texts = {d: domain_text(d, "calib") for d in DOMAINS}
    windows = [w.calib[0] for w in domain_windows(tokenizer, texts, settings).values()]
    times: dict[str, dict[str, list[float]]] = {p: {"wall_s": [], "cpu_s": []} for p in PRECISIONS}
    per_window = []
    with Calibrator(model, settings.on_sink_rows) as cal:
        # calibrate's own starting point, measured on these windows
        theta, logit = (t.detach() for t in _initial(cal, DomainWindows(windows, []), settings))
        for name, dtype in PRECISIONS.items():  # warm-up
            cal.matmul_dtype = dtype
            _step(cal, theta, logit, windows[0])
        for index, ids in enumerate(windows):
            results = {}
            for rnd in range(args.rounds):
                order = list(PRECISIONS) if rnd % 2 == 0 else list(PRECISIONS)[::-1]
                for name in order:
                    cal.matmul_dtype = PRECISIONS[name]
                    wall, cpu, nll, g_theta, g_logit = _step(cal, theta, logit, ids)
                    times[name]["wall_s"].append(wall)
                    times[name]["cpu_s"].append(cpu)
                    results[name] = (nll, g_theta, g_logit)
            (nll32, t32, l32), (nll16, t16, l16) = results["float32"], results["bfloat16"]
            per_window.append({"domain": list(DOMAINS)[index], "nll_float32": nll32, "nll_bfloat16": nll16,
                               "sink_scale_gradient": _agreement(t32, t16),
                               "virtual_logit_gradient": _agreement(l32, l16)})
            print(f"{per_window[-1]['domain']}: NLL {nll32:.5f} / {nll16:.5f}, gradient cosine "
                  f"{per_window[-1]['sink_scale_gradient']['cosine']:.6f} / "
                  f"{per_window[-1]['virtual_logit_gradient']['cosine']:.6f}", flush=True)
    medians = {p: {k: statistics.median(v) for k, v in t.items()} for p, t in times.items()}
    prov["load_average_end"] = load_average()
    return {"model": args.model, "bos": args.bos, "threads": args.threads, "rounds": args.rounds,
            "windows": len(windows), "medians": medians,
            "ratio_bfloat16_to_float32": {k: medians["bfloat16"][k] / medians["float32"][k] for k in ("wall_s", "cpu_s")},
            "samples": times, "per_window": per_window,
            "provenance": prov}


def markdown(data: dict) -> str:
    m, r = data["medians"], data["ratio_bfloat16_to_float32"]
    prov = data["provenance"]
    lines = [f"**{data['model']}, {'BOS' if data['bos'] else 'no BOS'}**, one fitting step (512 tokens, forward and "
             f"backward), {data['threads']} thread(s), {data['rounds']} steps per precision on each of "
             f"{data['windows']} windows, alternating (ABBA)", "",
             "| precision of the matrix products | median wall s | median CPU s |", "|---|---|---|",
             f"| float32 | {m['float32']['wall_s']:.3f} | {m['float32']['cpu_s']:.3f} |",
             f"| bfloat16 (autocast) | {m['bfloat16']['wall_s']:.3f} | {m['bfloat16']['cpu_s']:.3f} |",
             f"| ratio bfloat16 / float32 | **{r['wall_s']:.3f}x** | {r['cpu_s']:.3f}x |", "",
             "| window | NLL float32 | NLL bfloat16 | sink-scale gradient cosine (rel. diff.) | virtual-logit "
             "gradient cosine (rel. diff.) |", "|---|---|---|---|---|"]
    for w in data["per_window"]:
        s, v = w["sink_scale_gradient"], w["virtual_logit_gradient"]
        lines.append(f"| {w['domain']} | {w['nll_float32']:.5f} | {w['nll_bfloat16']:.5f} | {s['cosine']:.6f} "
                     f"({s['relative_difference']:.4f}) | {v['cosine']:.6f} ({v['relative_difference']:.4f}) |")
    lines += ["", f"Device: {prov['device_name']}; torch {prov['versions'].get('torch')}, transformers "
                  f"{prov['versions'].get('transformers')}; load average {prov['load_average_start']} -> "
                  f"{prov['load_average_end']}."]
    return "\n".join(lines)


DEFAULT_ROUNDS = 4


def _tag(args: argparse.Namespace) -> str:
    """The output files' name: model, BOS, threads, and the rounds when they are not the default's,
    so that a quick ``--rounds 1`` run does not overwrite the default run's file that
    docs/calibration.md cites (whose name stays as it was)."""
    tag = f"{args.model}-{'bos' if args.bos else 'nobos'}-{args.threads}t"
    return tag if args.rounds == DEFAULT_ROUNDS else f"{tag}-{args.rounds}r"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"steps per precision and window (default {DEFAULT_ROUNDS}; another count is named "
                             f"in the output files, step-MODEL-bos-Nt-Rr)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder the JSON and Markdown are written to")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    out = Path(args.out)
    # the folder made and checked before the minute of work, not after it (it failed at mkdir)
    from sinkfix.files import OutputError, check_writable

    try:
        check_writable(out, folder=True)
        out.mkdir(parents=True, exist_ok=True)
    except OutputError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"--out {out}: cannot create it ({error})")
    data = run(args)
    tag = _tag(args)
    atomic_write_text(out / f"step-{tag}.json", json.dumps(data, indent=1) + "\n")
    text = markdown(data)
    atomic_write_text(out / f"step-{tag}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
