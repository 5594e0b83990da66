"""Keep input-dependent hidden sinks of a quantized SinkCache in full precision.

Besides the first tokens, some later tokens (punctuation, newlines) draw a large share of attention
in some heads: the hidden sinks ``sinkfix inspect`` reports, by ACT's criterion (a key whose mean
attention over the query rows that see it exceeds 0.1, docs/formulas.md). Which tokens those are
depends on the input, so they can only be found while the model runs. :func:`protecting_hidden_sinks`
watches every attention call through a patch observer (patching the model with the identity policy
for the duration when it is not patched), applies the criterion to the call's own rows, and hands
each hidden sink the call saw in full precision to its cache layer (:meth:`SinkLayer.protect`),
which from then on reads it back over its quantized copy.

Limits: a token is judged on the rows of the calls in which its exact value is still at hand (the
call that brings it and, with ``bits=2|4``, the calls before its residual is flushed); a key needs
``min_rows`` rows (default 8) to be judged, so one-token decode steps never judge anything; feed
chunks (:func:`sinkfix.analysis.kvquant.sequence_nll` feeds 128 at a time). With fp8 a call reads
its own new tokens cast once the scale is set, so the guard asks the cache layers for the exact
states of each call's new tokens (``SinkLayer.expose_new_states``) and judges those columns in the
call that writes them, as the integer backends do; before, fp8 protected the hidden sinks of its
first, calibrating call only (tiny Llama, 16-token chunks, threshold 0.03: 24, 0, 0, ... per chunk
against 24, 31, 17, ... at 4 bits; SmolLM2, 2 x 256 tokens in chunks of 64: 215 against 712 at
4 bits, 713 with fp8 now).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from sinkfix.analysis.metrics import HIDDEN_SINK_THRESHOLD, _corrected_rows, check_count, check_hidden_sink_threshold
from sinkfix.caches import SinkCache
from sinkfix.caches.body import QUANTIZED_BODIES, Fp8Body
from sinkfix.caches.layers import SinkLayer
from sinkfix.errors import CacheError, UsageError
from sinkfix.patch import PatchHandle, patch
from sinkfix.policy import Policy

__all__ = ["HiddenSinkGuard", "protecting_hidden_sinks"]


class HiddenSinkGuard:
    """The observer: judges each call's exact columns and protects the hidden sinks among them."""

    def __init__(self, cache: SinkCache, threshold: float = HIDDEN_SINK_THRESHOLD, min_rows: int = 8) -> None:
        # Checked here, not left to the criterion: a threshold >= 1 is never exceeded and one <= 0
        # always is, and a min_rows below 1 or not an integer would judge keys on no rows at all;
        # each would quietly protect nothing (or everything) instead of failing.
        threshold = check_hidden_sink_threshold(threshold, "threshold")
        min_rows = check_count(min_rows, "min_rows", UsageError, " (query rows a key needs to be judged)")
        if not isinstance(cache, SinkCache):
            raise CacheError(f"cache must be a sinkfix SinkCache (hidden sinks are kept in its quantized "
                             f"layers), got {type(cache).__name__}")
        self.cache, self.threshold, self.min_rows = cache, threshold, min_rows
        self.protected = 0  # (row, token, layer) triples protected so far
        self._exposing = [layer for layer in cache.layers if isinstance(layer, SinkLayer)
                          and isinstance(layer.body, Fp8Body) and not layer.expose_new_states]
        for layer in self._exposing:  # fp8 reads a call's new tokens cast: the guard needs them exact
            layer.expose_new_states = True

    def close(self) -> None:
        """Stop asking the cache for the exact new states (:func:`protecting_hidden_sinks` calls it on
        exit; a guard used directly leaves them on, costing one call's new keys and values per layer)."""
        for layer in self._exposing:
            layer.expose_new_states = False
            layer.last_new_states = None
        self._exposing = []

    def _layer(self, call) -> SinkLayer | None:
        index = getattr(call.module, "layer_idx", call.layer)
        layer = self.cache.layers[index] if index < len(self.cache.layers) else None
        if not isinstance(layer, SinkLayer) or not isinstance(layer.body, QUANTIZED_BODIES):
            return None
        if layer.last_columns is None or layer.last_columns.shape[1] != call.key.shape[2]:
            return None
        return layer

    def __call__(self, call) -> None:
        layer = self._layer(call)
        if layer is None:
            return
        with torch.no_grad():
            hidden = self._hidden(call, layer)
            self._protect(call, layer, hidden)

    def _hidden(self, call, layer: SinkLayer) -> torch.Tensor:
        """(B, K) columns that are hidden sinks in some head, exact in this call, not yet protected."""
        q, k = call.query.detach().float(), call.key.detach().float()
        batch, k_len = k.shape[0], k.shape[2]
        is_sink = torch.zeros(batch, k_len, dtype=torch.bool, device=k.device)
        valid = call.sink_cols >= 0
        is_sink.scatter_(1, call.sink_cols.clamp(min=0), valid)
        rows = _corrected_rows(call, q, k, call.sink_cols, is_sink, None)
        mean = rows.col_sum / rows.seen_by.clamp(min=1)[:, None, :]
        hidden = (mean > self.threshold).any(1) & (rows.seen_by >= self.min_rows) & ~is_sink
        columns = layer.last_columns.to(k.device)
        first = layer.first_real[:, None]
        hidden &= (columns >= first + layer.n_sink)  # real, and not one of the cache's own sinks
        hidden[:, : _exact_from(layer, k_len)] = False
        if layer.hidden_abs is not None:
            hidden &= ~(columns[:, :, None] == layer.hidden_abs[:, None, :]).any(-1)
        return hidden

    def _protect(self, call, layer: SinkLayer, hidden: torch.Tensor) -> None:
        count = int(hidden.sum(1).max()) if hidden.numel() else 0
        if count == 0:
            return
        # the first `count` hidden columns of each row, padded with -1 where a row has fewer
        order = torch.sort((~hidden).to(torch.int8), dim=1, stable=True).indices[:, :count]
        chosen = hidden.gather(1, order)
        absolute = torch.where(chosen, layer.last_columns.gather(1, order), -1)
        gather = order[:, None, :, None].expand(-1, call.key.shape[1], -1, call.key.shape[-1])
        keys = call.key.detach().gather(2, gather)
        values = call.value.detach().gather(2, gather)
        new = _new_states(layer, call.key.shape[2])
        if new is not None:
            # the call read its new tokens cast (fp8): their exact states come from the layer
            start = call.key.shape[2] - new[0].shape[2]
            inner = (order - start).clamp(min=0)[:, None, :, None].expand_as(gather)
            is_new = (order >= start)[:, None, :, None]
            keys = torch.where(is_new, new[0].detach().gather(2, inner).to(keys.dtype), keys)
            values = torch.where(is_new, new[1].detach().gather(2, inner).to(values.dtype), values)
        layer.protect(absolute, keys, values)
        self.protected += int(chosen.sum())


