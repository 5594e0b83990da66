"""``SinkCache``: a transformers 5 cache that streams (sinks + recent window) and can quantize.

    cache = sinkfix.SinkCache(model.config, n_sink=4, window=1020)           # StreamingLLM
    cache = sinkfix.SinkCache(model.config, n_sink=4, window=None, bits=2)   # sink-protected KV quantization
    model.generate(ids, past_key_values=cache, max_new_tokens=...)           # or cache=..., or a decode loop

Full-attention layers get a :class:`~sinkfix.caches.layers.SinkLayer`; sliding-window layers of a
hybrid model (Gemma2/3, GPT-OSS) keep their own window as transformers does (quantized, sinks
protected while in the window, when ``bits`` is set). docs/caches.md has the position rule and the
quantization layout.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from sinkfix.caches.body import make_body
from sinkfix.caches.layers import SinkLayer
from sinkfix.caches.quantize import BACKENDS, KVQuantizer, check_quantization
from sinkfix.caches.rope import Rotary, rotary_for
from sinkfix.errors import CacheError, UnsupportedModelError

__all__ = ["SinkCache", "check_sink_window"]

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sink_window(n_sink: Any, window: Any) -> None:
    """Raise :class:`CacheError` unless ``n_sink >= 0`` and ``window`` is None or ``> n_sink``."""
    if not _is_int(n_sink) or n_sink < 0:
        raise CacheError(f"n_sink must be an integer >= 0, got {n_sink!r}")
    if window is None:
        return
    if not _is_int(window) or window < 1:
        raise CacheError(f"window must be an integer >= 1 (the recent tokens kept besides the sinks), got {window!r}")
    if n_sink >= window:
        raise CacheError(f"n_sink ({n_sink}) must be smaller than window ({window}): the window counts the recent "
                         "tokens kept besides the sinks, and a cache of mostly sinks keeps almost no context")


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", *_SLIDING_TYPES})
    if unknown:
        raise UnsupportedModelError(f"sink caches hold attention layers only; this model has layer types {unknown}")
    if "full_attention" not in types:
        raise UnsupportedModelError("every layer of this model is a sliding-window layer, which evicts its first "
                                    "tokens by design: there is nothing for a sink cache to keep")
    return list(types)


# one entry per layer: (layer type, the RoPE the layer re-rotates kept keys with, the sliding window)
_Plan = list[tuple[str, Rotary | None, int | None]]


def _layer_plan(text) -> _Plan:
    """What each layer of a cache built from ``text`` (a text config) relies on: its layer type, the
    RoPE frequencies its kept keys are re-rotated with (full attention) or its window (sliding)."""
    params = getattr(text, "rope_parameters", None) or {}
    rotaries: dict[str, Rotary] = {}
    plan: _Plan = []
    for kind in _layer_types(text):
        if kind == "full_attention":
            if kind not in rotaries:
                per_type = kind if isinstance(params.get(kind), dict) else None
                rotaries[kind] = rotary_for(text, per_type)
            plan.append((kind, rotaries[kind], None))
        else:
            plan.append((kind, None, text.sliding_window if kind == "sliding_attention" else text.attention_chunk_size))
    return plan


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _calling_config(depth: int) -> PreTrainedConfig | None:
    """The config of the module whose method called :meth:`SinkCache.update` (``depth`` frames up):
    transformers' attention modules call ``cache.update(...)`` from their ``forward`` and hold the
    model's (text) config as ``self.config``. None when the caller is not such a module (a
    hand-written ``cache.update`` call), which is then not checked."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return None
    try:
        caller = frame.f_locals.get("self")
    finally:
        del frame
    config = getattr(caller, "config", None) if isinstance(caller, torch.nn.Module) else None
    return config if isinstance(config, PreTrainedConfig) else None


