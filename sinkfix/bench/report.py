"""Presentation of ``sinkfix bench`` results: rich tables, JSON and CSV files, PNG plots.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written results.json next to an old plot. matplotlib is imported
only when plots are written, with the Agg backend (no display needed).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["render", "write_json", "write_csv", "write_plots", "write_outputs", "flatten_numbers"]

_MIB = 1024 * 1024


# -- atomic files -------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic(path: Path, mode: str = "w") -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dumps(results: dict[str, Any]) -> str:
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers; the runner
    # already maps non-finite numbers to null, this turns any slip into a loud error.
    return json.dumps(results, indent=2, allow_nan=False)


def write_json(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    with _atomic(path) as fh:
        fh.write(dumps(results) + "\n")
    return path


def flatten_numbers(results: dict[str, Any]) -> list[tuple[str, str, str, float | int | bool]]:
    """Every number in the results as ``(variant, section, metric, value)`` rows.

    ``metric`` is the dotted path below the section, list indices included
    (``prefill.seconds.samples.2``, ``sink_share_layer.5``); run-level numbers have variant "".
    """
    rows: list[tuple[str, str, str, Any]] = []

    def walk(variant: str, section: str, prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(variant, section, f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(variant, section, f"{prefix}.{i}" if prefix else str(i), item)
        elif isinstance(value, (bool, int, float)) and value is not None:
            rows.append((variant, section, prefix, value))

    for key, value in results.items():
        if key == "variants":
            continue
        if isinstance(value, (dict, list)):
            walk("", key, "", value)
        else:
            walk("", "run", key, value)
    for entry in results.get("variants", []):
        for key, value in entry.items():
            if isinstance(value, (dict, list)):
                walk(entry["name"], key, "", value)
    return rows


def write_csv(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    with _atomic(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "section", "metric", "value"])
        for variant, section, metric, value in flatten_numbers(results):
            writer.writerow([variant, section, metric, int(value) if isinstance(value, bool) else repr(value)
                             if isinstance(value, float) else value])
    return path


# -- plots --------------------------------------------------------------------------------------
def write_plots(out_dir: str | Path, results: dict[str, Any]) -> tuple[list[Path], list[str]]:
    """PNG plots; returns (files written, notes on what was skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["plots skipped: matplotlib is not installed (pip install matplotlib)"]
    out = Path(out_dir)
    written: list[Path] = []
    notes: list[str] = []
    variants = results["variants"]
    patched = [v for v in variants if v["kind"] != "stock"]
    model = results["model"]["name"]

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        with _atomic(out / name, "wb") as fh:
            fh.write(buf.getvalue())
        written.append(out / name)

    # perplexity change per domain
    domains = list(results["domains"]) + ["all"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(domains), 3.6))
    width = 0.8 / max(len(patched), 1)
    for i, v in enumerate(patched):
        xs = [d + (i - (len(patched) - 1) / 2) * width for d in range(len(domains))]
        ys = [v["quality"][d]["delta_pct"] or 0.0 for d in domains]
        ax.bar(xs, ys, width, label=v["name"])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("perplexity change vs stock (%)")
    ax.set_title(f"{model}: perplexity change ({results['protocol']['description'].split(',')[0]})", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "ppl_delta.png")

    # extreme-token metrics per layer
    if results["metrics_status"]["available"]:
        for key, name, ylabel, log in (
            ("sink_share_layer", "sink_share.png", "sink share (mean over heads)", False),
            ("residual_peak_layer", "residual_peak.png", "residual peak ratio (max / median norm)", True),
        ):
            fig, ax = plt.subplots(figsize=(7, 3.6))
            for v in variants:
                if v["metrics"] is None:
                    continue
                ys = [y if y is not None else math.nan for y in v["metrics"][key]]
                # stock as a wide grey band under the others: identity coincides with it exactly
                style = dict(color="black", linewidth=5, alpha=0.3, zorder=1) if v["kind"] == "stock" else {"zorder": 2}
                label = v["name"] + (" (before)" if v["kind"] == "stock" else "")
                ax.plot(range(len(ys)), ys, marker=".", label=label, **style)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}: {ylabel.split(' (')[0]} before / after", fontsize=9)
            ax.legend(fontsize=8)
            save(fig, name)
    else:
        notes.append("sink_share.png and residual_peak.png skipped: no extreme-token metrics in this run")

    # speed: time ratios vs stock, error bars = spread of the per-round paired ratios
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * max(len(patched), 1), 3.6))
    phases = [p for p in ("prefill", "decode") if patched and patched[0]["speed"][p] is not None]
    width = 0.8 / max(len(phases), 1)
    for j, phase in enumerate(phases):
        xs = [i + (j - (len(phases) - 1) / 2) * width for i in range(len(patched))]
        mids, lo, hi = [], [], []
        for v in patched:
            s = v["speed"][phase]
            paired = s["paired_time_ratio_vs_stock"]
            mid = s["time_ratio_vs_stock"] or math.nan
            mids.append(mid)
            lo.append(max(mid - (paired["min"] if paired["min"] is not None else mid), 0))
            hi.append(max((paired["max"] if paired["max"] is not None else mid) - mid, 0))
        ax.bar(xs, mids, width, yerr=[lo, hi], capsize=3, label=phase)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.10, color="grey", linewidth=0.8, linestyle="--", label="1.10x")
    ax.set_xticks(range(len(patched)), [v["name"] for v in patched], fontsize=8, rotation=15)
    ax.set_ylabel("time ratio vs stock (lower = faster)")
    ax.set_title(f"{model}: speed vs stock {results['model']['baseline_attention']} "
                 "(median ratio; bars: min-max of paired rounds)", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "speed_ratio.png")
    return written, notes


