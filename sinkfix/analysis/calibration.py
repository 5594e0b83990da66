"""Fit per-layer / per-head sink-scaling parameters to next-token NLL, without training the model.

``sinkfix.calibrate(model, tokenizer, texts)`` fits one beta per (attention layer, query head),
``beta = sigmoid(theta)``, and by default one virtual sink logit per head, by Adam on the token-mean
NLL of calibration windows (model weights frozen), plus a pull toward beta = 1::

    loss = NLL + reg * mean_{l,h} (1 - beta_lh)^2

``texts`` is a mapping domain -> text (default: every built-in domain, :data:`sinkfix.texts.DOMAINS`).
Each domain's windows are split into calibration windows and validation windows (its last
``val_fraction``: contiguous, so text the optimiser never saw). Two rules turn them into a profile:

* ``rule="robust"`` (the default): every domain gets its own fit (:func:`fit_domains`: ``steps``
  split evenly among the domains, early stopping on the domain's validation windows), and
  :func:`robust_profile` combines the fits head by head, choosing how by leave-one-domain-out on
  the validation windows so that no domain is traded for another (:mod:`sinkfix.analysis.robust`).
  Needs at least two domains.
* ``rule="pooled"``: one fit on every domain's windows together, early stopping on their pooled
  validation windows (what sinkfix did before; it overfits the kinds of text it was fitted on,
  ``docs/calibration.md``).

A fit keeps the parameters with the best validation NLL (scored every ``eval_every`` steps) and stops
after ``patience`` evaluations without improvement; if nothing beats the unpatched model the fit is
the identity. Gradients reach beta because :class:`~sinkfix.policy.LayerPolicy` bypasses its device
cache for tensors that require grad; the attention path then runs its differentiable route: on the
CPU autograd through the split path, whose fused attention op back-propagates through its own
kernel (:mod:`sinkfix.ops.flash`), elsewhere :mod:`sinkfix.ops.attention_grad` (the fused forward,
a blockwise recompute backward). Neither keeps a (B, H, Q, K) tensor per layer.

The virtual sink logit b_lh is an extra ``exp(b)`` in the softmax denominator with a zero value, a
learned "attend to nothing" option: sink scaling can only move a head away from its sink (beta <= 1);
the virtual logit can also make it more dormant. It starts a fixed distance below each head's typical
row log-sum-exp and below that of row 0 (the sink's own row), measured on a few calibration
windows of the text being fitted, so that it holds ~0.25% of the mass instead of having a vanishing
gradient; it is not regularised (early stopping is).
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from sinkfix.analysis.robust import (DEFAULT_SELECTION_RULE, SELECTION_RULES, Candidate, candidate_parameters, candidates,
                                     select)
from sinkfix.errors import SinkfixError, is_integer, is_real
from sinkfix.evaluate import (bos_token_id, check_positions, decoder_stack, model_device, model_label, token_ids,
                              window_nll)
from sinkfix.policy import Policy
from sinkfix.texts import DOMAINS, domain_text

__all__ = ["calibrate", "fit_domains", "FIT_PRECISIONS", "fit_matmul_dtype", "robust_profile", "calibration_windows",
           "domain_windows", "CalibrationError", "CalibrationSettings", "Calibrator", "require_two_domains",
           "duplicate_texts", "duplicate_windows", "min_seq_len", "check_finite", "tokens_needed", "is_integer",
           "is_real",
           "DomainFit", "DomainFits", "DomainWindows", "Progress", "CALIBRATION_RULES", "parameters_key",
           "check_model_positions", "split_steps"]

CALIBRATION_RULES = ("robust", "pooled")
# The fitting steps' matrix products: "auto" = bfloat16 where the device multiplies it natively
# (measured on this project's 2-core AVX512-BF16 CPU: 4.4x the float32 rate for a 512 x 576 x 1536
# product; on an AVX2-only CPU bfloat16 is emulated and 5.6x slower than float32), else the model's
# own precision. Validation and selection always score at the model's own precision.
FIT_PRECISIONS = ("auto", "bfloat16", "float32")
# Virtual sink logits start this far below the head's reference log-sum-exp: e^-6 = 0.25% of the mass.
_VIRTUAL_INIT_GAP = 6.0
# Windows used to measure each head's reference log-sum-exp for that initialisation (per fit).
_LSE_WINDOWS = 4

Parameters = tuple[torch.Tensor, "torch.Tensor | None"]


class CalibrationError(SinkfixError, ValueError):
    """Calibration cannot run with the given texts or settings."""


@dataclass(frozen=True)
class CalibrationSettings:
    """Every setting of a calibration run; :func:`calibrate` documents each one."""

    seq_len: int = 512
    bos: bool | str = True
    max_tokens: int | None = 8192
    val_fraction: float = 0.25
    steps: int = 150
    lr: float = 0.5
    reg: float = 0.05
    init_beta: float = 0.97
    virtual_logits: bool = True
    virtual_logit_on_sink_rows: bool | None = None
    eval_every: int = 10
    patience: int = 3
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        # every check here runs before any model is loaded (the CLI builds its settings first)
        if self.precision not in FIT_PRECISIONS:
            raise CalibrationError(f"precision must be one of {', '.join(FIT_PRECISIONS)}, got {self.precision!r}")
        if self.bos not in (True, False, "both"):
            raise CalibrationError(f"bos must be True, False or 'both', got {self.bos!r}")
        for name in ("seq_len", "steps", "eval_every", "patience", "seed") + (("max_tokens",) * (self.max_tokens is not None)):
            if not is_integer(getattr(self, name)):
                raise CalibrationError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.seq_len < min_seq_len(self.bos):
            raise CalibrationError(f"seq_len must be >= {min_seq_len(self.bos)} with bos={self.bos!r} (at least two "
                                   f"text tokens per window, one of them predicted from the other), got {self.seq_len}")
        if not is_real(self.init_beta) or not 0 < self.init_beta < 1:
            raise CalibrationError(f"init_beta must lie strictly between 0 and 1, got {self.init_beta}")
        if self.steps < 0 or self.eval_every < 1 or self.patience < 1:
            raise CalibrationError("steps must be >= 0, eval_every and patience >= 1")
        if not is_real(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise CalibrationError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        check_finite(self.lr, "lr (the Adam learning rate)", 0, inclusive=False)
        check_finite(self.reg, "reg (the weight of the pull toward beta = 1)", 0, inclusive=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise CalibrationError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        windows, needed = tokens_needed(self.seq_len, self.bos, self.val_fraction)
        if self.max_tokens is not None and self.max_tokens < needed:
            raise CalibrationError(
                f"max_tokens {self.max_tokens} cannot give a domain the {windows} full {self.seq_len}-token "
                f"window(s) a calibration {'and validation split needs' if windows == 2 else 'needs'}: "
                f"that takes at least {needed} tokens per domain")

    @property
    def windows_needed(self) -> int:
        """Full windows a domain must give: one to fit on, and one to validate on when ``val_fraction > 0``."""
        return tokens_needed(self.seq_len, self.bos, self.val_fraction)[0]

    @property
    def on_sink_rows(self) -> bool:
        """Whether the virtual logits act on the sink's own row: by default only with BOS windows."""
        if self.virtual_logit_on_sink_rows is None:
            return self.bos is True
        return bool(self.virtual_logit_on_sink_rows)

    @property
    def text_tokens(self) -> int:
        """Text tokens per window (the BOS token, when there is one, is not text)."""
        return self.seq_len - int(self.bos is True)

    def protocol(self) -> dict:
        return {"seq_len": self.seq_len, "bos": self.bos, "stride": self.text_tokens, "windows": "non-overlapping"}

    def hyper(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "reg": self.reg, "init_beta": self.init_beta,
                "virtual_logits": self.virtual_logits, "virtual_logit_on_sink_rows": self.on_sink_rows,
                "eval_every": self.eval_every, "patience": self.patience, "val_fraction": self.val_fraction,
                "max_tokens": self.max_tokens, "seed": self.seed, "precision": self.precision}


