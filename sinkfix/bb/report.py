"""The paper's quantities on trained BB models, the default experiment, figures and JSON.

What is measured (backcopy layer = the layer whose head puts the most attention on the previous
token on trigger rows; layer 0 in a 1-layer model; rows are query positions i >= 1):

* ``bos_attention_nontrigger`` / ``bos_attention_trigger``: mean share of row i's attention on BOS,
  ``w_i0 / sum_j w_ij``, over non-trigger / trigger rows. For softmax this is the probability
  itself; for ReLU attention (weights not normalised) it is the share of the row's mass, over rows
  with any mass (``relu_silent_rows_nontrigger``: the share of non-trigger rows whose every weight
  is 0; ``relu_attention_mass_*``: the mean row sum of the weights).
* ``prev_token_attention_trigger``: the same share on key i - 1, over trigger rows.
* ``bos_key_ratio``: on non-trigger rows, mean weight on BOS / mean weight on another visible key
  (ratio of the averages over rows). 1 = BOS treated like any key; a sink gives >> 1.
* ``bos_logit_gap``: on non-trigger rows, mean of ``s_i0 - mean_{1<=j<=i} s_ij`` (scaled scores).
* ``bos_value_ratio``: ``||v_0|| / median_{j>=1} ||v_j||`` of the backcopy layer's value states,
  averaged over sequences.
* ``bos_residual_ratio``: ``||h_0|| / median_{j>=1} ||h_j||`` of the last decoder layer's output
  (the residual stream before the final norm), averaged over sequences; per layer in
  ``bos_residual_ratio_by_layer``.
* ``detector_accuracy``: ``sinkfix.analysis.inspection.row_dormancy`` on the backcopy layer's head,
  dormant iff score >= ``DORMANT_THRESHOLD``, against the ground truth (non-trigger rows dormant,
  trigger rows active), rows i >= 1.
* task quality: ``loss``, ``trigger_accuracy`` (argmax = the copied token on trigger rows) and
  ``nontrigger_excess_loss`` (cross-entropy on non-trigger rows minus the bigram entropy, the
  best achievable).

Softmax models are measured through ``sinkfix.patch(model, Policy())`` (the identity) and its
``AttentionCall`` observers; the ReLU model through the observer of its own attention function.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sinkfix.bb.data import BigramBackcopy
from sinkfix.bb.relu_attention import observing as relu_observing
from sinkfix.bb.train import VARIANTS, TrainConfig, TrainResult, Variant, train_variant
from sinkfix.errors import UsageError

__all__ = ["Probe", "probe", "measure", "run_experiment", "write_figures", "remove_stale_figures", "summary_table"]


@dataclass
class Probe:
    """One forward pass, seen from inside. Lists are indexed by layer."""

    scores: list[torch.Tensor]  # (B, H, S, S) scaled q.k, before masking
    weights: list[torch.Tensor]  # (B, H, S, S) attention weights (0 where masked)
    values: list[torch.Tensor]  # (B, Hkv, S, D) value states
    residuals: list[torch.Tensor]  # (B, S, W) decoder-layer outputs (residual stream)
    logits: torch.Tensor  # (B, S, V)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a BB model (Llama or GPT-2), in order."""
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return list(model.model.layers)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [getattr(layer, "self_attn", None) or layer.attn for layer in decoder_layers(model)]


@torch.no_grad()
def probe(model: nn.Module, input_ids: torch.Tensor, variant: Variant) -> Probe:
    """Run ``model`` on unpadded ``input_ids`` (B, S) and record what :func:`measure` needs."""
    layers = decoder_layers(model)
    n = len(layers)
    scores: list = [None] * n
    weights: list = [None] * n
    values: list = [None] * n
    residuals: list = [None] * n
    seq = input_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    hooks = []
    for i, layer in enumerate(layers):
        def keep(module, args, output, i=i):
            residuals[i] = (output if isinstance(output, torch.Tensor) else output[0]).float()
        hooks.append(layer.register_forward_hook(keep))
    index = {id(m): i for i, m in enumerate(_attention_modules(model))}
    try:
        if variant.attention == "relu":
            def on_relu(module, query, key, value, s, w):
                i = index[id(module)]
                scores[i], weights[i], values[i] = s.float(), w.float(), value.float()

            with relu_observing(_attention_modules(model), on_relu):
                logits = model(input_ids=input_ids, use_cache=False).logits
        else:
            import sinkfix

            def on_call(call) -> None:
                q, k = call.query.float(), call.key.float()
                if k.shape[1] != q.shape[1]:
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                s = torch.matmul(q, k.transpose(-1, -2)) * call.scale
                visible = causal if call.attn_mask is None else call.attn_mask
                i = call.layer
                scores[i] = s
                weights[i] = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
                values[i] = call.value.float()

            with sinkfix.patch(model, sinkfix.Policy()) as handle, handle.observing(on_call):
                logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    if any(x is None for x in scores):
        raise RuntimeError("not every attention layer was observed during the probe forward")
    return Probe(scores, weights, values, residuals, logits.float())


