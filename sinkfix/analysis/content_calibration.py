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

import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import nn

from sinkfix.analysis.calibration import (CalibrationError, CalibrationSettings, DomainWindows, Parameters, Progress,
                                          calibration_windows, check_finite, domain_windows, parameters_key, split_steps)
from sinkfix.analysis.robust import Candidate, Selection, candidate_parameters, candidates, worst_case_choice
from sinkfix.evaluate import model_device, window_nll
from sinkfix.policy import ContentSinks, Policy
from sinkfix.profile import ModelIdentity, Profile

if TYPE_CHECKING:
    from sinkfix.analysis.calibration import DomainFits

__all__ = ["calibrate_hidden_sinks", "SINK_MODES", "HiddenSettings", "HiddenFit", "HiddenFits", "fit_hidden_domains",
           "ContentCandidate", "content_candidates", "build_content", "select_content", "content_profile",
           "content_key", "ContentScorer", "check_hidden_betas"]


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


# -- domain-robust hidden-sink calibration (``sinkfix calibrate --sinks hidden|combined``) ----------
#
# The same protocol as the positional calibration (sinkfix.analysis.calibration and .robust): every
# domain gets its own fit of the per-head hidden-sink beta (early stopping on its validation
# windows), and the profile is the candidate whose worst held-out domain does best in a
# leave-one-domain-out over the validation windows. The identity is always a candidate and scores
# 0, so the chosen profile never made a held-out calibration domain worse in validation.
#
# ``combined``: each domain's hidden-sink fit is made on top of that domain's own positional fit,
# which stays frozen (not a joint fit: a joint one doubles the parameters of every step for little
# expected gain, and it would make every hidden fit depend on which positional parameters win the
# selection). The candidates then pair the positional rule chosen by the positional selection with
# the hidden fits combined head by head; "positional alone" and the identity are candidates too.

SINK_MODES = ("positional", "hidden", "combined")
# Hidden-sink candidates: one global hidden beta for every head (ACT's rule with a milder beta than
# its 0.4, which made SmolLM2 worse on every built-in domain), and the fits combined head by head.
HIDDEN_GLOBAL_BETAS = (0.8,)
HIDDEN_COMBINATIONS = (("consensus", 1.0), ("mean", 1.0))

ContentParameters = tuple["Parameters | None", "torch.Tensor | None"]  # (positional, hidden beta [L, H])


@dataclass(frozen=True)
class HiddenSettings:
    """Settings of the hidden-sink fits; the window protocol is the positional calibration's
    (:class:`~sinkfix.analysis.calibration.CalibrationSettings`).

    ``steps`` Adam steps in all, split evenly among the domains (as the positional fit does);
    ``head_margin``: heads whose chosen beta is above ``1 - head_margin`` are switched off (their
    correction is too small to matter and would cost the content path)."""

    threshold: float = 0.1
    steps: int = 150
    lr: float = 0.2
    reg: float = 0.01
    init_beta: float = 0.9
    eval_every: int = 5
    patience: int = 3
    head_margin: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not 0.0 < float(self.threshold) < 1.0:
            raise CalibrationError(f"the hidden-sink threshold must lie in (0, 1) (ACT: 0.1), got {self.threshold!r}")
        if not 0.0 < self.init_beta < 1.0:
            raise CalibrationError(f"the starting hidden-sink beta must lie in (0, 1) (beta = sigmoid(theta)), got "
                                   f"{self.init_beta!r}")
        if not 0.0 <= self.head_margin < 1.0:
            raise CalibrationError(f"head_margin must lie in [0, 1), got {self.head_margin!r}")
        if self.steps < 0 or self.eval_every < 1 or self.patience < 1:
            raise CalibrationError("hidden-sink steps must be >= 0, eval_every and patience >= 1")
        check_finite(self.lr, "the hidden-sink learning rate", 0, inclusive=False)
        check_finite(self.reg, "the hidden-sink reg weight", 0, inclusive=True)


