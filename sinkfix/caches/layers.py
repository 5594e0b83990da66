"""One attention layer's sink cache: the first ``n_sink`` real tokens of each row plus a recent window.

Layout of what one call attends to (docs/caches.md), per batch row::

    [ head: n_sink sink columns ][ body: the most recent `window` tokens, oldest first ][ new tokens ]

* The **head** appears once the cache has evicted something. It shows the row's first ``n_sink``
  real tokens (from the sink store, always full precision). A left-padded row that has seen fewer
  than ``n_sink + window`` real tokens keeps everything instead: its head then shows padding (masked)
  followed by those of its sinks that are older than the body, right-aligned, which is exactly the
  contiguous run of tokens a plain cache would hold there.
* The **body** (:mod:`sinkfix.caches.body`) is the same run of absolute tokens in every row;
  optionally quantized, with the sinks (and protected hidden sinks) read back in full precision.
* **Positions.** Queries and new keys arrive rotated at whatever positions the model gave them. Every
  kept column is re-rotated, from its stored position, to the position that puts it where it sits in
  the cache: column c of L kept columns goes to ``p0 - (L - c)``, p0 the first new token's position.
  So every distance a query sees is a distance inside the cache (at most ``n_sink + window`` plus the
  new tokens), as in StreamingLLM, while the window keys, whose positions already are contiguous with
  the queries, need no rotation: normally only the n_sink head keys are rotated, every call.
* **Left padding.** A row's sinks are its first real tokens: the first token the call's attention
  mask lets any query see (the mask of the attention module calling, as :class:`SinkCache` passes
  it), or the last token the model placed at position 0 (generate's padding-aware positions put
  padding there too, before it), whichever comes later.
* **Masks.** transformers builds the mask from ``get_mask_sizes``: column c maps to absolute token
  ``seen - L + c``. Head columns of a row that has evicted tokens map to real tokens (unmasked), and
  a row that keeps everything maps exactly, padding included.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from sinkfix.caches.body import QUANTIZED_BODIES, Fp8Body, FullBody, QuantizedBody
from sinkfix.caches.rope import Rotary, rotate_keys
from sinkfix.errors import CacheError, UnsupportedModelError

__all__ = ["SinkLayer", "real_new_tokens"]


def real_new_tokens(mask: Any, batch: int, q_len: int, kept: int) -> torch.Tensor | None:
    """(B, Q) bool: which of a call's ``q_len`` new tokens are real, read off the call's attention
    ``mask`` (the kept columns come first): a token is real when some query of the call may see it
    (a real token sees itself; left padding is seen by no query). Takes transformers' bool (sdpa)
    and additive float (eager) (B, 1, Q, K) masks and sinkfix's own padded causal mask; None for
    anything else (no mask, other shapes or formats), which leaves the positions to decide."""
    k_len = kept + q_len
    if hasattr(mask, "seen_by_any_row"):  # sinkfix.integrations.masks.PaddedCausalMask
        if (mask.batch, mask.k_len) != (batch, k_len):
            return None
        seen = mask.seen_by_any_row()
    elif isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] == k_len and mask.shape[0] in (1, batch):
        if mask.dtype == torch.bool:
            allowed = mask
        elif mask.is_floating_point():
            allowed = mask > torch.finfo(mask.dtype).min / 2  # eager: 0 where seen, the dtype's min (or -inf) not
        else:
            return None
        seen = allowed.any(dim=-2).any(dim=1)
    else:
        return None
    return seen[:, kept:].expand(batch, q_len)


def _position_ids(kwargs: dict, batch: int, q_len: int, seen: int, device) -> torch.Tensor:
    """(B, Q) positions the model gave the new tokens: the ``position_ids`` the attention module was
    called with, or the model's own default (tokens seen so far + arange) when it passed none."""
    inner = kwargs.get("kwargs")
    pos = kwargs.get("position_ids")
    if pos is None and isinstance(inner, dict):
        pos = inner.get("position_ids")
    if pos is None:
        return (torch.arange(q_len, device=device) + seen).expand(batch, q_len)
    if pos.ndim != 2:
        raise UnsupportedModelError(f"position_ids of shape {tuple(pos.shape)} (multi-axis RoPE) are not supported "
                                    "by sink caches")
    return pos.to(device=device, dtype=torch.long).expand(batch, q_len)