def _rope_difference(mine, theirs) -> str:
    """The RoPE settings that differ between two text configs, in words (empty when none is named)."""
    def settings(text):
        out = dict(getattr(text, "rope_parameters", None) or {})
        out["head_dim"] = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if getattr(text, "partial_rotary_factor", None) is not None:
            out["partial_rotary_factor"] = text.partial_rotary_factor
        return out

    try:
        a, b = settings(mine), settings(theirs)
    except (AttributeError, TypeError, ZeroDivisionError):
        return ""
    return ", ".join(f"{key} {a.get(key)!r} in this cache's config, {b.get(key)!r} in the model's"
                     for key in sorted(set(a) | set(b), key=str) if a.get(key) != b.get(key))


class SinkCache(Cache):
    """Keep each row's first ``n_sink`` real tokens plus its ``window`` most recent ones.

    Args:
        config: the model's config (``model.config``, not the model); decides the layer types and the
            RoPE tables. The cache then serves that model only: when a model's attention layer calls it
            (every transformers model does), a model whose layer types, sliding windows or RoPE
            frequencies (``rope_theta``, ``rope_scaling`` / ``rope_parameters``, head dim, partial
            rotary factor) differ from ``config`` is refused with a :class:`CacheError`, since the kept
            keys would be re-rotated with the wrong frequencies once the cache evicts. A model with
            fewer layers of the same kinds is served (the extra cache layers stay empty); more layers,
            other kv-head counts or head dims are refused. Direct ``cache.update(...)`` calls from code
            that is not an attention module are checked for shapes only.
        n_sink: sink tokens kept per row (the first real tokens: left padding is skipped).
        window: recent tokens kept besides the sinks (the cache holds ``n_sink + window`` tokens between
            calls; a call also sees its own new tokens). ``None``: never evict (quantization only).
        bits: ``2`` or ``4`` quantizes tokens older than ``residual_length`` (KIVI-style, transformers'
            own backends), except the sinks, which stay in full precision; ``8`` with ``backend="fp8"``
            casts every token to float8 e4m3 with one scale per tensor calibrated without the sinks
            (transformers' fp8 arithmetic). ``None``: full precision.
        backend: ``"quanto"`` (optimum-quanto), ``"hqq"`` (2 or 4 bits) or ``"fp8"`` (8 bits); checked
            even without ``bits``, so a misspelt name fails at once.
        residual_length: recent tokens kept in full precision before they are quantized (as
            transformers; not used by fp8, which has no residual window).
        q_group_size: channels per quantization group (one token, one kv head); default 64 as in
            transformers, or the whole head when 64 does not divide it (not used by fp8).

    Raises :class:`~sinkfix.errors.CacheError` for bad arguments and
    :class:`~sinkfix.errors.UnsupportedModelError` for models without (position-independent) RoPE.
    """

    def __init__(self, config, n_sink: int = 4, window: int | None = 1020, bits: int | None = None, *,
                 backend: str = "quanto", residual_length: int = 128, q_group_size: int | None = None) -> None:
        if not isinstance(config, PreTrainedConfig):
            if isinstance(getattr(config, "config", None), PreTrainedConfig):
                raise CacheError(f"SinkCache takes the model's config, not the model: pass model.config (got a "
                                 f"{type(config).__name__})")
            raise CacheError(f"SinkCache needs the model's config (a transformers PreTrainedConfig: pass "
                             f"model.config), got {type(config).__name__}")
        check_sink_window(n_sink, window)
        if backend not in BACKENDS:
            raise CacheError(f"unknown quantization backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        text = _text_config(config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if q_group_size is None:
            q_group_size = 64 if head_dim % 64 == 0 else head_dim
        if bits is not None:
            check_quantization(bits, backend, q_group_size, head_dim)
            if not _is_int(residual_length) or residual_length < 1:
                raise CacheError(f"residual_length must be an integer >= 1, got {residual_length!r}")
        self.n_sink, self.window, self.bits = n_sink, window, bits
        self.backend = backend if bits is not None else None
        self.residual_length, self.q_group_size = residual_length, q_group_size
        self._expected = (text.num_key_value_heads if getattr(text, "num_key_value_heads", None) else
                          text.num_attention_heads, head_dim)
        quantizer = KVQuantizer(backend, bits, q_group_size) if bits is not None else None
        self._text, self._plan = text, _layer_plan(text)
        self._served = text  # the last config of a calling model found to match (checked once per config)
        layers = [self._make_layer(kind, rotary, window, quantizer) for kind, rotary, window in self._plan]
        super().__init__(layers=layers)

    def _make_layer(self, kind: str, rotary: Rotary | None, window: int | None, quantizer: KVQuantizer | None):
        def body():
            return make_body(quantizer, self.residual_length)

        if kind == "full_attention":
            return SinkLayer(n_sink=self.n_sink, window=self.window, rotary=rotary, body=body())
        if quantizer is None:
            return DynamicSlidingWindowLayer(sliding_window=window)
        # transformers' sliding layer keeps the last window - 1 tokens; this one keeps the same
        return SinkLayer(n_sink=self.n_sink, window=window - 1, rotary=None, body=body(), keep_sinks=False,
                         sliding=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.layers):
            raise CacheError(f"this cache was made for a model with {len(self.layers)} layers; layer {layer_idx} "
                             "asked for it: a cache serves the model whose config built it")
        heads, dim = key_states.shape[1], key_states.shape[-1]
        if (heads, dim) != self._expected:
            raise CacheError(f"this cache was made for {self._expected[0]} kv heads x {self._expected[1]} dims, got "
                             f"{heads} x {dim}: a cache serves the model whose config built it")
        # the attention module calling, if it is one; not while dynamo traces, which cannot trace frame
        # inspection (generate never compiles a model with this cache: its layers are not compileable)
        config = None if torch.compiler.is_compiling() else _calling_config(2)
        if config is not None and config is not self._served:
            self._check_model(_text_config(config))
            self._served = config
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_model(self, text) -> None:
        """Raise :class:`CacheError` unless the calling model's text config ``text`` has, layer for
        layer, the layer types, sliding windows and RoPE frequencies this cache was built with."""
        served = " a cache serves the model whose config built it: SinkCache(model.config, ...)"
        try:
            theirs = _layer_plan(text)
        except UnsupportedModelError as exc:
            raise CacheError(f"this cache is called by a model it cannot serve ({exc});{served}") from None
        except (AttributeError, KeyError, TypeError):
            return  # not a config this check can read (the caller is not a decoder's attention): shapes only
        if len(theirs) > len(self._plan):
            raise CacheError(f"this cache was made for a model with {len(self._plan)} layers; the calling model has "
                             f"{len(theirs)}:{served}")
        for i, ((kind, rotary, window), (their_kind, their_rotary, their_window)) in enumerate(zip(self._plan, theirs)):
            if kind != their_kind:
                raise CacheError(f"layer {i} is a {their_kind} layer in the calling model but a {kind} layer in this "
                                 f"cache:{served}")
            if window != their_window:
                raise CacheError(f"layer {i} keeps a {their_window}-token window in the calling model but "
                                 f"{window} in this cache:{served}")
            if rotary is not None and not (rotary.inv_freq.shape == their_rotary.inv_freq.shape
                                           and torch.equal(rotary.inv_freq, their_rotary.inv_freq)):
                detail = _rope_difference(self._text, text) or "other RoPE frequencies"
                raise CacheError(f"this cache was built from a config whose rotary embedding differs from the calling "
                                 f"model's ({detail}): it would re-rotate kept keys with the wrong frequencies "
                                 f"after eviction;{served}")

    def nbytes(self) -> int:
        """Bytes of cached state held (keys, values, positions, quantization scales)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, SinkLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += 2 * layer.keys.nelement() * layer.keys.element_size()
        return total

    def __repr__(self) -> str:
        quant = "" if self.bits is None else f", bits={self.bits}, backend={self.backend!r}"
        return f"SinkCache(n_sink={self.n_sink}, window={self.window}{quant}, layers={len(self.layers)})"
