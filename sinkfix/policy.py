"""Correction policies: what sinkfix does to each attention layer and head, and to the residual stream.

A :class:`Policy` is written by the user with scalars or ``[num_layers, num_heads]`` tensors and is
*resolved* against a concrete model into one :class:`LayerPolicy` per attention layer. Resolution is
where every parameter is validated (shape, range, finiteness), so that a bad policy fails at
``patch()`` time with a message naming the parameter, never in the middle of a forward pass.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Literal, Sequence

import numpy as np
import torch

from sinkfix.errors import PolicyError

__all__ = ["Policy", "ResidualClip", "ContentSinks", "LayerPolicy", "LayerClip", "LayerContentSinks", "SPEC_KEYS",
           "MAX_N_SINK", "MAX_CONTENT_ROWS"]

# The largest n_sink a policy takes. Sink sets are a few leading tokens (one BOS; StreamingLLM keeps
# 4); the set is materialised as a tuple of positions and a per-call tensor, so a typo such as 1e8
# in a policy or a profile file exhausted memory in patch() (a Python set of positions measured
# 66 MB per million, so 6.6 GB for 1e8, before the sorted tuple made from it). 1024 is two orders
# of magnitude above the sink sets in use and as long as the windows most models are run with.
MAX_N_SINK = 1024

# The largest ContentSinks.min_rows and reevaluate_every. Both count tokens: min_rows the query rows
# that see a key, which the PyTorch path and the kernels sum in float32, exact up to 2**24 =
# 16,777,216 rows (longer than any context a model is run with); reevaluate_every the decode steps
# between decisions. Above it min_rows can never be met (every key unjudged: the identity, unsaid) and
# reevaluate_every never re-decides (write None); min_rows=10**30 was accepted and then failed at the
# first forward with torch's raw "OverflowError: int too big to convert".
MAX_CONTENT_ROWS = 1 << 24

# The keys of a command-line policy spec (Policy.parse), in the order the error message lists them.
SPEC_KEYS = ("sink_scale", "virtual_sink_logit", "virtual_logit_on_sink_rows", "n_sink", "layers",
             "extra_sink_positions", "clip", "clip_abs", "hidden_sink_scale", "hidden_sink_threshold")

Scalar = float | int
PerHead = Scalar | Sequence[Sequence[float]] | torch.Tensor
PerLayer = Scalar | Sequence[float] | torch.Tensor


def _canonical(value):
    """A hashable stand-in with value semantics: numbers by their values and shape, whatever holds
    them (a float, a numpy number, a tensor, a nested list), so that policies holding per-head
    tensors compare (and hash) by value instead of raising, and sink_scale=0.5 equals
    sink_scale=torch.tensor(0.5)."""
    if isinstance(value, (ResidualClip, Policy, ContentSinks)):
        return (type(value).__name__,) + tuple(_canonical(getattr(value, f.name)) for f in fields(value))
    if isinstance(value, (numbers.Number, np.generic, np.ndarray, torch.Tensor, list, tuple)):
        try:
            held = value.detach().cpu() if isinstance(value, torch.Tensor) else value
            t = torch.as_tensor(held, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):  # not all numbers: item by item
            return tuple(_canonical(v) for v in value)
        return ("values", tuple(t.shape), tuple(t.flatten().tolist()))
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

    def __post_init__(self) -> None:
        # The values here, where they are written (a bad one failed only at patch(), after a model
        # had loaded); their count against the model's layers in resolve().
        if self.mode not in ("relative", "absolute"):
            raise PolicyError(f"residual_clip.mode must be 'relative' or 'absolute', got {self.mode!r}")
        thresholds = _clip_values("threshold", self.threshold)
        if self.mode == "relative" and any(t < 1 for t in thresholds):
            raise PolicyError("a relative residual_clip.threshold below 1 would clip the median token itself, "
                              f"got {thresholds[:8]}")
        if self.sink_norm is not None:
            _clip_values("sink_norm", self.sink_norm)


@dataclass(frozen=True, eq=False)
class ContentSinks(_ValueEquality):
    """Content-dependent sink sets ("hidden sinks"), decided per head and per input with the
    criterion of ACT (Yu et al. 2024; docs/formulas.md, "Content-dependent sinks").

    In every corrected head, a key is a *candidate sink* when the mean stock attention it receives
    from the query rows that can see it exceeds ``threshold``. The first candidate of the sequence
    (normally the first token) is kept; the others, outside the positional sink set, are the
    *hidden sinks* of that head: their attention becomes ``hidden_sink_scale x`` its stock value
    and the freed mass goes to every other visible key in proportion to its weight. The set is
    decided on the prompt (prefill) and carried unchanged through decoding with the KV cache.

    Args:
        threshold: the criterion's threshold, in (0, 1). ACT: 0.1.
        hidden_sink_scale: beta for hidden sinks in [0, 1], scalar or ``[num_layers, num_heads]``;
            separate from ``Policy.sink_scale`` (the positional sink). ACT: 0.4.
        heads: which heads are corrected, a bool ``[num_layers, num_heads]`` (ACT's head
            selection); None = every head. A scalar bool is every head (True, stored as None) or
            none (False).
        min_rows: keys seen by fewer query rows are not judged. 1 = the rule as written (the last
            key of a prompt is judged on its own row alone). At most :data:`MAX_CONTENT_ROWS`.
        reevaluate_every: during decoding, decide the set again every this many generated tokens,
            from the column means over every row seen so far (prompt and generated); None = the
            prompt's set is kept for the whole generation. The one-row criterion is never used.
            At most :data:`MAX_CONTENT_ROWS`.
    """

    threshold: float = 0.1
    hidden_sink_scale: PerHead = 0.4
    heads: PerHead | None = None
    min_rows: int = 1
    reevaluate_every: int | None = None

    def __post_init__(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, torch.Tensor) and threshold.numel() == 1 and threshold.is_floating_point():
            threshold = threshold.item()
        # numbers.Real: numpy floats too (np.float32(0.1) was refused as "not a number in (0, 1)")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) \
                or not 0.0 < threshold < 1.0:
            raise PolicyError(f"content sink threshold must be a finite real number in (0, 1), got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))
        _check_values("hidden_sink_scale", _numbers("hidden_sink_scale", self.hidden_sink_scale), 0.0, 1.0)
        if self.heads is not None:
            try:
                heads = torch.as_tensor(self.heads.detach() if isinstance(self.heads, torch.Tensor) else self.heads)
            except (TypeError, ValueError, RuntimeError):
                raise PolicyError(f"content sink heads must be a bool [num_layers, num_heads] mask, got "
                                  f"{type(self.heads).__name__}") from None
            if heads.dtype != torch.bool:
                raise PolicyError(f"content sink heads must be a bool [num_layers, num_heads] mask, got {heads.dtype}")
            if heads.ndim == 0 and bool(heads):
                # one True for every head is the default (None): stored as such, so that it describes
                # itself as every head (it read "heads=1", one corrected head) and parses back equal
                object.__setattr__(self, "heads", None)
        # the same integers n_sink takes (numpy and 0-d tensor integers; never a bool)
        min_rows = _integer(self.min_rows)
        if min_rows is None or not 1 <= min_rows <= MAX_CONTENT_ROWS:
            raise PolicyError(f"content sink min_rows must be an int in [1, {MAX_CONTENT_ROWS}] (MAX_CONTENT_ROWS: "
                              f"rows are counted in float32, exact to 2**24), got {self.min_rows!r:.80}")
        object.__setattr__(self, "min_rows", min_rows)
        every = self.reevaluate_every
        if every is not None:
            every = _integer(every)
            if every is None or not 1 <= every <= MAX_CONTENT_ROWS:
                raise PolicyError(f"content sink reevaluate_every must be None or an int in [1, {MAX_CONTENT_ROWS}] "
                                  f"(MAX_CONTENT_ROWS; None never decides again), got {self.reevaluate_every!r:.80}")
            object.__setattr__(self, "reevaluate_every", every)

    @property
    def is_identity(self) -> bool:
        beta = torch.as_tensor(self.hidden_sink_scale, dtype=torch.float64)
        heads = None if self.heads is None else torch.as_tensor(self.heads)
        return bool((beta == 1).all()) or (heads is not None and not bool(heads.any()))

    def describe(self) -> str:
        """Spec parts (Policy.parse keys) for the threshold and a scalar beta, exact so that they
        parse back; the settings a spec has no key for are named after them when not the default."""
        beta = torch.as_tensor(self.hidden_sink_scale, dtype=torch.float64)
        b = _spec_number(beta.item()) if beta.ndim == 0 else "per-head"
        parts = [f"hidden_sink_scale={b}", f"hidden_sink_threshold={_spec_number(self.threshold)}"]
        if self.heads is not None:
            parts.append(f"heads={int(torch.as_tensor(self.heads).sum())}")
        if self.min_rows != 1:
            parts.append(f"min_rows={self.min_rows}")
        if self.reevaluate_every is not None:
            parts.append(f"reevaluate_every={self.reevaluate_every}")
        return ",".join(parts)

    def resolve(self, num_layers: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta [L, H] fp64, heads [L, H] bool), checked against the model's shape."""
        beta = _per_head("hidden_sink_scale", self.hidden_sink_scale, num_layers, num_heads, low=0.0, high=1.0)
        if self.heads is None:
            return beta, torch.ones(num_layers, num_heads, dtype=torch.bool)
        heads = torch.as_tensor(self.heads.detach() if isinstance(self.heads, torch.Tensor) else self.heads).cpu()
        if heads.ndim == 0:
            return beta, heads.expand(num_layers, num_heads).clone()
        if heads.shape != (num_layers, num_heads):
            raise PolicyError(f"content sink heads has shape {tuple(heads.shape)}; expected a scalar or "
                              f"[num_layers, num_heads] = [{num_layers}, {num_heads}] for this model")
        return beta, heads.clone()


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
        n_sink: the sink set is the first ``n_sink`` positions counted from the first real
            (non-padding) token, at most :data:`MAX_N_SINK` (1024); a masked column among them is
            not a sink, and does not move the set past it.
        extra_sink_positions: further absolute positions (0 = first real token) in the sink set.
        layers: attention layers the attention policy applies to (None = all); a negative index
            counts from the last layer, as in Python (-1 = the last). Other layers run plain softmax.
        residual_clip: optional :class:`ResidualClip`.
        content_sinks: optional :class:`ContentSinks`: hidden sinks decided per head and per input
            (ACT's rule, :meth:`act`), on top of the positional sink set.
    """

    sink_scale: PerHead = 1.0
    virtual_sink_logit: PerHead | None = None
    virtual_logit_on_sink_rows: bool = False
    n_sink: int = 1
    extra_sink_positions: tuple[int, ...] = ()
    layers: tuple[int, ...] | None = None
    residual_clip: ResidualClip | None = None
    content_sinks: ContentSinks | None = None

    def __post_init__(self) -> None:
        for name in ("sink_scale", "virtual_sink_logit"):  # -0.0 is 0: one description, one policy
            value = getattr(self, name)
            if isinstance(value, float) and value == 0:
                object.__setattr__(self, name, 0.0)
        if self.content_sinks is not None and not isinstance(self.content_sinks, ContentSinks):
            raise PolicyError(f"content_sinks must be a sinkfix.ContentSinks or None, got {type(self.content_sinks).__name__}")
        if not isinstance(self.virtual_logit_on_sink_rows, bool):
            raise PolicyError(f"virtual_logit_on_sink_rows must be a bool, got {self.virtual_logit_on_sink_rows!r}")
        # Every argument's type is checked here, so that a wrong type is a PolicyError saying what was
        # expected, not an AttributeError or a torch TypeError from deep inside patch().
        n_sink = _as_int("n_sink", self.n_sink, "a non-negative int")
        if n_sink < 0:
            raise PolicyError(f"n_sink must be a non-negative int, got {self.n_sink!r}")
        if n_sink > MAX_N_SINK:
            raise PolicyError(f"n_sink must be at most {MAX_N_SINK} (MAX_N_SINK: a sink set is a few leading "
                              f"tokens), got {n_sink}")
        object.__setattr__(self, "n_sink", n_sink)
        extra = _int_tuple("extra_sink_positions", self.extra_sink_positions)
        if any(p < 0 for p in extra):
            raise PolicyError(f"extra_sink_positions must be >= 0, got {extra}")
        twice = sorted(listed_twice(extra))
        if twice:  # kept, it described itself as a spec that parse refuses or reads as another policy
            raise PolicyError(f"extra_sink_positions lists {', '.join(map(str, twice))} twice: give each position once")
        if len(extra) > MAX_N_SINK:  # the bound n_sink has; a spec range 0-65535 made a 65,536-position sink set
            raise PolicyError(f"extra_sink_positions lists {len(extra)} positions; at most {MAX_N_SINK} (MAX_N_SINK: a "
                              "sink set is a few tokens)")
        inside = [p for p in extra if p < n_sink]
        if inside:  # in the constructor, so that no policy describes itself as a spec parse refuses
            raise PolicyError(f"extra_sink_positions {', '.join(map(str, inside))} already in the sink set of the first "
                              f"n_sink={n_sink} position(s): list only positions after them")
        object.__setattr__(self, "extra_sink_positions", extra)
        if self.layers is not None:
            layers = _int_tuple("layers", self.layers)
            if not layers:
                # "layers=$LAYERS" with the variable unset: a policy that corrects no layer while its
                # description says it corrects, the silent identity an empty spec is refused for
                raise PolicyError("layers is empty: the policy would correct no layer; leave layers out for every "
                                  "layer, list the layers to correct (e.g. layers=5-20), or use the identity policy")
            object.__setattr__(self, "layers", layers)
        if self.residual_clip is not None and not isinstance(self.residual_clip, ResidualClip):
            raise PolicyError(f"residual_clip must be a sinkfix.ResidualClip or None (e.g. ResidualClip(8.0)), "
                              f"got {type(self.residual_clip).__name__} {self.residual_clip!r:.80}")
        if self.residual_clip is not None and self.residual_clip.mode not in ("relative", "absolute"):
            raise PolicyError(f"residual_clip.mode must be 'relative' or 'absolute', got {self.residual_clip.mode!r}")
        # Scalars are checked now so that Policy(sink_scale=1.5) fails where it is written.
        _check_values("sink_scale", _numbers("sink_scale", self.sink_scale), 0.0, 1.0)
        if self.virtual_sink_logit is not None:
            _check_values("virtual_sink_logit", _numbers("virtual_sink_logit", self.virtual_sink_logit))
        if self.layers is not None and self.residual_clip is not None and self._attention_is_identity():
            # `clip=1.1,layers=0` was measured as a variant equal to `clip=1.1`, easily read as "clip layer
            # 0 only"; refused here so that no policy describes itself as a spec parse refuses (`layers`
            # alone, a structure that behaves as the identity, is kept)
            raise PolicyError("layers chooses the layers of the attention correction, and this policy has none "
                              "(sink_scale, virtual_sink_logit or hidden_sink_scale); the residual clip acts on every "
                              "layer: layers would change nothing")
        self._warn_items_without_effect()

    def _warn_items_without_effect(self) -> None:
        """What a spec refuses (:func:`_refuse_items_without_effect`) the API keeps, since a profile may
        set it, but says: Policy(sink_scale=0.3, n_sink=0) gave the stock model bit for bit, unsaid.
        (virtual_logit_on_sink_rows without a virtual logit is not said: live parameters set through
        the patch handle may add the logits it acts on, as calibration does.)"""
        if self.n_sink == 0 and not self.extra_sink_positions and not bool(
                (torch.as_tensor(self.sink_scale, dtype=torch.float64) == 1).all()):
            warnings.warn("sink_scale acts on the sink set, and n_sink=0 without extra_sink_positions leaves it empty: "
                          "the sink scale changes nothing", UserWarning, stacklevel=3)

    def _attention_is_identity(self) -> bool:
        beta = torch.as_tensor(self.sink_scale, dtype=torch.float64)
        return (bool((beta == 1).all()) and self.virtual_sink_logit is None
                and (self.content_sinks is None or self.content_sinks.is_identity))

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def act(cls, beta: float = 0.4, threshold: float = 0.1) -> "Policy":
        """ACT's rule (Yu et al. 2024) on every head with its published defaults: per head and
        input, keys whose mean attention over the rows that see them exceeds ``threshold`` are
        sinks; the first is kept, the others get ``beta x`` their attention, the freed mass going to
        the other keys in proportion to their weight. The positional sink is left alone."""
        return cls(content_sinks=ContentSinks(threshold=threshold, hidden_sink_scale=beta))

    @classmethod
    def parse(cls, spec: str) -> "Policy":
        """Parse a command-line spec such as ``"sink_scale=0.9,n_sink=1"`` or ``"identity"``.

        Keys: sink_scale, virtual_sink_logit, virtual_logit_on_sink_rows (0/1), n_sink, layers,
        extra_sink_positions, clip (relative threshold), clip_abs (absolute threshold),
        hidden_sink_scale, hidden_sink_threshold. Each key is given at most once, and ``clip``
        and ``clip_abs`` (two ways to set the one residual clip) not together.

        ``layers`` and ``extra_sink_positions`` are lists whose items are separated by ``:``; an
        item ``a-b`` is the inclusive range a..b. ``layers=5-20`` is layers 5, 6, ..., 20;
        ``layers=5:20`` is the two layers 5 and 20; ``layers=0:3-5:9`` is 0, 3, 4, 5, 9. A
        descending range or an item listed twice is refused.
        """
        spec = spec.strip()
        if not spec:  # an empty spec (an unset shell variable, say) silently ran the identity
            raise PolicyError("empty policy spec: write 'identity' for the stock attention, or key=value items")
        if spec == "identity":
            return cls()
        if spec == "drop":
            return cls(sink_scale=0.0)
        if spec == "act":
            return cls.act()
        kwargs: dict = {}
        clip: ResidualClip | None = None
        content: dict = {}
        seen: set[str] = set()
        for item in spec.split(","):
            if item.strip() in _KEYWORD_POLICIES:
                word = item.strip()
                how = ("leave it out: the other items alone start from the identity" if word == "identity"
                       else f"write it as items, {word} = {_KEYWORD_POLICIES[word]}")
                raise PolicyError(f"{word!r} is a whole policy and stands alone in a spec; to combine it with other "
                                  f"items {how} (spec: {spec!r})")
            if "=" not in item:
                raise PolicyError(f"policy spec item {item!r} is not key=value (spec: {spec!r})")
            key, value = (part.strip() for part in item.split("=", 1))
            if key not in SPEC_KEYS:
                raise PolicyError(f"unknown policy key {key!r} in policy spec {spec!r}; known: {', '.join(SPEC_KEYS)}")
            # A second value for one setting would silently replace the first: refused, as a layer
            # listed twice is. clip and clip_abs both set the residual clip.
            if key in seen:
                raise PolicyError(f"policy key {key!r} is given twice in policy spec {spec!r}; give it once")
            if key in ("clip", "clip_abs") and seen & {"clip", "clip_abs"}:
                raise PolicyError(f"policy keys 'clip' and 'clip_abs' both set the residual clip (relative / "
                                  f"absolute threshold): give one of them, in policy spec {spec!r}")
            seen.add(key)
            try:
                if key in ("sink_scale", "virtual_sink_logit"):
                    kwargs[key] = _spec_float(value)
                elif key == "n_sink":
                    kwargs[key] = _spec_int(value)
                elif key == "virtual_logit_on_sink_rows":
                    if value not in ("0", "1", "true", "false"):
                        raise ValueError("expected 0, 1, true or false")
                    kwargs[key] = value in ("1", "true")
                elif key in ("layers", "extra_sink_positions"):
                    kwargs[key] = _parse_int_list(value, "layer" if key == "layers" else "position")
                    if key == "extra_sink_positions" and not kwargs[key]:  # (an empty layers= Policy refuses)
                        raise ValueError("no position given: list at least one, or leave the key out")
                elif key in ("clip", "clip_abs"):
                    clip = ResidualClip(_spec_float(value), mode="relative" if key == "clip" else "absolute")
                elif key == "hidden_sink_scale":
                    content["hidden_sink_scale"] = _spec_float(value)
                else:  # hidden_sink_threshold
                    content["threshold"] = _spec_float(value)
            except ValueError as exc:
                raise PolicyError(f"bad value for {key!r} in policy spec {spec!r}: {exc}") from None
        if content:
            kwargs["content_sinks"] = ContentSinks(**content)
        _refuse_items_without_effect(kwargs, clip, spec)
        return cls(residual_clip=clip, **kwargs)

    # -- properties ---------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        beta = torch.as_tensor(self.sink_scale, dtype=torch.float64)
        return (bool((beta == 1).all()) and self.virtual_sink_logit is None and self.residual_clip is None
                and (self.content_sinks is None or self.content_sinks.is_identity))

    def describe(self) -> str:
        """The policy as a spec. Every policy that :meth:`parse` can express (scalar parameters)
        is written so that ``Policy.parse(policy.describe()) == policy``; per-head and per-layer
        values, and the settings a spec has no key for, are summarised in a form ``parse`` refuses
        rather than reads as something else."""
        if self.is_identity and self.n_sink == 1 and not self.extra_sink_positions and self.layers is None \
                and not self.virtual_logit_on_sink_rows and self.content_sinks is None:
            return "identity"
        parts = []
        beta = torch.as_tensor(self.sink_scale, dtype=torch.float64)
        if beta.ndim == 0:
            parts.append(f"sink_scale={_spec_number(beta.item())}")
        else:  # a [1, 1] tensor too: a scalar would read back as a policy for every model shape
            parts.append(f"sink_scale=per-head[{beta.min().item():.3g}..{beta.max().item():.3g}]")
        if self.virtual_sink_logit is not None:
            b = torch.as_tensor(self.virtual_sink_logit, dtype=torch.float64)
            parts.append(f"virtual_sink_logit={_spec_number(b.item())}" if b.ndim == 0
                         else "virtual_sink_logit=per-head")
        if self.virtual_logit_on_sink_rows:
            parts.append("virtual_logit_on_sink_rows=1")
        if self.n_sink != 1:
            parts.append(f"n_sink={self.n_sink}")
        # written in the spec syntax (5-20, 0:3), so that these parts parse back to the same lists
        if self.extra_sink_positions:
            parts.append(f"extra_sink_positions={_format_int_list(self.extra_sink_positions)}")
        if self.layers is not None:
            parts.append(f"layers={_format_int_list(self.layers)}")
        if self.residual_clip is not None:
            rc = self.residual_clip
            key = "clip" if rc.mode == "relative" else "clip_abs"
            parts.append(f"{key}={_spec_number(float(rc.threshold))}" if _one_number(rc.threshold)
                         else f"{key}=per-layer")
            if rc.sink_norm is not None:  # no spec key: named, so that the text is not read as a clip without it
                parts.append(f"clip_sink_norm={_spec_number(float(rc.sink_norm))}"
                             if _one_number(rc.sink_norm) else "clip_sink_norm=per-layer")
        if self.content_sinks is not None:
            parts.append(self.content_sinks.describe())
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
            if len(enabled) != len(self.layers):  # layers=0:-2 on two layers: one layer listed twice
                named: dict[int, list[int]] = {}
                for layer in self.layers:
                    named.setdefault(layer % num_layers, []).append(layer)
                twice = next(names for names in named.values() if len(names) > 1)
                raise PolicyError(f"policy layers {twice} name the same layer of a model with {num_layers} attention "
                                  "layers; list each layer once")
        else:
            enabled = set(range(num_layers))
        clips = _resolve_clip(self.residual_clip, num_layers)
        content = None if self.content_sinks is None else self.content_sinks.resolve(num_layers, max_heads)
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
                    content=_layer_content(self.content_sinks, content, layer, heads) if on else None,
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
    content: "LayerContentSinks | None" = None  # hidden sinks decided per input (None = positional only)
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
        return self._beta_is_one and self.virtual_sink_logit is None and self.content is None

    @property
    def first_column_sink(self) -> bool:
        """The sink set is the first real token alone (the common n_sink=1 policy)."""
        return self.sink_positions == (0,)

    def head_slice(self, start: int, stop: int) -> "LayerPolicy":
        """The policy of query heads [start, stop) only: what one rank applies when tensor
        parallelism gives it those heads."""
        logit = self.virtual_sink_logit
        content = None if self.content is None else self.content.head_slice(start, stop)
        return LayerPolicy(self.layer, self.beta[start:stop].clone(), None if logit is None else logit[start:stop].clone(),
                           self.sink_positions, self.clip, self.virtual_logit_on_sink_rows, content)

    def as_identity(self) -> "LayerPolicy":
        """The same layer, heads and sink set with no correction at all (no residual clip either)."""
        return LayerPolicy(self.layer, torch.ones(self.num_heads, dtype=torch.float64), None, self.sink_positions)

    def set_parameters(self, beta: torch.Tensor, virtual_sink_logit: torch.Tensor | None) -> None:
        """Replace beta (H,) and the virtual sink logits (H,) or None; the patched model uses them
        from its next forward on. Tensors that require grad stay attached to their graph."""
        # the values a Policy checks when it is built: a beta of 1.5 or -0.5 was computed (mass outside
        # [0, 1] on the sink) and NaN / inf gave NaN logits, unsaid; one host read per call, not per forward
        self._check_live("beta", beta, 0.0, 1.0)
        if virtual_sink_logit is not None:
            self._check_live("virtual_sink_logit", virtual_sink_logit)
        self.beta = beta
        self.virtual_sink_logit = virtual_sink_logit
        self._derive()

    def _check_live(self, name: str, value, low: float | None = None, high: float | None = None) -> None:
        what = f"layer {self.layer}: {name}"
        if not isinstance(value, torch.Tensor):
            raise PolicyError(f"{what} must be a tensor of shape ({self.num_heads},), got {type(value).__name__}")
        if value.shape != (self.num_heads,):
            raise PolicyError(f"{what} must have shape ({self.num_heads},), got {tuple(value.shape)}")
        if value.is_meta:
            raise PolicyError(f"{what} is on the meta device: it holds no values")
        _check_values(what, value.detach(), low, high)

    @property
    def can_run_as_identity_in_place(self) -> bool:
        """Whether :meth:`identity_in_place` can make this layer the identity: its correction is the
        values of its device copy alone (no residual clip, no content sinks, nothing being fitted),
        and the copy exists (the patch uploads it)."""
        logit = self.virtual_sink_logit
        return (self.clip is None and self.content is None and self._device_copy is not None
                and not self.beta.requires_grad and not (logit is not None and logit.requires_grad))

    def identity_in_place(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Make the device copy's values the identity's, in place: sink scale 1 (the sink keeps its
        whole mass) and virtual sink logit -inf (a zero-value logit that holds no mass). The same code
        then serves plain softmax up to rounding. Returns what :meth:`restore_in_place` puts back."""
        _, _, beta, logit = self._device_copy
        saved = (None if beta is None else beta.clone(), None if logit is None else logit.clone())
        if beta is not None:
            beta.fill_(1.0)
        if logit is not None:
            logit.fill_(float("-inf"))
        return saved

    def restore_in_place(self, saved: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
        """Put back the values :meth:`identity_in_place` replaced (into the copy it changed, if that is
        still the cached one)."""
        if self._device_copy is None:
            return  # re-derived meanwhile (set_parameters): the next call uploads the live values
        _, _, beta, logit = self._device_copy
        for live, value in ((beta, saved[0]), (logit, saved[1])):
            if live is not None and value is not None:
                live.copy_(value)

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


@dataclass(eq=False)
class LayerContentSinks:
    """The resolved content-sink rule of one attention layer (:class:`ContentSinks`)."""

    threshold: float
    beta: torch.Tensor  # (H,) fp64 in [0, 1], hidden-sink scaling
    heads: torch.Tensor  # (H,) bool, heads the rule corrects
    min_rows: int = 1
    reevaluate_every: int | None = None

    def head_slice(self, start: int, stop: int) -> "LayerContentSinks":
        return LayerContentSinks(self.threshold, self.beta[start:stop].clone(), self.heads[start:stop].clone(),
                                 self.min_rows, self.reevaluate_every)

    def tensors(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta (H,), heads (H,) bool) on ``device``."""
        return self.beta.to(device=device, dtype=dtype), self.heads.to(device=device)


def _layer_content(rule: ContentSinks | None, resolved, layer: int, heads: int) -> LayerContentSinks | None:
    if rule is None:
        return None
    beta, on = resolved
    beta, on = beta[layer, :heads].clone(), on[layer, :heads].clone()
    if not bool(on.any()) or bool((beta[on] == 1).all()):
        return None  # nothing to correct in this layer: the positional path runs
    return LayerContentSinks(rule.threshold, beta, on, rule.min_rows, rule.reevaluate_every)


def _numbers(name: str, value, expected: str = "a number, a [num_layers, num_heads] nested list or a tensor"
             ) -> torch.Tensor:
    """``value`` as an fp64 tensor (for checking only), or a PolicyError saying what was expected.

    Strings are refused explicitly: ``"0.9"`` is a typo for ``0.9`` here, and torch's own error
    for it ("new(): invalid data type 'str'") does not name the parameter.
    """
    if isinstance(value, (str, bytes)) or _holds_bool(value):
        # a bool is a typo here, not a number: Policy(sink_scale=True) read as 1.0 (the identity)
        raise PolicyError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.80}")
    if isinstance(value, torch.Tensor) and value.is_meta:
        # torch's own "Tensor.item() cannot be called on meta tensors" named neither the parameter nor why
        raise PolicyError(f"{name} is a tensor on the meta device: it holds no values")
    if _holds_complex(value):
        # the same kind of mistake: torch.as_tensor(dtype=float64) drops the imaginary part of a complex
        # tensor or numpy array with a generic warning, and hidden_sink_scale=tensor(0.5+3j) ran as 0.5
        raise PolicyError(f"{name} must be {expected} (real), got a complex {type(value).__name__} {value!r:.80}")
    try:
        return torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise PolicyError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.80}") from None


def _holds(value, scalars: tuple, array_test) -> bool:
    """Whether ``value`` is one of ``scalars``, a tensor or array that ``array_test`` accepts, or a
    (nested) list or tuple holding one."""
    if isinstance(value, scalars):
        return True
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return array_test(value)
    if isinstance(value, (list, tuple)):
        return any(_holds(item, scalars, array_test) for item in value)
    return False


def _holds_bool(value) -> bool:
    """Whether ``value`` is or contains a bool (Python or numpy), or is a bool tensor or array."""
    return _holds(value, (bool, np.bool_), lambda array: array.dtype in (torch.bool, np.bool_))


def _holds_complex(value) -> bool:
    """Whether ``value`` is or contains a complex number (Python or numpy), or is a complex tensor
    or array."""
    return _holds(value, (complex, np.complexfloating),
                  lambda array: array.is_complex() if isinstance(array, torch.Tensor) else array.dtype.kind == "c")


def _integer(value) -> int | None:
    """An int from an int, a numpy or 0-d tensor integer, or an integral float (2.0); None for
    bools and fractional numbers, which int() would silently turn into 1 (int(True), int(1.7))."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    is_float_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()
    if isinstance(value, numbers.Real) or is_float_tensor:
        number = float(value)
        if number.is_integer():
            return int(number)
    return None


def _refuse_items_without_effect(kwargs: dict, clip: "ResidualClip | None", spec: str) -> None:
    """A spec item that changes nothing in the policy it is in: it was measured as a "patched"
    variant equal to the identity, unsaid (the API keeps these combinations: a profile may set them)."""
    if kwargs.get("virtual_logit_on_sink_rows") and "virtual_sink_logit" not in kwargs:
        raise PolicyError(f"virtual_logit_on_sink_rows acts on the virtual sink logit, and policy spec {spec!r} has "
                          "none: add virtual_sink_logit=B or leave the item out")
    content = kwargs.get("content_sinks")
    if kwargs.get("n_sink") == 0 and not kwargs.get("extra_sink_positions") and kwargs.get("sink_scale", 1.0) != 1:
        raise PolicyError(f"sink_scale acts on the sink set, and n_sink=0 without extra_sink_positions leaves it "
                          f"empty in policy spec {spec!r}: the sink scale would change nothing")
    if clip is not None and clip.threshold == float("inf"):
        raise PolicyError(f"a residual clip at inf never clips (policy spec {spec!r}): leave the clip out")
    if content is not None and float(torch.as_tensor(content.hidden_sink_scale).min()) == 1:
        raise PolicyError(f"hidden_sink_scale=1 leaves every hidden sink's attention as it is (policy spec {spec!r}): "
                          "the content-sink items would change nothing")


def _one_number(value) -> bool:
    """A plain number or a 0-d tensor (one value for every layer), not a per-layer list or tensor."""
    return isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.ndim == 0)


def _as_int(name: str, value, expected: str = "an int") -> int:
    number = _integer(value)
    if number is None:
        raise PolicyError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.80}")
    return number