def check_hidden_betas(betas: Sequence[float]) -> None:
    """Global hidden-sink betas of a candidate pool must lie in [0, 1)."""
    bad = [b for b in betas if not 0.0 <= b < 1.0]
    if bad:
        raise CalibrationError(f"hidden-sink betas must lie in [0, 1) (1 is the identity, always a candidate), got {bad}")


@dataclass
class HiddenFit:
    """Hidden-sink beta fitted on one domain, and how the fit went (NLLs on its validation windows)."""

    beta: torch.Tensor  # [L, H]; ones = the fit found nothing better than its base
    val_stock: float  # unpatched model
    val_base: float  # the positional base alone (= val_stock without one)
    val_after: float
    best_step: int
    steps_run: int
    history: list = field(default_factory=list)
    windows: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {**self.windows, "val_nll_stock": self.val_stock, "val_nll_base": self.val_base,
                "val_nll_after": self.val_after, "val_ppl_change_vs_base": math.exp(self.val_after - self.val_base) - 1,
                "best_step": self.best_step, "steps_run": self.steps_run, "history": self.history}


@dataclass
class HiddenFits:
    """One hidden-sink fit per domain (``bases``: the positional parameters each was fitted on top
    of, None for ``hidden`` mode)."""

    fits: dict[str, HiddenFit]
    windows: dict[str, DomainWindows]
    settings: CalibrationSettings
    hidden: HiddenSettings
    bases: dict[str, Parameters] | None
    shape: tuple[int, int]
    seconds: float

    @property
    def domains(self) -> list[str]:
        return list(self.fits)

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "hidden": asdict(self.hidden), "shape": list(self.shape),
                "seconds": self.seconds, "combined": self.bases is not None,
                "fits": {d: {**f.record(), "hidden_sink_scale": f.beta.tolist(), "val_nll_stock": f.val_stock}
                         for d, f in self.fits.items()}}

    @classmethod
    def from_dict(cls, data: dict, tokenizer, texts, bases: dict[str, Parameters] | None = None) -> "HiddenFits":
        """The inverse of :meth:`to_dict` (windows cut again from ``texts``; ``bases`` given again)."""
        settings, hidden = CalibrationSettings(**data["settings"]), HiddenSettings(**data["hidden"])
        if bool(data.get("combined")) != (bases is not None):
            raise CalibrationError("saved hidden-sink fits: positional bases must be given exactly for combined fits")
        fits = {d: HiddenFit(torch.tensor(f["hidden_sink_scale"]), f["val_nll_stock"], f["val_nll_base"],
                             f["val_nll_after"], f["best_step"], f["steps_run"], f["history"],
                             {"calib_windows": f["calib_windows"], "val_windows": f["val_windows"]})
                for d, f in data["fits"].items()}
        windows = domain_windows(tokenizer, texts, settings)
        if set(windows) != set(fits):
            raise CalibrationError(f"texts {sorted(windows)} are not the fitted domains {sorted(fits)}")
        return cls(fits, windows, settings, hidden, bases, tuple(data["shape"]), data["seconds"])


def _content_policy(settings: CalibrationSettings, threshold: float, params: ContentParameters) -> Policy:
    """The policy a profile with these parameters applies: the hidden-sink rule on the heads whose
    beta is below 1, and on no other (see :func:`_with_heads`)."""
    positional, hidden = params
    beta, logit = positional if positional is not None else (1.0, None)
    content = None
    if hidden is not None and bool((hidden < 1).any()):
        content = ContentSinks(threshold=threshold, hidden_sink_scale=hidden.double(), heads=hidden < 1)
    return Policy(sink_scale=beta, virtual_sink_logit=logit, content_sinks=content,
                  virtual_logit_on_sink_rows=bool(settings.on_sink_rows and logit is not None))


def content_key(params: ContentParameters, domain: str) -> tuple:
    """Cache key of a parameter set on a domain; a positional-only set has the positional calibration's
    key (:func:`~sinkfix.analysis.calibration.parameters_key`), so its saved scores are reused."""
    positional, hidden = params
    if positional is None:
        positional = (torch.ones(1), None)
    key = parameters_key(positional, domain)
    if hidden is None:
        return key
    return domain, key[1] + "+" + hashlib.sha256(hidden.detach().float().numpy().tobytes()).hexdigest()