def _bos_norm_ratio(x: torch.Tensor) -> torch.Tensor:
    """x (B, S, D) -> (B,) ||x_0|| / median_{j>=1} ||x_j||."""
    norms = x.norm(dim=-1)
    return norms[:, 0] / norms[:, 1:].median(dim=1).values


def _mean(x: torch.Tensor) -> float | None:
    return float(x.mean()) if x.numel() else None


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float | None:
    """num / den, or None when den is 0 (e.g. a ReLU head that gives no key any weight)."""
    return float(num / den) if float(den) > 0 else None


def measure(
    model: nn.Module,
    task: BigramBackcopy,
    input_ids: torch.Tensor,
    variant: Variant,
    detector: bool = True,
) -> dict:
    """The quantities listed in the module docstring, on one evaluation batch."""
    p = probe(model, input_ids, variant)
    batch, seq = input_ids.shape
    trig = task.trigger_rows(input_ids)
    rows = torch.zeros(batch, seq, dtype=torch.bool)
    rows[:, 1:] = True
    trig_rows, non_rows = trig & rows, ~trig & rows
    pos = torch.arange(seq)

    # attention shares per layer, head 0 (one head per layer)
    prev_share, bos_share, mass = [], [], []
    for w in p.weights:
        w = w[:, 0]  # (B, S, S)
        total = w.sum(dim=-1)
        mass.append(total)
        safe = total.clamp(min=1e-30)
        bos_share.append(w[:, :, 0] / safe)
        prev = torch.zeros(batch, seq)
        prev[:, 1:] = w[:, pos[1:], pos[1:] - 1] / safe[:, 1:]
        prev_share.append(prev)
    by_layer_prev = [_mean(s[trig_rows & (m > 0)]) or 0.0 for s, m in zip(prev_share, mass)]
    layer = max(range(len(by_layer_prev)), key=lambda i: by_layer_prev[i])

    w = p.weights[layer][:, 0]
    s = p.scores[layer][:, 0]
    has_mass = mass[layer] > 0
    visible = torch.ones(seq, seq, dtype=torch.bool).tril()
    others = visible.clone()
    others[:, 0] = False  # keys 1..i
    n_others = others.sum(dim=-1).clamp(min=1)  # (S,)
    mean_other_w = (w * others).sum(dim=-1) / n_others
    mean_other_s = (s * others).sum(dim=-1) / n_others

    logp = torch.log_softmax(p.logits, dim=-1)
    nxt = input_ids[:, 1:]
    token_nll = -logp[:, :-1].gather(-1, nxt[..., None]).squeeze(-1)  # row i predicts token i + 1
    has_next = torch.zeros(batch, seq, dtype=torch.bool)
    has_next[:, :-1] = True
    pred = p.logits.argmax(dim=-1)
    copied = torch.zeros(batch, seq, dtype=torch.long)
    copied[:, 1:] = input_ids[:, :-1]
    trans = task.transition
    entropy = -(trans * trans.clamp(min=1e-30).log()).sum(dim=-1)  # (n_regular,)
    regular = input_ids.clamp(max=task.n_regular - 1)
    non_next = (non_rows & has_next)[:, :-1]

    out = {
        "backcopy_layer": layer,
        "bos_attention_nontrigger": _mean(bos_share[layer][non_rows & has_mass]),
        "bos_attention_trigger": _mean(bos_share[layer][trig_rows & has_mass]),
        "prev_token_attention_trigger": _mean(prev_share[layer][trig_rows & has_mass]),
        "uniform_attention_nontrigger": _mean((1.0 / (pos + 1).float()).expand(batch, seq)[non_rows]),
        "bos_key_ratio": _ratio(w[:, :, 0][non_rows].mean(), mean_other_w[non_rows].mean()),
        "bos_logit_gap": _mean((s[:, :, 0] - mean_other_s)[non_rows]),
        "bos_value_ratio": float(_bos_norm_ratio(p.values[layer][:, 0]).mean()),
        "bos_residual_ratio": float(_bos_norm_ratio(p.residuals[-1]).mean()),
        "bos_residual_ratio_by_layer": [float(_bos_norm_ratio(h).mean()) for h in p.residuals],
        "bos_value_norm": float(p.values[layer][:, 0, 0].norm(dim=-1).mean()),
        "median_value_norm": float(p.values[layer][:, 0, 1:].norm(dim=-1).median()),
        "bos_residual_norm": float(p.residuals[-1][:, 0].norm(dim=-1).mean()),
        "median_residual_norm": float(p.residuals[-1][:, 1:].norm(dim=-1).median()),
        "prev_token_attention_trigger_by_layer": by_layer_prev,
        "loss": float(token_nll.mean()),
        "trigger_accuracy": _mean((pred == copied)[trig_rows & has_next].float()),
        "nontrigger_excess_loss": _mean((token_nll - entropy[regular[:, :-1]])[non_next]),
        "trigger_row_fraction": float(trig_rows.sum() / rows.sum()),
    }
    if variant.attention == "relu":
        # ReLU weights need not sum to 1: a row can attend to nothing at all
        out["relu_silent_rows_nontrigger"] = float((~has_mass[non_rows]).float().mean())
        out["relu_attention_mass_nontrigger"] = float(mass[layer][non_rows].mean())
        out["relu_attention_mass_trigger"] = _mean(mass[layer][trig_rows])
    if detector:
        out.update(detector_accuracy(model, input_ids, trig, layer, variant))
    return out