class SinkLayer(CacheLayerMixin):
    """Sink + window cache layer (see the module docstring). ``window=None`` never evicts.

    ``keep_sinks=False`` makes a plain sliding window (a sliding-attention layer of a hybrid model)
    that still protects its first tokens from quantization while they are in the window, and is
    re-rotated by the same rule. ``rotary=None`` is for models without RoPE in a cache that never
    evicts: their keys carry no position, so nothing is rotated.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, *, n_sink: int, window: int | None, rotary: Rotary | None, body: FullBody | QuantizedBody | Fp8Body,
                 keep_sinks: bool = True, sliding: bool = False) -> None:
        super().__init__()
        self.n_sink, self.window, self.rotary = n_sink, window, rotary
        self.keep_sinks = keep_sinks
        self.is_sliding = sliding
        self.body = body
        # whether a call that reads its new tokens cast (fp8 once its scale is set) keeps their exact
        # states in ``last_new_states`` for the observers of its attention (the hidden-sink guard sets
        # it): off by default, since they would stay alive until the next call
        self.expose_new_states = False
        self._clear()

    def _clear(self) -> None:
        self.seen = 0  # tokens seen by every row (padding included)
        self.evicted = False  # whether tokens have left: then the head is shown
        self.shape: tuple[int, int, int] | None = None  # (batch, kv heads, head dim) of the first update
        self.first_real: torch.Tensor | None = None  # (B,) absolute index of each row's first real token
        self.rows_started = False  # every row has seen a real token: no padding left to find in masks
        # (B, H, S, D) the rows' first n_sink real tokens, S = min(n_sink, tokens seen): grown as tokens
        # arrive, not allocated at n_sink (n_sink=10**6 held 528 MB after a 5-token prompt, and 10**9
        # died in the allocator); slots a row has not filled yet are zeros
        self.sink_k = self.sink_v = None
        self.sink_pos: torch.Tensor | None = None  # (B, S) the positions they were rotated at
        self.body_pos: torch.Tensor | None = None  # (B, L) positions of the body tokens
        self.body_start = 0  # absolute index of the first body token
        self.hidden_abs: torch.Tensor | None = None  # (B, P) protected hidden sinks in the body, -1 = none
        self.hidden_k = self.hidden_v = None  # (B, H, P, D) their full-precision keys / values
        self.last_columns: torch.Tensor | None = None  # (B, K) absolute token of each column of the last call
        self.head_shown = False  # the last call's columns began with the kept sinks (then not one run of tokens)
        self.last_exact_from = 0  # columns of the last call from here on were returned exactly as written
        # (keys, values) (B, H, Q, D): the exact states of the last call's new tokens (its last Q
        # columns) when the call returned them cast and ``expose_new_states`` is set, else None
        self.last_new_states: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        # a copy (copy.deepcopy, pickling) has no hidden-sink guard reading the exact new states: taken
        # while a guard was active it kept the switch on, and every later call held one call's new
        # keys and values alive with nothing reading them
        return {**self.__dict__, "expose_new_states": False, "last_new_states": None}

    def __repr__(self) -> str:
        kind = "sliding window" if not self.keep_sinks else f"{self.n_sink} sinks + window {self.window}"
        quant = f", {self.body.quantizer}" if isinstance(self.body, QUANTIZED_BODIES) else ""
        return f"SinkLayer({kind}{quant})"

    # -- transformers' layer interface ----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.shape = (batch, heads, dim)
        self.sink_k = key_states.new_zeros(batch, heads, 0, dim)
        self.sink_v = value_states.new_zeros(batch, heads, 0, dim)
        self.sink_pos = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self._sink_slots = torch.arange(0, device=self.device)[None, :]
        self.body_pos = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return what this call attends to ([head][body][new]), then store the new tokens and evict."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shape(key_states)
        batch, _, q_len, _ = key_states.shape
        real = kwargs.pop("real_tokens", None)
        positions = _position_ids(kwargs, batch, q_len, self.seen, key_states.device)
        self._find_first_real(positions, real)
        keys, values = self._visible(key_states, value_states, positions)
        self.last_new_states = None
        if isinstance(self.body, Fp8Body) and self.body.k_scale is not None:
            # as transformers' fp8 layer: once the scale is set, a call reads its own new tokens
            # cast too (only the first, calibrating call reads them exact); the new sinks stay exact
            keys, values = self._cast_new_tokens(keys, values, key_states, value_states)
            if self.expose_new_states:
                # what the model wrote, for the hidden-sink guard: without it nothing after the
                # calibrating call was ever exact, and fp8 protected the hidden sinks of the first
                # call only (tiny Llama, 16-token chunks: 24, 0, 0, ... against 24, 31, 17, ... at 4 bits)
                self.last_new_states = (key_states, value_states)
        self._store(key_states, value_states, positions)
        return keys, values

    def _cast_new_tokens(self, keys, values, key_states, value_states) -> tuple[torch.Tensor, torch.Tensor]:
        q_len = key_states.shape[-2]
        new_k, new_v = self.body.read_back(key_states, value_states)
        if self.keep_sinks and self.n_sink:
            exact = self._is_sink(self._new_abs(q_len))[:, None, :, None]
            new_k, new_v = torch.where(exact, key_states, new_k), torch.where(exact, value_states, new_v)
        self.last_exact_from = keys.shape[-2]  # nothing of this call is read as the model wrote it
        return torch.cat([keys[:, :, :-q_len], new_k], dim=-2), torch.cat([values[:, :, :-q_len], new_v], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.kept_length
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        # no limit on the sequence length: that is the point of a streaming cache
        return -1

    @property
    def kept_length(self) -> int:
        """Columns held between calls: head (once evicted) plus body."""
        return (self.n_sink if self.evicted and self.keep_sinks else 0) + len(self.body)

    def reset(self) -> None:
        self.body = self.body.fresh()
        self.is_initialized = False
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise CacheError("a sink cache cannot be cropped: evicted tokens cannot be restored (assisted or "
                         "speculative decoding needs a cache that can roll back, e.g. DynamicCache)")

    def offload(self) -> None:
        raise CacheError("sink caches do not support offloading")

    prefetch = offload

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder every per-row state along the batch."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.shape is not None:
            rows = torch.arange(self.shape[0], device=self.device).repeat_interleave(repeats)
            self.batch_select_indices(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.shape is None:
            return
        index = torch.as_tensor(indices, device=self.device)
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(-1)
        self.body.select_rows(index)
        self.last_new_states = None  # the last call's, in the old row order: no observer reads it any more
        for name in ("first_real", "sink_k", "sink_v", "sink_pos", "body_pos", "hidden_abs", "hidden_k", "hidden_v"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        self.shape = (index.numel(),) + self.shape[1:]

    # -- bookkeeping ----------------------------------------------------------------------------
    def _check_shape(self, key_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        if (batch, heads, dim) != self.shape:
            b0, h0, d0 = self.shape
            raise CacheError(
                f"this cache holds a batch of {b0} rows x {h0} kv heads x {d0} dims, got {batch} x {heads} x {dim}: "
                "a cache serves one model and one batch; make a new cache (or call cache.reset())")

    def _find_first_real(self, positions: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Each row's first real token, the later of two clues. The positions: the last token the model
        placed at 0 (transformers puts left padding at position 0 (generate) or 1, and the first real
        token at 0; positions that never return to 0 say token 0). The mask, when the call had one
        (``real`` (B, Q), :func:`real_new_tokens`): the first token some query may see, in a row that
        had none before (until then the row's first real token lies beyond what it has seen). The
        mask is what finds the padding of a loop that passes an attention mask but lets the model
        count positions from 0 in every row: the positions alone then make padding the sinks."""
        q_len = positions.shape[1]
        absolute = torch.arange(q_len, device=positions.device) + self.seen
        clue = torch.where(positions == 0, absolute, -1).amax(dim=1)
        if real is not None:
            real = real.to(positions.device)
            first_seen = torch.where(real, absolute, self.seen + q_len).amin(dim=1)
            if self.first_real is not None:  # rows that already have a real token keep it
                first_seen = torch.where(self.first_real >= self.seen, first_seen, -1)
            clue = torch.maximum(clue, first_seen)
        if self.first_real is None:
            self.first_real = clue.clamp(min=0)
        else:
            self.first_real = torch.maximum(self.first_real, clue)
        if not self.rows_started:  # one host read per call until then (normally the first call only)
            self.rows_started = bool((self.first_real < self.seen + q_len).all())

    def column_info(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the kept columns of the next call: (absolute token index (B, L), -1 for padding,
        is-sink (B, L)). Used to build masks for chunked streaming (:mod:`sinkfix.caches.chunked`)."""
        head_abs = self._head_abs()
        body_abs = self._body_abs(len(self.body))
        columns = body_abs if head_abs is None else torch.cat([head_abs, body_abs], dim=1)
        return columns, self._is_sink(columns)

    def _first_tokens(self, absolute: torch.Tensor) -> torch.Tensor:
        """(B, L): which of the tokens at ``absolute`` (B or 1, L) indices are a row's first ``n_sink``
        real tokens (the sinks, whether or not this layer keeps them once they leave its window)."""
        first = self.first_real[:, None]
        return (absolute >= first) & (absolute < first + self.n_sink)

    def _is_sink(self, absolute: torch.Tensor) -> torch.Tensor:
        """(B, L): which of the tokens at ``absolute`` (B or 1, L) indices are sinks this layer keeps."""
        return self._first_tokens(absolute) & self.keep_sinks

    def _new_abs(self, q_len: int) -> torch.Tensor:
        """(1, q_len) absolute token index of a call's new tokens (before they are stored)."""
        return (torch.arange(q_len, device=self.device) + self.seen)[None, :]

    def _body_abs(self, length: int) -> torch.Tensor:
        """(B, length) absolute token index of the body's first ``length`` columns, -1 for padding."""
        absolute = (torch.arange(length, device=self.device) + self.body_start)[None, :]
        return torch.where(absolute >= self.first_real[:, None], absolute, -1)

    def _head_slots(self) -> torch.Tensor | None:
        """(B, n_sink) which sink each head column shows, -1 = padding (masked); None = no head."""
        if not (self.evicted and self.keep_sinks) or self.n_sink == 0:
            return None
        before_body = (self.body_start - self.first_real).clamp(0, self.n_sink)  # sinks older than the body
        slots = torch.arange(self.n_sink, device=self.device)[None, :] - (self.n_sink - before_body)[:, None]
        return torch.where(slots >= 0, slots, -1)

    def _head_abs(self) -> torch.Tensor | None:
        slots = self._head_slots()
        return None if slots is None else torch.where(slots >= 0, self.first_real[:, None] + slots, -1)

    def _head(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys, values, positions, real) of the head columns, or None."""
        slots = self._head_slots()
        if slots is None:
            return None
        real = slots >= 0
        if bool(real.all()) and bool((slots == torch.arange(self.n_sink, device=self.device)).all()):
            return self.sink_k, self.sink_v, self.sink_pos, real
        index = slots.clamp(min=0)
        gather = index[:, None, :, None].expand(-1, self.sink_k.shape[1], -1, self.sink_k.shape[-1])
        keep = real[:, None, :, None]
        keys = torch.where(keep, self.sink_k.gather(2, gather), 0)
        values = torch.where(keep, self.sink_v.gather(2, gather), 0)
        return keys, values, self.sink_pos.gather(1, index), real

    def _body(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Body keys / values in full precision, with protected tokens restored exactly."""
        keys, values = self.body.materialize()
        if keys is None or not isinstance(self.body, QUANTIZED_BODIES) or self.body.quantized_len == 0:
            return keys, values
        cols, exact_k, exact_v = [], [], []
        if self.n_sink:
            cols.append(self.first_real[:, None] + self._sink_slots - self.body_start)
            exact_k.append(self.sink_k)
            exact_v.append(self.sink_v)
        if self.hidden_abs is not None:
            cols.append(torch.where(self.hidden_abs >= 0, self.hidden_abs - self.body_start, -1))
            exact_k.append(self.hidden_k)
            exact_v.append(self.hidden_v)
        if not cols:
            return keys, values
        return self._overlay(keys, values, torch.cat(cols, 1), torch.cat(exact_k, 2), torch.cat(exact_v, 2))

    def _overlay(self, keys, values, cols: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Copies of keys / values with keys[b, :, cols[b, p]] = k[b, :, p] (and values) where
        0 <= cols[b, p] < quantized length. One scatter for every token to restore: the columns that
        do not apply go to a scratch column past the end (clamped into the body they would collide
        with a real one), which is cut off again. Per token, with a host read each, the loop took
        11.7 s of CPU for 74 tokens with 10,000 sinks kept on a tiny Llama."""
        length = keys.shape[2]
        valid = (cols >= 0) & (cols < self.body.quantized_len)
        index = torch.where(valid, cols, length)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        scratch = (keys.shape[0], keys.shape[1], 1, keys.shape[-1])
        keys = torch.cat([keys, keys.new_zeros(scratch)], 2).scatter_(2, index, k.to(keys.dtype))
        values = torch.cat([values, values.new_zeros(scratch)], 2).scatter_(2, index, v.to(values.dtype))
        return keys[:, :, :length], values[:, :, :length]

    def _visible(self, key_states, value_states, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """[head][body][new]: the kept columns re-rotated to their place in the cache, then the new ones."""
        head = self._head()
        body_k, body_v = self._body()
        parts_k, parts_v, parts_pos, parts_real = [], [], [], []
        if head is not None:
            parts_k.append(head[0]), parts_v.append(head[1]), parts_pos.append(head[2]), parts_real.append(head[3])
        if body_k is not None and body_k.shape[-2]:
            parts_k.append(body_k), parts_v.append(body_v), parts_pos.append(self.body_pos)
            parts_real.append(self._body_abs(body_k.shape[-2]) >= 0)
        self._note_columns(head is not None, body_k, key_states.shape[-2])
        if not parts_k:
            return key_states, value_states
        kept = sum(p.shape[-1] for p in parts_pos)
        target0 = positions[:, :1] - kept  # position of kept column 0
        start = 0
        for i, (pos, real) in enumerate(zip(parts_pos, parts_real)):
            width = pos.shape[-1]
            target = target0 + torch.arange(start, start + width, device=self.device)
            delta = torch.where(real, target - pos, 0)
            # no rotary embedding (a model without RoPE, in a cache that never evicts): keys carry
            # no position, so there is nothing to move
            if self.rotary is not None and bool(delta.any()):
                self.last_exact_from = max(self.last_exact_from, start + width)  # rotated: not as stored
                parts_k[i] = rotate_keys(parts_k[i], delta, self.rotary)
            start += width
        return torch.cat(parts_k + [key_states], dim=-2), torch.cat(parts_v + [value_states], dim=-2)

    @property
    def columns_in_order(self) -> bool:
        """Whether the last call's key columns were one run of consecutive tokens: not when they
        began with the kept sinks (shown from the call after the first eviction on; the evicting
        call itself still sees its keys in order)."""
        return not self.head_shown

    def _note_columns(self, has_head: bool, body_k: torch.Tensor | None, q_len: int) -> None:
        """Remember, for observers of the attention call that follows: each returned column's absolute
        token index (-1 = padding) and from which column on the returned keys / values are exactly
        what the model wrote (the full-precision residual and the new tokens)."""
        self.head_shown = has_head
        head_abs = self._head_abs() if has_head else None
        body_abs = self._body_abs(0 if body_k is None else body_k.shape[-2]).expand(self.shape[0], -1)
        new_abs = self._new_abs(q_len).expand(self.shape[0], -1)
        parts = ([] if head_abs is None else [head_abs]) + [body_abs, new_abs]
        self.last_columns = torch.cat(parts, dim=1)
        quantized = self.body.quantized_len if isinstance(self.body, QUANTIZED_BODIES) else 0
        self.last_exact_from = (0 if head_abs is None else head_abs.shape[1]) + quantized

    def _store(self, key_states, value_states, positions) -> None:
        """Capture sink tokens, append to the body, evict down to the window."""
        q_len = key_states.shape[-2]
        self._capture_sinks(key_states, value_states, positions)
        calibrate = None
        if isinstance(self.body, Fp8Body) and self.body.k_scale is None:
            # the per-tensor scale is set by the tokens the body really serves: not the sinks (read
            # back from their full-precision copies, in a sliding layer too while they are in its
            # window: there an outlier sink set the scale frozen for the whole stream, 4x the error
            # of the full layers' on a tiny Gemma3 with a 1e5 outlier) and not left padding (never attended)
            absolute = self._new_abs(q_len)
            calibrate = (absolute >= self.first_real[:, None]) & ~self._first_tokens(absolute)
        self.body.append(key_states, value_states, calibrate)
        self.body_pos = torch.cat([self.body_pos, positions], dim=1)
        self.seen += q_len
        capacity = None if self.window is None else (self.n_sink if self.keep_sinks else 0) + self.window
        if capacity is not None and self.seen > capacity:
            drop = len(self.body) - self.window
            if drop > 0:
                self.body.drop_front(drop)
                self.body_pos = self.body_pos[:, drop:]
                if q_len > 1:
                    # the kept tokens in memory of their own: a slice kept the whole concatenation
                    # alive, so after a 2,000-token prompt a 4 + 60 cache held the prompt (31x what
                    # nbytes() counts) until the next call, and a chunked feed held window + chunk
                    # (+12.5% in sinkfix stream's protocol). A one-token step keeps one token more
                    # than it counts until the next step, cheaper than a copy of the window per token
                    self.body.compact()
                    self.body_pos = self.body_pos.clone()
                self.body_start += drop
                self._drop_hidden_before(self.body_start)
            self.evicted = True

    def _capture_sinks(self, key_states, value_states, positions) -> None:
        """Copy the new tokens that are sinks into the sink store, every sink at once (one host read
        per call; a loop over the sinks read the host once per sink, layer and call)."""
        if self.n_sink == 0:
            return
        q_len = key_states.shape[-2]
        self._grow_sink_store(min(self.n_sink, self.seen + q_len))
        j = self.first_real[:, None] + self._sink_slots - self.seen  # (B, S) sinks among the new tokens
        valid = (j >= 0) & (j < q_len)
        if not bool(valid.any()):
            return
        index = j.clamp(0, q_len - 1)
        gather = index[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
        keep = valid[:, None, :, None]
        self.sink_k = torch.where(keep, key_states.gather(2, gather), self.sink_k)
        self.sink_v = torch.where(keep, value_states.gather(2, gather), self.sink_v)
        self.sink_pos = torch.where(valid, positions.gather(1, index), self.sink_pos)

    def _grow_sink_store(self, width: int) -> None:
        """Widen the sink store to ``width`` slots (zeros): a row's sinks are among the tokens seen, so
        ``min(n_sink, seen)`` slots hold every sink captured so far."""
        extra = width - self.sink_k.shape[2]
        if extra <= 0:
            return
        batch, heads, _, dim = self.sink_k.shape
        self.sink_k = torch.cat([self.sink_k, self.sink_k.new_zeros(batch, heads, extra, dim)], dim=2)
        self.sink_v = torch.cat([self.sink_v, self.sink_v.new_zeros(batch, heads, extra, self.sink_v.shape[-1])], dim=2)
        self.sink_pos = torch.cat([self.sink_pos, self.sink_pos.new_zeros(batch, extra)], dim=1)
        self._sink_slots = torch.arange(width, device=self.device)[None, :]

    # -- hidden sinks (input-dependent tokens kept in full precision) ----------------------------
    def protect(self, absolute: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep tokens at ``absolute`` (B, P) indices (-1 = none) in full precision: ``keys`` /
        ``values`` (B, H, P, D) are their exact states. No-op for a full-precision body."""
        if not isinstance(self.body, QUANTIZED_BODIES) or absolute.shape[1] == 0:
            return
        if self.hidden_abs is None:
            self.hidden_abs, self.hidden_k, self.hidden_v = absolute, keys, values
        else:
            self.hidden_abs = torch.cat([self.hidden_abs, absolute], dim=1)
            self.hidden_k = torch.cat([self.hidden_k, keys], dim=2)
            self.hidden_v = torch.cat([self.hidden_v, values], dim=2)

    def _drop_hidden_before(self, start: int) -> None:
        if self.hidden_abs is None:
            return
        keep = (self.hidden_abs >= start).any(dim=0)
        if not bool(keep.all()):
            self.hidden_abs = torch.where(self.hidden_abs >= start, self.hidden_abs, -1)[:, keep]
            self.hidden_k, self.hidden_v = self.hidden_k[:, :, keep], self.hidden_v[:, :, keep]

    # -- introspection ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of cached state held by this layer (sinks, body, protected tokens, positions)."""
        tensors = [self.sink_k, self.sink_v, self.sink_pos, self.body_pos, self.hidden_k, self.hidden_v]
        return self.body.nbytes() + sum(t.nelement() * t.element_size() for t in tensors if t is not None)
