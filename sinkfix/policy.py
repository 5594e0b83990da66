"""Correction policies: what sinkfix does to each attention layer and head, and to the residual stream.

A :class:`Policy` is written by the user with scalars or ``[num_layers, num_heads]`` tensors and is
*resolved* against a concrete model into one :class:`LayerPolicy` per attention layer. Resolution is
where every parameter is validated (shape, range, finiteness), so that a bad policy fails at
``patch()`` time with a message naming the parameter, never in the middle of a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, Sequence

import torch

from sinkfix.errors import PolicyError

__all__ = ["Policy", "ResidualClip", "LayerPolicy", "LayerClip", "SPEC_KEYS"]

# The keys of a command-line policy spec (Policy.parse), in the order the error message lists them.
SPEC_KEYS = ("sink_scale", "virtual_sink_logit", "virtual_logit_on_sink_rows", "n_sink", "layers",
             "extra_sink_positions", "clip", "clip_abs")

Scalar = float | int
PerHead = Scalar | Sequence[Sequence[float]] | torch.Tensor
PerLayer = Scalar | Sequence[float] | torch.Tensor


def _canonical(value):
    """A hashable stand-in with value semantics: tensors and sequences by their numbers, so that
    policies holding per-head tensors compare (and hash) by value instead of raising."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device="cpu", dtype=torch.float64)
        return ("tensor", tuple(t.shape), tuple(t.flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, (ResidualClip, Policy)):
        return (type(value).__name__,) + tuple(_canonical(getattr(value, f.name)) for f in fields(value))
    return value


class _ValueEquality:
    """Equality and hashing by value for the frozen user-facing dataclasses below (a dataclass's
    generated ``__eq__`` compares tensors element-wise and fails on per-head ones)."""

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return _canonical(self) == _canonical(other)

    def __hash__(self) -> int:
        return hash(_canonical(self))


@dataclass(frozen=True, eq=False)
class ResidualClip(_ValueEquality):
    """Clip the per-token L2 norm of the residual stream after each decoder layer.

    ``threshold`` is a scalar or one value per layer (``inf`` disables a layer). With
    ``mode="relative"`` the cap is ``threshold x median`` of the non-sink tokens' norms in the same
    sequence and forward call (so in one-token decode steps a relative cap never fires: the median
    is the token itself); with ``mode="absolute"`` the cap is ``threshold`` itself.

    Sink positions are exempt by default (``sink_norm=None``); give ``sink_norm`` (scalar or per
    layer) to clamp their norm to that value instead. Tokens are only ever scaled *down*, never
    zeroed: zeroing the massive activations of the sink destroys the model (docs/formulas.md).
    """

    threshold: PerLayer
    mode: Literal["relative", "absolute"] = "relative"
    sink_norm: PerLayer | None = None


@dataclass(frozen=True, eq=False)
class Policy(_ValueEquality):
    """A sink-aware attention and residual policy. The default is the identity.

    Args:
        sink_scale: beta in [0, 1], the ACT-form sink scaling. The attention mass on the sink set
            becomes ``beta * p_S`` and the freed mass goes to the other visible keys in proportion
            to their weights. 1 = identity, 0 = drop the sink. Scalar or ``[num_layers,
            num_heads]``.
        virtual_sink_logit: b_h, an extra ``exp(b_h)`` in the softmax denominator with a zero
            value vector ("softmax off by one" is b = 0), in every row that sees a non-sink key.
            None = off. Scalar or per head.
        virtual_logit_on_sink_rows: also count b_h in the rows that see only the sink (the sink
            token's own row). Off by default: like beta, the policy then leaves the sink's own
            representation as the stock model computes it, which matters when the sink is a
            content token (no BOS). Calibration turns it on for BOS windows, where that row is
            the BOS token and acting on it measurably helps (docs/calibration.md).
        n_sink: the sink set is the first ``n_sink`` real (non-padding) positions.
        extra_sink_positions: further absolute positions (0 = first real token) in the sink set.
        layers: attention layers the attention policy applies to (None = all). Other layers run
            plain softmax.
        residual_clip: optional :class:`ResidualClip`.
    """

    sink_scale: PerHead = 1.0
    virtual_sink_logit: PerHead | None = None
    virtual_logit_on_sink_rows: bool = False
    n_sink: int = 1
    extra_sink_positions: tuple[int, ...] = ()
    layers: tuple[int, ...] | None = None
    residual_clip: ResidualClip | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.virtual_logit_on_sink_rows, bool):
            raise PolicyError(f"virtual_logit_on_sink_rows must be a bool, got {self.virtual_logit_on_sink_rows!r}")
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise PolicyError(f"n_sink must be a non-negative int, got {self.n_sink!r}")
        extra = tuple(int(p) for p in self.extra_sink_positions)
        if any(p < 0 for p in extra):
            raise PolicyError(f"extra_sink_positions must be >= 0, got {extra}")
        object.__setattr__(self, "extra_sink_positions", extra)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        if self.residual_clip is not None and self.residual_clip.mode not in ("relative", "absolute"):
            raise PolicyError(f"residual_clip.mode must be 'relative' or 'absolute', got {self.residual_clip.mode!r}")
        # Scalars are checked now so that Policy(sink_scale=1.5) fails where it is written.
        _check_values("sink_scale", torch.as_tensor(self.sink_scale, dtype=torch.float64), 0.0, 1.0)
        if self.virtual_sink_logit is not None:
            _check_values("virtual_sink_logit", torch.as_tensor(self.virtual_sink_logit, dtype=torch.float64))

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> "Policy":
        """Parse a command-line spec such as ``"sink_scale=0.9,n_sink=1"`` or ``"identity"``.

        Keys: sink_scale, virtual_sink_logit, virtual_logit_on_sink_rows (0/1), n_sink, layers
        (``0:5:20``), extra_sink_positions (``3:7``), clip (relative threshold), clip_abs
        (absolute threshold).
        """
        spec = spec.strip()
        if spec in ("", "identity"):
            return cls()
        if spec == "drop":
            return cls(sink_scale=0.0)
        kwargs: dict = {}
        clip: ResidualClip | None = None
        for item in spec.split(","):
            if "=" not in item:
                raise PolicyError(f"policy spec item {item!r} is not key=value (spec: {spec!r})")
            key, value = (part.strip() for part in item.split("=", 1))
            try:
                if key in ("sink_scale", "virtual_sink_logit"):
                    kwargs[key] = float(value)
                elif key == "n_sink":
                    kwargs[key] = int(value)
                elif key == "virtual_logit_on_sink_rows":
                    if value not in ("0", "1", "true", "false"):
                        raise ValueError("expected 0, 1, true or false")
                    kwargs[key] = value in ("1", "true")
                elif key in ("layers", "extra_sink_positions"):
                    kwargs[key] = tuple(int(v) for v in value.split(":") if v)
                elif key in ("clip", "clip_abs"):
                    clip = ResidualClip(float(value), mode="relative" if key == "clip" else "absolute")
                else:
                    raise PolicyError(f"unknown policy key {key!r}; known: {', '.join(SPEC_KEYS)}")
            except ValueError as exc:
                raise PolicyError(f"bad value for {key!r} in policy spec {spec!r}: {exc}") from None
        return cls(residual_clip=clip, **kwargs)

    # -- properties ---------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        beta = torch.as_tensor(self.sink_scale, dtype=torch.float64)
        return bool((beta == 1).all()) and self.virtual_sink_logit is None and self.residual_clip is None

    def describe(self) -> str:
        if self.is_identity:
            return "identity"
        parts = []
        beta = torch.as_tensor(self.sink_scale, dtype=torch.float64)
        if beta.numel() == 1:
            parts.append(f"sink_scale={beta.item():g}")
        else:
            parts.append(f"sink_scale=per-head[{beta.min().item():.3g}..{beta.max().item():.3g}]")
        if self.virtual_sink_logit is not None:
            b = torch.as_tensor(self.virtual_sink_logit, dtype=torch.float64)
            parts.append(f"virtual_sink_logit={b.item():g}" if b.numel() == 1 else "virtual_sink_logit=per-head")
            if self.virtual_logit_on_sink_rows:
                parts.append("virtual_logit_on_sink_rows=1")
        if self.n_sink != 1:
            parts.append(f"n_sink={self.n_sink}")
        if self.extra_sink_positions:
            parts.append(f"extra_sink_positions={list(self.extra_sink_positions)}")
        if self.layers is not None:
            parts.append(f"layers={list(self.layers)}")
        if self.residual_clip is not None:
            rc = self.residual_clip
            parts.append(f"clip={rc.mode}:{rc.threshold if isinstance(rc.threshold, (int, float)) else 'per-layer'}")
        return ",".join(parts)

    # -- resolution ---------------------------------------------------------------------------
    def resolve(self, num_layers: int, num_heads: Sequence[int]) -> list["LayerPolicy"]:
        """One :class:`LayerPolicy` per attention layer; ``num_heads[l]`` = query heads of layer l."""
        if len(num_heads) != num_layers:
            raise PolicyError(f"num_heads has {len(num_heads)} entries for {num_layers} layers")
        max_heads = max(num_heads) if num_heads else 0
        beta = _per_head("sink_scale", self.sink_scale, num_layers, max_heads, low=0.0, high=1.0)
        logit = None
        if self.virtual_sink_logit is not None:
            logit = _per_head("virtual_sink_logit", self.virtual_sink_logit, num_layers, max_heads)
        if self.layers is not None:
            bad = [layer for layer in self.layers if not -num_layers <= layer < num_layers]
            if bad:
                raise PolicyError(f"policy layers {bad} out of range for a model with {num_layers} attention layers")
            enabled = {layer % num_layers for layer in self.layers}
        else:
            enabled = set(range(num_layers))
        clips = _resolve_clip(self.residual_clip, num_layers)
        sink_positions = tuple(sorted(set(range(self.n_sink)) | set(self.extra_sink_positions)))
        out = []
        for layer in range(num_layers):
            heads = num_heads[layer]
            on = layer in enabled
            out.append(
                LayerPolicy(
                    layer=layer,
                    beta=beta[layer, :heads].clone() if on else torch.ones(heads, dtype=torch.float64),
                    virtual_sink_logit=logit[layer, :heads].clone() if (on and logit is not None) else None,
                    virtual_logit_on_sink_rows=self.virtual_logit_on_sink_rows,
                    sink_positions=sink_positions,
                    clip=clips[layer],
                )
            )
        return out