def _int_tuple(name: str, value) -> tuple[int, ...]:
    """A tuple of ints from a list, tuple, range, 1-d tensor or array of integers. A string is
    refused: iterating it would turn "12" into (1, 2)."""
    expected = "a list or tuple of ints"
    if isinstance(value, (str, bytes)):
        raise PolicyError(f"{name} must be {expected}, got str {value!r} (Policy.parse reads spec strings)")
    try:
        items = list(value)
    except TypeError:  # an int, a 0-d tensor, None...
        raise PolicyError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.80}") from None
    out = []
    for index, item in enumerate(items):
        number = _integer(item)
        if number is None:
            raise PolicyError(f"{name} must be {expected}; item {index} is {type(item).__name__} {item!r:.80}")
        out.append(number)
    return tuple(out)


# ASCII digits only: \d also matches other scripts' digits (int("\u0663") is 3), and int() and float()
# read "1_0" as 10: a spec is typed, and a typo must not become another number
_SPEC_ITEM = re.compile(r"([+-]?[0-9]+)(?:-([+-]?[0-9]+))?")
_SPEC_INT = re.compile(r"[+-]?[0-9]+")
_SPEC_FLOAT = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)
_KEYWORD_POLICIES = {"identity": "", "drop": "sink_scale=0",
                     "act": "hidden_sink_scale=0.4,hidden_sink_threshold=0.1"}


