"""Fit per-layer / per-head sink-scaling parameters to next-token NLL, without training the model.

``sinkfix.calibrate(model, tokenizer, texts)`` patches the model, freezes its weights and fits one
beta per (attention layer, query head), ``beta = sigmoid(theta)``, by Adam on the token-mean NLL of
calibration windows, plus a pull toward beta = 1::

    loss = NLL + reg * mean_{l,h} (1 - beta_lh)^2

A validation split (the last ``val_fraction`` of every text's windows: contiguous, so it is text
the optimiser never saw, not interleaved sentences of the same paragraphs) is scored every
``eval_every`` steps; the parameters with the best validation NLL are kept and the loop stops after
``patience`` evaluations without improvement. Calibration NLL (on the windows it was fitted on)
and validation NLL are both reported, before and after, so overfitting is visible. If nothing beats
the unpatched model on validation, the returned profile is the identity.

Gradients reach beta because :class:`~sinkfix.policy.LayerPolicy` bypasses its device cache for
tensors that require grad, and the PyTorch attention path switches to its dense differentiable
formula when an input requires grad.

With ``virtual_logits=True`` (the default) a virtual sink logit b_lh per head is fitted as well:
an extra ``exp(b)`` in the softmax denominator with a zero value, i.e. a learned "attend to
nothing" option. Sink scaling can only move a head away from its sink (beta <= 1); the virtual
logit can also make it more dormant. On SmolLM2-135M with BOS it took the held-out gain from
2.7% to 3.4-3.9% (docs/calibration.md). It starts a fixed distance below each head's typical row
log-sum-exp and below that of row 0 (the sink's own row), measured in a forward pass over a few
calibration windows, so that it holds ~0.25% of the mass instead of having a vanishing gradient;
it is not regularised (early stopping on the validation split is).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from sinkfix.errors import SinkfixError
from sinkfix.evaluate import bos_token_id, model_device, tokenize, window_nll
from sinkfix.policy import Policy
from sinkfix.texts import domain_text

__all__ = ["calibrate", "calibration_windows", "CalibrationError"]

# Virtual sink logits start this far below the head's reference log-sum-exp: e^-6 = 0.25% of the mass.
_VIRTUAL_INIT_GAP = 6.0
# Windows used to measure each head's reference log-sum-exp for that initialisation.
_LSE_WINDOWS = 8


class CalibrationError(SinkfixError, ValueError):
    """Calibration cannot run with the given texts or settings."""


def calibration_windows(tokenizer, text: str, *, seq_len: int, bos: bool | str,
                        max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping full-length windows (1-D ids) over ``text``; BOS first when ``bos``.

    ``bos="both"`` alternates: even windows start with BOS, odd windows do not, so that one profile
    is fitted for both protocols.
    """
    if bos == "both":
        with_bos = calibration_windows(tokenizer, text, seq_len=seq_len, bos=True, max_tokens=max_tokens)
        without = calibration_windows(tokenizer, text, seq_len=seq_len, bos=False, max_tokens=max_tokens)
        return [with_bos[i] if i % 2 == 0 else without[i] for i in range(min(len(with_bos), len(without)))]
    if not isinstance(bos, bool):
        raise CalibrationError(f"bos must be True, False or 'both', got {bos!r}")
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos_id = bos_token_id(tokenizer) if bos else None
    body = seq_len - (bos_id is not None)
    out = []
    for start in range(0, ids.numel() - body + 1, body):
        chunk = ids[start : start + body]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id], dtype=chunk.dtype), chunk])
        out.append(chunk)
    return out


# -- helpers ------------------------------------------------------------------------------------
def _set_params(handle, beta: torch.Tensor, logit: torch.Tensor | None) -> None:
    """Install beta [L, H] (and virtual logits) on the live layer policies."""
    for layer, lp in enumerate(handle.layer_policies()):
        h = lp.num_heads
        lp.set_parameters(beta[layer, :h], None if logit is None else logit[layer, :h])


@torch.no_grad()
def _mean_nll(model, windows: Sequence[torch.Tensor], device, tick: Callable[[], None] | None = None) -> float:
    total, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits
        nll, n = window_nll(logits, ids[None].to(logits.device))
        total += float(nll)
        count += n
        if tick is not None:
            tick()
    return total / max(count, 1)


