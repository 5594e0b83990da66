"""Device-side running sums of one request batch, read back to the host once.

One :class:`RequestAccumulator` lives for one request (one ``with monitor.request()`` block: a
forward, or every forward of a ``generate`` call) and holds, per attention layer, batch row and
query head, what the fast path and the prompt measurements hand it. Every update is an in-place
tensor op on the device; nothing is read on the host until :meth:`RequestAccumulator.read`, which
moves everything to the CPU in a single transfer.

A decode step is made of small ops, so what it costs is their count: the per-layer work of a step is
a Python list append (the attention call's statistics, the decoder layer's output), and one
``stack`` + ``add_`` (statistics) and one ``stack`` + norm (residuals) fold the whole step in after
its last decoder layer (or when the next forward starts, or the request is read). Done per layer, the
same updates took 1.4 ms of a 63 ms SmolLM2 step on one CPU thread (22 us per attention call, 25 us
per residual norm). An eager decode step of plain softmax hands over its query row, its sink key and
its log-sum-exp instead of statistics (``AttentionCall.sink_stats_deferred``), and the fold computes
all layers' sink masses in one product: 55 us per layer of the step when each call did it itself.

**Compiled decoding.** ``torch.compile`` traces these updates into the model's graph and guards the
graph on every Python value they read, so nothing a decode step reads may change from one step to
the next: a list that grows per step (the forwards' residual norms) made dynamo compile the model
again at every step until its recompile limit stopped the request (``generate`` with a static cache
and a ``compile_config``, 10 new tokens: "recompile limit exceeded"). Under dynamo the decode steps
therefore write their residual norms into a preallocated device buffer at a device-side position
(no Python state changes), sized by the static cache the prompt's forward used; eager forwards keep
one tensor per forward, unbounded.
"""

from __future__ import annotations

import warnings

import torch

from sinkfix.ops.attention import first_column_row_mass, sink_stats
from sinkfix.telemetry.prompt import PromptMeasures, norms32

__all__ = ["COPIED_SINK_KEY_ELEMENTS", "RequestAccumulator", "flatten_fp64", "read_once", "unflatten"]

#: Forwards with at most this many new tokens keep their decoder layers' outputs until the forward
#: is folded in (a few vectors per layer); longer ones (prompts) take each layer's norms at once, so
#: no layer's hidden states outlive the layer.
DEFERRED_NORM_TOKENS = 8

#: A deferred decode row copies the sink key out of a key tensor of at least this many elements
#: instead of keeping the tensor until the step's fold (RequestAccumulator.add_first_column_rows):
#: kept tensors then hold at most this much per layer (1 MB in fp32; SmolLM2 holds its keys whole
#: up to 1365 cached tokens). The copy costs about 9 us per call inside a decode step (measured: the
#: listener's time per SmolLM2-shaped step rose from 39 to 300-320 us when every call copied), next
#: to an attention call over at least this many key elements.
COPIED_SINK_KEY_ELEMENTS = 1 << 18

#: Decode tokens the compiled path's residual-norm buffer holds when the prompt's cache states no
#: maximum length (transformers compiles decoding only with a cache that does; beyond it a token's
#: norms are not kept, and the record's peak is over the tokens that were, with a warning).
DEFAULT_DECODE_CAPACITY = 2048