def check_finite(value, what: str, low: float, *, inclusive: bool, error: type[Exception] = CalibrationError) -> float:
    """A rate or weight checked: a finite real number above ``low`` (or at it, ``inclusive``), else
    ``error`` saying ``what`` must be. Torch refuses a NaN or negative Adam rate only once a model is
    loaded, and an infinite rate or a NaN weight ran a whole fit and failed when the profile was saved."""
    if not (is_real(value) and math.isfinite(value) and (value >= low if inclusive else value > low)):
        raise error(f"{what} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value!r}")
    return float(value)


def tokens_needed(seq_len: int, bos: bool | str, val_fraction: float) -> tuple[int, int]:
    """(full windows a domain must give, the text tokens they take): one window to fit on, one more to
    validate on when ``val_fraction > 0``; a window's BOS token (``bos=True``) is not text."""
    windows = 2 if val_fraction > 0 else 1
    return windows, windows * (seq_len - int(bos is True))


def min_seq_len(bos: bool | str) -> int:
    """The shortest window of the ``bos`` protocol: two text tokens (one predicted from the other),
    plus the BOS token where windows start with it (``bos=True``; ``"both"`` has such windows too)."""
    return 2 + (bos is True or bos == "both")


def calibration_windows(tokenizer, text: str, *, seq_len: int, bos: bool | str,
                        max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping full-length windows (1-D ids) over ``text``; BOS first when ``bos``.

    ``bos="both"`` alternates: even windows start with BOS, odd windows do not, so that one profile
    is fitted for both protocols. The windows tile the text all the same: each takes the next
    ``seq_len - 1`` text tokens when it starts with BOS, the next ``seq_len`` when it does not.
    """
    if bos != "both" and not isinstance(bos, bool):
        raise CalibrationError(f"bos must be True, False or 'both', got {bos!r}")
    if not is_integer(seq_len) or seq_len < min_seq_len(bos):
        raise CalibrationError(f"seq_len must be an integer >= {min_seq_len(bos)} with bos={bos!r}, got {seq_len!r}")
    # no minimum here: a text too short for one window gives none, and domain_windows names it with
    # the tokens a calibration needs (tokenize's own "fewer than 2 tokens" named neither)
    ids = token_ids(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos_id = bos_token_id(tokenizer) if bos else None
    out, start = [], 0
    while True:
        # "both" once took window i from the BOS grid (stride seq_len - 1) or the no-BOS grid (stride
        # seq_len): odd and even windows overlapped and skipped tokens, and at 16 windows of 64, 12
        # tokens were in a calibration window and a validation window alike
        with_bos = bos is True or (bos == "both" and len(out) % 2 == 0)
        body = seq_len - with_bos
        if start + body > ids.numel():
            return out
        chunk = ids[start : start + body]
        if with_bos:
            chunk = torch.cat([torch.tensor([bos_id], dtype=chunk.dtype), chunk])
        out.append(chunk)
        start += body


def check_model_positions(model: nn.Module, seq_len: int, what: str = "seq_len",
                          error: type[Exception] = CalibrationError) -> None:
    """Refuse windows longer than the positions the model's config states, before any fitting:
    past them GPT-2's position table raised an IndexError mid-fit, and a RoPE model fitted on
    garbage without a word (``what`` names the setting in the error)."""
    config = getattr(model, "config", None)
    if config is not None:
        check_positions(seq_len, config, what, model_label(model), error)


# -- windows ------------------------------------------------------------------------------------
class DomainWindows(NamedTuple):
    calib: list[torch.Tensor]  # windows the optimiser sees
    val: list[torch.Tensor]  # the domain's last windows: early stopping and domain-robust selection


def _normalise_texts(texts) -> dict[str, str]:
    if texts is None:
        return {domain: domain_text(domain, "calib") for domain in DOMAINS}
    if isinstance(texts, str):
        return {"text": texts}
    if isinstance(texts, Mapping):
        return dict(texts)
    return {f"text{i}": t for i, t in enumerate(texts)}


def _split(windows: list[torch.Tensor], val_fraction: float, name: str) -> DomainWindows:
    """The last ``val_fraction`` of the windows (rounded, at least one) held out. A share that rounds
    to every window is refused: clamped, it would be a different split than the one asked for and
    recorded."""
    n_val = max(1, round(len(windows) * val_fraction)) if val_fraction > 0 else 0
    if n_val > len(windows) - 1:
        most = (len(windows) - 1) / len(windows)
        raise CalibrationError(
            f"val_fraction (--val-fraction) {val_fraction:g} holds out {n_val} of the {len(windows)} windows of text "
            f"{name!r}, leaving none to fit on; with this text it can hold out at most {len(windows) - 1} "
            f"({most:.3g}): give a smaller val_fraction or more text")
    return DomainWindows(windows[: len(windows) - n_val], windows[len(windows) - n_val :])


def domain_windows(tokenizer, texts, settings: CalibrationSettings) -> dict[str, DomainWindows]:
    """Each domain's calibration and validation windows. A domain too short to give one calibration
    and (with ``val_fraction > 0``) one validation window, or whose windows ``val_fraction`` would
    hold out all of, is a :class:`CalibrationError` naming it."""
    needed = settings.windows_needed
    out = {}
    for name, text in _normalise_texts(texts).items():
        windows = calibration_windows(tokenizer, text, seq_len=settings.seq_len, bos=settings.bos,
                                      max_tokens=settings.max_tokens)
        if len(windows) < needed:
            raise CalibrationError(
                f"text {name!r} is too short: it gives {len(windows)} full {settings.seq_len}-token window(s), and a "
                f"calibration {'and validation split needs' if needed == 2 else 'needs'} at least {needed}, i.e. at "
                f"least {needed * settings.text_tokens} tokens of text ("
                + ("shorter than one window: nothing to fit on)" if not windows else
                   "one window: nothing left to validate on)"))
        out[name] = _split(windows, settings.val_fraction, name)
    return out


# -- the patched model --------------------------------------------------------------------------
class Progress:
    """A tqdm bar counting forward passes (fitting steps and evaluations alike), or nothing."""

    def __init__(self, total: int, enabled: bool, desc: str = "calibrate") -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="win")

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self, interrupted: bool | None = None) -> None:
        """Close the bar; ``interrupted`` None = whether an exception is on its way through the caller's
        ``finally`` (Ctrl-C, an error): then the bar stays where the run stopped."""
        if self.bar is not None:
            if interrupted is None:
                interrupted = sys.exc_info()[0] is not None
            if not interrupted:
                # the total is an upper bound (early stopping, pruned selection): end at what was done;
                # after Ctrl-C this redrew a bar stopped at 42% as 100%
                self.bar.total = self.bar.n
                self.bar.refresh()
            self.bar.close()


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (so faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(probe()) if probe is not None else False
        except RuntimeError:  # a build without oneDNN
            return False
    return False


def fit_matmul_dtype(model: nn.Module, precision: str) -> torch.dtype | None:
    """The autocast dtype of the fitting steps for ``precision`` (:data:`FIT_PRECISIONS`), or None
    for the model's own precision. Only a float32 model is autocast: a model already in a 16-bit
    dtype fits in it."""
    if precision not in FIT_PRECISIONS:
        raise CalibrationError(f"precision must be one of {', '.join(FIT_PRECISIONS)}, got {precision!r}")
    param = next(model.parameters(), None)
    if precision == "float32" or param is None or param.dtype != torch.float32:
        return None
    native = bf16_native(param.device)
    if precision == "auto" and not native:
        return None
    if not native:  # asked for by name: do it, but say what it costs
        warnings.warn(f"{param.device} does not multiply bfloat16 natively: emulated bfloat16 fitting steps are far "
                      "slower than float32 (one 512 x 576 x 1536 product, one thread of an AVX2 CPU: 727 ms against "
                      "17 ms); precision 'auto' fits in float32 here", stacklevel=2)
    return torch.bfloat16


def precision_name(model: nn.Module, matmul_dtype: torch.dtype | None) -> str:
    """What a record says of the fitting steps' products: "bfloat16" (autocast) or the model's dtype."""
    if matmul_dtype is not None:
        return str(matmul_dtype).removeprefix("torch.")
    param = next(model.parameters(), None)
    return "float32" if param is None else str(param.dtype).removeprefix("torch.")


class Calibrator:
    """A model patched for calibration: weights frozen, parameters set per call, everything
    restored on exit (weights' ``requires_grad``, and any patch the model carried before).

    ``matmul_dtype`` (e.g. ``torch.bfloat16``) runs the differentiable fitting steps
    (:meth:`step_nll`) under ``torch.autocast``: the model's matrix products in that dtype, attention
    and the NLL at full precision. Scoring (:meth:`nll`) always runs at the model's own precision,
    so every choice made from validation scores is made on exact numbers."""

    def __init__(self, model: nn.Module, on_sink_rows: bool, progress: Progress | None = None,
                 matmul_dtype: torch.dtype | None = None) -> None:
        self.model, self.on_sink_rows = model, on_sink_rows
        self.progress = progress or Progress(0, False)
        self.device = model_device(model)
        self.matmul_dtype = matmul_dtype

    def __enter__(self) -> "Calibrator":
        from sinkfix.patch import patch

        self._frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)
        self.handle = patch(self.model, Policy(virtual_logit_on_sink_rows=self.on_sink_rows))
        self.shape = (self.handle.num_layers, max(self.handle.num_heads()))
        return self

    def __exit__(self, *exc) -> None:
        # leaving the calibration patch as a with block does: the user's own patch (the very handle,
        # with its backend, observers and monitor) back in force, not a new patch of its policy, which
        # left the user's handle stale (its remove() and its with block no longer unpatched the model)
        self.handle.__exit__(*exc)
        for p, flag in self._frozen:
            p.requires_grad_(flag)

    def set(self, beta: torch.Tensor, logit: torch.Tensor | None) -> None:
        """Install beta [L, H] (and virtual logits) on the live layer policies."""
        for layer, lp in enumerate(self.handle.layer_policies()):
            h = lp.num_heads
            lp.set_parameters(beta[layer, :h], None if logit is None else logit[layer, :h])

    def identity(self) -> None:
        self.set(torch.ones(self.shape), None)

    @torch.no_grad()
    def nll(self, windows: Sequence[torch.Tensor]) -> float:
        """Token-mean next-token NLL over ``windows`` with the parameters currently set."""
        total, count = 0.0, 0
        for ids in windows:
            logits = self.model(input_ids=ids[None].to(self.device), use_cache=False).logits
            nll, n = window_nll(logits, ids[None].to(logits.device))
            total += float(nll)
            count += n
            self.progress.tick()
        return total / max(count, 1)

    def nll_with(self, params: Parameters, windows: Sequence[torch.Tensor]) -> float:
        self.set(*params)
        return self.nll(windows)

    def step_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Token-mean NLL of one window, differentiable in whatever parameters are set."""
        ids = ids[None].to(self.device)
        with torch.autocast(self.device.type, dtype=self.matmul_dtype or torch.bfloat16,
                            enabled=self.matmul_dtype is not None):
            logits = self.model(input_ids=ids, use_cache=False).logits
        nll, count = window_nll(logits, ids)  # bfloat16 logits under autocast: the NLL upcasts row chunks
        return nll / max(count, 1)

    @torch.no_grad()
    def reference_lse(self, windows: Sequence[torch.Tensor]) -> torch.Tensor:
        """[L, H] per head: min(mean log-sum-exp of rows i >= 1, log-sum-exp of row 0), averaged over windows.

        With ``virtual_logit_on_sink_rows`` the virtual logit reaches row 0 too: the sink's own row, which
        sink scaling leaves alone because every later layer reads the sink's representation. In ~10% of
        SmolLM2's heads row 0's log-sum-exp lies more than 6 nats below the mean row's; a logit placed from
        the mean alone then takes most of that row at the start, and without BOS (row 0 = a real word)
        validation perplexity rose 9% within 10 steps and never recovered.
        """
        self.identity()
        sums = torch.zeros(self.shape, dtype=torch.float64)
        counts = torch.zeros(self.shape[0], dtype=torch.float64)

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

        stack = decoder_stack(self.model)
        with self.handle.observing(observer):
            for ids in windows:
                stack(input_ids=ids[None].to(self.device), use_cache=False)
                self.progress.tick()
        return (sums / counts.clamp(min=1)[:, None]).float()


# -- one fit ------------------------------------------------------------------------------------
@dataclass
class DomainFit:
    """Parameters fitted on one set of calibration windows, and how the fit went."""

    beta: torch.Tensor  # [L, H]
    logit: torch.Tensor | None  # [L, H]
    val_before: float  # validation NLL of the unpatched model (NaN without validation windows)
    val_after: float  # validation NLL of these parameters
    best_step: int
    steps_run: int
    history: list[dict] = field(default_factory=list)
    windows: dict = field(default_factory=dict)  # {"calib_windows": n, "val_windows": n}

    @property
    def parameters(self) -> Parameters:
        return self.beta, self.logit

    def record(self) -> dict:
        """JSON-ready; a fit without validation windows has no validation NLL: null, not NaN (which
        a profile cannot be saved with)."""
        validated = self.val_before == self.val_before
        change = math.exp(self.val_after - self.val_before) - 1 if validated else None
        history = [{k: None if isinstance(v, float) and v != v else v for k, v in h.items()} for h in self.history]
        return {**self.windows, "val_nll_before": self.val_before if validated else None,
                "val_nll_after": self.val_after if validated else None,
                "val_ppl_change": change, "best_step": self.best_step, "steps_run": self.steps_run,
                "history": history}


def _initial(cal: Calibrator, windows: DomainWindows, settings: CalibrationSettings) -> Parameters:
    """theta = logit(init_beta) everywhere; virtual logits _VIRTUAL_INIT_GAP below each head's reference."""
    theta = torch.full(cal.shape, math.log(settings.init_beta / (1 - settings.init_beta)), requires_grad=True)
    if not settings.virtual_logits:
        return theta, None
    lse = cal.reference_lse(windows.calib[:_LSE_WINDOWS])
    return theta, (lse - _VIRTUAL_INIT_GAP).clone().requires_grad_(True)


def _fit(cal: Calibrator, windows: DomainWindows, settings: CalibrationSettings, steps: int,
         say: Callable[[str], None], name: str = "") -> DomainFit:
    """Adam on theta (beta = sigmoid(theta)) and the virtual logits, one calibration window per step;
    the parameters with the best validation NLL are kept (early stopping)."""
    theta, logit = _initial(cal, windows, settings)
    optimiser = torch.optim.Adam([theta] + ([logit] if logit is not None else []), lr=settings.lr)
    cal.identity()
    val_before = cal.nll(windows.val) if windows.val else float("nan")
    best = DomainFit(torch.ones(cal.shape), None, val_before, val_before, 0, 0, [{"step": 0, "val_nll": val_before}],
                     {"calib_windows": len(windows.calib), "val_windows": len(windows.val)})
    order = _window_order(len(windows.calib), steps, settings.seed)
    stale, running, step = 0, [], 0
    for step, index in enumerate(order, start=1):
        running.append(_step(cal, optimiser, theta, logit, windows.calib[index], settings.reg))
        if not windows.val or (step % settings.eval_every and step != steps):
            continue
        best, improved = _validate(cal, theta, logit, windows.val, best, running, step, name)
        running, stale = [], 0 if improved else stale + 1
        if stale >= settings.patience:
            say(f"{name + ': ' if name else ''}early stop at step {step}: validation NLL has not improved "
                f"for {settings.patience} evaluations")
            break
    if not windows.val:  # no validation split: keep the last parameters
        best = replace(best, beta=torch.sigmoid(theta).detach(), logit=None if logit is None else logit.detach(),
                       best_step=step)
    return replace(best, steps_run=step)


def _window_order(n_windows: int, steps: int, seed: int) -> list[int]:
    """The calibration window of each step: every window once per pass, shuffled, passes repeated."""
    rng, order = random.Random(seed), []
    while len(order) < steps:
        block = list(range(n_windows))
        rng.shuffle(block)
        order += block[::-1]  # popped from the end, as the loop always took them
    return order[:steps]


def _step(cal: Calibrator, optimiser, theta: torch.Tensor, logit: torch.Tensor | None, ids: torch.Tensor,
          reg: float) -> float:
    """One Adam step on one window; returns its NLL (before the step)."""
    beta = torch.sigmoid(theta)
    cal.set(beta, logit)
    nll = cal.step_nll(ids)
    loss = nll + reg * ((1 - beta) ** 2).mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    cal.progress.tick()
    return float(nll.detach())


def _validate(cal: Calibrator, theta, logit, val: list[torch.Tensor], best: DomainFit, running: list[float],
              step: int, name: str) -> tuple[DomainFit, bool]:
    """Score the current parameters on the validation windows; keep them when they are the best so far."""
    params = torch.sigmoid(theta).detach(), None if logit is None else logit.detach()
    val_nll = cal.nll_with(params, val)
    best.history.append({"step": step, "val_nll": val_nll, "train_nll": sum(running) / len(running),
                         "beta_mean": float(params[0].mean()), "beta_min": float(params[0].min())})
    cal.progress.show(fit=name, val=f"{val_nll:.4f}", best=f"{best.val_after:.4f}")
    if val_nll < best.val_after - 1e-5:
        return replace(best, beta=params[0].clone(), logit=None if params[1] is None else params[1].clone(),
                       val_after=val_nll, best_step=step), True
    return best, False


def _fit_cost(windows: DomainWindows, settings: CalibrationSettings, steps: int) -> int:
    """Forward passes one fit takes at most (for the progress bar)."""
    lse = min(_LSE_WINDOWS, len(windows.calib)) if settings.virtual_logits else 0
    evals = (steps // settings.eval_every + 2) * len(windows.val)
    return lse + steps + evals


# -- per-domain fits ----------------------------------------------------------------------------
@dataclass
class DomainFits:
    """One fit per calibration domain, and what :func:`robust_profile` needs to combine any subset."""

    fits: dict[str, DomainFit]
    windows: dict[str, DomainWindows]
    settings: CalibrationSettings
    seconds: float
    shape: tuple[int, int]
    #: the fitting steps' matrix products ("bfloat16" under autocast, else the model's dtype); fits
    #: saved before the option existed were float32
    fit_precision: str = "float32"

    @property
    def domains(self) -> list[str]:
        return list(self.fits)

    def to_dict(self) -> dict:
        """JSON-ready: settings, shape, seconds and every fit (parameters as nested lists)."""
        return {"settings": asdict(self.settings), "shape": list(self.shape), "seconds": self.seconds,
                "fit_precision": self.fit_precision,
                "fits": {d: {**f.record(), "sink_scale": f.beta.tolist(),
                             "virtual_sink_logit": None if f.logit is None else f.logit.tolist()}
                         for d, f in self.fits.items()}}

    @classmethod
    def from_dict(cls, data: dict, tokenizer, texts=None) -> "DomainFits":
        """The inverse of :meth:`to_dict`; the windows are cut again from ``texts`` (same settings),
        by default the fitted domains' built-in calibration texts."""
        # fits saved before ``precision`` existed ran every step in float32
        settings = CalibrationSettings(**{"precision": "float32", **data["settings"]})
        fits = {}
        for d, f in data["fits"].items():
            logit = f["virtual_sink_logit"]
            fits[d] = DomainFit(torch.tensor(f["sink_scale"]), None if logit is None else torch.tensor(logit),
                                f["val_nll_before"], f["val_nll_after"], f["best_step"], f["steps_run"], f["history"],
                                {"calib_windows": f["calib_windows"], "val_windows": f["val_windows"]})
        if texts is None:
            texts = {d: domain_text(d, "calib") for d in fits}
        windows = domain_windows(tokenizer, texts, settings)
        if set(windows) != set(fits):
            raise CalibrationError(f"texts {sorted(windows)} are not the fitted domains {sorted(fits)}")
        return cls(fits, windows, settings, data["seconds"], tuple(data["shape"]),
                   data.get("fit_precision", "float32"))


def split_steps(steps: int, names: Iterable[str]) -> dict[str, int]:
    """``steps`` split evenly among the domains ``names``, the first ``steps % n`` taking one more:
    with ``steps // n`` each, 20 steps among 3 domains ran 18, unsaid."""
    names = list(names)
    per, extra = divmod(steps, max(len(names), 1))
    return {name: per + (i < extra) for i, name in enumerate(names)}


def fit_domains(model: nn.Module, tokenizer, texts=None, settings: CalibrationSettings | None = None, *,
                progress: bool = True, log: Callable[[str], None] | None = None) -> DomainFits:
    """Fit each domain on its own (``settings.steps`` split evenly among the domains: :func:`split_steps`).

    Every domain needs validation windows: they stop its fit early, and :func:`robust_profile` scores
    the other domains' fits on them. The model is left as it was found.
    """
    settings = settings or CalibrationSettings()
    if settings.val_fraction <= 0:
        raise CalibrationError("per-domain fits validate on each domain's held-out windows: val_fraction must be > 0")
    texts = _normalise_texts(texts)
    if 0 < settings.steps < len(texts):
        warnings.warn(f"steps={settings.steps} split evenly among {len(texts)} domains leaves {len(texts) - settings.steps} "
                      "of them 0 steps: their fits are the identity", stacklevel=2)
    check_model_positions(model, settings.seq_len)
    windows = domain_windows(tokenizer, texts, settings)
    warn_duplicate_texts(texts, windows)
    steps = split_steps(settings.steps, windows)
    say = log or (lambda message: None)
    bar = Progress(sum(_fit_cost(w, settings, steps[name]) for name, w in windows.items()), progress, "fit per domain")
    matmul_dtype = fit_matmul_dtype(model, settings.precision)
    precision = precision_name(model, matmul_dtype)
    say(f"fitting steps: {precision} matrix products; validation at the model's precision")
    started = time.perf_counter()
    fits = {}
    try:
        with Calibrator(model, settings.on_sink_rows, bar, matmul_dtype) as cal:
            for name, w in windows.items():
                fits[name] = _fit(cal, w, settings, steps[name], say, name)
                fit = fits[name]
                say(f"{name}: best step {fit.best_step} of {fit.steps_run}, validation NLL {fit.val_before:.4f} -> "
                    f"{fit.val_after:.4f} ({100 * (math.exp(fit.val_after - fit.val_before) - 1):+.2f}%)")
            shape = cal.shape
    finally:
        bar.close()
    return DomainFits(fits, windows, settings, round(time.perf_counter() - started, 1), shape, precision)


def duplicate_texts(texts: Mapping[str, str]) -> list[tuple[str, str]]:
    """Pairs (first, copy) of domains whose texts are identical: the same file given twice, say."""
    first: dict[str, str] = {}
    pairs = []
    for name, text in texts.items():
        if isinstance(text, str) and text in first:
            pairs.append((first[text], name))
        elif isinstance(text, str):
            first[text] = name
    return pairs


#: a domain whose token runs of this length (fewer in short windows) are mostly another domain's is that
#: domain's text again: runs, not whole windows, so a copy shifted by one token (a leading space or blank
#: line moves every window's cut) is still seen
DUPLICATE_RUN_TOKENS = 32
#: the share of the smaller domain's distinct runs that must recur in the other: a shifted copy shares
#: all but the runs that cross a window cut (99.6-99.99% on the built-in domains with SmolLM2's and
#: Gemma3's tokenizers); no 32-token run of one built-in domain recurs in another
DUPLICATE_RUN_SHARE = 0.8


def _token_runs(windows: DomainWindows, length: int) -> set[bytes]:
    runs: set[bytes] = set()
    for w in (*windows.calib, *windows.val):
        # without the first token, a BOS in every window: in a short periodic text, runs from BOS
        # (one per window phase) outnumbered the text's own and hid a shifted copy
        ids = w.reshape(-1)[1:].to(torch.int64)
        if ids.numel() >= length:
            # each run's bytes: an exact key (no hash collisions to reason about)
            runs.update(r.numpy().tobytes() for r in ids.unfold(0, length, 1))
    return runs


class Duplicate(NamedTuple):
    """Two domains of which one repeats the other: ``copy`` is ``first`` again (both ways) or is
    contained in it; ``share``: of ``copy``'s distinct token runs, how many recur in ``first``."""

    first: str
    copy: str
    share: float
    contained: bool  # copy's runs recur in first, not the other way round (a part of a longer text)


def duplicate_windows(windows: Mapping[str, DomainWindows]) -> list[Duplicate]:
    """Pairs of domains where at least :data:`DUPLICATE_RUN_SHARE` of the smaller one's distinct
    :data:`DUPLICATE_RUN_TOKENS`-token runs in its calibration and validation windows recur in the
    other's: one text twice as far as a calibration reads it, though the strings differ (a trailing
    newline, text past ``max_tokens``, one leading space that shifts every window), or one text a part
    of another, which :func:`duplicate_texts` does not see."""
    shortest = min((w.numel() - 1 for d in windows.values() for w in (*d.calib, *d.val)), default=0)
    length = max(2, min(DUPLICATE_RUN_TOKENS, shortest // 2))
    runs = {name: _token_runs(w, length) for name, w in windows.items()}
    names = list(runs)
    found = []
    for j, later in enumerate(names):
        for earlier in names[:j]:
            if not runs[earlier] or not runs[later]:
                continue
            shared = len(runs[earlier] & runs[later])
            of_later, of_earlier = shared / len(runs[later]), shared / len(runs[earlier])
            if max(of_later, of_earlier) < DUPLICATE_RUN_SHARE:
                continue
            if of_later >= DUPLICATE_RUN_SHARE and of_earlier >= DUPLICATE_RUN_SHARE:
                found.append(Duplicate(earlier, later, of_later, contained=False))
            elif of_later >= DUPLICATE_RUN_SHARE:  # the later text is a part of the earlier one
                found.append(Duplicate(earlier, later, of_later, contained=True))
            else:
                found.append(Duplicate(later, earlier, of_earlier, contained=True))
    return found


def warn_duplicate_texts(texts: Mapping[str, str], windows: Mapping[str, DomainWindows] | None = None) -> None:
    """A warning naming domains that are one text twice: each would be validated (and, left out, scored) on
    its own copy's fit, which makes the domain-robust selection and leave-one-domain-out meaningless for them.
    With ``windows`` (:func:`domain_windows` of ``texts``) the windows are compared, not the strings."""
    if windows is None:
        named = "; ".join(f"{b!r} is {a!r} again" for a, b in duplicate_texts(texts))
    else:
        named = "; ".join(f"{d.copy!r} is {'a part of ' if d.contained else ''}{d.first!r}{'' if d.contained else ' again'}"
                          for d in duplicate_windows(windows))
    if named:
        warnings.warn(f"one calibration text given twice: {named}; each copy's fit is scored on the "
                      "other copy, so the domain-robust selection treats one text as two domains", stacklevel=3)


# -- from fits to a profile ---------------------------------------------------------------------
def require_two_domains(names: Sequence[str]) -> None:
    """The robust rule's precondition, as the one clear error (before any model is loaded, in the CLI)."""
    if len(names) < 2:
        raise CalibrationError(
            f"domain-robust calibration scores each domain's fit on the other domains' validation windows, so it "
            f"needs at least two domains; {'only ' + repr(names[0]) + ' is' if names else 'no domain is'} left to "
            "calibrate on. Add text of another kind, or use rule='pooled' (--rule pooled; not domain-robust)")


def _check_domains(fits: DomainFits, domains: Sequence[str] | None) -> list[str]:
    names = list(fits.domains if domains is None else domains)
    unknown = [d for d in names if d not in fits.fits]
    if unknown:
        raise CalibrationError(f"no fit for domain(s) {', '.join(map(repr, unknown))}; "
                               f"fitted: {', '.join(fits.domains)}")
    require_two_domains(names)
    return names


def _ppl_change(nll: float, before: float) -> float:
    return math.exp(nll - before) - 1


def parameters_key(params: Parameters, domain: str) -> tuple:
    beta, logit = params
    digest = hashlib.sha256(beta.detach().float().numpy().tobytes())
    if logit is not None:
        digest.update(logit.detach().float().numpy().tobytes())
    return domain, digest.hexdigest()


def robust_profile(model: nn.Module, fits: DomainFits, domains: Sequence[str] | None = None,
                   pool: Sequence[Candidate] | None = None, *, progress: bool = True,
                   log: Callable[[str], None] | None = None, cache: dict | None = None, score_chosen: bool = True,
                   selection_rule: str = DEFAULT_SELECTION_RULE):
    """Combine the fits of ``domains`` (default: all) into one profile, chosen by leave-one-domain-out.

    Each candidate of ``pool`` (default :func:`sinkfix.analysis.robust.candidates`) is scored on
    every held-out domain and chosen by ``selection_rule`` (:func:`sinkfix.analysis.robust.select`:
    ``safe-mean``, the default, or ``worst``); the winner is rebuilt from every domain's fit.
    Returns a :class:`~sinkfix.profile.Profile` that also carries the per-domain fits.
    ``cache`` (a dict, kept by the caller) remembers validation NLLs by parameters and domain, so that
    rebuilding profiles for several subsets of the same fits (:mod:`sinkfix.analysis.lodo`) scores
    each parameter set once. ``score_chosen=False`` skips scoring the chosen parameters on every
    domain's validation windows (the record's per-domain changes are then NaN): leave-one-domain-out
    evaluation scores the rebuilt profile on the held-out domain's evaluation text instead.
    """
    from sinkfix.profile import ModelIdentity, Profile

    names = _check_domains(fits, domains)
    pool = list(candidates() if pool is None else pool)
    say = log or (lambda message: None)
    val = {d: fits.windows[d].val for d in names}
    stock = {d: fits.fits[d].val_before for d in names}
    n_val = sum(len(v) for v in val.values())
    cache = {} if cache is None else cache
    bar = Progress((len(pool) + 1) * n_val, progress, "select")  # at most: pruning skips most (robust.select)
    started = time.perf_counter()
    try:
        with Calibrator(model, fits.settings.on_sink_rows, bar) as cal:
            def change(params: Parameters, domain: str) -> float:
                key = parameters_key(params, domain)
                if key not in cache:
                    cache[key] = cal.nll_with(params, val[domain])
                return _ppl_change(cache[key], stock[domain])

            selection = select(pool, {d: fits.fits[d].parameters for d in names}, cal.shape, change,
                               rule=selection_rule)
            beta, logit = candidate_parameters(selection.chosen, [fits.fits[d].parameters for d in names], cal.shape)
            final = {d: change((beta, logit), d) if score_chosen else math.nan for d in names}
            identity = ModelIdentity.of(model)
    finally:
        bar.close()
    say(selection.summary())
    record = _record(fits.settings, fits.windows, names, "robust", final, stock, val,
                     round(fits.seconds + time.perf_counter() - started, 1))
    record["fits"] = {d: fits.fits[d].record() for d in names}
    record["fit_precision"] = fits.fit_precision
    record["selection"] = selection.to_dict()
    return Profile(identity, beta.double(), None if logit is None else logit.double(), calibration=record,
                   virtual_logit_on_sink_rows=bool(fits.settings.on_sink_rows and logit is not None),
                   domain_parameters={d: fits.fits[d].parameters for d in names})


def _record(settings: CalibrationSettings, windows: Mapping[str, DomainWindows], names: Sequence[str], rule: str,
            change: Mapping[str, float], stock: Mapping[str, float], val: Mapping[str, list], seconds: float) -> dict:
    """What a profile remembers of its calibration: protocol, texts, rule, validation changes per domain.

    Without validation windows (the pooled rule with ``val_fraction=0``) there is nothing to score:
    the NLLs and changes are null (JSON has no NaN) and ``"validation"`` says why."""
    weights = {d: len(val[d]) for d in names}
    total = sum(weights.values())
    record = {
        "protocol": settings.protocol(),
        "texts": {d: {"calib_windows": len(windows[d].calib), "val_windows": len(windows[d].val)} for d in names},
        "rule": rule,
        "domain_robust": rule == "robust",
    }
    if total == 0:
        record["validation"] = "none: val_fraction 0, early stopping off, the last step's parameters kept"
        record["nll"] = {"val_before": None, "val_after": None}
        record["ppl_change"] = {"val": None, "val_per_domain": {d: None for d in names}}
    else:
        before = sum(stock[d] * weights[d] for d in names) / total
        after = sum((stock[d] + math.log1p(change[d])) * weights[d] for d in names) / total
        record["nll"] = {"val_before": before, "val_after": after}
        record["ppl_change"] = {"val": math.exp(after - before) - 1, "val_per_domain": dict(change)}
    return {**record, "hyper": settings.hyper(), "seconds": seconds}


def _pooled_profile(model: nn.Module, tokenizer, texts, settings: CalibrationSettings, progress: bool,
                    say: Callable[[str], None]):
    """One fit on every domain's windows together (``rule="pooled"``)."""
    from sinkfix.profile import ModelIdentity, Profile

    check_model_positions(model, settings.seq_len)
    windows = domain_windows(tokenizer, texts, settings)
    pooled = DomainWindows([w for d in windows.values() for w in d.calib], [w for d in windows.values() for w in d.val])
    if not pooled.val:
        say("no validation windows (val_fraction=0): early stopping is off")
    bar = Progress(_fit_cost(pooled, settings, settings.steps) + len(pooled.val), progress)
    matmul_dtype = fit_matmul_dtype(model, settings.precision)
    started = time.perf_counter()
    try:
        with Calibrator(model, settings.on_sink_rows, bar, matmul_dtype) as cal:
            fit = _fit(cal, pooled, settings, settings.steps, say)
            cal.identity()
            stock = {d: cal.nll(w.val) if w.val else float("nan") for d, w in windows.items()}
            after = {d: cal.nll_with(fit.parameters, w.val) if w.val else float("nan") for d, w in windows.items()}
            identity = ModelIdentity.of(model)
    finally:
        bar.close()
    say(f"best step {fit.best_step} of {fit.steps_run}: validation NLL {fit.val_before:.4f} -> {fit.val_after:.4f}")
    names = list(windows)
    record = _record(settings, windows, names, "pooled", {d: _ppl_change(after[d], stock[d]) for d in names}, stock,
                     {d: w.val for d, w in windows.items()}, round(time.perf_counter() - started, 1))
    record["fits"] = {"pooled": fit.record()}
    record["fit_precision"] = precision_name(model, matmul_dtype)
    return Profile(identity, fit.beta.double(), None if fit.logit is None else fit.logit.double(), calibration=record,
                   virtual_logit_on_sink_rows=bool(settings.on_sink_rows and fit.logit is not None))


def calibrate(
    model: nn.Module,
    tokenizer,
    texts: str | Sequence[str] | Mapping[str, str] | None = None,
    *,
    rule: str = "robust",
    seq_len: int = 512,
    bos: bool | str = True,
    max_tokens: int | None = 8192,
    val_fraction: float = 0.25,
    steps: int = 150,
    lr: float = 0.5,
    reg: float = 0.05,
    init_beta: float = 0.97,
    virtual_logits: bool = True,
    virtual_logit_on_sink_rows: bool | None = None,
    eval_every: int = 10,
    patience: int = 3,
    seed: int = 0,
    precision: str = "auto",
    pool: Sequence[Candidate] | None = None,
    selection_rule: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **deprecated,
):
    """Fit per-head sink scaling (and optionally virtual sink logits) on ``texts``; return a Profile.

    Args:
        texts: a mapping domain -> text (one string or a list are one or several unnamed domains);
            None = every built-in domain's calibration text (:data:`sinkfix.texts.DOMAINS`).
        rule: "robust" (default: a fit per domain, combined by leave-one-domain-out selection; needs
            two or more domains) or "pooled" (one fit on everything; not domain-robust). Module
            docstring; the measurements behind the default are in docs/calibration.md.
        seq_len / bos: the window protocol (BOS first when ``bos``; ``"both"`` alternates windows
            with and without BOS); windows do not overlap.
        max_tokens: text tokens used per domain (calibration + validation). The default 8192 is 16
            windows of 512 per domain, 12 fitted + 4 validation.
        val_fraction: share of each domain's windows (its last ones) held out for validation.
        steps: Adam steps in all, one calibration window per step (cycled, shuffled); the robust
            rule gives each domain an equal share.
        lr: Adam learning rate on theta (beta = sigmoid(theta)) and on the virtual logits.
        reg: weight of the pull toward beta = 1, ``reg * mean (1 - beta)^2``.
        init_beta: starting beta of every head (theta = logit(init_beta)).
        virtual_logit_on_sink_rows: whether the virtual logits also act on the sink's own row (see
            :class:`~sinkfix.policy.Policy`); None = only when every window starts with BOS (that
            row is then the BOS token, not text; docs/calibration.md compares both).
        eval_every / patience: validation schedule and early stopping of each fit.
        seed: the order of the calibration windows.
        precision: the fitting steps' matrix products (:data:`FIT_PRECISIONS`): "auto" (default)
            = bfloat16 under ``torch.autocast`` where the device multiplies bfloat16 natively (CPUs
            with AVX512-BF16 or AMX, CUDA GPUs that support it) and the model is float32, else the
            model's precision; "bfloat16" forces it, "float32" turns it off. Attention, the NLL,
            validation and selection stay at the model's precision (docs/calibration.md, "Fitting in
            bfloat16").
        pool: the robust rule's candidates (default :func:`sinkfix.analysis.robust.candidates`).
        selection_rule: how the robust rule chooses among them (:data:`sinkfix.analysis.robust.SELECTION_RULES`):
            None or "safe-mean" (the default: the best mean held-out change among the candidates
            that made no held-out domain worse) or "worst" (the best worst held-out domain; the
            default before 2026-12-03). The pooled rule makes no selection and refuses one.

    The model is left as it was found (weights untouched, any previous patch restored). The
    returned profile's ``calibration`` entry records the protocol, the rule, the validation NLLs per
    domain and, for the robust rule, every fit and every candidate's score.
    """
    if "virtual_on_sink_rows" in deprecated:
        warnings.warn("calibrate(virtual_on_sink_rows=...) is deprecated; use virtual_logit_on_sink_rows",
                      FutureWarning, stacklevel=2)
        virtual_logit_on_sink_rows = deprecated.pop("virtual_on_sink_rows")
    if deprecated:
        raise TypeError(f"calibrate() got unexpected keyword arguments {sorted(deprecated)}")
    if rule not in CALIBRATION_RULES:
        raise CalibrationError(f"rule must be one of {', '.join(CALIBRATION_RULES)}, got {rule!r}")
    if rule == "pooled" and selection_rule is not None:
        raise CalibrationError("selection_rule chooses among the robust rule's candidates; rule='pooled' makes no "
                               "selection (drop selection_rule, or use rule='robust')")
    selection_rule = DEFAULT_SELECTION_RULE if selection_rule is None else selection_rule
    if selection_rule not in SELECTION_RULES:
        raise CalibrationError(f"selection_rule must be one of {', '.join(SELECTION_RULES)}, got {selection_rule!r}")
    settings = CalibrationSettings(seq_len, bos, max_tokens, val_fraction, steps, lr, reg, init_beta, virtual_logits,
                                   virtual_logit_on_sink_rows, eval_every, patience, seed, precision)
    say = log or (lambda message: None)
    if rule == "pooled":
        return _pooled_profile(model, tokenizer, texts, settings, progress, say)
    require_two_domains(list(_normalise_texts(texts)))
    fits = fit_domains(model, tokenizer, texts, settings, progress=progress, log=log)
    return robust_profile(model, fits, pool=pool, progress=progress, log=log, selection_rule=selection_rule)
