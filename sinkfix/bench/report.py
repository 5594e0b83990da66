"""Presentation of ``sinkfix bench`` results: rich tables, JSON and CSV files, PNG plots.

Every file is written with :func:`sinkfix.files.atomic_write` (a temporary file in the same folder,
then ``os.replace``), so an interrupted run never leaves a half-written results.json next to an old
plot, and a folder that cannot be written is one :class:`~sinkfix.files.OutputError` naming the
path. matplotlib is imported only when plots are written, with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from sinkfix.errors import OutputError
from sinkfix.files import atomic_write, check_writable, save_figure
from sinkfix.texts import POOLED_NAME

__all__ = ["render", "write_json", "write_csv", "write_plots", "write_outputs", "check_outputs", "flatten_numbers",
           "OUTPUT_FILES"]

_MIB = 1024 * 1024


def dumps(results: dict[str, Any]) -> str:
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers; the runner
    # already maps non-finite numbers to null, this turns any slip into a loud error.
    return json.dumps(results, indent=2, allow_nan=False)


def write_json(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_write(path) as fh:
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
    with atomic_write(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "section", "metric", "value"])
        for variant, section, metric, value in flatten_numbers(results):
            writer.writerow([variant, section, metric, int(value) if isinstance(value, bool) else repr(value)
                             if isinstance(value, float) else value])
    return path


# -- plots --------------------------------------------------------------------------------------
def _plain(text: Any) -> str:
    """``text`` as matplotlib should draw it: a name holding ``$...$`` is no mathtext (``$_$`` fails to render)."""
    return str(text).replace("$", r"\$")


class _Figures:
    """Saves matplotlib figures as PNG files in one folder, each atomically, and remembers them."""

    def __init__(self, plt: Any, out: Path, written: list[Path] | None = None) -> None:
        self.plt, self.out = plt, out
        self.written = [] if written is None else written

    def save(self, fig: Any, name: str) -> None:
        self.written.append(save_figure(fig, self.out / name, bbox_inches="tight"))


def _ppl_plot(figures: _Figures, results: dict[str, Any], patched: list[dict[str, Any]]) -> None:
    """Perplexity change per domain (and pooled), one bar per patched variant."""
    domains = list(results["domains"]) + [POOLED_NAME]
    fig, ax = figures.plt.subplots(figsize=(1.6 + 1.4 * len(domains), 3.6))
    width = 0.8 / max(len(patched), 1)
    for i, v in enumerate(patched):
        xs = [d + (i - (len(patched) - 1) / 2) * width for d in range(len(domains))]
        ys = [v["quality"][d]["delta_pct"] or 0.0 for d in domains]
        ax.bar(xs, ys, width, label=_plain(v["name"]))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(domains)), [_plain(d) for d in domains])
    ax.set_ylabel("perplexity change vs stock (%)")
    protocol = results["protocol"]["description"].split(",")[0]
    ax.set_title(_plain(f"{results['model']['name']}: perplexity change ({protocol})"), fontsize=9)
    ax.legend(fontsize=8)
    figures.save(fig, "ppl_delta.png")


_LAYER_PLOTS = (
    ("sink_share_layer", "sink_share.png", "sink share (mean over heads)", False),
    ("residual_peak_layer", "residual_peak.png", "residual peak ratio (max / median norm)", True),
)


def _layer_plots(figures: _Figures, results: dict[str, Any]) -> None:
    """Extreme-token metrics per layer, every variant before / after."""
    for key, name, ylabel, log in _LAYER_PLOTS:
        fig, ax = figures.plt.subplots(figsize=(7, 3.6))
        for v in results["variants"]:
            if v["metrics"] is None:
                continue
            ys = [y if y is not None else math.nan for y in v["metrics"][key]]
            # stock as a wide grey band under the others: identity coincides with it exactly
            style = dict(color="black", linewidth=5, alpha=0.3, zorder=1) if v["kind"] == "stock" else {"zorder": 2}
            label = v["name"] + (" (before)" if v["kind"] == "stock" else "")
            ax.plot(range(len(ys)), ys, marker=".", label=_plain(label), **style)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(_plain(f"{results['model']['name']}: {ylabel.split(' (')[0]} before / after"), fontsize=9)
        ax.legend(fontsize=8)
        figures.save(fig, name)


def _ratio_bars(patched: list[dict[str, Any]], phase: str) -> tuple[list[float], list[float], list[float]]:
    """Median time ratios and their distances to the min / max paired ratio (the error bars)."""
    mids, lo, hi = [], [], []
    for v in patched:
        s = v["speed"][phase]
        paired = s["paired_time_ratio_vs_stock"]
        mid = s["time_ratio_vs_stock"] or math.nan
        mids.append(mid)
        lo.append(max(mid - (paired["min"] if paired["min"] is not None else mid), 0))
        hi.append(max((paired["max"] if paired["max"] is not None else mid) - mid, 0))
    return mids, lo, hi


def _speed_plot(figures: _Figures, results: dict[str, Any], patched: list[dict[str, Any]]) -> None:
    """Time ratios vs stock; error bars = spread of the per-round paired ratios."""
    fig, ax = figures.plt.subplots(figsize=(1.6 + 1.6 * max(len(patched), 1), 3.6))
    phases = [p for p in ("prefill", "decode") if patched and patched[0]["speed"][p] is not None]
    width = 0.8 / max(len(phases), 1)
    for j, phase in enumerate(phases):
        xs = [i + (j - (len(phases) - 1) / 2) * width for i in range(len(patched))]
        mids, lo, hi = _ratio_bars(patched, phase)
        ax.bar(xs, mids, width, yerr=[lo, hi], capsize=3, label=phase)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.10, color="grey", linewidth=0.8, linestyle="--", label="1.10x")
    ax.set_xticks(range(len(patched)), [_plain(v["name"]) for v in patched], fontsize=8, rotation=15)
    ax.set_ylabel("time ratio vs stock (lower = faster)")
    ax.set_title(_plain(f"{results['model']['name']}: speed vs stock {results['model']['baseline_attention']} "
                        "(median ratio; bars: min-max of paired rounds)"), fontsize=9)
    ax.legend(fontsize=8)
    figures.save(fig, "speed_ratio.png")


PLOT_FILES = ("ppl_delta.png", *(name for _, name, _, _ in _LAYER_PLOTS), "speed_ratio.png")
#: every file a run may write into ``--out DIR``
OUTPUT_FILES = ("results.json", "results.csv", *PLOT_FILES)


def check_outputs(out_dir: str | Path) -> Path:
    """Raise now the :class:`~sinkfix.files.OutputError` that writing any of :data:`OUTPUT_FILES`
    into ``out_dir`` would raise after the run (a folder where a file goes, no permission)."""
    out = check_writable(out_dir, folder=True)
    for name in OUTPUT_FILES:  # every plot, though a run may skip some: which ones is known only at the end
        check_writable(out / name)
    return out


def _has_metrics(results: dict[str, Any]) -> bool:
    return any(v["metrics"] is not None for v in results["variants"])


def _remove_stale(out: Path, names: tuple[str, ...]) -> str:
    """Remove the plots ``names`` an earlier run left in ``out``: next to this run's results.json
    they would read as this run's. Only those exact names, only files. Returns what to add to the note."""
    removed, failed = [], []
    for name in names:
        path = out / name
        if path.is_symlink() or path.is_file():
            try:
                path.unlink()
                removed.append(name)
            except OSError as exc:
                failed.append(f"{name} ({exc.strerror or exc})")
    text = f"; removed an earlier run's {', '.join(removed)}" if removed else ""
    return text + (f"; could not remove an earlier run's {', '.join(failed)}" if failed else "")


