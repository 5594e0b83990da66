"""Merge ``sinkfix stream`` runs of one stream, made with different ``--variants``, into one result.

The variants of ``sinkfix stream`` are independent (each streams the same tokens afresh), so a long
measurement can run as several processes, e.g. the caches in one and the recomputation in another:

    sinkfix stream --tokens 20738 --segment 4096 --variants sink,window_only --out runs/caches
    sinkfix stream --tokens 20738 --segment 4096 --variants recompute --recompute-every 128 --out runs/recompute
    python benchmarks/merge_stream_runs.py runs/caches runs/recompute --out runs/merged

writes ``stream.json`` (the summary ``sinkfix stream --json`` prints, with the paired comparison
recomputed over all variants) and ``stream.png`` into ``--out``. The runs must agree on the stream
(model, text, tokens, cache, segments, BOS, ``--period``). ``chunk`` must agree between the runs
that streamed a cache (``sink``, ``window_only``, ``sink_profile``), and ``recompute_every`` between
the runs that recomputed (``recompute``, ``recompute_profile``): the merged protocol holds one of
each, taken from those runs (a run of recomputations only feeds no chunks, and ``sinkfix stream``
refuses ``--chunk`` there). Runs made with ``--profile`` must name the same profile (a run without
one, whose variants use none, merges with them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sinkfix.analysis.plots import running_perplexity_plot
from sinkfix.analysis.streaming import StreamResult, StreamVariant
from sinkfix.errors import UsageError
from sinkfix.files import atomic_write_text, same_file, strict_json

# protocol entries every merged run must share (the rest describe how a variant was run); "period"
# makes a different stream (the text's first N tokens over and over) and was missing, so a periodic
# control run merged silently with an ordinary one
SHARED = ("tokens", "n_sink", "window", "cache_tokens", "segment_len", "warmup", "bos", "model", "text", "period")
# entries shared by the runs whose variants use them: (entry, whether a variant uses it, the option).
# Two recomputing runs with different intervals merged before, and the protocol named the last run's
# (32) while the other reference had scored every 16th token
USED_BY = (("chunk", lambda name: not name.startswith("recompute"), "--chunk"),
           ("recompute_every", lambda name: name.startswith("recompute"), "--recompute-every"))


def load_run(folder: Path) -> tuple[dict, dict[str, StreamVariant]]:
    summary = json.loads((folder / "stream.json").read_text())
    token_nll = torch.load(folder / "stream_tokens.pt")
    variants = {}
    for name, nll in token_nll.items():
        entry = summary[name]
        variants[name] = StreamVariant(name, nll, ms_per_token=entry["ms_per_token"],
                                       cpu_ms_per_token=entry.get("cpu_ms_per_token", []),
                                       peak_rss_mib=entry["peak_rss_mib"], cache_mib=entry["cache_mib"])
    return summary["protocol"], variants


def merge(folders: list[Path]) -> StreamResult:
    protocol: dict | None = None
    variants: dict[str, StreamVariant] = {}
    used_from: dict[str, Path] = {}  # entry -> the first run whose variants used it
    for folder in folders:
        run_protocol, run_variants = load_run(folder)
        if protocol is None:
            protocol = dict(run_protocol)
        differing = [k for k in SHARED if protocol.get(k) != run_protocol.get(k)]
        if differing:
            raise UsageError(f"{folder} streamed something else: {', '.join(differing)} differ")
        clash = sorted(set(variants) & set(run_variants))
        if clash:
            raise UsageError(f"{folder} repeats variants {clash}")
        for entry, uses, option in USED_BY:
            if not any(uses(name) for name in run_variants):
                continue  # recorded by this run, used by none of its variants
            if entry in used_from and protocol[entry] != run_protocol[entry]:
                raise UsageError(f"{folder} ran {entry} = {run_protocol[entry]}, {used_from[entry]} "
                                 f"{protocol[entry]}: the merged protocol holds one {entry}; run both with the "
                                 f"same {option}")
            used_from.setdefault(entry, folder)
            protocol[entry] = run_protocol[entry]
        if run_protocol.get("profile"):
            # only the *_profile variants use the profile, so a run without one merges; two different
            # profiles do not (the last run's name used to replace the first's, silently)
            if protocol.get("profile") and protocol["profile"] != run_protocol["profile"]:
                raise UsageError(f"{folder} ran with profile {run_protocol['profile']}, an earlier run with "
                                 f"{protocol['profile']}")
            protocol["profile"] = run_protocol["profile"]
        variants.update(run_variants)
    assert protocol is not None
    protocol.pop("segments", None)
    return StreamResult(variants, protocol)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of sinkfix stream")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    for run in args.runs:  # the merged stream.json/stream.png would replace that run's own
        if same_file(args.out, run):
            parser.error(f"--out {args.out} is the run folder {run}: the merged files would replace its "
                         "stream.json and stream.png; write the merge to another folder")
    try:
        result = merge(args.runs)
    except UsageError as error:  # runs that do not belong together: a message, not a traceback
        parser.error(str(error))
    summary = result.summary()
    summary["protocol"]["merged_from"] = [str(r) for r in args.runs]
    atomic_write_text(args.out / "stream.json", strict_json(summary, indent=2) + "\n")  # NaN ratios as null
    running_perplexity_plot(result, args.out / "stream.png")
    print(strict_json({k: v for k, v in summary.items() if k != "protocol"}, indent=1))


if __name__ == "__main__":
    main()
