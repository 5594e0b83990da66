"""``SinkCache``: a transformers 5 cache that streams (sinks + recent window) and can quantize.

    cache = sinkfix.SinkCache(model.config, n_sink=4, window=1020)           # StreamingLLM
    cache = sinkfix.SinkCache(model.config, n_sink=4, window=None, bits=2)   # sink-protected KV quantization
    model.generate(ids, past_key_values=cache, max_new_tokens=...)           # or cache=..., or a decode loop

Every layer is a :class:`~sinkfix.caches.layers.SinkLayer`: full-attention layers keep sinks and
window; sliding-window layers of a hybrid model (Gemma2/3, GPT-OSS) keep their own window as
transformers does (quantized, sinks protected while in the window, when ``bits`` is set), and
re-rotate it by the same rule, so both kinds see the same distances whatever positions the model
is given. docs/caches.md has the position rule and the quantization layout.
"""

from __future__ import annotations

import copy
import sys
import weakref
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache

from sinkfix.caches.body import Fp8Body, make_body
from sinkfix.caches.layers import SinkLayer, real_new_tokens
from sinkfix.caches.quantize import BACKENDS, KVQuantizer, check_quantization
from sinkfix.caches.rope import Rotary, check_model_rotation, rotary_for
from sinkfix.errors import EVICTED_CACHE_REFUSAL, EVICTED_CACHE_REMEDY, CacheError, UnsupportedModelError

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


def _layer_plan(text, moves_keys: bool = True) -> _Plan:
    """What each layer of a cache built from ``text`` (a text config) relies on: its layer type, the
    RoPE frequencies its kept keys are re-rotated with (Gemma3 has one table per layer type) and,
    for sliding layers, the window. ``moves_keys=False`` (a cache that never evicts) accepts a model
    without rotary embeddings: its layers then get no RoPE (None), and keys that carry no position
    are never rotated."""
    if getattr(text, "kv_lora_rank", None) is not None:
        # DeepSeek-style multi-head latent attention: the cached keys are not head_dim wide (their
        # rotary part is a slice of its own), which the first forward met as a shape error blaming
        # the cache's config
        kind = getattr(text, "model_type", type(text).__name__)
        raise UnsupportedModelError(
            f"{kind} uses multi-head latent attention (kv_lora_rank): its cached keys and values are not "
            "(kv heads, head_dim) like a sink cache's layers; use transformers' own cache for it")
    params = getattr(text, "rope_parameters", None) or {}
    if not moves_keys and not (isinstance(params, dict) and params):
        return [(kind, None, _window_of(text, kind)) for kind in _layer_types(text)]
    rotaries: dict[str, Rotary] = {}
    plan: _Plan = []
    for kind in _layer_types(text):
        if kind not in rotaries:
            per_type = kind if isinstance(params.get(kind), dict) else None
            rotaries[kind] = rotary_for(text, per_type)
            if moves_keys:  # a cache that never evicts never rotates a key
                check_model_rotation(text, rotaries[kind])
        plan.append((kind, rotaries[kind], _window_of(text, kind)))
    return plan