class ContentScorer:
    """Validation NLLs of parameter sets, each applied as the policy a profile would carry (patched
    for the call, removed after); ``cache`` maps :func:`content_key` to NLL."""

    def __init__(self, model: nn.Module, settings: CalibrationSettings, threshold: float, cache: dict | None = None,
                 progress: Progress | None = None) -> None:
        self.model, self.settings, self.threshold = model, settings, threshold
        self.cache = {} if cache is None else cache
        self.progress = progress or Progress(0, False)
        self.device = model_device(model)

    def nll(self, params: ContentParameters, domain: str, windows: Sequence[torch.Tensor]) -> float:
        import sinkfix

        key = content_key(params, domain)
        if key not in self.cache:
            total, count = 0.0, 0
            with torch.no_grad(), sinkfix.patch(self.model, _content_policy(self.settings, self.threshold, params),
                                                backend="torch"):
                for ids in windows:
                    logits = self.model(input_ids=ids[None].to(self.device), use_cache=False).logits
                    nll, n = window_nll(logits, ids[None].to(logits.device))
                    total, count = total + float(nll), count + n
                    self.progress.tick()
            self.cache[key] = total / max(count, 1)
        return self.cache[key]


def fit_hidden_domains(model: nn.Module, tokenizer, texts, settings: CalibrationSettings | None = None,
                       hidden: HiddenSettings | None = None, *, bases: Mapping[str, Parameters] | None = None,
                       stock: Mapping[str, float] | None = None, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> HiddenFits:
    """Fit the per-head hidden-sink beta on each domain alone (``hidden.steps`` split evenly).

    ``bases``: per domain, positional (beta, virtual logit) applied, frozen, during that domain's fit
    (``combined`` mode); ``stock``: per domain, the unpatched validation NLL when already known (the
    positional fits record it). A fit that never beats its base on validation is all ones (the
    identity). The model is left as it was found."""
    from sinkfix.patch import PatchHandle, patch

    settings, hidden = settings or CalibrationSettings(), hidden or HiddenSettings()
    if settings.val_fraction <= 0:
        raise CalibrationError("per-domain fits validate on each domain's held-out windows: val_fraction must be > 0")
    windows = domain_windows(tokenizer, texts, settings)
    if bases is not None and set(bases) != set(windows):
        raise CalibrationError(f"positional bases for {sorted(bases)}, texts {sorted(windows)}: they must match")
    if PatchHandle.of(model) is not None:
        raise CalibrationError("hidden-sink calibration patches the model itself; remove the existing patch first")
    say = log or (lambda message: None)
    steps = split_steps(hidden.steps, windows)
    cost = {name: steps[name] + (steps[name] // hidden.eval_every + 2) * len(w.val) for name, w in windows.items()}
    bar = Progress(sum(cost.values()), progress, "fit hidden sinks")
    started = time.perf_counter()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    policy = Policy(virtual_logit_on_sink_rows=settings.on_sink_rows,
                    content_sinks=ContentSinks(threshold=hidden.threshold, hidden_sink_scale=hidden.init_beta))
    handle = patch(model, policy, backend="torch")
    fits = {}
    try:
        shape = (handle.num_layers, max(handle.num_heads()))
        for name, w in windows.items():
            base = None if bases is None else bases[name]
            fits[name] = _fit_hidden(model, handle, w, base, shape, hidden, steps[name], bar,
                                     None if stock is None else stock.get(name))
            f = fits[name]
            say(f"{name}: hidden sinks, best step {f.best_step} of {f.steps_run}, validation NLL {f.val_base:.4f} -> "
                f"{f.val_after:.4f} ({100 * (math.exp(f.val_after - f.val_base) - 1):+.2f}% vs its base)")
    finally:
        handle.remove()
        bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return HiddenFits(fits, windows, settings, hidden, None if bases is None else dict(bases), shape,
                      round(time.perf_counter() - started, 1))


def _fit_hidden(model, handle, windows: DomainWindows, base: Parameters | None, shape, hidden: HiddenSettings,
                steps: int, bar: Progress, stock: float | None) -> HiddenFit:
    device = model_device(model)
    for layer, lp in enumerate(handle.layer_policies()):  # the positional base, frozen
        h = lp.num_heads
        lp.set_parameters(torch.ones(h) if base is None else base[0][layer, :h],
                          None if base is None or base[1] is None else base[1][layer, :h])

    def val_nll(beta: torch.Tensor | None) -> float:
        # beta None: every head off, i.e. no hidden sinks at all. Hidden beta 1 is not the same once
        # the positional beta is below 1: hidden sinks then take no share of the positional sink's
        # freed mass (docs/formulas.md), so "the base alone" is measured with the heads off.
        for lp in handle.layer_policies():
            lp.content.heads = torch.full((lp.num_heads,), beta is not None, dtype=torch.bool)
        if beta is not None:
            _install(handle, beta)
        value = _mean_nll(model, windows.val, device)
        bar.tick(len(windows.val))
        return value

    ones = torch.ones(shape, dtype=torch.float64)
    val_base = val_nll(None)
    if stock is None:
        if base is None:
            stock = val_base
        else:
            for lp in handle.layer_policies():
                lp.set_parameters(torch.ones(lp.num_heads), None)
            stock = val_nll(None)
            for layer, lp in enumerate(handle.layer_policies()):
                lp.set_parameters(base[0][layer, : lp.num_heads],
                                  None if base[1] is None else base[1][layer, : lp.num_heads])
    theta = torch.full(shape, math.log(hidden.init_beta / (1 - hidden.init_beta)), dtype=torch.float64,
                       requires_grad=True)
    optimiser = torch.optim.Adam([theta], lr=hidden.lr)
    best_nll, best_beta, best_step = val_base, ones.float(), 0
    history, stale, step = [{"step": 0, "val_nll": val_base}], 0, 0
    order = [i for _ in range(steps // max(len(windows.calib), 1) + 1) for i in range(len(windows.calib))]
    random.Random(hidden.seed).shuffle(order)
    for step, index in enumerate(order[:steps], start=1):
        ids = windows.calib[index][None].to(device)
        beta = torch.sigmoid(theta)
        for lp in handle.layer_policies():
            lp.content.heads = torch.ones(lp.num_heads, dtype=torch.bool)
        _install(handle, beta)
        logits = model(input_ids=ids, use_cache=False).logits
        nll, n = window_nll(logits, ids.to(logits.device))
        loss = nll / max(n, 1) + hidden.reg * ((1 - beta) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.tick()
        if step % hidden.eval_every and step != steps:
            continue
        current = torch.sigmoid(theta).detach()
        value = val_nll(current)
        history.append({"step": step, "val_nll": value, "beta_mean": float(current.mean()),
                        "beta_min": float(current.min())})
        bar.show(val=f"{value:.4f}", best=f"{best_nll:.4f}")
        if value < best_nll - 1e-5:
            best_nll, best_beta, best_step, stale = value, current.float().clone(), step, 0
        else:
            stale += 1
            if stale >= hidden.patience:
                break
    return HiddenFit(best_beta, stock, val_base, best_nll, best_step, step, history,
                     {"calib_windows": len(windows.calib), "val_windows": len(windows.val)})


@dataclass(frozen=True)
class ContentCandidate:
    """A content-mode candidate: a positional part (a :class:`~sinkfix.analysis.robust.Candidate`
    over the positional fits, or None) and a hidden part (one over the hidden fits, or None)."""

    name: str
    positional: Candidate | None = None
    hidden: Candidate | None = None


CONTENT_IDENTITY = ContentCandidate("identity")


def content_candidates(positional: Candidate | None = None,
                       global_betas: Sequence[float] = HIDDEN_GLOBAL_BETAS,
                       combinations: Sequence[tuple[str, float]] = HIDDEN_COMBINATIONS) -> list[ContentCandidate]:
    """identity; with ``positional`` (combined mode) that rule alone and with each hidden combination;
    without it (hidden mode) each global hidden beta and each hidden combination."""
    check_hidden_betas(global_betas)
    hidden = [c for c in candidates(combinations, global_betas=()) if c.uses_fits]
    out = [CONTENT_IDENTITY]
    if positional is None:
        out += [ContentCandidate(f"hidden global {b:g}", hidden=Candidate(f"global {b:g}", global_beta=float(b)))
                for b in global_betas]
        out += [ContentCandidate(f"hidden {c.name}", hidden=c) for c in hidden]
    else:
        out.append(ContentCandidate(f"positional {positional.name}", positional=positional))
        out += [ContentCandidate(f"positional {positional.name} + hidden {c.name}", positional=positional, hidden=c)
                for c in hidden]
    return out


def build_content(candidate: ContentCandidate, domains: Sequence[str], hidden_fits: HiddenFits,
                  positional_fits: "DomainFits | None" = None) -> ContentParameters:
    """The parameters ``candidate`` stands for, built from the fits of ``domains`` only."""
    shape = hidden_fits.shape
    positional = None
    if candidate.positional is not None and candidate.positional.name != "identity":
        if positional_fits is None:
            raise CalibrationError(f"candidate {candidate.name!r} needs the positional fits")
        positional = candidate_parameters(candidate.positional, [positional_fits.fits[d].parameters for d in domains],
                                          shape)
    hidden = None
    if candidate.hidden is not None:
        hidden = candidate_parameters(candidate.hidden, [(hidden_fits.fits[d].beta, None) for d in domains], shape)[0]
        hidden = _with_heads(hidden, hidden_fits.hidden.head_margin)
    return positional, hidden


def _with_heads(hidden: torch.Tensor, margin: float) -> torch.Tensor:
    """Head selection: a head whose beta is above ``1 - margin`` is switched off (beta exactly 1, and
    the profile's ``heads`` leaves it out). Off is not the same as beta 1 on a corrected head when
    the positional beta is below 1 (docs/formulas.md: hidden sinks then take no share of the
    positional sink's freed mass), so candidates are scored with their heads already chosen."""
    return torch.where(hidden <= 1 - margin, hidden, torch.ones_like(hidden))


def select_content(pool: Sequence[ContentCandidate], domains: Sequence[str],
                   build: Callable[[ContentCandidate, list[str]], ContentParameters],
                   change: Callable[[ContentParameters, str], float]) -> Selection:
    """Leave-one-domain-out selection (as :func:`sinkfix.analysis.robust.select`): each candidate is
    rebuilt without each domain and scored on it; the one whose worst domain changes least wins,
    ties to the earlier one (the identity first)."""
    if len(domains) < 2:
        raise CalibrationError("leave-one-domain-out selection needs at least two domains")

    def score(candidate: ContentCandidate, held_out: str) -> float:
        if candidate.positional is None and candidate.hidden is None:
            return 0.0
        positional, hidden = build(candidate, [d for d in domains if d != held_out])
        if isinstance(hidden, torch.Tensor) and bool((hidden == 1).all()):
            # no head on: the candidate is its positional part alone (the identity, in hidden mode), and is
            # scored as that. Through the content path its fp32 rounding (1e-7) broke the tie the identity
            # wins, and a profile that corrects nothing was reported as the chosen correction
            hidden = None
        if positional is None and hidden is None:
            return 0.0
        return change((positional, hidden), held_out)

    # a ContentCandidate has the name Selection reads. The hidden-sink selection keeps the worst-case
    # rule its leave-one-domain-out tables were measured with (docs/calibration.md)
    return Selection(*worst_case_choice(pool, list(domains), score), rule="worst")  # type: ignore[arg-type]


def content_profile(model: nn.Module, hidden_fits: HiddenFits, positional_fits: "DomainFits | None" = None,
                    positional: Candidate | None = None, domains: Sequence[str] | None = None,
                    pool: Sequence[ContentCandidate] | None = None, *, cache: dict | None = None,
                    score_chosen: bool = True, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> Profile:
    """The content-mode profile chosen by leave-one-domain-out over ``domains`` (default: all).

    Hidden mode: ``positional_fits`` and ``positional`` None. Combined mode: ``positional`` is the
    rule the positional selection chose (:func:`~sinkfix.analysis.calibration.robust_profile`) and
    ``positional_fits`` its per-domain fits. ``cache`` (validation NLLs by :func:`content_key`) may be
    shared between calls. The profile is of mode ``content`` even when the identity or the positional
    part alone wins (every head then off): it records what was calibrated and what was chosen."""
    from sinkfix.analysis.calibration import _check_domains

    names = list(hidden_fits.domains if domains is None else domains)
    unknown = [d for d in names if d not in hidden_fits.fits]
    if unknown:
        raise CalibrationError(f"no hidden-sink fit for domain(s) {', '.join(map(repr, unknown))}")
    if positional_fits is not None:
        _check_domains(positional_fits, names)
    elif len(names) < 2:
        _check_domains(hidden_fits, names)  # the clear error of the positional rule
    if (positional is None) != (positional_fits is None):
        raise CalibrationError("combined mode needs both the positional fits and the positional rule chosen on them")
    pool = list(content_candidates(positional) if pool is None else pool)
    say = log or (lambda message: None)
    settings = hidden_fits.settings
    threshold = hidden_fits.hidden.threshold
    stock = {d: hidden_fits.fits[d].val_stock for d in names}
    bar = Progress(len(pool) * sum(len(hidden_fits.windows[d].val) for d in names), progress, "select")
    scorer = ContentScorer(model, settings, threshold, cache, bar)
    started = time.perf_counter()

    def build(candidate: ContentCandidate, subset: list[str]) -> ContentParameters:
        return build_content(candidate, subset, hidden_fits, positional_fits)

    def change(params: ContentParameters, d: str) -> float:
        return math.exp(scorer.nll(params, d, hidden_fits.windows[d].val) - stock[d]) - 1

    try:
        selection = select_content(pool, names, build, change)
        pos, hid = build(selection.chosen, names)
        final = {d: change((pos, hid), d) if score_chosen else math.nan for d in names}
    finally:
        bar.close()
    say(f"chosen: {selection.chosen.name} (worst held-out domain {100 * selection.worst(selection.chosen.name):+.2f}%)")
    shape = hidden_fits.shape
    if hid is None:
        hid = torch.ones(shape)
    heads = hid < 1  # build_content chose the heads (_with_heads)
    weights = {d: len(hidden_fits.windows[d].val) for d in names}
    total = sum(weights.values())
    before = sum(stock[d] * weights[d] for d in names) / total
    after = sum((stock[d] + math.log1p(final[d])) * weights[d] for d in names) / total
    mode = "combined" if positional_fits is not None else "hidden"
    record = {
        "protocol": settings.protocol(), "sinks": mode, "rule": "robust", "domain_robust": True,
        "texts": {d: {"calib_windows": len(hidden_fits.windows[d].calib), "val_windows": weights[d]} for d in names},
        "nll": {"val_before": before, "val_after": after},
        "ppl_change": {"val": math.exp(after - before) - 1, "val_per_domain": final},
        "hyper": settings.hyper(), "hidden": asdict(hidden_fits.hidden),
        "heads_chosen": int(heads.sum()), "heads_total": int(heads.numel()),
        "fits": {d: hidden_fits.fits[d].record() for d in names},
        "selection": selection.to_dict(),
        "seconds": round(hidden_fits.seconds + time.perf_counter() - started, 1),
    }
    if positional_fits is not None:
        record["positional_fits"] = {d: positional_fits.fits[d].record() for d in names}
    beta, logit = pos if pos is not None else (torch.ones(shape), None)
    return Profile(ModelIdentity.of(model), beta.double(), None if logit is None else logit.double(),
                   calibration=record, virtual_logit_on_sink_rows=bool(settings.on_sink_rows and logit is not None),
                   domain_parameters=None if positional_fits is None else
                   {d: positional_fits.fits[d].parameters for d in names},
                   content_sinks=ContentSinks(threshold=threshold, hidden_sink_scale=hid.double(), heads=heads))