def write_outputs(out_dir: str | Path, results: dict[str, Any]) -> tuple[list[Path], list[str]]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    files = [write_json(out / "results.json", results), write_csv(out / "results.csv", results)]
    plots, notes = write_plots(out, results)
    return files + plots, notes


# -- terminal -----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _delta(value: float | None) -> str:
    if value is None:
        return ""
    color = "green" if value < -0.05 else "red" if value > 0.05 else "dim"
    return f" [{color}]({value:+.2f}%)[/{color}]"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    color = "red" if value > 1.10 else "yellow" if value > 1.03 else "green"
    return f"[{color}]{value:.3f}x[/{color}]"


def render(results: dict[str, Any], console: Any) -> None:
    """Print the results as rich tables on ``console``."""
    from rich.table import Table

    m, prov, proto = results["model"], results["provenance"], results["protocol"]
    git = prov["git"]
    console.print(
        f"[bold]sinkfix bench[/bold]  {m['name']}  ({m['architecture']}, {m['parameters'] / 1e6:.1f}M params, "
        f"{m['dtype']}, stock attention: {m['baseline_attention']}, patch backend: {m['patch_backend']})"
    )
    console.print(
        f"device: {prov['device']} ({prov['device_name']}), torch threads {prov['torch_threads']}, load average "
        f"{prov['load_average_start']} -> {prov['load_average_end']}; torch {prov['versions']['torch']}, "
        f"transformers {prov['versions']['transformers']}, git {(git['revision'] or 'n/a')[:10]}"
        f"{' (dirty)' if git['dirty'] else ''}"
    )
    console.print(f"protocol: {proto['description']}")

    variants = results["variants"]
    domains = list(results["domains"])
    quality = Table(title="Quality and extreme tokens", title_justify="left")
    quality.add_column("variant", style="bold")
    for d in domains:
        info = results["domains"][d]
        quality.add_column(f"ppl {d}\n{info['scored_tokens']} tok", justify="right")
    quality.add_column("ppl all", justify="right")
    metrics_on = results["metrics_status"]["available"]
    if metrics_on:
        quality.add_column("sink share\nmean", justify="right")
        quality.add_column("resid. peak\nmax", justify="right")
        quality.add_column("value drain\nmean", justify="right")
    for v in variants:
        row = [v["name"]]
        for d in [*domains, "all"]:
            q = v["quality"][d]
            row.append(f"{q['ppl']:.3f}" + ("" if v["kind"] == "stock" else _delta(q["delta_pct"])))
        if metrics_on:
            s = (v["metrics"] or {}).get("summary", {})
            row += [_fmt(s.get("sink_share_mean"), ".3f"), _fmt(s.get("residual_peak_max"), ".1f"),
                    _fmt(s.get("value_drain_mean"), ".3f")]
        quality.add_row(*row)
    console.print(quality)

    speed = Table(title="Speed and memory (median \\[min-max]; x = patched / stock)", title_justify="left")
    speed.add_column("variant", style="bold")
    speed.add_column("prefill tok/s", justify="right")
    speed.add_column("x time", justify="right")
    speed.add_column("p50/p90 ms", justify="right")
    has_decode = variants[0]["speed"]["decode"] is not None
    if has_decode:
        speed.add_column("decode tok/s", justify="right")
        speed.add_column("x time", justify="right")
        speed.add_column("step p50/p90 ms", justify="right")
    speed.add_column("peak MiB", justify="right")
    speed.add_column("x mem", justify="right")
    for v in variants:
        p = v["speed"]["prefill"]
        tps = p["tokens_per_s"]
        row = [v["name"], f"{tps['median']:.0f} [{tps['min']:.0f}-{tps['max']:.0f}]",
               _ratio(p["time_ratio_vs_stock"]), f"{p['latency_ms']['p50']:.0f}/{p['latency_ms']['p90']:.0f}"]
        if has_decode:
            d = v["speed"]["decode"]
            r = d["tokens_per_s"]
            row += [f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]", _ratio(d["time_ratio_vs_stock"]),
                    f"{d['step_latency_ms']['p50']:.1f}/{d['step_latency_ms']['p90']:.1f}"]
        mem = v["memory"]
        row += ["-", "-"] if mem is None else [f"{mem['peak_bytes'] / _MIB:.1f}", _ratio(mem["ratio_vs_stock"])]
        speed.add_row(*row)
    console.print(speed)
    for note in results["notes"]:
        console.print(f"[dim]note: {note}[/dim]")
    console.print(f"wall time {results['wall_time_s']:.1f} s")