def detector_accuracy(
    model: nn.Module, input_ids: torch.Tensor, trigger_rows: torch.Tensor, layer: int, variant: Variant, head: int = 0
) -> dict:
    """Agreement of ``sinkfix.analysis.inspection.row_dormancy`` with the BB ground truth.

    Returns ``{"detector_accuracy": float | None, "detector_note": str}`` (``note`` only when None).
    """
    if variant.attention != "softmax":
        return {
            "detector_accuracy": None,
            "detector_note": "not applicable: the detector patches softmax attention, this model uses ReLU attention",
        }
    try:
        from sinkfix.analysis.inspection import DORMANT_THRESHOLD, row_dormancy
    except ImportError:
        return {"detector_accuracy": None, "detector_note": "sinkfix.analysis.inspection.row_dormancy is not available"}
    with torch.no_grad():
        score = row_dormancy(model, input_ids)  # (L, B, H, S)
    dormant = score[layer, :, head].float() >= DORMANT_THRESHOLD
    truth = ~trigger_rows
    return {"detector_accuracy": float((dormant == truth)[:, 1:].float().mean())}


# -- the experiment -----------------------------------------------------------------------------
def run_experiment(
    config: TrainConfig | None = None,
    variants: tuple[str, ...] = ("adam", "sgd", "relu"),
    source: str = "prose",
    k: int = 3,
    progress: Callable[[str], None] | None = None,
    keep_models: bool = False,
    on_variant: Callable[[dict], None] | None = None,
) -> dict:
    """Train and measure each variant; returns the JSON-ready report. ``on_variant(report)`` is
    called after each variant with the report so far (the finished variants), so that a caller can
    keep them if a later variant is interrupted or fails.

    Keys: one per variant (its final :func:`measure` dict plus ``wall_s``, ``steps``, ``lr``,
    ``history``; ``train_s`` is the optimisation alone, ``wall_s`` adds the dynamics measurements),
    and ``config`` / ``task``. With ``keep_models`` the trained models are returned
    under ``"_models"`` (not JSON-serialisable; drop that key before dumping).
    """
    config = config or TrainConfig()
    if not variants:
        raise UsageError(f"no BB variant to train; choose from {', '.join(VARIANTS)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown BB variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    repeated = sorted({v for v in variants if variants.count(v) > 1})
    if repeated:  # the report holds one entry per name: a second training would silently replace the first
        raise UsageError(f"BB variant(s) named twice: {', '.join(repeated)}")
    task = BigramBackcopy.build(source, k=k, seed=config.seed)
    eval_ids = task.sample(config.eval_batch, config.seq_len, generator=torch.Generator().manual_seed(config.seed + 7))
    report: dict = {
        "config": {**config.to_dict(), "source": source, "k": k, "threads": torch.get_num_threads()},
        "task": {
            "vocab_size": task.vocab_size,
            "triggers": list(task.triggers),
            "trigger_chars": [task.chars[t] for t in task.triggers] if task.chars else None,
        },
    }
    models = {}
    for name in variants:
        variant = VARIANTS[name]

        def on_eval(step: int, model: nn.Module, variant: Variant = variant) -> dict:
            m = measure(model, task, eval_ids, variant, detector=False)
            return {key: m[key] for key in (
                "loss", "bos_attention_nontrigger", "prev_token_attention_trigger", "bos_key_ratio",
                "bos_logit_gap", "bos_value_ratio", "bos_residual_ratio", "trigger_accuracy", "bos_residual_ratio_by_layer",
            )}

        result: TrainResult = train_variant(task, variant, config, on_eval=on_eval, progress=progress)
        t0 = time.perf_counter()
        final = measure(result.model, task, eval_ids, variant)
        report[name] = {
            "description": variant.description,
            "lr": variant.lr,
            "optimizer": variant.optimizer,
            "attention": variant.attention,
            "steps": config.steps,
            "train_s": round(result.train_s, 1),
            "wall_s": round(result.wall_s, 1),
            "measure_s": round(time.perf_counter() - t0, 1),
            **final,
            "history": result.history,
        }
        models[name] = result.model
        if progress is not None:
            progress(summary_line(name, report[name]))
        if on_variant is not None:
            on_variant(report)
    if keep_models:
        report["_models"] = models
        report["_task"] = task
    return report


def summary_line(name: str, m: dict) -> str:
    def f(x, fmt=".3f"):
        x = _finite(x)  # NaN in memory is null in bb.json
        return "null" if x is None else format(x, fmt)

    return (
        f"{name}: bos_attn non-trig {f(m['bos_attention_nontrigger'])} trig {f(m['bos_attention_trigger'])}, "
        f"prev-token trig {f(m['prev_token_attention_trigger'])}, value ratio {f(m['bos_value_ratio'])}, "
        f"residual ratio {f(m['bos_residual_ratio'], '.2f')}, logit gap {f(m['bos_logit_gap'], '.2f')}, "
        f"detector {f(m.get('detector_accuracy'))}, loss {f(m['loss'])}, copy acc {f(m['trigger_accuracy'])}, "
        f"train {m['train_s']}s"
    )


def summary_table(report: dict) -> str:
    """Plain-text table of the headline numbers per variant."""
    names = [k for k in ("adam", "sgd", "relu") if k in report] + [
        k for k in report if k not in ("adam", "sgd", "relu", "config", "task") and not k.startswith("_")
    ]
    cols = [
        ("bos_attention_nontrigger", "BOS attn (non-trig)"), ("bos_attention_trigger", "BOS attn (trig)"),
        ("prev_token_attention_trigger", "prev attn (trig)"), ("bos_key_ratio", "BOS/other key"),
        ("bos_value_ratio", "BOS value ratio"), ("bos_residual_ratio", "BOS resid ratio"),
        ("bos_logit_gap", "BOS logit gap"), ("detector_accuracy", "detector acc"),
        ("trigger_accuracy", "copy acc"), ("loss", "loss"), ("train_s", "train s"),
    ]
    lines = ["metric".ljust(22) + "".join(n.rjust(10) for n in names)]
    for key, label in cols:
        cells = []
        for n in names:
            v = _finite(report[n].get(key))  # an undefined measure is NaN in memory, null in bb.json: "-" here
            cells.append(("-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))).rjust(10))
        lines.append(label.ljust(22) + "".join(cells))
    return "\n".join(lines)


def to_json(report: dict) -> str:
    clean = {k: v for k, v in report.items() if not k.startswith("_")}

    def fix(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    return json.dumps(fix(clean), indent=2)


# -- figures --------------------------------------------------------------------------------------
_DYNAMICS = (
    ("bos_attention_nontrigger", "attention on BOS, non-trigger rows", False),
    ("prev_token_attention_trigger", "attention on previous token, trigger rows", False),
    ("bos_value_ratio", "BOS value norm / median", True),
    ("bos_residual_ratio", "BOS residual norm / median (last layer; dashed: layer 0)", True),
    ("bos_logit_gap", "BOS logit gap (non-trigger rows)", False),
    ("loss", "eval loss", False),
)


#: The figures :func:`write_figures` writes into the output folder.
FIGURE_NAMES = ("bb_dynamics.png", "bb_final.png")


def remove_stale_figures(out_dir: str | Path, written: list[Path]) -> list[Path]:
    """Delete the figures of :data:`FIGURE_NAMES` in ``out_dir`` that this run did not write (all of
    them after ``--no-figures``): beside this run's bb.json they would read as this run's. Returns the
    paths removed."""
    from sinkfix.files import remove_unwritten

    return remove_unwritten(out_dir, FIGURE_NAMES, written)


def _finite(value: float | None) -> float | None:
    """A measure as a bar height: None for an undefined one (null in bb.json: None, or a non-finite float)."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _pyplot():
    """matplotlib.pyplot for the figures. :class:`~sinkfix.analysis.plots.PlotError` when matplotlib is
    missing (the one "pip install" message), and when it is installed but fails to import, with that
    import's own error: a broken install was told to install matplotlib, its real error hidden."""
    from sinkfix.analysis.plots import PlotError, pyplot

    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":  # matplotlib is there; one of its own dependencies is not
            raise PlotError(f"figures need matplotlib, which is installed but does not import ({type(exc).__name__}: "
                            f"{exc}): repair it, or pass --no-figures") from exc
    except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways; each said as it is
        raise PlotError(f"figures need matplotlib, which is installed but does not import ({type(exc).__name__}: "
                        f"{exc}): repair it, or pass --no-figures") from exc
    return pyplot()  # missing: PlotError with the install hint


def write_figures(report: dict, out_dir: str | Path, written: list[Path] | None = None) -> list[Path]:
    """``bb_dynamics.png`` (quantities vs step per variant) and ``bb_final.png`` (final comparison).
    :class:`~sinkfix.analysis.plots.PlotError` when matplotlib is missing (a ModuleNotFoundError
    traceback before) or does not import. ``written``: each figure's path is appended to it as soon
    as it is saved, so that a caller knows which figures this run wrote when a later one fails."""
    from sinkfix.files import save_figure

    plt = _pyplot()
    from matplotlib.patches import Patch

    out = Path(out_dir)
    names = [k for k in ("adam", "sgd", "relu") if k in report]
    colors = {"adam": "tab:blue", "sgd": "tab:orange", "relu": "tab:green"}
    paths = [] if written is None else written

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, title, log) in zip(axes.flat, _DYNAMICS):
        for n in names:
            hist = [h for h in report[n]["history"] if h.get(key) is not None]
            ax.plot([h["step"] for h in hist], [h[key] for h in hist], label=report[n]["description"],
                    color=colors.get(n))
            if key == "bos_residual_ratio" and len(hist) and len(hist[0].get("bos_residual_ratio_by_layer", [])) > 1:
                # layer 0's output too: in a deeper model the BOS peak shows there first
                ax.plot([h["step"] for h in hist], [h["bos_residual_ratio_by_layer"][0] for h in hist],
                        color=colors.get(n), ls="--", lw=1)
        if log:
            ax.set_yscale("log")
            ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Bigram-Backcopy: training dynamics")
    fig.tight_layout()
    paths.append(save_figure(fig, out / FIGURE_NAMES[0]))

    panels = (
        ("attention share", [("bos_attention_nontrigger", "BOS, non-trig"), ("bos_attention_trigger", "BOS, trig"),
                             ("prev_token_attention_trigger", "prev token, trig")], False),
        ("norm ratio (log scale; bars from 1, the median)", [("bos_value_ratio", "BOS value / median"),
                              ("bos_residual_ratio", "BOS residual / median")], True),
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (title, keys, log) in zip(axes, panels):
        width = 0.8 / len(names)
        for j, n in enumerate(names):
            # a null measure (a ReLU head silent on every row has no attention share) is no bar and
            # "n/a": drawn as 0 it read as "no attention on BOS"
            vals = [_finite(report[n].get(key)) for key, _ in keys]
            xs = [i + j * width for i in range(len(keys))]
            shown = [(x, v) for x, v in zip(xs, vals) if v is not None]
            # a ratio's bar starts at 1 (the median) on the log axis: from matplotlib's automatic floor a
            # ratio of 0.21 was a sliver beside 0.52, lengths that meant nothing
            base = 1.0 if log else 0.0
            ax.bar([x for x, _ in shown], [v - base for _, v in shown], width, bottom=base, label=n,
                   color=colors.get(n))
            for x, v in zip(xs, vals):
                if v is None:
                    ax.text(x, 0.02, "n/a", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                            rotation=90, fontsize=8, color=colors.get(n))
        # every slot inside the axes, also a last one with no bar (its "n/a" fell outside them)
        ax.set_xlim(-width / 2 - 0.1, len(keys) - 1 + 0.8 - width / 2 + 0.1)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels([label for _, label in keys], fontsize=9)
        if log:
            ax.set_yscale("log")
            ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        else:
            ax.set_ylim(bottom=0.0)  # shares: with every bar n/a the automatic range went below 0
        ax.set_title(title)
        # the legend from patches: a variant with no bar in a panel took matplotlib's default colour there
        ax.legend(handles=[Patch(color=colors.get(n), label=n) for n in names], fontsize=8)
    fig.suptitle("Bigram-Backcopy: final comparison per variant")
    fig.tight_layout()
    paths.append(save_figure(fig, out / FIGURE_NAMES[1]))
    return paths


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
