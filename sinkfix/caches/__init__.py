"""Sink-aware KV caches for transformers 5: streaming with attention sinks, sink-protected quantization.

* :class:`SinkCache` keeps each row's first ``n_sink`` real tokens and its ``window`` most recent
  ones (StreamingLLM), re-rotating cached keys so every distance a query sees is a distance inside
  the cache; ``bits=2|4`` quantizes the older tokens with transformers' own backends while the sinks
  stay in full precision.
* :func:`feed` streams a long input through such a cache in chunks, each token seeing the tokens it
  would see when decoded one at a time (with the same values in full precision only: a quantized
  cache quantizes at other moments when tokens arrive in chunks, docs/caches.md): it yields each
  chunk's logits and feeds nothing until iterated (``for logits in feed(model, cache, ids): ...``).

docs/caches.md describes the position rule and the quantization layout.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use (PEP 562): the cache classes import transformers' cache module, which
# `sinkfix kvquant --help` and anything reading only the backend names should not pay for.
_WHERE = {
    "SinkCache": "cache", "check_sink_window": "cache",
    "cache_keyword": "chunked", "feed": "chunked", "stream_masks": "chunked",
    "BACKENDS": "quantize", "SUPPORTED_BITS": "quantize", "KVQuantizer": "quantize",
}

__all__ = ["SinkCache", "KVQuantizer", "BACKENDS", "SUPPORTED_BITS", "check_sink_window", "feed", "stream_masks",
           "cache_keyword"]

if TYPE_CHECKING:
    from sinkfix.caches.cache import SinkCache, check_sink_window
    from sinkfix.caches.chunked import cache_keyword, feed, stream_masks
    from sinkfix.caches.quantize import BACKENDS, SUPPORTED_BITS, KVQuantizer


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
