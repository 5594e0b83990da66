"""Sink-aware KV caches for transformers 5: streaming with attention sinks, sink-protected quantization.

* :class:`SinkCache` keeps each row's first ``n_sink`` real tokens and its ``window`` most recent
  ones (StreamingLLM), re-rotating cached keys so every distance a query sees is a distance inside
  the cache; ``bits=2|4`` quantizes the older tokens with transformers' own backends while the sinks
  stay in full precision.
* :func:`feed` streams a long input through such a cache in chunks, each token seeing exactly the
  tokens it would see when decoded one at a time.

docs/caches.md describes the position rule and the quantization layout.
"""

from sinkfix.caches.cache import SinkCache, check_sink_window
from sinkfix.caches.feed import cache_keyword, feed, stream_masks
from sinkfix.caches.quantize import BACKENDS, SUPPORTED_BITS, KVQuantizer

__all__ = ["SinkCache", "KVQuantizer", "BACKENDS", "SUPPORTED_BITS", "check_sink_window", "feed", "stream_masks",
           "cache_keyword"]
