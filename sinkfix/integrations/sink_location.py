"""Where the sink set sits inside one attention call.

The policy names the sink set in *positions* counted from the first real (non-padding) token
(``LayerPolicy.sink_positions``: the first ``n_sink`` plus any extra positions). An attention call
sees key *columns* (its K axis, which with a KV cache includes the past) and query *rows* (its Q
axis). This module maps positions to columns, per batch row, from what transformers hands the
attention function: the boolean mask and ``position_ids``. The rules (docs/formulas.md, "The sink
set"):

* Full-attention layers, and any layer without a cache, read the first real token off the mask:
  the first column that any query row may see. This handles left padding even when
  ``position_ids`` are not padding-aware (a plain forward with an attention mask).
* Sliding-window layers with a cache may have evicted token 0 from their keys; there the first
  real token is placed from the last query's position (``last_col - position``), so a sink that
  left the window gets a column < 0 and is simply absent: the policy does not apply there. While
  the cache still starts with left padding (the mask's padding, not keys the window hides), the
  sink is the first column after it, whatever the positions say: positions that count the padding (a hand-written
  loop that passes no ``position_ids``) would otherwise put it on a padding column.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch

__all__ = ["SinkLocation", "locate_sinks", "packed_sequences", "real_query_rows", "sinks_in_columns"]

# The last calls judged by packed_sequences: their position_ids and mask (weak references and
# version counters, which in-place writes bump) and the answer. Every layer of a forward gets the
# same position_ids and one mask per layer type, and hybrid models alternate the types from layer
# to layer: remembering a few calls, not one, keeps a forward at one host read per mask.
_RECENT_JUDGEMENTS = 4
_recent_judgements: list[tuple[tuple, bool]] = []


def _judged_key(*tensors: torch.Tensor) -> tuple:
    return tuple((weakref.ref(t), t._version) for t in tensors)


def _same_key(key: tuple, tensors: tuple[torch.Tensor, ...]) -> bool:
    return len(key) == len(tensors) and all(ref() is t and version == t._version
                                            for (ref, version), t in zip(key, tensors))


def packed_sequences(attention_mask, position_ids: torch.Tensor | None, q_len: int, k_len: int) -> bool:
    """Whether this call holds several sequences packed into one batch row: transformers' packed
    format (no 2-D mask, no cache, ``position_ids`` that restart inside a row), which it turns into a
    dense block-diagonal mask. Each packed sequence has its own first token, while a sink set is
    one per batch row, so the policy cannot be placed there (the caller refuses).

    A restart counts only between two real tokens (keys some query row sees): left padding restarts
    at the first real token and right padding at the first pad, and neither is packing. Judged only
    where it can happen (a dense square mask and 2-D ``position_ids``), and not under compilation,
    where the host read would break the graph."""
    if (not isinstance(attention_mask, torch.Tensor) or q_len != k_len or q_len < 2 or position_ids is None
            or position_ids.ndim != 2 or position_ids.shape[-1] != q_len or torch.compiler.is_compiling()):
        return False
    tensors = (position_ids, attention_mask)
    for key, judged in _recent_judgements:
        if _same_key(key, tensors):
            return judged
    real = attention_mask[:, 0].any(dim=1)  # (B, K): keys some query row sees
    restart = position_ids[:, 1:] - position_ids[:, :-1] != 1  # (B or 1, Q - 1); query i is key column i
    packed = bool(torch.any(restart & real[:, 1:] & real[:, :-1]))
    _recent_judgements.insert(0, (_judged_key(*tensors), packed))
    del _recent_judgements[_RECENT_JUDGEMENTS:]
    return packed


@dataclass(frozen=True)
class SinkLocation:
    """The sink set of one attention call, in the coordinates each consumer needs."""

    sink_cols: torch.Tensor  # (B, NS) key columns of the sink set, -1 = absent
    first_real_col: torch.Tensor  # (B,) key column of the first real token
    last_col: torch.Tensor  # (B,) key column of the last query row
    last_real_col: torch.Tensor  # (B,) key column of the last real token (before any right padding)

    def query_rows(self, q_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sink_rows (B, NS) query rows of this call that are sink tokens, -1 = not among them;
        first_real_row (B,) query row of the first real token, clamped to 0; end_real_row (B,) one
        past the query row of the last real token, clamped to [0, Q]: rows outside
        [first_real_row, end_real_row) are padding). Query row i sits at key column
        ``last_col - (Q - 1) + i``."""
        row0 = self.last_col - (q_len - 1)
        rows = self.sink_cols - row0[:, None]
        valid = (self.sink_cols >= 0) & (rows >= 0) & (rows < q_len)
        return (torch.where(valid, rows, -1), (self.first_real_col - row0).clamp(min=0),
                (self.last_real_col - row0 + 1).clamp(min=0, max=q_len))