def _spec_int(value: str) -> int:
    if not _SPEC_INT.fullmatch(value):
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def _spec_float(value: str) -> float:
    """A decimal number as typed (inf and nan are read, for the range checks to name them). A
    non-zero number too small for a float (1e-400) is refused rather than read as 0: for sink_scale
    that is the drop policy."""
    if not _SPEC_FLOAT.fullmatch(value):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    if reads_as_zero(value, number):
        raise ValueError(f"{value!r} is too small for a float (it would read as 0)")
    return number + 0.0  # -0 reads as 0: one spelling, one description


def reads_as_zero(text: str, number: float) -> bool:
    """Whether the decimal ``text`` names a non-zero number that float() read as ``number`` = 0
    (1e-400: for a sink scale, the drop policy)."""
    return number == 0 and any(digit in "123456789" for digit in text.lower().split("e")[0])


_MAX_RANGE = 1 << 16  # far more layers or sink positions than any model has; stops layers=0-999999999


def _parse_int_list(value: str, noun: str) -> tuple[int, ...]:
    """A spec list: items separated by ':', each an int or an inclusive range 'a-b' ("-1" is the
    last layer, "-3--1" the last three). An empty item is refused (``0::1``, a trailing ':'), an
    empty list is () for the caller to judge (skipped, ``extra_sink_positions=`` was a policy without
    the sink set it asked for). Raises
    ValueError, which Policy.parse reports with the key and the spec."""
    if not value.strip():
        return ()  # Policy says what an empty list means for its key
    out: list[int] = []
    for item in (part.strip() for part in value.split(":")):
        if not item:
            raise ValueError(f"an empty item in {value!r}: {noun}s are separated by single ':'")
        match = _SPEC_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"{item!r} is not a {noun} or an inclusive range a-b")
        low = int(match.group(1))
        high = low if match.group(2) is None else int(match.group(2))
        if high < low:
            raise ValueError(f"range {item!r} is descending; write {high}-{low}")
        if low < 0 <= high:  # -2-1 would mean "the last two and the first two": list them instead
            raise ValueError(f"range {item!r} mixes negative and non-negative {noun}s")
        if high - low >= _MAX_RANGE:
            raise ValueError(f"range {item!r} is too long")
        out.extend(range(low, high + 1))
    twice = listed_twice(out)
    if twice:
        raise ValueError(f"{noun} {twice[0]} is listed twice")
    return tuple(out)


