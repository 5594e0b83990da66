"""How far do real requests leave a profile's calibration ranges? The evidence behind the guard's margin.

    python benchmarks/check_guard_margin.py                     # SmolLM2-135M, 8 calibration windows per domain
    python benchmarks/check_guard_margin.py --profile p.json --calib-windows 16

Protocol: the model is patched with ``--profile`` (default: a per-head policy with seeded random
betas in [0.8, 1] and virtual sink logits around -4, the overhead benchmark's). Calibration ranges
(:func:`sinkfix.telemetry.calibration_statistics`, prefixes of >= 32 rows) are measured on
``--calib-windows`` 512-token windows (BOS first) of the built-in *calibration* text of each of
``--domains`` (default: all five built-in domains, the ones ``sinkfix calibrate`` records its ranges
over; the run recorded in docs/monitoring.md used pydoc prose and python code only). Then each
request group goes through ``sinkfix.monitor`` (one forward per prompt, no guard) and the request's
*excess* is computed from its record: the largest, over layers and heads, of
``max(low - share, share - high)`` (sink share before sink scaling; > 0 means out of range). Groups,
per built-in domain: the built-in request set (``builtin_requests``: prompts cut from the held-out
*evaluation* text of every built-in domain, BOS first) and the same prompts without BOS; then
``--random-prompts`` prompts of uniformly random token ids. A margin separates
the groups when the held-out requests stay below it and the far-out ones exceed it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import sinkfix
from sinkfix.analysis.inspection import text_windows
from sinkfix.bench.provenance import provenance, provenance_line
from sinkfix.evaluate import bos_token_id
from sinkfix.profile import ModelIdentity, Profile
from sinkfix.telemetry import DEFAULT_MARGIN, calibration_statistics
from sinkfix.telemetry.requests import builtin_requests
from sinkfix.texts import DOMAINS, domain_text


def _default_profile(model) -> Profile:
    with sinkfix.patch(model) as handle:
        layers, heads = handle.num_layers, max(handle.num_heads())
    g = torch.Generator().manual_seed(0)
    beta = (0.8 + 0.2 * torch.rand(layers, heads, generator=g)).double()
    return Profile(ModelIdentity.of(model), beta, (torch.randn(layers, heads, generator=g) - 4).double())


def _excess(record: dict, low: torch.Tensor, high: torch.Tensor, min_rows: int) -> float | None:
    share = torch.tensor([[float("nan") if x is None else x for x in layer] for layer in record["sink_share_unscaled"]],
                         dtype=torch.float64)
    judged = torch.tensor(record["rows"])[:, None] >= min_rows
    excess = torch.maximum(low - share, share - high).masked_fill(~judged, float("-inf")).nan_to_num(nan=float("-inf"))
    worst = float(excess.max())
    return None if worst == float("-inf") else worst


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (no random prompt left the excess list empty, and its median failed)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib-windows", type=_positive, default=8, help="512-token calibration windows per domain")
    # the domains `sinkfix calibrate` records its ranges over (every built-in one), not the old
    # aliases "prose" and "code", which warn and left three of the request set's domains uncalibrated
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS),
                        help="built-in domains whose calibration text the ranges are measured on (default: all)")
    parser.add_argument("--random-prompts", type=_positive, default=6, help="prompts of random token ids (>= 1)")
    parser.add_argument("--json", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.json:  # before the forwards, not after them
        from sinkfix.files import OutputError, check_writable

        try:
            check_writable(args.json)
        except OutputError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    model, tokenizer = sinkfix.load_model(args.model)
    profile = sinkfix.Profile.load(args.profile) if args.profile else _default_profile(model)
    windows = [w for domain in args.domains
               for w in text_windows(tokenizer, domain_text(domain, "calib"), seq_len=512)[: args.calib_windows]]
    bos = bos_token_id(tokenizer)
    groups: dict[str, list[torch.Tensor]] = {}
    for request in builtin_requests():
        ids = tokenizer(request.prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
        groups.setdefault(f"held-out {request.domain}, BOS", []).append(torch.cat([torch.tensor([bos]), ids]))
        groups.setdefault(f"held-out {request.domain}, no BOS", []).append(ids)
    g = torch.Generator().manual_seed(0)
    groups["random token ids, BOS"] = [torch.cat([torch.tensor([bos]), torch.randint(0, tokenizer.vocab_size, (299,),
                                                                                      generator=g)])
                                       for _ in range(args.random_prompts)]
    origin = provenance(torch.device("cpu"))
    print(provenance_line(origin), flush=True)
    results = {"model": args.model, "calibration_domains": args.domains, "calibration_windows": len(windows),
               "load_before": os.getloadavg(), "provenance": origin, "groups": {}}
    with sinkfix.patch(model, profile):
        stats = calibration_statistics(model, windows)
        print(f"ranges over {len(windows)} calibration windows: width median "
              f"{float((stats.high - stats.low).median()):.3f}, max {float((stats.high - stats.low).max()):.3f}")
        with sinkfix.monitor(model) as monitor, torch.no_grad():
            for name, prompts in groups.items():
                excesses = []
                for ids in prompts:
                    monitor.forward(input_ids=ids[None], use_cache=False)
                    excess = _excess(monitor.records[0], stats.low, stats.high, stats.min_rows)
                    if excess is not None:
                        excesses.append(excess)
                over = sum(e > DEFAULT_MARGIN for e in excesses)
                results["groups"][name] = {"requests": len(excesses), "excess": excesses, "over_default_margin": over}
                print(f"{name:28s} {len(excesses):3d} requests | excess median {statistics.median(excesses):+.3f} "
                      f"max {max(excesses):+.3f} min {min(excesses):+.3f} | over the default margin "
                      f"{DEFAULT_MARGIN}: {over}", flush=True)
    print(f"{args.model}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        from sinkfix.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