@dataclass(frozen=True)
class LayerClip:
    threshold: float
    mode: Literal["relative", "absolute"]
    sink_norm: float | None


@dataclass(eq=False)
class LayerPolicy:
    """The resolved policy of one attention layer (fp64 master copies of the parameters, on the CPU).

    ``beta`` and ``virtual_sink_logit`` are replaced through :meth:`set_parameters` (calibration
    assigns tensors that require grad at every step), which also re-derives the flags the attention
    path branches on: those are decided here, on the host, once, never per call from device values.
    """

    layer: int
    beta: torch.Tensor  # (H,) in [0, 1]
    virtual_sink_logit: torch.Tensor | None  # (H,) or None
    sink_positions: tuple[int, ...]  # positions (0 = first real token) forming the sink set
    clip: LayerClip | None = None
    virtual_logit_on_sink_rows: bool = False  # the virtual sink logit also counts in sink-only rows
    _beta_is_one: bool = field(default=False, init=False, repr=False)
    _device_copy: tuple | None = field(default=None, init=False, repr=False)  # (device, dtype, beta, logit)

    def __post_init__(self) -> None:
        self._derive()

    def _derive(self) -> None:
        self._beta_is_one = not self.beta.requires_grad and bool((self.beta.detach() == 1).all())
        self._device_copy = None  # a replaced tensor must not be served from a stale copy

    @property
    def num_heads(self) -> int:
        return int(self.beta.shape[0])

    @property
    def beta_is_one(self) -> bool:
        """beta = 1 on every head (and not being fitted): sink scaling is off in this layer."""
        return self._beta_is_one

    @property
    def attention_is_identity(self) -> bool:
        return self._beta_is_one and self.virtual_sink_logit is None

    @property
    def first_column_sink(self) -> bool:
        """The sink set is the first real token alone (the common n_sink=1 policy)."""
        return self.sink_positions == (0,)

    def head_slice(self, start: int, stop: int) -> "LayerPolicy":
        """The policy of query heads [start, stop) only: what one rank applies when tensor
        parallelism gives it those heads."""
        logit = self.virtual_sink_logit
        return LayerPolicy(self.layer, self.beta[start:stop].clone(), None if logit is None else logit[start:stop].clone(),
                           self.sink_positions, self.clip, self.virtual_logit_on_sink_rows)

    def as_identity(self) -> "LayerPolicy":
        """The same layer, heads and sink set with no correction at all (no residual clip either)."""
        return LayerPolicy(self.layer, torch.ones(self.num_heads, dtype=torch.float64), None, self.sink_positions)

    def set_parameters(self, beta: torch.Tensor, virtual_sink_logit: torch.Tensor | None) -> None:
        """Replace beta (H,) and the virtual sink logits (H,) or None; the patched model uses them
        from its next forward on. Tensors that require grad stay attached to their graph."""
        if beta.shape != (self.num_heads,):
            raise PolicyError(f"layer {self.layer}: beta must have shape ({self.num_heads},), got {tuple(beta.shape)}")
        if virtual_sink_logit is not None and virtual_sink_logit.shape != (self.num_heads,):
            raise PolicyError(f"layer {self.layer}: virtual_sink_logit must have shape ({self.num_heads},), got "
                              f"{tuple(virtual_sink_logit.shape)}")
        self.beta = beta
        self.virtual_sink_logit = virtual_sink_logit
        self._derive()

    def tensors(self, device: torch.device, dtype: torch.dtype = torch.float32):
        """(beta, virtual_sink_logit) on ``device``; beta is None when it is 1 on every head (the
        attention path then takes its identity branch without looking at values). Cached: a forward
        pass must not re-upload them. Parameters that require grad (calibration) bypass the cache
        so gradients flow."""
        logit = self.virtual_sink_logit
        if self.beta.requires_grad or (logit is not None and logit.requires_grad):
            return (self.beta.to(device=device, dtype=dtype),
                    None if logit is None else logit.to(device=device, dtype=dtype))
        cached = self._device_copy
        if cached is None or cached[0] != device or cached[1] != dtype:
            beta = None if self._beta_is_one else self.beta.to(device=device, dtype=dtype)
            cached = (device, dtype, beta, None if logit is None else logit.to(device=device, dtype=dtype))
            self._device_copy = cached
        return cached[2], cached[3]


