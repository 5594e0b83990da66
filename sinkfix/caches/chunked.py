"""Feed a long input through a sink cache in chunks, with the visibility of one-token decoding.

A plain forward of C new tokens through a :class:`~sinkfix.caches.SinkCache` lets every one of them
see all kept tokens and all earlier new ones, so the last token of a chunk sees up to C - 1 more
context than decoding would give it. :func:`feed` passes an explicit mask instead: the token at
absolute index t sees its row's sinks and the tokens t - window .. t, exactly the set it sees when
the stream is decoded one token at a time, and C tokens cost one forward instead of C. With a
full-precision cache the one difference from decoding:
the sink keys are placed once per chunk, right before the oldest kept token as seen by the chunk's
first token, so the chunk's j-th token sees them j positions further away than decoding would
(``sinkfix stream --chunk`` measures the effect; docs/caches.md). A quantized cache (``bits=2|4``,
fp8) adds another: the same tokens, but other values, since the residual flushes and the fp8 scale
is calibrated per call, so at other tokens when they arrive in chunks (tiny Llama, window-only,
chunks of 5 against one token at a time: 2e-2 on the logits at 4 bits, 1.1e-2 with fp8, 2.4e-7 in
full precision).
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterator

import torch

from sinkfix.caches.cache import SinkCache
from sinkfix.caches.layers import SinkLayer
from sinkfix.errors import CacheError

__all__ = ["feed", "stream_masks", "cache_keyword"]


def cache_keyword(model) -> str:
    """The forward keyword that takes a cache: ``cache`` from transformers 5.24 on (``past_key_values``
    is deprecated there), ``past_key_values`` before."""
    forward = inspect.signature(model.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def _full_mask(layer: SinkLayer, batch: int, seen: int, chunk: int, window: int | None, device) -> torch.Tensor:
    """(B, 1, C, K) bool: kept columns (sinks + window) and the new ones, under the decoding rule."""
    new = (torch.arange(chunk, device=device) + seen).expand(batch, chunk)
    if layer.is_initialized:
        if bool((layer.first_real != 0).any()):
            raise CacheError("feed() streams unpadded rows; this cache holds left-padded rows")
        kept, kept_sink = layer.column_info()
        columns = torch.cat([kept, new], dim=1)
        is_sink = torch.cat([kept_sink, torch.zeros_like(new, dtype=torch.bool)], dim=1)
    else:  # first chunk: nothing kept yet; the chunk's first tokens are the sinks
        columns, is_sink = new, new < layer.n_sink
    query = new[:, :, None]  # (B, C, 1)
    col = columns[:, None, :]  # (B, 1, K)
    visible = (col >= 0) & (col <= query)
    if window is not None:
        visible &= (col >= query - window) | is_sink[:, None, :]
    return visible[:, None]


def _sliding_mask(layer: SinkLayer, batch: int, seen: int, chunk: int, device) -> torch.Tensor:
    """(B, 1, C, K) bool for a sliding-window layer: causal, and within its window."""
    kv_length, kv_offset = layer.get_mask_sizes(chunk)
    window = layer.window + 1  # the model's sliding window: the layer keeps window - 1 tokens
    col = (torch.arange(kv_length, device=device) + kv_offset)[None, :]
    query = (torch.arange(chunk, device=device) + seen)[:, None]
    visible = (col <= query) & (col > query - window)
    return visible[None, None].expand(batch, 1, chunk, kv_length)


def stream_masks(cache: SinkCache, batch: int, chunk: int, device) -> dict[str, torch.Tensor]:
    """The masks of the next ``chunk`` tokens, per layer kind ("full_attention", "sliding_attention")."""
    seen = cache.get_seq_length()
    masks: dict[str, torch.Tensor] = {}
    for layer in cache.layers:
        if isinstance(layer, SinkLayer) and layer.keep_sinks and "full_attention" not in masks:
            masks["full_attention"] = _full_mask(layer, batch, seen, chunk, cache.window, device)
        elif not (isinstance(layer, SinkLayer) and layer.keep_sinks) and "sliding_attention" not in masks:
            masks["sliding_attention"] = _sliding_mask(layer, batch, seen, chunk, device)
    return masks


def _as_model_mask(masks: dict[str, torch.Tensor], model) -> torch.Tensor | dict[str, torch.Tensor]:
    if getattr(model.config, "_attn_implementation", None) == "eager":
        # eager attention adds its mask to the scores
        dtype = next(model.parameters()).dtype
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                 for k, m in masks.items()}
    return masks["full_attention"] if len(masks) == 1 else masks


def feed(model, cache: SinkCache, input_ids: torch.Tensor, *, chunk_size: int = 32,
         on_chunk: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
    """Stream ``input_ids`` (B, N), unpadded, through ``model`` with ``cache``: return an iterator that
    runs one forward per chunk of ``chunk_size`` tokens and yields that chunk's logits (B, C, V).

    Nothing is fed until the iterator is consumed (``for logits in feed(...)``, or
    ``torch.cat(list(feed(...)), 1)``); the arguments are checked at once, when ``feed`` is called.
    The cache may already hold earlier tokens of the same rows. ``on_chunk(C)`` is called after each
    chunk's forward. Raises :class:`CacheError` for a cache that is not a :class:`SinkCache`, a
    ``chunk_size`` that is not a positive integer, or ``input_ids`` that are not a 2-D (B, N) tensor
    of token ids (one sequence: ``ids[None]``).
    """
    if not isinstance(cache, SinkCache):
        raise CacheError(f"feed() needs a SinkCache, got {type(cache).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise CacheError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not isinstance(input_ids, torch.Tensor):
        raise CacheError(f"feed() takes input_ids as a (batch, tokens) tensor, got {type(input_ids).__name__}")
    if input_ids.ndim != 2:
        hint = ": for one sequence pass ids[None]" if input_ids.ndim == 1 else ""
        raise CacheError(f"feed() takes input_ids of shape (batch, tokens), got shape {tuple(input_ids.shape)}{hint}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise CacheError(f"feed() takes integer token ids, got a {input_ids.dtype} tensor")
    if on_chunk is not None and not callable(on_chunk):
        raise CacheError(f"on_chunk must be callable or None, got {type(on_chunk).__name__}")
    return _feed(model, cache, input_ids, chunk_size, on_chunk)


@torch.no_grad()
def _feed(model, cache: SinkCache, input_ids: torch.Tensor, chunk_size: int,
          on_chunk: Callable[[int], None] | None) -> Iterator[torch.Tensor]:
    batch, total = input_ids.shape
    device = input_ids.device
    for start in range(0, total, chunk_size):
        ids = input_ids[:, start:start + chunk_size]
        chunk = ids.shape[1]
        seen = cache.get_seq_length()
        masks = stream_masks(cache, batch, chunk, device)
        positions = (torch.arange(chunk, device=device) + seen).expand(batch, chunk)
        out = model(input_ids=ids, attention_mask=_as_model_mask(masks, model), position_ids=positions,
                    use_cache=True, **{cache_keyword(model): cache})
        if on_chunk is not None:
            on_chunk(chunk)
        yield out.logits