def _new_states(layer: SinkLayer, k_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact (keys, values) of the call's new tokens, the last columns of its ``k_len``, when
    the layer handed them over (fp8 after calibration, where every returned column is cast)."""
    new = layer.last_new_states
    return new if new is not None and new[0].shape[2] <= k_len else None


def _exact_from(layer: SinkLayer, k_len: int) -> int:
    """The first column of the call whose exact states the guard can protect: the layer's
    ``last_exact_from``, or the first new column when the layer handed their exact states over."""
    new = _new_states(layer, k_len)
    return layer.last_exact_from if new is None else min(layer.last_exact_from, k_len - new[0].shape[2])


@contextlib.contextmanager
def protecting_hidden_sinks(model, cache: SinkCache, *, threshold: float = HIDDEN_SINK_THRESHOLD,
                            min_rows: int = 8) -> Iterator[HiddenSinkGuard]:
    """While active, hidden sinks the model's attention finds are kept in full precision in ``cache``.

    ``threshold``: ACT's criterion, in (0, 1); ``min_rows``: an integer >= 1, the query rows a key
    needs to be judged. Out-of-range values are a :class:`~sinkfix.errors.UsageError`, raised
    before the model is touched."""
    guard = HiddenSinkGuard(cache, threshold, min_rows)  # the arguments checked before the model is patched
    handle = PatchHandle.of(model)
    temporary = None
    try:
        if handle is None:
            temporary = handle = patch(model, Policy())
        with handle.observing(guard):
            yield guard
    finally:
        guard.close()
        if temporary is not None:
            temporary.remove()