def _check_values(name: str, values: torch.Tensor, low: float | None = None, high: float | None = None) -> None:
    if not torch.isfinite(values).all():
        raise PolicyError(f"{name} contains NaN or inf: {values.flatten()[:8].tolist()}")
    if low is not None and (values < low).any() or high is not None and (values > high).any():
        raise PolicyError(
            f"{name} must lie in [{low}, {high}]; got min {values.min().item():g}, max {values.max().item():g}"
        )


def _per_head(name: str, value: PerHead, num_layers: int, num_heads: int, low=None, high=None) -> torch.Tensor:
    t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64).cpu()
    _check_values(name, t, low, high)
    if t.ndim == 0:
        return t.expand(num_layers, num_heads).clone()
    if t.shape != (num_layers, num_heads):
        raise PolicyError(
            f"{name} has shape {tuple(t.shape)}; expected a scalar or [num_layers, num_heads] = "
            f"[{num_layers}, {num_heads}] for this model"
        )
    return t.clone()


def _resolve_clip(clip: ResidualClip | None, num_layers: int) -> list[LayerClip | None]:
    if clip is None:
        return [None] * num_layers

    def per_layer(name: str, value) -> list[float]:
        t = torch.as_tensor(value, dtype=torch.float64).flatten()
        if torch.isnan(t).any() or (t <= 0).any():
            raise PolicyError(f"residual_clip.{name} must be > 0 (inf disables a layer), got {t.tolist()[:8]}")
        if t.numel() == 1:
            return [t.item()] * num_layers
        if t.numel() != num_layers:
            raise PolicyError(f"residual_clip.{name} has {t.numel()} values; expected 1 or num_layers = {num_layers}")
        return t.tolist()

    thresholds = per_layer("threshold", clip.threshold)
    if clip.mode == "relative" and any(t < 1 for t in thresholds):
        raise PolicyError("a relative residual_clip.threshold below 1 would clip the median token itself")
    sink = per_layer("sink_norm", clip.sink_norm) if clip.sink_norm is not None else [None] * num_layers
    return [
        None if math.isinf(thr) and sink_norm is None else LayerClip(thr, clip.mode, sink_norm)
        for thr, sink_norm in zip(thresholds, sink)
    ]