def flatten_fp64(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Several tensors as one fp64 vector, in the dict's order (:func:`unflatten` cuts it back)."""
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts.values()])


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``flat`` (from :func:`flatten_fp64` of tensors shaped as ``like``'s) cut back into those shapes."""
    out, start = {}, 0
    for name, tensor in like.items():
        count = tensor.numel()
        out[name] = flat[start:start + count].reshape(tensor.shape)
        start += count
    return out


def read_once(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy several device tensors to the host in one transfer (one synchronisation): flattened
    into one fp64 vector, moved, and cut back into the original shapes."""
    return unflatten(flatten_fp64(parts).cpu(), parts)


class RequestAccumulator:
    """Running sums of one request batch of ``batch`` sequences.

    ``stats`` (L, B, H, 2) fp64 sums the (B, Hq, 2) sink statistics of every attention call (mass
    before sink scaling, rows); the prompt's call of each layer also fills the drain weights and the
    sampled hidden-sink estimates (:mod:`sinkfix.telemetry.prompt`). Residual norms are kept per
    forward as (B, Q) tensors, a few floats per token and layer, so the peak ratio of the request is
    exact over all its tokens.
    """

    def __init__(self, num_heads: list[int], batch: int, device: torch.device,
                 decode_capacity: int | None = None) -> None:
        layers, heads = len(num_heads), max(num_heads)
        zeros = dict(device=device, dtype=torch.float32)
        self.num_heads = list(num_heads)
        self.kv_heads = [0] * layers
        self._stats = torch.zeros(layers, batch, heads, 2, dtype=torch.float64, device=device)
        self.drain_weight = torch.zeros(layers, batch, heads, **zeros)
        self.value_drain = torch.full((layers, batch, heads), float("nan"), **zeros)
        self.hidden_sinks = torch.zeros(layers, batch, heads, **zeros)
        self.hidden_part = torch.zeros(layers, batch, heads, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.float64, device=device)
        self.prompt_tokens = torch.zeros(batch, dtype=torch.float64, device=device)
        # (B,) rows with padding after a real token (right padding): their padding rows' attention is
        # inside the fast path's sums, which cannot leave it out (read() reports, the monitor refuses)
        self.padding_after_real = torch.zeros(batch, dtype=torch.bool, device=device)
        # () a forward of another batch size ran inside the request where no check could refuse it first
        # (note_batch); read() reports it, and the monitor refuses the request's records
        self.batch_changed = torch.zeros((), dtype=torch.bool, device=device)
        self.norms: list[torch.Tensor] = []  # per forward: (L, B, Q) residual norms, NaN for a layer without a hook
        self.real: list[torch.Tensor] = []
        # a forward appended to ``real`` whose norms are not in ``norms`` yet: a flag, because reading the
        # lists' lengths inside a compiled decode step made dynamo guard on the prompt's tensors in them
        # (their batch size: a new graph per batch size)
        self._norms_open = False
        self.in_prompt = True
        self._began = False  # flips once (the prompt's forward): a compiled decode step always reads True
        self._all_layers = list(range(layers))
        # the current forward's updates, folded in by _fold() (end_forward, begin_forward, read)
        self._pending_stats: list[tuple[int, torch.Tensor]] = []
        # (layer, query (B, Hq, 1, D), key (B, Hkv, K, D) or its sink key (B, Hkv, D), lse (B, Hq, 1), scale):
        # deferred decode statistics
        self._pending_rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
        self._pending_norms: dict[int, torch.Tensor] = {}  # layer -> (B, Q) norms, or the (B, Q, D) output itself
        self._norms_deferred = False
        # (B, 1, 1) 1 for the rows a forward serves, 0 for rows that finished (end of sequence) and are
        # only carried along; None when every row is served
        self._row_weight: torch.Tensor | None = None
        # compiled decode steps (module docstring): norms and real-token flags at a device-side position
        self._into_buffer = False
        self._buffer_real: torch.Tensor | None = None
        self._buffer_used = False  # set by a compiled step, read only on the host
        self._decode_norms = self._decode_real = self._decode_at = self._decode_overflow = None
        if decode_capacity is not None:
            self._decode_norms = torch.full((layers, batch, decode_capacity), float("nan"), **zeros)
            self._decode_real = torch.zeros(batch, decode_capacity, dtype=torch.bool, device=device)
            self._decode_at = torch.zeros((), dtype=torch.long, device=device)
            self._decode_overflow = torch.zeros((), dtype=torch.bool, device=device)

    @property
    def batch(self) -> int:
        """The request's batch size, read from a tensor's shape: under torch.compile a symbolic size,
        where an ``int`` attribute fixed every decode graph to the batch size it was traced with."""
        return self.tokens.shape[0]

    def note_batch(self, batch: int) -> None:
        """A traced forward's batch size against the request's, on the device: compared in Python, the
        two sizes made dynamo fix every graph to one batch size, and a forward of one sequence in a
        request of two broadcast its statistics into both rows unnoticed."""
        self.batch_changed |= torch.scalar_tensor(batch, device=self.tokens.device) != self.tokens.shape[0]

    @property
    def stats(self) -> torch.Tensor:
        """(L, B, H, 2) fp64 sums of the sink statistics so far (the current forward included)."""
        self._fold_stats()
        return self._stats

    # -- updates (device ops only) ------------------------------------------------------------
    def begin_forward(self, real: torch.Tensor, finished: torch.Tensor | None = None,
                      padding_after_real: torch.Tensor | None = None) -> None:
        """real (B, Q) bool: which of the forward's new tokens are real (not padding). finished (B,)
        bool: rows whose sequence has ended (``generate`` feeds them padding with a mask of ones until
        the last row ends): none of their tokens is real, and their sink statistics are left out.
        padding_after_real (B,) bool: rows padded after a real token (kept for :meth:`read`)."""
        self._fold()
        if padding_after_real is not None:
            self.padding_after_real |= padding_after_real
        self._row_weight = None
        if finished is not None:
            real = real & ~finished[:, None]
            self._row_weight = (~finished).to(self._stats.dtype)[:, None, None]
        self.in_prompt = not self._began
        self._began = True
        # a compiled decode step: its norms go to the device buffer, not to a list that grows
        self._into_buffer = (not self.in_prompt and self._decode_norms is not None
                             and torch.compiler.is_compiling())
        if self._into_buffer:
            self._buffer_real = real
        else:
            self.real.append(real)
            self._norms_open = True
        self._norms_deferred = real.shape[1] <= DEFERRED_NORM_TOKENS
        count = real.sum(-1)
        self.tokens.add_(count)
        if self.in_prompt:
            self.prompt_tokens.add_(count)

    def end_forward(self) -> None:
        """The forward's last decoder layer ran: fold its updates in now, inside the same forward (a
        compiled step then leaves no pending Python state for the next one to read)."""
        self._fold()

    def add_attention(self, layer: int, sink_stats: torch.Tensor) -> None:
        self._pending_stats.append((layer, sink_stats))

    def add_first_column_rows(self, layer: int, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
                              scale: float) -> None:
        """A call of one query row per sequence whose sink is key column 0 of a plain softmax:
        query (B, Hq, 1, D), key (B, Hkv, K, D) with K >= 2, lse (B, Hq, 1). Its statistics (the
        row's sink mass, one row) are computed when the forward is folded in, with the other layers'.

        The tensors are kept as they are and cut to the row and the sink key at the fold, in one
        loop over the layers and one stack and view for the queries and log-sum-exps (a decode step
        is paced by such small host operations, and three indexing operations per call here cost
        316 us per SmolLM2-shaped step where the fold's loop costs a tenth of that). A large key tensor
        is not kept: its sink key is copied out now, because holding the tensor until the fold would
        hold every layer's at once, and a quantized cache hands each call a freshly dequantized one."""
        if key.numel() >= COPIED_SINK_KEY_ELEMENTS:
            key = torch.select_copy(key, 2, 0)  # (B, Hkv, D), its own memory
        self._pending_rows.append((layer, query, key, lse, scale))

    def add_prompt(self, layer: int, measures: PromptMeasures, rows: torch.Tensor) -> None:
        """The prompt's call of ``layer``; ``rows`` (B, Hq) is its row count, over which the sampled
        hidden-sink part of the dormancy score is extrapolated."""
        heads, kv = measures.drain_weight.shape[1], measures.value_drain.shape[1]
        self.kv_heads[layer] = kv
        self.drain_weight[layer, :, :heads].copy_(measures.drain_weight)
        self.value_drain[layer, :, :kv].copy_(measures.value_drain)
        self.hidden_sinks[layer, :, :heads].copy_(measures.hidden_sinks)
        self.hidden_part[layer, :, :heads].copy_(measures.hidden_part * rows)

    def add_prompts(self, layers: list[int], measures: list[PromptMeasures], rows: list[torch.Tensor]) -> None:
        """:meth:`add_prompt` of several layers; when they are every layer in order with the same
        heads (a forward's prompt, usually) one copy per field instead of four per layer."""
        heads = self._stats.shape[2]
        if layers != self._all_layers or any(m.drain_weight.shape[1] != heads for m in measures) \
                or len({m.value_drain.shape[1] for m in measures}) != 1:
            for layer, m, r in zip(layers, measures, rows):
                self.add_prompt(layer, m, r)
            return
        kv = measures[0].value_drain.shape[1]
        self.kv_heads = [kv] * len(layers)
        self.drain_weight.copy_(torch.stack([m.drain_weight for m in measures]))
        self.value_drain[:, :, :kv].copy_(torch.stack([m.value_drain for m in measures]))
        self.hidden_sinks.copy_(torch.stack([m.hidden_sinks for m in measures]))
        self.hidden_part.copy_(torch.stack([m.hidden_part for m in measures]) * torch.stack(rows))

    def add_residual(self, layer: int, hidden: torch.Tensor) -> None:
        self._pending_norms[layer] = hidden if self._norms_deferred else _norms(hidden)

    # -- folding one forward in -----------------------------------------------------------------
    def _add_layers(self, layers: list[int], stats: list[torch.Tensor] | torch.Tensor) -> None:
        """Several layers' (B, h, 2) statistics, as a list or already stacked (n, B, h, 2): one
        stacked add when they are every layer once, in order, with the widest heads (the usual
        forward), else one add per layer."""
        stacked = isinstance(stats, torch.Tensor)
        if self._row_weight is not None:  # rows that finished: carried along, not served
            stats = stats * self._row_weight if stacked else [part * self._row_weight for part in stats]
        heads = stats.shape[2] if stacked else stats[0].shape[1]
        if layers == self._all_layers and heads == self._stats.shape[2] \
                and (stacked or all(part.shape == stats[0].shape for part in stats)):
            self._stats.add_(stats if stacked else torch.stack(stats))
            return
        for layer, part in zip(layers, stats):
            self._stats[layer, :, : part.shape[1]].add_(part)

    def _fold_stats(self) -> None:
        rows, self._pending_rows = self._pending_rows, []
        for layers, stacked in _first_column_stats(rows):
            self._add_layers(layers, stacked)
        pending, self._pending_stats = self._pending_stats, []
        if pending:
            layers, parts = zip(*pending)
            self._add_layers(list(layers), list(parts))

    def _fold_norms(self) -> None:
        pending, self._pending_norms = self._pending_norms, {}
        if self._into_buffer:
            # the step's flags are in the buffer now; holding on to the tensor would keep one
            # allocation of a compiled step alive past it, which CUDA graphs must account for
            real, self._into_buffer, self._buffer_real = self._buffer_real, False, None
            self._write_buffer(self._forward_norms(pending, real.shape), real)
            return
        if not self._norms_open:
            return  # no forward yet, or this one is already folded
        self._norms_open = False
        self.norms.append(self._forward_norms(pending, self.real[-1].shape))

    def _forward_norms(self, pending: dict[int, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """(L, B, Q) norms of one forward from its layers' pending entries; NaN for a layer without a hook."""
        layers = len(self._all_layers)
        if not pending:
            return torch.full((layers, *shape), float("nan"), dtype=torch.float32, device=self._stats.device)
        ordered = [pending[layer] for layer in sorted(pending)]
        norms = _norms(torch.stack(ordered)) if self._norms_deferred else torch.stack(ordered)
        if len(pending) < layers:  # a layer without a decoder hook
            full = torch.full((layers, *shape), float("nan"), dtype=norms.dtype, device=norms.device)
            full[sorted(pending)] = norms
            norms = full
        return norms

    def _write_buffer(self, norms: torch.Tensor, real: torch.Tensor) -> None:
        """A compiled decode step's (L, B, Q) norms at the buffer's device-side position: device ops
        only. Tokens past the buffer's end are not kept (their slot keeps what it holds) and the
        overflow flag is set."""
        capacity = self._decode_norms.shape[-1]
        slots = self._decode_at + torch.arange(real.shape[1], device=real.device)
        fits = slots < capacity
        self._decode_overflow |= ~fits.all()
        slots = slots.clamp(max=capacity - 1)
        kept_norms = self._decode_norms.index_select(2, slots)
        kept_real = self._decode_real.index_select(1, slots)
        self._decode_norms.index_copy_(2, slots, torch.where(fits, norms.to(kept_norms.dtype), kept_norms))
        self._decode_real.index_copy_(1, slots, torch.where(fits, real, kept_real))
        self._decode_at += real.shape[1]
        self._buffer_used = True

    def _fold(self) -> None:
        self._fold_stats()
        self._fold_norms()

    # -- reading ------------------------------------------------------------------------------
    def _residual_peaks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, B) max / median of the residual norms over the request's real tokens, and the
        position (among the real tokens) of the maximum; NaN where a layer has no decoder hook."""
        layers = len(self._all_layers)
        if not self.real:
            nan = torch.full((layers, self.batch), float("nan"), dtype=torch.float32, device=self._stats.device)
            return nan, nan
        reals, norm_parts = list(self.real), list(self.norms)
        if self._buffer_used:  # compiled decode steps; slots never written are not real
            reals.append(self._decode_real)
            norm_parts.append(self._decode_norms)
        real = torch.cat(reals, dim=1)  # (B, T)
        norms = torch.cat(norm_parts, dim=-1)  # (L, B, T)
        median = torch.nanmedian(norms.masked_fill(~real, float("nan")), dim=-1).values
        peak, index = norms.masked_fill(~real, float("-inf")).max(dim=-1)
        position = (real.cumsum(-1) - 1).expand(layers, -1, -1).gather(-1, index[..., None]).squeeze(-1)
        return peak / median, position.float()

    def read(self) -> dict[str, torch.Tensor]:
        """Everything, on the host, in one transfer."""
        self._fold()
        peak, position = self._residual_peaks()
        parts = {
            "stats": self._stats, "drain_weight": self.drain_weight, "value_drain": self.value_drain,
            "hidden_sinks": self.hidden_sinks, "hidden_part": self.hidden_part, "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens, "residual_peak": peak, "peak_position": position,
            "padding_after_real": self.padding_after_real, "batch_changed": self.batch_changed,
        }
        if self._buffer_used:
            parts["decode_overflow"] = self._decode_overflow
        values = read_once(parts)
        if self._buffer_used and bool(values.pop("decode_overflow")):
            warnings.warn(f"this request decoded more tokens under torch.compile than the residual-norm buffer holds "
                          f"({self._decode_norms.shape[-1]}, the prompt's cache states no maximum length): its "
                          "residual peaks leave the tokens past that out", RuntimeWarning, stacklevel=3)
        return values


def _first_column_stats(rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]]
                        ) -> list[tuple[list[int], torch.Tensor]]:
    """Deferred decode rows (:meth:`RequestAccumulator.add_first_column_rows`) as (layers, their
    (n, B, Hq, 2) statistics): one product per shape and scale, usually one for the whole step."""
    groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]]] = {}
    for entry in rows:  # torch.Size hashes as the tuple it is: no conversion per layer
        _, query, key, _, scale = entry
        sink_key_shape = (key.shape[0], key.shape[1], key.shape[-1])  # kept whole or its sink key already
        groups.setdefault((query.shape, sink_key_shape, query.dtype, key.dtype, scale), []).append(entry)
    out = []
    for entries in groups.values():
        layers, queries, keys, lses, scales = zip(*entries)
        # the one query row and the lse of every layer in one stack each, then one view; the sink
        # key (column 0) of the keys kept whole
        sink_keys = torch.stack([key.select(2, 0) if key.dim() == 4 else key for key in keys])
        mass = first_column_row_mass(torch.stack(queries).squeeze(-2), sink_keys, torch.stack(lses).squeeze(-1),
                                     scales[0])
        out.append((list(layers), sink_stats(mass[..., None], None)))  # one row each: (mass, 1)
    return out


def _norms(hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (...) fp32 Euclidean norms of residual-stream vectors."""
    return norms32(hidden)