def _window_of(text, kind: str) -> int | None:
    if kind == "full_attention":
        return None
    return text.sliding_window if kind == "sliding_attention" else text.attention_chunk_size


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _caller(depth: int) -> tuple[PreTrainedConfig | None, Any, torch.nn.Module | None]:
    """(config, attention mask, module) of the module whose method called :meth:`SinkCache.update`
    (``depth`` frames up): transformers' attention modules call ``cache.update(...)`` from their
    ``forward``, hold the model's (text) config as ``self.config`` and have the call's mask as their
    ``attention_mask`` argument. (None, None, None) when the caller is not such a module (a
    hand-written ``cache.update`` call), which is then checked for shapes only."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return None, None, None
    try:
        caller = frame.f_locals.get("self")
        mask = frame.f_locals.get("attention_mask")
    finally:
        del frame
    if not isinstance(caller, torch.nn.Module):
        return None, None, None
    config = getattr(caller, "config", None)
    return (config if isinstance(config, PreTrainedConfig) else None), mask, caller


# the per-module state sinkfix.patch attaches to each attention module it corrects (its policy says
# whether the layer has content-dependent sinks); read by name, as the patch sets it
_PATCH_STATE = "_sinkfix"


def _NO_MODULE() -> None:
    """A dead weak reference: no module seen yet."""
    return None


def _has_content_sinks(module: torch.nn.Module | None) -> bool:
    policy = getattr(getattr(module, _PATCH_STATE, None), "policy", None)
    return getattr(policy, "content", None) is not None


#: recent tokens kept in full precision before they are quantized, as transformers' QuantizedCache
DEFAULT_RESIDUAL_LENGTH = 128


@torch.compiler.disable
def _traced_caller_mask() -> Any:
    """The ``attention_mask`` argument of the nearest module method up the stack, for an update that
    torch.compile traces (which cannot trace :func:`_caller`'s frame lookup): run outside the graph,
    searching up from the frame that called it, since the frames between depend on how the compiled
    code reached it. None when no such frame is found."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            local = frame.f_locals
            if isinstance(local.get("self"), torch.nn.Module) and "attention_mask" in local:
                return local["attention_mask"]
            frame = frame.f_back
        return None
    finally:
        del frame


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
            (transformers' fp8 arithmetic), frozen after the first block: later tokens beyond its range
            are clipped (:meth:`fp8_saturated` counts them). ``None``: full precision.
        backend: ``"quanto"`` (optimum-quanto), ``"hqq"`` (2 or 4 bits) or ``"fp8"`` (8 bits); checked
            even without ``bits``, so a misspelt name fails at once.
        residual_length: recent tokens kept in full precision before they are quantized (default
            128, as transformers); refused with fp8, which has no residual window. With ``bits=2|4`` a
            ``window`` must be larger: the residual flushes only once it holds ``residual_length``
            tokens, more than a window no larger lets it keep.
        q_group_size: channels per quantization group (one token, one kv head); default 64 as in
            transformers, or the whole head when 64 does not divide it (not used by fp8).

    Raises :class:`~sinkfix.errors.CacheError` for bad arguments and
    :class:`~sinkfix.errors.UnsupportedModelError` for models without (position-independent) RoPE
    (models without any RoPE only when ``window`` is set: a cache that never evicts moves no key).
    """

    def __init__(self, config, n_sink: int = 4, window: int | None = 1020, bits: int | None = None, *,
                 backend: str = "quanto", residual_length: int | None = None, q_group_size: int | None = None) -> None:
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
        longest = getattr(text, "max_position_embeddings", None)
        if window is None and _is_int(longest) and n_sink > longest:
            # a cache that never evicts then keeps every token the model was trained on as a sink, in
            # full precision (the sink store grows with the tokens seen, so a streaming cache with
            # many sinks holds only those it has captured)
            raise CacheError(f"n_sink ({n_sink}) is larger than the model's max_position_embeddings ({longest}): with "
                             "window=None every token within the model's positions would be a sink kept in full "
                             "precision; give n_sink at most that")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # the quantization-only arguments are checked with or without bits, as the backend is: a wrong
        # value given with bits=None was accepted and only failed once bits was added
        if q_group_size is not None and (not _is_int(q_group_size) or q_group_size < 1 or head_dim % q_group_size):
            raise CacheError(f"q_group_size {q_group_size!r} does not divide the head dimension {head_dim}: it must "
                             "be a positive integer that does (groups hold channels of one token and head)")
        if backend == "fp8" and residual_length is not None:
            # fp8 casts every token and has no residual window: the value was accepted and ignored
            raise CacheError(f"residual_length with backend='fp8': fp8 casts every token and has no residual window, "
                             f"got residual_length={residual_length!r}")
        residual_length = DEFAULT_RESIDUAL_LENGTH if residual_length is None else residual_length
        if not _is_int(residual_length) or residual_length < 1:
            raise CacheError(f"residual_length must be an integer >= 1, got {residual_length!r}")
        if q_group_size is None:
            q_group_size = 64 if head_dim % 64 == 0 else head_dim
        if bits is not None:
            check_quantization(bits, backend, q_group_size, head_dim)
            if backend != "fp8" and window is not None and window <= residual_length:
                # the residual flushes when it reaches residual_length tokens and eviction keeps it at
                # most window long: one-token decoding with window < residual_length - 1 never flushes
                # after the first call, and one just below flushes a window that is then evicted token by
                # token (measured: 4 sinks, window 100, residual 128, a 200-token prompt and 300
                # generated tokens: 80,512 bytes at 4 bits, 54,912 in full precision, 0 tokens quantized)
                raise CacheError(f"with bits={bits}, window ({window}) must be larger than residual_length "
                                 f"({residual_length}), the recent tokens held in full precision until they are "
                                 f"quantized: a window no larger keeps most or all of its tokens in full precision "
                                 f"after the first call; set residual_length below {window} (e.g. residual_length="
                                 f"{max(1, window // 4)}) or bits=None")
        self.n_sink, self.window, self.bits = n_sink, window, bits
        self.backend = backend if bits is not None else None
        self.residual_length, self.q_group_size = residual_length, q_group_size
        self._expected = (text.num_key_value_heads if getattr(text, "num_key_value_heads", None) else
                          text.num_attention_heads, head_dim)
        quantizer = KVQuantizer(backend, bits, q_group_size) if bits is not None else None
        self._text, self._plan = text, _layer_plan(text, moves_keys=window is not None)
        self._served = text  # the last config of a calling model found to match (checked once per config)
        # layer -> (the attention module that last called it, the layer-0 module of that forward), weakly
        # (the cache must not keep a model alive): at a forward's first layer, whether a later layer of
        # the same model has content-dependent sinks (another model's modules, e.g. those of the model a
        # copied cache was copied beside, say nothing about this forward)
        self._callers: dict[int, tuple[weakref.ref, Any]] = {}
        self._first_caller: Any = _NO_MODULE  # weakly, the layer-0 module of the current forward
        layers = [self._make_layer(kind, rotary, window, quantizer) for kind, rotary, window in self._plan]
        super().__init__(layers=layers)

    def _make_layer(self, kind: str, rotary: Rotary | None, window: int | None, quantizer: KVQuantizer | None):
        body = make_body(quantizer, self.residual_length)
        if kind == "full_attention":
            return SinkLayer(n_sink=self.n_sink, window=self.window, rotary=rotary, body=body)
        # transformers' sliding layer keeps the last window - 1 tokens; this one keeps the same and
        # re-rotates them by the full layers' rule: with positions counted inside the cache (constant
        # once it is full) keys kept as written would all sit at the query's own position
        return SinkLayer(n_sink=self.n_sink, window=window - 1, rotary=rotary, body=body, keep_sinks=False,
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
        config, mask, module = (None, None, None) if torch.compiler.is_compiling() else _caller(2)
        if config is not None and config is not self._served:
            self._check_model(_text_config(config))
            self._served = config
        layer = self._in_step(layer_idx, key_states.shape[-2])
        if module is not None:
            if layer_idx == 0:
                self._check_content_sinks(module)
                self._first_caller = weakref.ref(module)
            self._callers[layer_idx] = (weakref.ref(module), self._first_caller)
        if torch.compiler.is_compiling() and isinstance(layer, SinkLayer) and not layer.rows_started:
            # the mask is what tells left padding from real tokens when the positions count the padding
            # (a loop that passes an attention mask and no position_ids): taken for real, the padding
            # became each row's sinks under torch.compile (tiny Llama: logits 0.64 off, no error). Read
            # outside the graph (a graph break, until every row has a real token: the first call)
            mask = _traced_caller_mask()
        if isinstance(layer, SinkLayer) and mask is not None and not layer.rows_started:
            # which new tokens are real (not padding): position_ids alone do not tell when a loop
            # passes an attention mask but leaves the positions to the model; read until every row
            # has a real token (normally the first call only)
            kwargs["real_tokens"] = real_new_tokens(mask, key_states.shape[0], key_states.shape[-2],
                                                    layer.kept_length if layer.is_initialized else 0)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def __getstate__(self) -> dict:
        # weak references do not pickle; an unpickled cache records the modules that call it again,
        # from its next forward on (until then a content-sink refusal comes from the attention, late)
        return {**self.__dict__, "_callers": {}, "_first_caller": _NO_MODULE}

    def __deepcopy__(self, memo: dict) -> "SinkCache":
        # a copy (a prompt cache copied to reuse its prefix) serves the same model: it keeps the weak
        # references to its attention modules, so its first forward refuses content sinks early too
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = dict(value) if name == "_callers" else copy.deepcopy(value, memo)
        return copied

    def _check_content_sinks(self, first: torch.nn.Module) -> None:
        """At a forward's first layer, before any layer stores its tokens: raise :class:`CacheError`
        if a layer that will show its kept sinks (it has evicted) is called by an attention module
        patched with content-dependent sinks, which cannot follow such columns. The attention raised
        it itself only after layer 0 had stored the call's tokens, and the cache was then out of step
        for good (the next call, even unpatched, hit the interrupted-forward error). The modules are
        those of the previous forward for the later layers."""
        for index, (ref, owner) in self._callers.items():
            layer = self.layers[index]
            if not (isinstance(layer, SinkLayer) and layer.keep_sinks and layer.n_sink and layer.evicted):
                continue  # its columns are one run of tokens in this call: content sinks follow them
            if index and owner() is not first:
                continue  # recorded in a forward of another model (one the cache was copied beside)
            if _has_content_sinks(first if index == 0 else ref()):
                raise CacheError(f"layer {index}: {EVICTED_CACHE_REFUSAL}; nothing of this call was stored, so the "
                                 f"cache can go on without the content-sink policy; {EVICTED_CACHE_REMEDY}")

    def _in_step(self, layer_idx: int, new_tokens: int):
        """Layer ``layer_idx``, after checking that the layers are in step: at a forward's first layer
        every layer used so far has seen the same tokens, at a later one it has seen the first
        layer's minus this call's. A forward interrupted part-way (an exception, Ctrl-C in a long
        ``feed``) left them apart, and going on put each later token at different places in different
        layers (SmolLM2, interrupted at layer 15 of 30: logits 1-5.8 off for 20 tokens, no error).
        Layers no forward has reached (a cache built for a deeper model of the same kinds) are not
        counted."""
        layer, first = self.layers[layer_idx], self.layers[0]
        if not (isinstance(layer, SinkLayer) and isinstance(first, SinkLayer)):
            return layer
        if layer_idx == 0:
            seen = [other.seen for other in self.layers if isinstance(other, SinkLayer) and other.is_initialized]
            apart = len(set(seen)) > 1
        else:
            seen = [first.seen, layer.seen]
            apart = layer.seen + new_tokens != first.seen
        if apart:
            raise CacheError(f"this cache's layers are out of step (tokens seen: {min(seen)} to {max(seen)}): a "
                             "forward using it was interrupted part-way; call cache.reset() and feed the sequence "
                             "again, or start a new cache")
        return layer

    def _check_model(self, text) -> None:
        """Raise :class:`CacheError` unless the calling model's text config ``text`` has, layer for
        layer, the layer types, sliding windows and RoPE frequencies this cache was built with."""
        served = " a cache serves the model whose config built it: SinkCache(model.config, ...)"
        try:
            theirs = _layer_plan(text, moves_keys=self.window is not None)
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
            if (rotary is None) != (their_rotary is None) or rotary is not None and not (
                    rotary.inv_freq.shape == their_rotary.inv_freq.shape
                    and torch.equal(rotary.inv_freq, their_rotary.inv_freq)):
                detail = _rope_difference(self._text, text) or "other RoPE frequencies"
                raise CacheError(f"this cache was built from a config whose rotary embedding differs from the calling "
                                 f"model's ({detail}): it would re-rotate kept keys with the wrong frequencies "
                                 f"after eviction;{served}")

    def nbytes(self) -> int:
        """Bytes of cached state held (keys, values, positions, quantization scales)."""
        return sum(layer.nbytes() for layer in self.layers)

    def fp8_saturated(self) -> int:
        """Key and value elements an fp8 cache has cast beyond float8's range (saturated at +-448 times
        the frozen scale) since its scales were set, summed over layers; 0 for other caches. The scale
        is calibrated on the first block and frozen, so a later token larger than every token of that
        block is clipped: SmolLM2, greedy decoding from a 5-token prompt, 3805 elements saturated and
        the next-token distributions a mean KL of 6.5 nats from full precision (docs/caches.md, "fp8").
        Reading it synchronizes with the device once."""
        bodies = [getattr(layer, "body", None) for layer in self.layers]
        counts = [body.saturated for body in bodies if isinstance(body, Fp8Body) and body.saturated is not None]
        return int(torch.stack(counts).sum()) if counts else 0

    def __repr__(self) -> str:
        quant = "" if self.bits is None else f", bits={self.bits}, backend={self.backend!r}"
        return f"SinkCache(n_sink={self.n_sink}, window={self.window}{quant}, layers={len(self.layers)})"
