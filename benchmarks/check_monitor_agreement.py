"""Does the live telemetry say what ``sinkfix inspect`` says on the same text? SmolLM2, CPU.

    python benchmarks/check_monitor_agreement.py                       # 4 windows of prose + 4 of code
    python benchmarks/check_monitor_agreement.py --windows 8 --json agreement.json
    python benchmarks/check_monitor_agreement.py --domains readme legal cpp --sample-rows 16 32 64

Protocol: the built-in *evaluation* texts of ``--domains`` (default: pydoc prose and python code),
non-overlapping windows of ``--seq-len`` tokens with BOS first (``text_windows``, the windows
``sinkfix inspect`` uses). For each policy and window, one forward without a cache through
:func:`sinkfix.analysis.metrics.measure_extreme_tokens` (inspect's collector: the Python path, every
row's full attention) and one through ``sinkfix.monitor`` (the fast path's side output plus the
sampled prompt measures), on the same patched model. Printed per quantity: the largest absolute
difference over all windows, layers and heads (relative for the residual peak), and for the
approximated parts (dormancy and hidden sinks on ``--sample-rows`` sampled rows) the mean difference
and the dormant-head counts.

Exact by construction: sink share (target 1e-4), value drain, residual peak. Approximated:
dormancy, hidden sinks (exact when ``--sample-rows`` >= ``--seq-len``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import sinkfix
from sinkfix.analysis.inspection import text_windows
from sinkfix.analysis.metrics import DORMANT_THRESHOLD, measure_extreme_tokens
from sinkfix.bench.provenance import provenance, provenance_line
from sinkfix.telemetry import SAMPLE_ROWS
from sinkfix.texts import DOMAINS, QUICK_DOMAINS, domain_text

SINK_SHARE_TARGET = 1e-4


def _tensor(nested) -> torch.Tensor:
    width = max(len(row) for row in nested)
    return torch.tensor([[float("nan") if x is None else x for x in row] + [float("nan")] * (width - len(row))
                         for row in nested], dtype=torch.float64)


def _policies(layers: int, heads: int) -> dict[str, sinkfix.Policy]:
    g = torch.Generator().manual_seed(0)
    return {"identity": sinkfix.Policy(),
            "per-head": sinkfix.Policy(sink_scale=0.8 + 0.2 * torch.rand(layers, heads, generator=g),
                                       virtual_sink_logit=torch.randn(layers, heads, generator=g) - 4)}


def compare(model, windows: list[torch.Tensor], sample_rows: int) -> dict[str, float]:
    """Differences between inspect's statistics and the monitor's record over ``windows``."""
    worst = {"sink_share": 0.0, "value_drain": 0.0, "residual_peak_rel": 0.0, "dormancy_max": 0.0}
    dormancy_diffs, hidden_diffs, dormant = [], [], {"inspect": 0, "monitor": 0}
    hidden_totals = {"inspect": 0.0, "monitor": 0.0}
    with sinkfix.monitor(model, sample_rows=sample_rows) as monitor:
        for ids in windows:
            reference = measure_extreme_tokens(model, [ids])
            with torch.no_grad(), monitor.request():
                model(input_ids=ids[None], use_cache=False)
            (record,) = monitor.records
            share = (_tensor(record["sink_share"]) - reference.sink_share).abs()
            worst["sink_share"] = max(worst["sink_share"], float(share.nan_to_num(0).max()))
            drain = (_tensor(record["value_drain"]) - reference.value_drain).abs()
            worst["value_drain"] = max(worst["value_drain"], float(drain.nan_to_num(0).max()))
            peak = torch.tensor(record["residual_peak"], dtype=torch.float64)
            rel = ((peak - reference.residual_peak) / reference.residual_peak).abs()
            worst["residual_peak_rel"] = max(worst["residual_peak_rel"], float(rel.max()))
            dormancy = (_tensor(record["dormancy"]) - reference.dormancy).abs().nan_to_num(0)
            worst["dormancy_max"] = max(worst["dormancy_max"], float(dormancy.max()))
            dormancy_diffs.append(float(dormancy.mean()))
            hidden = _tensor(record["hidden_sinks"]) - reference.hidden_sink_rate
            hidden_diffs.append(float(hidden.abs().nan_to_num(0).sum()))
            hidden_totals["monitor"] += float(_tensor(record["hidden_sinks"]).nansum())
            hidden_totals["inspect"] += float(reference.hidden_sink_rate.nansum())
            dormant["monitor"] += record["dormant_heads"]
            dormant["inspect"] += int((reference.dormancy >= DORMANT_THRESHOLD).sum())
    return {**worst, "dormancy_mean": sum(dormancy_diffs) / len(dormancy_diffs),
            "hidden_sinks_inspect": hidden_totals["inspect"], "hidden_sinks_monitor": hidden_totals["monitor"],
            "hidden_sinks_abs_diff": sum(hidden_diffs), "dormant_heads_inspect": dormant["inspect"],
            "dormant_heads_monitor": dormant["monitor"], "windows": len(windows)}


POLICIES = ("identity", "per-head")  # the names _policies builds, offered as --policies choices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--windows", type=int, default=4, help="windows per domain")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sample-rows", type=int, nargs="+", default=[SAMPLE_ROWS])
    parser.add_argument("--domains", nargs="+", default=list(QUICK_DOMAINS), choices=DOMAINS,
                        help="built-in domains whose evaluation text is windowed")
    # choices: a misspelt name used to be skipped, leaving nothing compared and an exit code of 0
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES,
                        help="policies compared (default: all of them)")
    parser.add_argument("--json", default=None)
    return parser


def _passed(rows: list[dict]) -> bool:
    """Every compared row within the sink-share target, and at least one row: nothing compared is no pass."""
    return bool(rows) and all(r["sink_share"] <= SINK_SHARE_TARGET for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.json:  # before the model loads and the windows run, not after
        from sinkfix.files import OutputError, check_writable

        try:
            check_writable(args.json)
        except OutputError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    model, tokenizer = sinkfix.load_model(args.model)
    windows = [w for domain in args.domains
               for w in text_windows(tokenizer, domain_text(domain, "eval"), seq_len=args.seq_len)[: args.windows]]
    with sinkfix.patch(model) as handle:
        layers, heads = handle.num_layers, max(handle.num_heads())
    origin = provenance(torch.device("cpu"))  # which CPU and which versions measured this, in the header and JSON
    print(provenance_line(origin), flush=True)
    results = {"model": args.model, "torch": torch.__version__, "seq_len": args.seq_len, "domains": args.domains,
               "windows_per_domain": args.windows, "load_before": os.getloadavg(), "provenance": origin, "rows": []}
    for name, policy in _policies(layers, heads).items():
        if name not in args.policies:
            continue
        with sinkfix.patch(model, policy):
            for rows in args.sample_rows:
                row = {"policy": name, "sample_rows": rows, **compare(model, windows, rows)}
                results["rows"].append(row)
                print(f"{name:9s} sample {rows:4d} | sink share max |diff| {row['sink_share']:.2e} | value drain "
                      f"{row['value_drain']:.2e} | residual peak rel {row['residual_peak_rel']:.2e} | dormancy "
                      f"max {row['dormancy_max']:.4f} mean {row['dormancy_mean']:.5f} | dormant heads "
                      f"{row['dormant_heads_monitor']} vs {row['dormant_heads_inspect']} | hidden sinks "
                      f"{row['hidden_sinks_monitor']:.0f} vs {row['hidden_sinks_inspect']:.0f} "
                      f"(sum |diff| {row['hidden_sinks_abs_diff']:.0f})", flush=True)
    print(f"{len(windows)} windows of {args.seq_len} tokens ({', '.join(args.domains)}), {args.model}, "
          f"torch {torch.__version__}, threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        from sinkfix.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1))
    return 0 if _passed(results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