@torch.no_grad()
def _reference_lse(model, handle, windows: Sequence[torch.Tensor], device) -> torch.Tensor:
    """[L, H] per head: min(mean log-sum-exp of rows i >= 1, log-sum-exp of row 0), averaged over windows.

    With ``virtual_logit_on_sink_rows`` the virtual logit reaches row 0 too: the sink's own row, which
    sink scaling leaves alone because every later layer reads the sink's representation. In ~10% of SmolLM2's
    heads row 0's log-sum-exp lies more than 6 nats below the mean row's; a logit placed from the
    mean alone then takes most of that row at the start, and without BOS (row 0 = a real word)
    validation perplexity rose 9% within 10 steps and never recovered.
    """
    L, H = handle.num_layers, max(handle.num_heads())
    sums = torch.zeros(L, H, dtype=torch.float64)
    counts = torch.zeros(L, dtype=torch.float64)

    def observer(call) -> None:
        lse = call.result.lse
        if lse is None or lse.shape[-1] < 2:
            return
        lse = lse.detach().float()
        rows = lse[:, :, 1:]
        ok_rows = torch.isfinite(rows)
        mean = torch.where(ok_rows, rows, 0).sum(-1) / ok_rows.sum(-1).clamp(min=1)  # (B, H)
        row0 = lse[:, :, 0]
        ref = torch.where(torch.isfinite(row0), torch.minimum(mean, row0), mean)
        sums[call.layer, : ref.shape[1]] += ref.sum(0).double().cpu()
        counts[call.layer] += ref.shape[0]

    with handle.observing(observer):
        for ids in windows:
            model(input_ids=ids[None].to(device), use_cache=False)
    return (sums / counts.clamp(min=1)[:, None]).float()