def write_plots(out_dir: str | Path, results: dict[str, Any],
                written: list[Path] | None = None) -> tuple[list[Path], list[str]]:
    """PNG plots; returns (files written, notes on what was skipped). A plot this run skips is removed
    from ``out_dir`` when an earlier run left it there. ``written``: a list each plot is appended to as
    soon as it is on disk (what a failure part way leaves is known to the caller)."""
    out = Path(out_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["plots skipped: matplotlib is not installed (pip install 'sinkfix[plots]')"
                    + _remove_stale(out, PLOT_FILES)]
    figures = _Figures(plt, out, written)
    notes: list[str] = []
    patched = [v for v in results["variants"] if v["kind"] != "stock"]
    _ppl_plot(figures, results, patched)
    if _has_metrics(results):  # a variant whose metrics failed is left out of the plot, not the others
        _layer_plots(figures, results)
    else:
        layer_files = tuple(name for _, name, _, _ in _LAYER_PLOTS)
        notes.append(f"{' and '.join(layer_files)} skipped: no extreme-token metrics in this run"
                     + _remove_stale(out, layer_files))
    _speed_plot(figures, results, patched)
    return figures.written, notes


def write_outputs(out_dir: str | Path, results: dict[str, Any]) -> tuple[list[Path], list[str]]:
    """results.json, results.csv and the plots into ``out_dir``; returns (files written, notes).

    Each file is written atomically, and the folder never mixes two runs: a write that fails after
    this run's results.json is in place removes the files of an earlier run that this run has not
    replaced yet and says so in the error (a full disk during the plots left a new results.json beside
    an earlier run's residual_peak.png and speed_ratio.png, showing other variants). A failure before
    it leaves the folder as it was."""
    out = Path(out_dir)  # atomic_write creates the folder, or names the file standing in its way
    written = [write_json(out / "results.json", results)]
    try:
        written.append(write_csv(out / "results.csv", results))
        _, notes = write_plots(out, results, written)
    except BaseException as exc:
        done = [path.name for path in written]
        removed = _remove_stale(out, tuple(name for name in OUTPUT_FILES if name not in done))
        if isinstance(exc, OutputError):
            error = OutputError(f"{exc}; {out} holds this run's {', '.join(done)}{removed}")
            error.path = exc.path
            raise error from exc
        raise
    return written, notes


# -- terminal -----------------------------------------------------------------------------------
# Every string from outside (model and file names, policy specs, exception texts in notes) goes
# through escape(): rich reads "[...]" as markup, which drops "[v2]" from "data[v2]" and raises on "[/x]".
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


def _header(results: dict[str, Any], console: Any) -> None:
    from rich.markup import escape

    m, prov, proto = results["model"], results["provenance"], results["protocol"]
    git = prov["git"]
    console.print(
        f"[bold]sinkfix bench[/bold]  {escape(str(m['name']))}  ("
        + escape(f"{m['architecture']}, {m['parameters'] / 1e6:.1f}M params, {m['dtype']}, stock attention: "
                 f"{m['baseline_attention']}, patch backend: {m['patch_backend']})")
    )
    console.print(escape(
        f"device: {prov['device']} ({prov['device_name']}), torch threads {prov['torch_threads']}, load average "
        f"{prov['load_average_start']} -> {prov['load_average_end']}; torch {prov['versions']['torch']}, "
        f"transformers {prov['versions']['transformers']}, git {(git['revision'] or 'n/a')[:10]}"
        f"{' (dirty)' if git['dirty'] else ''}"
    ))
    console.print(escape(f"protocol: {proto['description']}"))


def _sink_sets_differ(results: dict[str, Any]) -> bool:
    """Whether a variant moves the sink set (Policy.describe names n_sink / extra_sink_positions only
    when they differ from the default first token)."""
    return any(key in (v.get("policy") or "") for v in results["variants"]
               for key in ("n_sink=", "extra_sink_positions="))


def _quality_table(results: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    domains = list(results["domains"])
    metrics_on = _has_metrics(results)
    caption = None
    if metrics_on and _sink_sets_differ(results):
        caption = ("sink share: attention on each variant's own sink set (its n_sink, extra_sink_positions): "
                   "not comparable between variants whose sink sets differ")
    table = Table(title="Quality and extreme tokens", title_justify="left", caption=caption, caption_justify="left")
    table.add_column("variant", style="bold")
    for d in domains:
        table.add_column(f"ppl {escape(d)}\n{results['domains'][d]['scored_tokens']} tok", justify="right")
    table.add_column("ppl all", justify="right")
    if metrics_on:
        table.add_column("sink share\nmean", justify="right")
        table.add_column("resid. peak\nmax", justify="right")
        table.add_column("value drain\nmean", justify="right")
    for v in results["variants"]:
        row = [escape(v["name"])]
        for d in [*domains, POOLED_NAME]:
            q = v["quality"][d]
            row.append(_fmt(q["ppl"], ".3f") + ("" if v["kind"] == "stock" else _delta(q["delta_pct"])))
        if metrics_on:
            s = (v["metrics"] or {}).get("summary", {})
            row += [_fmt(s.get("sink_share_mean"), ".3f"), _fmt(s.get("residual_peak_max"), ".1f"),
                    _fmt(s.get("value_drain_mean"), ".3f")]
        table.add_row(*row)
    return table


def _speed_row(v: dict[str, Any], has_decode: bool) -> list[str]:
    from rich.markup import escape

    p = v["speed"]["prefill"]
    tps = p["tokens_per_s"]
    row = [escape(v["name"]), f"{tps['median']:.0f} [{tps['min']:.0f}-{tps['max']:.0f}]",
           _ratio(p["time_ratio_vs_stock"]), f"{p['latency_ms']['p50']:.0f}/{p['latency_ms']['p90']:.0f}"]
    if has_decode:
        d = v["speed"]["decode"]
        r = d["tokens_per_s"]
        row += [f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]", _ratio(d["time_ratio_vs_stock"]),
                f"{d['step_latency_ms']['p50']:.1f}/{d['step_latency_ms']['p90']:.1f}"]
    mem = v["memory"]
    return row + (["-", "-"] if mem is None else [f"{mem['peak_bytes'] / _MIB:.1f}", _ratio(mem["ratio_vs_stock"])])


def _speed_table(results: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="Speed and memory (median \\[min-max]; x = patched / stock)", title_justify="left")
    table.add_column("variant", style="bold")
    table.add_column("prefill tok/s", justify="right")
    table.add_column("x time", justify="right")
    table.add_column("p50/p90 ms", justify="right")
    has_decode = results["variants"][0]["speed"]["decode"] is not None
    if has_decode:
        table.add_column("decode tok/s", justify="right")
        table.add_column("x time", justify="right")
        table.add_column("step p50/p90 ms", justify="right")
    table.add_column("peak MiB", justify="right")
    table.add_column("x mem", justify="right")
    for v in results["variants"]:
        table.add_row(*_speed_row(v, has_decode))
    return table


def render(results: dict[str, Any], console: Any) -> None:
    """Print the results as rich tables on ``console``."""
    _header(results, console)
    console.print(_quality_table(results))
    console.print(_speed_table(results))
    from rich.markup import escape

    for note in results["notes"]:
        console.print(f"[dim]{escape(f'note: {note}')}[/dim]")
    console.print(f"wall time {results['wall_time_s']:.1f} s")