def listed_twice(values: Sequence[int]) -> list[int]:
    """The values that occur more than once, each once, in the order of their second occurrence."""
    seen: set[int] = set()
    twice: list[int] = []
    for value in values:
        if value in seen and value not in twice:
            twice.append(value)
        seen.add(value)
    return twice


def _spec_number(value: float) -> str:
    """A float written short (``%g``) where that reads back to the same value, else in full (repr),
    so that a described policy parses back to an equal one."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _format_int_list(values: Sequence[int]) -> str:
    """The spec form of a list that _parse_int_list reads back to the same list: runs of three or
    more consecutive ascending values of one sign as 'a-b', the rest separated by ':'. A value
    listed twice (a layer, through the Policy constructor, which refuses it only against a model) is
    written once: the meaning is a set."""
    unique = list(dict.fromkeys(values))
    items: list[str] = []
    start = 0
    while start < len(unique):
        end = start
        while (end + 1 < len(unique) and unique[end + 1] == unique[end] + 1
               and (unique[end + 1] < 0) == (unique[start] < 0)):
            end += 1
        if end - start >= 2:
            items.append(f"{unique[start]}-{unique[end]}")
        else:
            items.extend(str(v) for v in unique[start:end + 1])
        start = end + 1
    return ":".join(items)


def _check_values(name: str, values: torch.Tensor, low: float | None = None, high: float | None = None) -> None:
    if not torch.isfinite(values).all():
        raise PolicyError(f"{name} contains NaN or inf: {values.flatten()[:8].tolist()}")
    if low is not None and (values < low).any() or high is not None and (values > high).any():
        raise PolicyError(
            # every digit it takes (Python's repr): a beta of 1.0000001 was refused as "got min 1, max 1"
            f"{name} must lie in [{low}, {high}]; got min {values.min().item()!r}, max {values.max().item()!r}"
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


def _clip_values(name: str, value) -> list[float]:
    """A residual clip's threshold or sink norm as a flat list: a number or one per layer, each > 0
    (inf: a threshold disables the layer's clip, a sink norm leaves its sinks unclipped), no bool
    (``ResidualClip(True)`` read as a relative threshold of 1)."""
    expected = "a number or one number per layer"
    t = _numbers(f"residual_clip.{name}", value, expected)
    if t.ndim > 1:
        raise PolicyError(f"residual_clip.{name} must be {expected}, got shape {tuple(t.shape)}")
    values = t.flatten().tolist()
    if not values or any(math.isnan(v) or v <= 0 for v in values):
        # inf means "no clip" for a threshold (of other tokens) and "exempt" for a sink norm, not the same
        meaning = "inf disables a layer" if name == "threshold" else "inf leaves a layer's sinks unclipped"
        raise PolicyError(f"residual_clip.{name} must be > 0 ({meaning}), got {values[:8]}")
    return values


def _resolve_clip(clip: ResidualClip | None, num_layers: int) -> list[LayerClip | None]:
    if clip is None:
        return [None] * num_layers

    def per_layer(name: str, value) -> list[float]:
        values = _clip_values(name, value)
        if len(values) == 1:
            return values * num_layers
        if len(values) != num_layers:
            raise PolicyError(f"residual_clip.{name} has {len(values)} values; expected 1 or num_layers = {num_layers}")
        return values

    thresholds = per_layer("threshold", clip.threshold)
    sink = per_layer("sink_norm", clip.sink_norm) if clip.sink_norm is not None else [None] * num_layers
    return [
        None if math.isinf(thr) and sink_norm is None else LayerClip(thr, clip.mode, sink_norm)
        for thr, sink_norm in zip(thresholds, sink)
    ]