def _split(windows: list[torch.Tensor], val_fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if len(windows) < 2:
        return windows, []
    n_val = max(1, round(len(windows) * val_fraction)) if val_fraction > 0 else 0
    n_val = min(n_val, len(windows) - 1)
    return windows[: len(windows) - n_val], windows[len(windows) - n_val :]


def _normalise_texts(texts) -> dict[str, str]:
    if texts is None:
        return {"prose": domain_text("prose", "calib"), "code": domain_text("code", "calib")}
    if isinstance(texts, str):
        return {"text": texts}
    if isinstance(texts, Mapping):
        return dict(texts)
    return {f"text{i}": t for i, t in enumerate(texts)}


# -- calibrate ----------------------------------------------------------------------------------
class _Windows(NamedTuple):
    calib: list[torch.Tensor]
    val: list[torch.Tensor]
    counts: dict[str, dict[str, int]]  # domain -> {"calib_windows", "val_windows"}


def _prepare_windows(tokenizer, texts, *, seq_len: int, bos, max_tokens, val_fraction: float) -> _Windows:
    calib: list[torch.Tensor] = []
    val: list[torch.Tensor] = []
    counts = {}
    for name, text in _normalise_texts(texts).items():
        windows = calibration_windows(tokenizer, text, seq_len=seq_len, bos=bos, max_tokens=max_tokens)
        if not windows:
            raise CalibrationError(f"text {name!r} is shorter than one {seq_len}-token window")
        c, v = _split(windows, val_fraction)
        calib += c
        val += v
        counts[name] = {"calib_windows": len(c), "val_windows": len(v)}
    return _Windows(calib, val, counts)


class _Fit(NamedTuple):
    beta: torch.Tensor  # [L, H]
    logit: torch.Tensor | None  # [L, H]
    val_nll: float  # best validation NLL (NaN without a validation split)
    step: int  # the step those parameters come from
    steps_run: int
    history: list[dict]


class _Progress:
    """A tqdm bar counting forward passes (fits and evaluations alike), or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="calibrate", unit="win")

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fit(model, handle, windows: _Windows, theta: torch.Tensor, logit: torch.Tensor | None, before: tuple[float, float],
         *, steps: int, lr: float, reg: float, eval_every: int, patience: int, seed: int, device,
         progress: _Progress, say: Callable[[str], None]) -> _Fit:
    """Adam on theta (beta = sigmoid(theta)) and the virtual logits, one calibration window per
    step; the parameters with the best validation NLL are kept (early stopping)."""
    L, H = theta.shape
    optimiser = torch.optim.Adam([theta] + ([logit] if logit is not None else []), lr=lr)
    calib, val = windows.calib, windows.val
    calib_before, val_before = before
    best = _Fit(torch.ones(L, H), None, val_before, 0, 0, [{"step": 0, "val_nll": val_before,
                                                            "train_nll": calib_before}])
    rng = random.Random(seed)
    stale, order, running, step = 0, [], [], 0
    for step in range(1, steps + 1):
        if not order:
            order = list(range(len(calib)))
            rng.shuffle(order)
        ids = calib[order.pop()][None].to(device)
        beta = torch.sigmoid(theta)
        _set_params(handle, beta, logit)
        logits = model(input_ids=ids, use_cache=False).logits
        nll, count = window_nll(logits, ids)
        nll = nll / max(count, 1)
        loss = nll + reg * ((1 - beta) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        running.append(float(nll.detach()))
        del logits, loss
        progress.tick()
        if not val or (step % eval_every and step != steps):
            continue
        beta_d, logit_d = torch.sigmoid(theta).detach(), None if logit is None else logit.detach()
        _set_params(handle, beta_d, logit_d)
        val_nll = _mean_nll(model, val, device, progress.tick)
        best.history.append({"step": step, "val_nll": val_nll, "train_nll": sum(running) / len(running),
                             "beta_mean": float(beta_d.mean()), "beta_min": float(beta_d.min())})
        running = []
        progress.show(train=f"{best.history[-1]['train_nll']:.4f}", val=f"{val_nll:.4f}", best=f"{best.val_nll:.4f}")
        if val_nll < best.val_nll - 1e-5:
            best = best._replace(beta=beta_d.clone(), logit=None if logit_d is None else logit_d.clone(),
                                 val_nll=val_nll, step=step)
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                say(f"early stop at step {step}: validation NLL has not improved for {patience} evaluations")
                break
    if not val:  # no validation split: keep the last parameters
        best = best._replace(beta=torch.sigmoid(theta).detach(), logit=None if logit is None else logit.detach(),
                             step=step)
    return best._replace(steps_run=step if steps else 0)


def calibrate(
    model: nn.Module,
    tokenizer,
    texts: str | Sequence[str] | Mapping[str, str] | None = None,
    *,
    seq_len: int = 512,
    bos: bool | str = True,
    max_tokens: int | None = 16384,
    val_fraction: float = 0.25,
    steps: int = 120,
    lr: float = 0.2,
    reg: float = 0.05,
    init_beta: float = 0.97,
    virtual_logits: bool = True,
    virtual_logit_on_sink_rows: bool | None = None,
    eval_every: int = 10,
    patience: int = 3,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **deprecated,
):
    """Fit per-head sink scaling (and optionally virtual sink logits) on ``texts``; return a Profile.

    Args:
        texts: one string, a list, or a mapping domain -> text; None = the built-in offline prose
            and code calibration texts (standard-library docstrings and source).
        seq_len / bos: the window protocol (BOS first when ``bos``; ``"both"`` alternates windows
            with and without BOS); windows do not overlap.
        max_tokens: text tokens used per domain (calibration + validation). The default 16384
            (with ``steps=120``) is 32 windows of 512 per domain, 24 fitted + 8 validation; how
            these defaults were chosen, and what they cost, is in docs/calibration.md.
        val_fraction: share of each domain's windows (its last ones) held out for validation.
        steps: Adam steps, one calibration window per step (cycled, shuffled).
        lr: Adam learning rate on theta (beta = sigmoid(theta)) and on the virtual logits.
        reg: weight of the pull toward beta = 1, ``reg * mean (1 - beta)^2``.
        init_beta: starting beta of every head (theta = logit(init_beta)).
        virtual_logit_on_sink_rows: whether the virtual logits also act on the sink's own row (see
            :class:`~sinkfix.policy.Policy`); None = only when every window starts with BOS (that
            row is then the BOS token, not text; docs/calibration.md compares both).
        eval_every / patience: validation schedule and early stopping.

    The model is left as it was found (weights untouched, any previous patch restored). The
    returned profile's ``calibration`` entry records the protocol, the NLLs and the history.
    """
    from sinkfix.patch import PatchHandle, patch
    from sinkfix.profile import ModelIdentity, Profile

    if "virtual_on_sink_rows" in deprecated:
        warnings.warn("calibrate(virtual_on_sink_rows=...) is deprecated; use virtual_logit_on_sink_rows",
                      DeprecationWarning, stacklevel=2)
        virtual_logit_on_sink_rows = deprecated.pop("virtual_on_sink_rows")
    if deprecated:
        raise TypeError(f"calibrate() got unexpected keyword arguments {sorted(deprecated)}")
    if not 0 < init_beta < 1:
        raise CalibrationError(f"init_beta must lie strictly between 0 and 1, got {init_beta}")
    if steps < 0 or eval_every < 1 or patience < 1:
        raise CalibrationError("steps must be >= 0, eval_every and patience >= 1")
    if not 0 <= val_fraction < 1:
        raise CalibrationError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    say = log or (lambda message: None)
    windows = _prepare_windows(tokenizer, texts, seq_len=seq_len, bos=bos, max_tokens=max_tokens,
                               val_fraction=val_fraction)
    if not windows.val:
        say("no validation windows (texts too short or val_fraction=0): early stopping is off")
    on_sink_rows = (bos is True) if virtual_logit_on_sink_rows is None else bool(virtual_logit_on_sink_rows)

    device = model_device(model)
    previous = PatchHandle.of(model)
    previous_policy = previous.policy if previous is not None else None
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    handle = patch(model, Policy(virtual_logit_on_sink_rows=on_sink_rows))
    identity = ModelIdentity.of(model)
    L, H = handle.num_layers, max(handle.num_heads())
    started = time.perf_counter()
    lse_windows = len(windows.calib[:_LSE_WINDOWS]) if virtual_logits else 0
    evals = (steps // eval_every + 2) * len(windows.val) + 2 * len(windows.calib) + lse_windows
    bar = _Progress(steps + evals, progress)
    try:
        theta = torch.full((L, H), math.log(init_beta / (1 - init_beta)), requires_grad=True)
        logit = None
        if virtual_logits:
            lse = _reference_lse(model, handle, windows.calib[:_LSE_WINDOWS], device)
            bar.tick(lse_windows)
            logit = (lse - _VIRTUAL_INIT_GAP).clone().requires_grad_(True)
        # -- before: the unpatched model on both splits
        _set_params(handle, torch.ones(L, H), None)
        calib_before = _mean_nll(model, windows.calib, device, bar.tick)
        val_before = _mean_nll(model, windows.val, device, bar.tick) if windows.val else float("nan")
        say(f"unpatched: calibration NLL {calib_before:.4f}, validation NLL {val_before:.4f}")
        fit = _fit(model, handle, windows, theta, logit, (calib_before, val_before), steps=steps, lr=lr, reg=reg,
                   eval_every=eval_every, patience=patience, seed=seed, device=device, progress=bar, say=say)
        _set_params(handle, fit.beta, fit.logit)
        calib_after = _mean_nll(model, windows.calib, device, bar.tick)
        say(f"best step {fit.step}: calibration NLL {calib_after:.4f}, validation NLL {fit.val_nll:.4f}")
    finally:
        bar.close()
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        if previous_policy is not None:
            patch(model, previous_policy)

    record = {
        "protocol": {"seq_len": seq_len, "bos": bos, "stride": seq_len - int(bos is True),
                     "windows": "non-overlapping"},
        "texts": windows.counts,
        "nll": {"calib_before": calib_before, "calib_after": calib_after, "val_before": val_before,
                "val_after": fit.val_nll},
        "ppl_change": {
            "calib": math.exp(calib_after - calib_before) - 1,
            "val": (math.exp(fit.val_nll - val_before) - 1) if windows.val else None,
        },
        "best_step": fit.step,
        "steps_run": fit.steps_run,
        "hyper": {"steps": steps, "lr": lr, "reg": reg, "init_beta": init_beta, "virtual_logits": virtual_logits,
                  "virtual_logit_on_sink_rows": on_sink_rows,
                  "eval_every": eval_every, "patience": patience, "val_fraction": val_fraction,
                  "max_tokens": max_tokens, "seed": seed},
        "history": fit.history,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return Profile(identity, fit.beta.double(), None if fit.logit is None else fit.logit.double(),
                   calibration=record, virtual_logit_on_sink_rows=bool(on_sink_rows and fit.logit is not None))
