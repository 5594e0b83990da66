"""Figures of an :class:`~sinkfix.analysis.inspection.InspectionReport` (matplotlib, Agg backend).

matplotlib is an optional dependency (``pip install 'sinkfix[plots]'``); it is imported only when a
figure is drawn, and its absence is a clear :class:`PlotError`, not an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sinkfix.errors import SinkfixError

__all__ = ["PlotError", "pyplot", "check_matplotlib", "write_figures", "remove_stale_figures", "FIGURE_NAMES",
           "sink_share_heatmap", "residual_norm_plot",
           "value_norm_plot", "domain_flip_plot", "running_perplexity_plot"]


class PlotError(SinkfixError, RuntimeError):
    """Figures cannot be drawn (matplotlib missing)."""


def pyplot():
    """matplotlib.pyplot on the Agg backend; :class:`PlotError` when matplotlib is missing."""
    return _pyplot()


#: The one message for missing matplotlib, the same from the early check and from drawing.
_MISSING = "figures need matplotlib: pip install 'sinkfix[plots]' (or pass --no-figures)"


def check_matplotlib() -> None:
    """Raise :class:`PlotError` now when matplotlib is missing. Commands that draw figures after their
    work call it before that work: without it they measured or trained to the end and then failed on the
    first figure (``sinkfix bb --out`` after its whole training, ``sinkfix stream`` after every variant).
    Looks the package up without importing it (importing matplotlib takes about a second)."""
    try:
        missing = importlib.util.find_spec("matplotlib") is None
    except (ImportError, ValueError):  # a broken install, or a module without a spec: drawing will tell
        return
    if missing:
        raise PlotError(_MISSING)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError(_MISSING) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, *, tight: bool) -> Path:
    """Write ``fig`` as a 110-dpi PNG and free it (pyplot keeps every open figure alive).
    ``tight``: tight_layout first (figures not built with a constrained layout)."""
    from sinkfix.files import save_figure

    if tight:
        fig.tight_layout()
    return save_figure(fig, path)


def _title(report) -> str:
    p = report.protocol
    # seq_len is the longest a window may be: a short text gives one shorter window
    return f"{report.model.get('name')} - {'BOS + ' if p.get('bos') else 'no BOS, '}windows of up to {p.get('seq_len')} tokens"


def _example_source(report) -> str:
    """Which window the per-position curves come from: the first window of the first domain."""
    names = list(report.domains)
    return f"first window of {names[0]!r}" if len(names) > 1 else "first window"


def sink_share_heatmap(report, path: Path) -> Path:
    """Layers x heads heatmap of the first-token sink share, one panel per domain."""
    plt = _pyplot()
    names = list(report.domains)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 2.6 * len(names), 6), squeeze=False,
                             layout="constrained")
    image = None
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        share = report.domains[name].sink_share.numpy()
        image = ax.imshow(share, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("head")
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="attention mass on the sink tokens (rows that see a non-sink key)")
    fig.suptitle(f"Sink share - {_title(report)}", fontsize=10)
    return _save(plt, fig, path, tight=False)


def residual_norm_plot(report, path: Path, layers: list[int] | None = None) -> Path:
    """Residual-stream L2 norm by position (the first domain's first window) for the peak layers, log
    scale; the legend's peak is the mean over every window."""
    plt = _pyplot()
    metrics = report.overall
    layers = report.peak_layers() if layers is None else layers
    fig, ax = plt.subplots(figsize=(8, 4))
    for layer in layers:
        norms = metrics.residual_norms[layer] if layer < len(metrics.residual_norms) else []
        if norms:
            ax.plot(range(len(norms)), norms, lw=0.8,
                    label=f"layer {layer} (peak x{metrics.residual_peak[layer]:.0f}, mean of all windows)")
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("||h_i|| after the layer")
    ax.legend(fontsize=8)
    ax.set_title(f"Residual norm by position, {_example_source(report)} - {_title(report)}", fontsize=10)
    return _save(plt, fig, path, tight=True)


def value_norm_plot(report, path: Path) -> Path:
    """Left: value drain ratio (layers x kv heads, mean over every window). Right: value norms by
    position for the sink layers (the first domain's first window)."""
    plt = _pyplot()
    metrics = report.overall
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 2.5]})
    image = left.imshow(metrics.value_drain.numpy(), aspect="auto", cmap="viridis_r", vmin=0, vmax=1.5,
                        interpolation="nearest")
    left.set_xlabel("kv head")
    # whole heads only: a model with one kv head (Gemma3-270m) got an axis from -0.4 to 0.4
    left.set_xticks(range(metrics.value_drain.shape[1]))
    left.set_ylabel("layer")
    left.set_title("||v_sink|| / median ||v_j||, mean of all windows", fontsize=9)
    fig.colorbar(image, ax=left)
    layers = report.sink_layers() or report.peak_layers()
    for layer in layers[:4]:
        norms = metrics.value_norms[layer] if layer < len(metrics.value_norms) else []
        if norms:
            mean = [sum(col) / len(col) for col in zip(*norms)]
            right.plot(range(len(mean)), mean, lw=0.8, label=f"layer {layer}")
    right.set_yscale("log")
    right.set_xlabel("position")
    right.set_ylabel("mean ||v_j|| over kv heads")
    right.set_title(_example_source(report), fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(f"Value norms - {_title(report)}", fontsize=10)
    return _save(plt, fig, path, tight=True)


def _flips_between(flip: dict, a: str, b: str) -> bool:
    """Whether ``flip`` (an entry of ``report.flips``) is dormant on one of ``a``, ``b`` and active on the other."""
    dormant, active = set(flip["dormant_on"]), set(flip["active_on"])
    return (a in dormant and b in active) or (b in dormant and a in active)


def domain_flip_plot(report, path: Path) -> Path | None:
    """Dormancy score of every head on the first two domains; the heads that flip between those two
    labelled (a head that flips between two other domains is not drawn as a flip here: on these
    axes it may sit on one side of the threshold on both). None with one domain."""
    names = [n for n, m in report.domains.items() if m.dormancy is not None]
    if len(names) < 2:
        return None
    plt = _pyplot()
    from sinkfix.analysis.metrics import DORMANT_THRESHOLD

    a, b = names[:2]
    x = report.domains[a].dormancy.flatten().numpy()
    y = report.domains[b].dormancy.flatten().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(x, y, s=8, alpha=0.6, color="tab:gray")
    between = [f for f in report.flips if _flips_between(f, a, b)]
    for flip in between:
        fx, fy = flip["scores"][a], flip["scores"][b]
        ax.scatter([fx], [fy], s=20, color="tab:red")
        ax.annotate(f"L{flip['layer']}H{flip['head']}", (fx, fy), fontsize=7)
    ax.axvline(DORMANT_THRESHOLD, color="k", lw=0.5, ls="--")
    ax.axhline(DORMANT_THRESHOLD, color="k", lw=0.5, ls="--")
    ax.plot([0, 1], [0, 1], color="k", lw=0.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"dormancy on {a}")
    ax.set_ylabel(f"dormancy on {b}")
    others = len(report.flips) - len(between)
    more = f"; {others} more between other domains" if others else ""
    ax.set_title(f"Heads that flip between {a} and {b} ({len(between)}{more})\n{_title(report)}", fontsize=9)
    return _save(plt, fig, path, tight=True)


#: The file names :func:`write_figures` may write (``domain_flips.png`` only with two domains or more).
FIGURE_NAMES = ("sink_share.png", "residual_norms.png", "value_norms.png", "domain_flips.png")


def write_figures(report, out_dir: str | Path) -> list[Path]:
    """All figures of ``report`` as PNG files in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        sink_share_heatmap(report, out / "sink_share.png"),
        residual_norm_plot(report, out / "residual_norms.png"),
        value_norm_plot(report, out / "value_norms.png"),
    ]
    flips = domain_flip_plot(report, out / "domain_flips.png")
    if flips is not None:
        paths.append(flips)
    return paths


def remove_stale_figures(out_dir: str | Path, written: list[Path]) -> list[Path]:
    """Delete the figures of :data:`FIGURE_NAMES` in ``out_dir`` that this run did not write (an earlier
    run's ``domain_flips.png`` beside a one-domain report, or every figure after ``--no-figures``), so
    that the folder describes one run; returns the paths removed."""
    from sinkfix.files import remove_unwritten

    return remove_unwritten(out_dir, FIGURE_NAMES, written)


def running_perplexity_plot(result, path: Path, span: int | None = None) -> Path:
    """Top: perplexity over the trailing ``span`` positions (default: the run's segment length) against
    position, per streaming variant (:class:`~sinkfix.analysis.streaming.StreamResult`; recomputation,
    scored every k-th token, over ``span`` x 4), with the cache size and the model's trained context
    marked: the figure StreamingLLM is known for. Bottom: each cache's perplexity ratio to
    recomputation on the tokens both scored."""
    from sinkfix.analysis.streaming import running_ppl, running_ratio

    plt = _pyplot()
    p = result.protocol
    # a fixed 1024 labelled a 640-token stream's curves "trailing 1024 positions" (they were cumulative)
    span = int(p.get("segment_len") or 1024) if span is None else span

    def trailing(n: int) -> str:
        return f"trailing {n} positions" if n < p["tokens"] else "since the stream's start"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[3, 2])
    compared = False
    for name, variant in result.variants.items():
        kind = name.split("_profile")[0]
        style = {"sink": "-", "window_only": "--", "recompute": ":"}.get(kind, "-")
        positions, ppl = running_ppl(variant, span * (4 if kind == "recompute" else 1))
        # its own span in the legend: the axis states the caches' span, and a recomputation curve read
        # against it was 114 where its trailing 100 positions (the JSON's segment) gave 440
        label = (f"{name} (every {p['recompute_every']}th token; {trailing(span * 4)})" if kind == "recompute"
                 else name)
        top.plot(positions.numpy(), ppl.numpy(), style, lw=1.2, label=label)
        reference = result.reference_for(name)
        if reference is None and name.endswith("_profile") and kind in result.variants:
            reference = result.variants[kind]  # no recomputation run: the patched cache against the unpatched one
        if reference is not None and kind != "recompute":
            positions, ratio = running_ratio(variant, reference, span * 4)
            bottom.plot(positions.numpy(), ratio.numpy(), style, lw=1.2, label=f"{name} / {reference.name}")
            compared = True
    for ax in (top, bottom):
        ax.axvline(p["cache_tokens"], color="grey", lw=0.8, ls="-.")
        trained = p.get("max_position_embeddings")
        if trained and trained < p["tokens"]:
            ax.axvline(trained, color="black", lw=0.8, ls="-.")
        ax.grid(alpha=0.3)
    top.axvline(p["cache_tokens"], color="grey", lw=0.8, ls="-.", label=f"cache size {p['cache_tokens']}")
    if p.get("max_position_embeddings") and p["max_position_embeddings"] < p["tokens"]:
        top.axvline(p["max_position_embeddings"], color="black", lw=0.8, ls="-.",
                    label=f"trained positions {p['max_position_embeddings']}")
    top.set_yscale("log")
    top.set_ylabel(f"perplexity, {trailing(span)}")
    versus = f" vs {p['cache_tokens']} recent" if "window_only" in result.variants else ""
    top.set_title(f"{p.get('model', '')} streaming: {p['n_sink']} sinks + {p['window']} recent tokens"
                  f"{versus}, chunks of {p['chunk']}")
    top.legend(fontsize=8)
    bottom.axhline(1.0, color="grey", lw=0.8)
    bottom.set_ylabel(f"ppl ratio, {trailing(span * 4)}")
    bottom.set_xlabel("position in the stream (tokens)")
    if compared:
        bottom.legend(fontsize=8)
    return _save(plt, fig, path, tight=True)