def real_query_rows(first_real_row: torch.Tensor, end_real_row: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Q) bool: the query rows in [first_real_row, end_real_row) (:meth:`SinkLocation.query_rows`),
    the ones that are not left or right padding."""
    rows = torch.arange(q_len, device=first_real_row.device)
    return (rows >= first_real_row[:, None]) & (rows < end_real_row[:, None])


def _last_query_col(attention_mask: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """(B,) key column of a dense mask's last query row. A call with as many keys as queries has no
    cache: its query rows are its keys, and the last row is column Q - 1 whatever the mask says.
    (The last column the last row sees, the rule for calls with a cache, is the last *real* key
    under right padding: every row's sink and padding were placed at the wrong rows, and residual
    clipping counted the padding in its median.)"""
    if q_len == k_len:
        return torch.full((attention_mask.shape[0],), q_len - 1, dtype=torch.long, device=attention_mask.device)
    cols = torch.arange(k_len, device=attention_mask.device)
    return torch.where(attention_mask[:, 0, -1], cols, -1).amax(dim=-1)


def _left_padding_end(attention_mask, first_seen: torch.Tensor, last_col: torch.Tensor, q_len: int,
                      window: int | None) -> torch.Tensor:
    """(B,) the first key column after the call's left padding (0: none) of a sliding layer's call.
    A :class:`PaddedCausalMask` says which keys are padding. In a dense mask the first column some
    row sees ends the padding only where the window would let the call's first row see the columns
    before it: a cache that keeps every key (``DynamicCache()`` built without a config) starts with
    keys that have left the window, which are not padding (taking them for padding put the sink on
    the oldest key in the window: logits 0.10-0.16 off on tiny Mistral and Gemma3)."""
    if hasattr(attention_mask, "seen_by_any_row"):
        if attention_mask.key_padding is None:
            return torch.zeros_like(first_seen)
        cols = torch.arange(attention_mask.k_len, device=first_seen.device)
        return torch.where(attention_mask.key_padding, cols, attention_mask.k_len).amin(dim=-1)
    if window is None:  # no window to tell padding from keys that left it: no padding assumed
        return torch.zeros_like(first_seen)
    window_start = (last_col - (q_len - 1) - window + 1).clamp(min=0)
    return torch.where(first_seen > window_start, first_seen, 0)


def locate_sinks(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    *,
    batch: int,
    q_len: int,
    k_len: int,
    causal: bool,
    sliding: bool,
    sink_positions: tuple[int, ...],
    device: torch.device,
    window: int | None = None,
) -> SinkLocation:
    """Map the policy's sink positions to the key columns of one attention call (rules above).

    ``attention_mask`` is transformers' bool (B, 1, Q, K) mask (True = attend), a
    :class:`~sinkfix.integrations.masks.PaddedCausalMask`, or None (plain causal, upper-left
    aligned, when ``causal``; everything visible otherwise).
    """
    if attention_mask is None:
        first = torch.zeros(batch, dtype=torch.long, device=device)
        last = (q_len - 1) if (causal and q_len > 1) else (k_len - 1)
        last_col = last_real_col = torch.full((batch,), last, dtype=torch.long, device=device)
    else:
        cols = torch.arange(k_len, device=device)
        if hasattr(attention_mask, "seen_by_any_row"):  # a PaddedCausalMask: the same (B, K) views, no (Q, K)
            seen_by_any_row = attention_mask.seen_by_any_row()
            # its rows sit at known columns: the last at Q - 1 + causal_offset, right padding or not
            last_col = torch.full((batch,), q_len - 1 + attention_mask.causal_offset, dtype=torch.long, device=device)
        else:
            seen_by_any_row = attention_mask[:, 0].any(dim=1)  # (B, K)
            last_col = _last_query_col(attention_mask, q_len, k_len)
        first = torch.where(seen_by_any_row, cols, k_len).amin(dim=-1)
        last_real_col = torch.where(seen_by_any_row, cols, -1).amax(dim=-1)
    if sliding and q_len != k_len and position_ids is not None:
        positions = position_ids if position_ids.ndim == 2 else position_ids[0]
        placed = last_col - positions[:, -1].to(device).long().expand(batch)
        if attention_mask is not None:
            # Positions that count the left padding (transformers' own when a hand-written loop
            # passes none) place the sink on a padding column, or before the cache's first column
            # once the window has dropped part of the padding. While the cache still starts with
            # padding, the sink is the first real column after it; with padding-aware positions
            # the placed column is that column already.
            padding_end = _left_padding_end(attention_mask, first, last_col, q_len, window)
            placed = torch.where((padding_end > 0) & (padding_end < k_len) & (placed < padding_end), padding_end, placed)
        first = placed
    offsets = torch.tensor(sink_positions, dtype=torch.long, device=device)
    sink_cols = first[:, None] + offsets[None, :]
    sink_cols = torch.where((sink_cols >= 0) & (sink_cols < k_len), sink_cols, -1)
    return SinkLocation(sink_cols, first, last_col, last_real_col)


def sinks_in_columns(location: SinkLocation, column_tokens: torch.Tensor, first_token: torch.Tensor,
                     sink_positions: tuple[int, ...]) -> SinkLocation:
    """``location`` with its sink columns read off the token each key column holds, for a cache whose
    columns are not one run of consecutive tokens (a :class:`~sinkfix.caches.SinkCache` after it has
    evicted shows ``[kept sinks][window][new]``, where ``first + p`` is a recent token, not token
    ``p``: a policy sink set longer than the cache's kept sinks put the correction on that token,
    logits 0.07-0.12 off). Position ``p`` is the column holding token ``first_token + p`` and absent
    (-1) once the cache no longer holds it. ``column_tokens``: (B, K) absolute token index of each
    column (-1 = padding); ``first_token``: (B,) absolute index of each row's first real token."""
    offsets = torch.tensor(sink_positions, dtype=torch.long, device=column_tokens.device)
    wanted = first_token.to(column_tokens.device).long()[:, None] + offsets[None, :]  # (B, NS)
    match = column_tokens[:, None, :] == wanted[:, :, None]  # (B, NS, K)
    cols = torch.where(match.any(-1), match.to(torch.int8).argmax(-1), -1)
    return replace(location, sink_cols=cols.to(location.sink_cols.device))
