"""Fit the per-head hidden-sink beta of content-dependent sinks, and choose the heads to correct.

``calibrate_hidden_sinks(model, tokenizer, texts)`` patches the model with ACT's criterion
(``threshold``) on every head, fits ``beta_H = sigmoid(theta)`` per (layer, head) by Adam on the
token-mean next-token NLL of calibration windows, with a pull toward 1,
``loss = NLL + reg * mean (1 - beta_H)^2``, keeps the parameters with the best NLL on a held-out
split (the last ``val_fraction`` of each text's windows) and stops after ``patience`` evaluations
without improvement. The heads it corrects are those whose fitted beta ends at least
``head_margin`` below 1 (ACT's head selection, made on calibration text); the others are off.

``base`` (a positional :class:`~sinkfix.profile.Profile`) is applied, fixed, during the fit and
carried into the result, which then corrects both the positional sink and the hidden sinks.

The sink sets are decided by the criterion on stock attention, which does not depend on beta, so
the gradient reaches beta through the correction only; the PyTorch path switches to its dense,
differentiable formula while beta requires grad (it materialises each layer's (B, H, Q, K) scores:
keep windows short).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from sinkfix.analysis.calibration import CalibrationError, calibration_windows
from sinkfix.evaluate import model_device, window_nll
from sinkfix.policy import ContentSinks, Policy
from sinkfix.profile import ModelIdentity, Profile

__all__ = ["calibrate_hidden_sinks"]


def _mean_nll(model: nn.Module, windows: Sequence[torch.Tensor], device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(input_ids=ids[None].to(device), use_cache=False).logits
            nll, n = window_nll(logits, ids[None].to(logits.device))
            total += float(nll)
            count += n
    return total / max(count, 1)


def _install(handle, beta: torch.Tensor) -> None:
    for layer, lp in enumerate(handle.layer_policies()):
        if lp.content is not None:
            lp.content.beta = beta[layer, : lp.num_heads]


def calibrate_hidden_sinks(
    model: nn.Module,
    tokenizer,
    texts: Mapping[str, str] | Sequence[str] | str,
    *,
    threshold: float = 0.1,
    seq_len: int = 256,
    bos: bool = False,
    max_tokens: int | None = 8192,
    steps: int = 40,
    lr: float = 0.05,
    reg: float = 0.01,
    init_beta: float = 0.9,
    val_fraction: float = 0.25,
    eval_every: int = 5,
    patience: int = 3,
    head_margin: float = 0.02,
    base: Profile | None = None,
    progress: bool = True,
) -> Profile:
    """A content-mode :class:`~sinkfix.profile.Profile` with fitted per-head hidden-sink beta and
    the chosen heads (module docstring). ``calibration`` records the protocol and the NLLs."""
    import sinkfix
    from sinkfix.patch import PatchHandle

    if not 0.0 < init_beta < 1.0:
        raise CalibrationError(f"init_beta must lie in (0, 1), got {init_beta}")
    if isinstance(texts, str):
        texts = {"text": texts}
    elif not isinstance(texts, Mapping):
        texts = {f"text{i}": t for i, t in enumerate(texts)}
    calib, val = [], []
    for name, text in texts.items():
        windows = calibration_windows(tokenizer, text, seq_len=seq_len, bos=bos, max_tokens=max_tokens)
        cut = max(1, int(round(len(windows) * (1 - val_fraction))))
        if cut >= len(windows):
            raise CalibrationError(f"text {name!r} gives {len(windows)} windows of {seq_len} tokens: too few to "
                                   "keep a validation split")
        calib += windows[:cut]
        val += windows[cut:]
    device = model_device(model)
    if PatchHandle.of(model) is not None:
        raise CalibrationError("calibrate_hidden_sinks patches the model itself; remove the existing patch first")
    positional = Policy() if base is None else base.policy_for(model)
    stock_val = _mean_nll(model, val, device) if base is None else None
    rule = ContentSinks(threshold=threshold, hidden_sink_scale=init_beta)
    policy = Policy(sink_scale=positional.sink_scale, virtual_sink_logit=positional.virtual_sink_logit,
                    virtual_logit_on_sink_rows=positional.virtual_logit_on_sink_rows, n_sink=positional.n_sink,
                    extra_sink_positions=positional.extra_sink_positions, content_sinks=rule)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = sinkfix.patch(model, policy, backend="torch")
    try:
        num_layers = handle.num_layers
        max_heads = max(handle.num_heads())
        theta = torch.full((num_layers, max_heads), math.log(init_beta / (1 - init_beta)), dtype=torch.float64,
                           requires_grad=True)
        optimiser = torch.optim.Adam([theta], lr=lr)
        base_val = _mean_nll(model, val, device)  # positional base alone is not this: init beta applies
        best = (base_val, theta.detach().clone(), 0)
        history = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="hidden-sink beta", leave=False)
        bad = 0
        for step in range(1, steps + 1):
            ids = calib[(step - 1) % len(calib)]
            beta = torch.sigmoid(theta)
            _install(handle, beta)
            logits = model(input_ids=ids[None].to(device), use_cache=False).logits
            nll, n = window_nll(logits, ids[None].to(logits.device))
            loss = nll / max(n, 1) + reg * ((1 - beta) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if bar is not None:
                bar.update(1)
            if step % eval_every == 0 or step == steps:
                _install(handle, torch.sigmoid(theta).detach())
                val_nll = _mean_nll(model, val, device)
                history.append({"step": step, "val_nll": val_nll})
                if val_nll < best[0]:
                    best, bad = (val_nll, theta.detach().clone(), step), 0
                else:
                    bad += 1
                    if bad >= patience:
                        break
        if bar is not None:
            bar.close()
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    fitted = torch.sigmoid(best[1]).detach()
    heads = fitted <= 1 - head_margin
    fitted = torch.where(heads, fitted, torch.ones_like(fitted))
    content = ContentSinks(threshold=threshold, hidden_sink_scale=fitted, heads=heads)
    record = {
        "mode": "content", "threshold": threshold, "protocol": f"{'BOS + ' if bos else 'no BOS, '}{seq_len}-token windows",
        "texts": sorted(texts), "calib_windows": len(calib), "val_windows": len(val), "best_step": best[2],
        "val_nll_init": base_val, "val_nll_best": best[0], "val_nll_stock": stock_val, "history": history,
        "heads_chosen": int(heads.sum()), "heads_total": int(heads.numel()),
    }
    identity = ModelIdentity.of(model)
    if base is None:
        return Profile(identity, torch.ones(identity.num_layers, max(identity.num_heads), dtype=torch.float64),
                       calibration=record, content_sinks=content)
    return Profile(identity, base.sink_scale, base.virtual_sink_logit, base.n_sink, base.extra_sink_positions,
                   base.residual_clip, {**base.calibration, "hidden_sinks": record},
                   virtual_logit_on_sink_rows=base.virtual_logit_on_sink_rows, content_sinks=content)
