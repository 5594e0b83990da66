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

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from sinkfix.caches.body import make_body
from sinkfix.caches.layers import SinkLayer
from sinkfix.caches.quantize import KVQuantizer, check_quantization
from sinkfix.caches.rope import rotary_for
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


class SinkCache(Cache):
    """Keep each row's first ``n_sink`` real tokens plus its ``window`` most recent ones.

    Args:
        config: the model's config (``model.config``); decides the layer types and the RoPE tables.
        n_sink: sink tokens kept per row (the first real tokens: left padding is skipped).
        window: recent tokens kept besides the sinks (the cache holds ``n_sink + window`` tokens between
            calls; a call also sees its own new tokens). ``None``: never evict (quantization only).
        bits: ``2`` or ``4`` quantizes tokens older than ``residual_length`` (KIVI-style, transformers'
            own backends), except the sinks, which stay in full precision; ``8`` with ``backend="fp8"``
            casts every token to float8 e4m3 with one scale per tensor calibrated without the sinks
            (transformers' fp8 arithmetic). ``None``: full precision.
        backend: ``"quanto"`` (optimum-quanto), ``"hqq"`` (2 or 4 bits) or ``"fp8"`` (8 bits).
        residual_length: recent tokens kept in full precision before they are quantized (as
            transformers; not used by fp8, which has no residual window).
        q_group_size: channels per quantization group (one token, one kv head); default 64 as in
            transformers, or the whole head when 64 does not divide it (not used by fp8).

    Raises :class:`~sinkfix.errors.CacheError` for bad arguments and
    :class:`~sinkfix.errors.UnsupportedModelError` for models without (position-independent) RoPE.
    """

    def __init__(self, config, n_sink: int = 4, window: int | None = 1020, bits: int | None = None, *,
                 backend: str = "quanto", residual_length: int = 128, q_group_size: int | None = None) -> None:
        check_sink_window(n_sink, window)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
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
        layers = [self._make_layer(text, kind, quantizer) for kind in _layer_types(text)]
        super().__init__(layers=layers)

    def _make_layer(self, text, kind: str, quantizer: KVQuantizer | None):
        def body():
            return make_body(quantizer, self.residual_length)

        per_type = kind if isinstance(getattr(text, "rope_parameters", {}).get(kind), dict) else None
        if kind == "full_attention":
            return SinkLayer(n_sink=self.n_sink, window=self.window, rotary=rotary_for(text, per_type), body=body())
        window = text.sliding_window if kind == "sliding_attention" else text.attention_chunk_size
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
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

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
