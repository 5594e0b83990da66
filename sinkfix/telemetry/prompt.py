"""What the monitor measures once per request, on the prompt: value drain and hidden sinks.

The fast path's statistics (``AttentionResult.sink_stats``) give the sink share of every row
exactly. The rest of the dormancy rule (docs/formulas.md, "Measuring") needs more:

* the **drain weight** of a key, ``w_j = clamp(1 - ||v_j|| / median_k ||v_k||, 0, 1)``: one norm
  per value vector of the call, computed on the prompt's call only (in a decode step the median
  would be over one new key); the sink's own value is cached and never changes, and the median is
  that of the prompt's keys for the rest of the request;
* the **hidden sinks** (ACT's criterion: a non-sink key whose mean attention over the rows that can
  see it exceeds 0.1), which need whole probability rows. Those are rebuilt from the call's own
  log-sum-exp for an evenly spaced sample of the prompt's query rows (32 by default): a
  ``(B, Hq, rows, K)`` block per layer, 1/16 of the score matrix of a 512-token prompt, never
  the whole of it, and nothing at all in decode steps.

Two steps: :func:`sample_call` while the attention call runs (the sampled rows, the value norms),
:func:`measure_sampled` later (a monitor runs :func:`measure_sampled_many` for all layers after the
forward's last one: the layers in batches, each batch one call; under the causal rule the sampled
rows in parts, each scored only on the keys it may see).
All of it stays on the device: no host read, no branch on tensor values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sinkfix.ops.reference import sink_key_mask, visibility_mask, zero_value_lse

__all__ = ["LayoutCache", "PromptMeasures", "SampledCall", "Workspace", "measure_prompt", "measure_sampled",
           "measure_sampled_many", "merged_block_limit", "norms32", "sample_call", "sampled_rows", "MIN_SAMPLED_VIEWERS"]

#: A key is judged only when at least this many sampled rows see it (or all of its viewers, for a
#: prompt short enough to be sampled whole): a mean over fewer is too noisy for ACT's threshold. On
#: SmolLM2 with 64 of 512 rows it took the hidden sinks found from 1369 to 1225 (exact: 1095) on six
#: windows, and changed no dormancy score.
MIN_SAMPLED_VIEWERS = 6

#: Parts the sampled rows are cut into under the causal rule on the CPU, each scored only on the keys
#: its rows may see (a fraction (n + 1) / 2n of the block: 62.5% with four).
CAUSAL_ROW_CHUNKS = 4

#: At most this many elements (fp32) in the probability block of calls measured together (4 MB). A
#: 512-token prompt of SmolLM2 (9 heads, 32 rows) has 0.15 M per layer: its 30 layers go in five
#: batches of six. Measured after real prefills (one thread, 20 rounds, medians): 27.4 ms layer by
#: layer; 22.7 / 21.2 / 22.8 / 28.4 ms with at most 0.6 / 1.2 / 2.4 / 8.4 M entries per batch (all
#: 30 layers' 17 MB leave the caches between the passes over the block); 34.3 ms one layer per batch
#: in parts. At this limit, in another run: 18.8 ms against 24.9 ms layer by layer.
MERGED_BLOCK_ELEMENTS = 1 << 20

#: The same limit on a GPU, where a batch of layers costs its operations' count rather than its bytes
#: (each operation is a kernel launch of a few microseconds, and the arithmetic of a block is a
#: fraction of a millisecond): 32 M elements, so a 4096-token prompt with 32 query heads, 8 kv heads
#: of 128 and 32 sampled rows (4.2 M per layer) goes in four batches of 8 layers instead of 32
#: batches of one, each holding about 335 MB while it is measured (the fp32 block, the layers' keys in
#: fp32 and their concatenation). On an H200 (2026-12-04) the monitor added 10.6 ms to such a prompt
#: of a 32-layer model while its measures went layer by layer. Counted on the CPU with the GPU's
#: settings (one part, this limit), a monitored 4096-token prefill of a 32-layer model launches 518
#: (per-head policy) and 616 (identity) operations more than an unmonitored one, against 1277 and 1212
#: layer by layer. Not yet timed on a GPU.
MERGED_BLOCK_ELEMENTS_GPU = 1 << 25

# exp(-87) = 1.6e-38 is the smallest fp32 normal number's neighbourhood: below it exp's result is
# subnormal, which the CPU kernels compute ~100x slower. exp(60) stays finite.
_EXP_FLOOR, _EXP_CEILING = -87.0, 60.0


#: The largest tensor (elements) a :class:`Workspace` keeps for the next forward: twice
#: :data:`MERGED_BLOCK_ELEMENTS` (8 MB of fp32). A larger one (a single layer of a long prompt) is
#: allocated and freed as before, so that one long request does not pin its block for good.
WORKSPACE_MAX_ELEMENTS = 2 * MERGED_BLOCK_ELEMENTS


class Workspace:
    """Buffers on the CPU that the prompt measures write their largest tensors into (the probability
    block, the batch of layers' keys), kept from one request to the next.

    Why: the measures run after the forward's last layer, while its KV cache is alive, and used to
    allocate a few 4 MB blocks there. glibc then grew its heap past what an unmonitored forward
    needs and gave the top back to the system after the request (its trim threshold), so the next
    prefill faulted those pages in again. SmolLM2-135M, 512-token prefills, monitored and
    unmonitored alternating, one thread (2026-12-05): with fresh blocks 7 of 10 monitored passes
    faulted 1,800-15,600 pages more than the unmonitored ones and the heap moved between 263 and 324
    MB; with the workspace none did after the first request and the heap stayed at 304 MB.

    Only on the CPU: a GPU's caching allocator already reuses its blocks, and a persistent block of
    a 4096-token prompt's batch would hold hundreds of MB of device memory. Not while compiling
    (a traced forward owns its buffers). Not thread-safe, like the monitor that owns it."""

    def __init__(self, max_elements: int = WORKSPACE_MAX_ELEMENTS) -> None:
        self.max_elements = max_elements
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape`` tensor: a view of the buffer ``name`` (grown when too small), or
        a fresh tensor where the workspace does not apply. A name's previous view is overwritten."""
        # compiling is asked first: the size of a traced prompt can be symbolic, and comparing it
        # with the limit would guard the graph on the prompt's length
        if torch.compiler.is_compiling() or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        if numel > self.max_elements:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes the workspace holds."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())


class PromptMeasures(NamedTuple):
    """Per batch row and query head (B, Hq) unless noted."""

    drain_weight: torch.Tensor  # the sink set's w in the dormancy score (several sink keys: their mass-weighted mean; NaN: no sink key)
    value_drain: torch.Tensor  # (B, Hkv) ||v_sink|| / median_j ||v_j||
    hidden_sinks: torch.Tensor  # hidden sinks found on the sampled rows
    hidden_part: torch.Tensor  # mean over sampled rows of sum_{j hidden} p_ij w_j (dormancy's hidden-sink part)


def norms32(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (...) float32 Euclidean norms over the last axis, accumulated in float32 for 16-bit
    inputs; a float64 input is reduced in float64 and rounded (``vector_norm`` refuses to narrow)."""
    if x.dtype == torch.float64:
        return torch.linalg.vector_norm(x, dim=-1).float()
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


def _row_step(q_len: int, wanted: int) -> int:
    """The spacing of the sampled rows: the largest that still gives at least ``wanted`` of them.
    Rounding the step up instead gave fewer rows than asked for between ``wanted`` and about four
    times it: a 40-row prompt got 20 of 32, and its late keys, seen by fewer than
    MIN_SAMPLED_VIEWERS sampled rows, were never judged (Gemma3-270M: 23 hidden sinks against 62)."""
    return torch.sym_max(1, q_len // max(1, wanted))  # no guard on a traced length (an int for an int)


def max_sampled_rows(q_len: int, wanted: int) -> int:
    """The most rows :func:`sampled_rows` gives a prompt of at most ``q_len`` rows: all of them below
    ``2 * wanted`` (a step of 1), and fewer than ``2 * wanted`` above (with a step k >= 2 a prompt of
    L < (k + 1) * wanted rows gets ceil(L / k) < 2 * wanted)."""
    return min(q_len, 2 * max(1, wanted) - 1)


def sampled_rows(q_len: int, wanted: int) -> slice:
    """Evenly spaced query rows ending at the last one, at least ``wanted`` of them (all rows when
    Q < 2 * wanted; :func:`max_sampled_rows` at most), as a slice (a strided view of the rows, no
    gather). A function of the shape only: the same rows every time for the same prompt length."""
    step = _row_step(q_len, wanted)
    return slice((q_len - 1) % step, q_len, step)


class _Layout(NamedTuple):
    """What the measures need from the call's layout alone (mask, lengths, sink columns): the same
    for every layer of a forward that shares its mask, so a monitor builds it once per forward and
    each layer runs only the operations that depend on its own tensors."""

    mask: torch.Tensor | None  # kept alive so that its id() is not reused while the layout is cached
    first_column: bool  # the sink is key column 0 of every row (no sink columns were located)
    first_sink: torch.Tensor  # (B, 1, 1) long, the first sink column (clamped to a valid index)
    row_slice: slice  # the sampled query rows, evenly spaced: a strided view, no gather (unused with row_index)
    row_index: torch.Tensor | None  # (B, 1, r) long: each prompt's own sampled rows (a mask, or traced); None = row_slice
    blind_rows: bool  # some sampled row may see no key at all (padding): its log-sum-exp is not a number
    visible: torch.Tensor | None  # (B, 1, r, K) fp32 0/1, what the sampled rows may see; None = everything
    has_n: torch.Tensor  # (B, 1, r) bool, sampled rows that see a non-sink key
    indicators: torch.Tensor  # (B, 1, 2, K) fp32: the sink keys, the non-sink keys
    judged: torch.Tensor  # (B, 1, K) bool, keys ACT's criterion may call hidden sinks
    inv_seen: torch.Tensor  # (B, 1, K) fp32, 1 / the sampled rows that see each key
    inv_counted: torch.Tensor  # (B, 1) fp32, 1 / the sampled rows that see a non-sink key
    unseen: torch.Tensor | None  # (B, 1, K) bool, keys no row may see (left out of the value median); None = none
    chunks: tuple[tuple[int, int, int], ...]  # (first sampled row, end row, keys they may see): the block's parts
    #: (B, 1, NS) long, the sink columns (-1 = unused slot) where the sink set has more than one
    #: position; None for one position (its drain weight is the whole sink part of the dormancy)
    sink_slots: torch.Tensor | None = None
    #: (B, 1) bool, prompts whose sink set names no key a row may see (an extra sink position past the
    #: prompt's end, a sink on padding); None when the sink is column 0 of every row
    sink_absent: torch.Tensor | None = None


def _all_visible(call, batch: int, q_len: int, k_len: int) -> torch.Tensor:
    """(B, 1, Q, K) bool: which keys each query row of the call may see: its mask, or the shared
    upper-left causal rule without one."""
    if call.attn_mask is not None:
        return call.attn_mask.expand(batch, 1, q_len, k_len)
    return visibility_mask(batch, q_len, k_len, causal=call.causal, device=call.query.device)


def _layout(call, rows_wanted: int, min_queries: int) -> _Layout:
    q = call.query
    batch, _, q_len, _ = q.shape
    k_len = call.key.shape[2]
    first_column = call.sink_cols is None
    sink_cols = torch.zeros(batch, 1, dtype=torch.long, device=q.device) if first_column else call.sink_cols
    visible_all = _all_visible(call, batch, q_len, k_len)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, :]  # (B, 1, K)
    sees_n_all = (visible_all & ~is_sink[:, :, None, :]).any(-1)  # (B, 1, Q)
    # inspect's rule, per prompt: keys seen by fewer than min(min_queries, a quarter of the rows that
    # see a non-sink key) rows are not judged, so late keys never "sink"
    n_rows = sees_n_all.sum(-1, keepdim=True)  # (B, 1, 1)
    min_q = torch.clamp(torch.div(n_rows, 4, rounding_mode="floor"), min=1, max=min_queries)
    seen_by = visible_all.sum(2)  # (B, 1, K)
    if call.attn_mask is None and not torch.compiler.is_compiling():
        # every prompt of the batch has all Q rows: one strided view
        row_slice, row_index = sampled_rows(q_len, rows_wanted), None
        visible, has_n = visible_all[:, :, row_slice], sees_n_all[:, :, row_slice]
        chunks = _row_chunks(row_slice, q_len, k_len, causal=call.causal,
                             parts=CAUSAL_ROW_CHUNKS if q.device.type == "cpu" else 1)
    else:
        # under a mask, each prompt's own rows; while tracing, the same rows at a fixed number of slots
        # (max_sampled_rows): a strided view's row count is a symbolic expression of the length's
        # quotient and remainder, which inductor's CPU kernels evaluated per element (SmolLM2, a
        # 512-token prompt, one thread: the measures took ~440 ms of a compiled prefill, ~25 ms eager)
        # Without a mask every prompt has all Q rows, and their count is the length's own expression, so
        # the slots are the rows the eager forward samples (SmolLM2, 512 tokens: 32 where
        # max_sampled_rows gives 63; the monitored compiled prefill, per-head policy, 1.037x -> 1.027x)
        rows = None if call.attn_mask is not None else _traced_row_count(q_len, rows_wanted)
        row_slice, (row_index, sampled_real) = slice(None), _rows_per_prompt(visible_all, q_len, rows_wanted,
                                                                            rows=rows)
        visible = visible_all.gather(2, row_index[..., None].expand(-1, -1, -1, k_len)) & sampled_real[..., None]
        has_n = sees_n_all.gather(2, row_index) & sampled_real
        chunks = ((0, row_index.shape[-1], k_len),)
    sampled_seen = visible.sum(2)
    judged = (seen_by >= min_q) & ~is_sink & (sampled_seen >= torch.clamp(min_q, max=MIN_SAMPLED_VIEWERS))
    some_unseen = call.attn_mask is not None or (call.causal and k_len > q_len)
    return _Layout(
        call.attn_mask, first_column, sink_cols[:, :1].clamp(min=0)[:, None, :], row_slice, row_index,
        call.attn_mask is not None,
        None if row_index is None and not call.causal else visible.to(torch.float32), has_n,
        torch.stack([is_sink, ~is_sink], dim=2).to(torch.float32), judged,
        1 / sampled_seen.clamp(min=1).to(torch.float32), 1 / has_n.sum(-1).clamp(min=1).to(torch.float32),
        (seen_by == 0) if some_unseen else None, chunks,
        None if first_column or sink_cols.shape[-1] == 1 else sink_cols[:, None, :].to(torch.long),
        None if first_column else ~(is_sink & (seen_by > 0)).any(-1))


def _traced_row_count(q_len: int, rows_wanted: int) -> int:
    """The rows :func:`sampled_rows` gives a prompt of ``q_len`` rows, ``ceil(q_len / step)``, as
    arithmetic on the (maybe symbolic) length with no comparison, so that dynamo adds no guard."""
    return (q_len - 1) // _row_step(q_len, rows_wanted) + 1


def _rows_per_prompt(visible_all: torch.Tensor, q_len: int, rows_wanted: int,
                     read_lengths: bool | None = None, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Under a mask: each prompt's own sampled rows, (B, 1, r) long indices into the Q rows and a (B, 1, r)
    bool of those that are real. A left-padded prompt's rows are its last L (the rows that see some
    key); it gets the rows :func:`sampled_rows` gives the same prompt alone, ``max(1, L // rows_wanted)``
    apart and ending at the last row, so that a padded row of a batch gets
    the record it gets alone (spaced over the batch's Q rows, a 10-token prompt in a batch with a
    512-token one got one sampled row, too few to judge any key).

    ``read_lengths`` (default: on the CPU, outside compilation): r is the most rows a prompt of the
    batch gets, read from the lengths, which costs the CPU nothing. Otherwise r =
    :func:`max_sampled_rows` (Q), a shape, so that a GPU never waits to read the lengths back; up to
    twice the block: SmolLM2-135M, a 512-token and a left-padded 400-token prompt, 63 slots where 34 do.
    ``rows`` given: that many slots (every prompt of the batch has all Q rows)."""
    lengths = visible_all.any(-1).sum(-1, keepdim=True)  # (B, 1, 1)
    step = torch.div(lengths, max(1, rows_wanted), rounding_mode="floor").clamp(min=1)  # _row_step
    if read_lengths is None:
        read_lengths = visible_all.device.type == "cpu" and not torch.compiler.is_compiling()
    if rows is None and read_lengths:  # a prompt of L rows, step k, gets ceil(L / k) rows (sampled_rows)
        rows = max(1, int(torch.div(lengths + step - 1, step, rounding_mode="floor").max()))
    elif rows is None:
        rows = max_sampled_rows(q_len, rows_wanted)
    back = torch.arange(rows - 1, -1, -1, device=visible_all.device)  # ascending rows, the last one last
    index = (q_len - 1) - back * step  # (B, 1, r)
    real = index >= q_len - lengths
    return index.clamp(min=0), real


def _row_chunks(row_slice: slice, q_len: int, k_len: int, *, causal: bool,
                parts: int) -> tuple[tuple[int, int, int], ...]:
    """The sampled rows cut into ``parts`` runs, each with the keys its last row may see: under the
    causal rule without a mask (row ``i`` sees keys ``0..i``), known from the shapes alone, the
    probability block is built only where it can be non-zero. Other layouts: one part, every key.

    Parts pay where the block's arithmetic is the cost (the CPU). On a GPU the block of a prompt is
    a fraction of a millisecond of work and each part adds about ten kernel launches per batch of
    layers, so the monitor asks for one part there (by that count, not measured on a GPU)."""
    positions = range(q_len)[row_slice]
    rows = len(positions)
    if not causal or parts < 2 or rows < 2 * parts:
        return ((0, rows, k_len),)
    bounds = [round(rows * part / parts) for part in range(parts + 1)]
    return tuple((start, end, min(k_len, positions[end - 1] + 1)) for start, end in zip(bounds, bounds[1:]))


class LayoutCache:
    """The layouts of a forward's calls, each under the key of what it was built from (:func:`_cached_layout`).

    Keys are compared (``==``), never hashed: under ``torch.compile`` with a dynamic prompt length a
    key holds the symbolic length, and hashing it makes dynamo guard the graph on the length's value,
    so a compiled forward was compiled again for every new prompt length (a tiny Llama stopped at
    dynamo's recompile limit at its eighth length). Two keys holding the same symbolic length compare
    equal without any guard. A forward has a few layouts, so the scan costs nothing."""

    def __init__(self, entries: list[tuple[tuple, _Layout]] | None = None) -> None:
        self._entries = [] if entries is None else entries

    def get(self, key: tuple) -> _Layout | None:
        for known, layout in self._entries:
            if known == key:
                return layout
        return None

    def add(self, key: tuple, layout: _Layout) -> None:
        self._entries.append((key, layout))

    def keys(self) -> list[tuple]:
        return [key for key, _ in self._entries]

    def values(self) -> list[_Layout]:
        return [layout for _, layout in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def for_next_forward(self, limit: int = 8) -> LayoutCache:
        """The cache a monitor hands its next forward: the layouts without a mask, which depend on
        the shapes alone (building one took about 1.5 ms of a 512-token SmolLM2 prompt, one thread), and
        none of those made for a mask (their key is the mask's id, which a later tensor may reuse). Empty
        while dynamo traces the model: tensors kept from one compiled call to the next would be graph
        inputs, and a symbolic length kept past its graph means nothing in the next one."""
        if torch.compiler.is_compiling() or len(self._entries) > limit:
            return LayoutCache()
        return LayoutCache([(key, layout) for key, layout in self._entries if key[0] is None])


def _cached_layout(call, rows_wanted: int, min_queries: int, layouts: LayoutCache | None) -> _Layout:
    """The call's layout, from ``layouts`` when a call of the same forward had the same one. Calls
    whose sink columns were located per call (padding, explicit sink positions) are cached by those
    columns' values on the CPU, where reading them costs nothing (SmolLM2-135M, a left-padded batch of
    a 512- and a 400-token prompt, one thread: 30 layouts built, 34 ms of a request, against one);
    elsewhere they are not: telling whether two such tensors agree would wait for the device."""
    if layouts is None:
        return _layout(call, rows_wanted, min_queries)
    sinks = None
    if call.sink_cols is not None:
        if call.sink_cols.device.type != "cpu" or torch.compiler.is_compiling():
            return _layout(call, rows_wanted, min_queries)
        sinks = (tuple(call.sink_cols.shape), tuple(call.sink_cols.flatten().tolist()))
    key = (None if call.attn_mask is None else id(call.attn_mask), call.causal, call.query.shape[0],
           call.query.shape[2], call.key.shape[2], rows_wanted, min_queries, str(call.query.device), sinks)
    layout = layouts.get(key)
    if layout is None:
        layout = _layout(call, rows_wanted, min_queries)
        layouts.add(key, layout)
    return layout


def _value_weights(norms: torch.Tensor, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the value norms (B, Hkv, K): the drain weights (B, Hkv, K), the sink's (B, Hkv) and the
    drain ratio (B, Hkv), with the median over the keys some row may see (padding and empty cache
    slots left out)."""
    if lay.unseen is None:  # every key is seen: the plain median (the same lower middle value)
        median = norms.median(dim=-1).values
    else:
        median = torch.nanmedian(norms.masked_fill(lay.unseen, float("nan")), dim=-1).values
    ratio = norms / median[..., None]
    weights = (1 - ratio).clamp_(0, 1)
    if lay.unseen is not None:  # a batch row that sees no key has a NaN median
        weights = weights.nan_to_num_(0)
    if lay.first_column:
        return weights, weights[..., 0], ratio[..., 0]
    first = lay.first_sink.expand(-1, norms.shape[1], 1)  # (B, Hkv, 1)
    return weights, weights.gather(-1, first).squeeze(-1), ratio.gather(-1, first).squeeze(-1)


class SampledCall(NamedTuple):
    """What the prompt measures need from one attention call, taken while the call runs: the
    sampled query rows and their log-sum-exps (copies of a few rows, not the call's tensors), the
    value norms, and a reference to the keys (the KV cache's own tensor when there is a cache).
    :func:`measure_sampled` turns it into :class:`PromptMeasures` later: a monitor measures the
    whole forward's calls back to back after its last decoder layer, where the same work took
    16-17 ms against 25-30 ms interleaved with the model's layers (SmolLM2, 512 tokens, 32 rows,
    one thread: each small operation runs cold between two layers' large ones)."""

    layer: int
    layout: _Layout
    q_rows: torch.Tensor  # (B * Hkv, g * r, D) fp32, the sampled rows grouped by kv head
    lse: torch.Tensor  # (B, Hq, r) fp32, finite
    key: torch.Tensor  # (B, Hkv, K, D)
    value_norms: torch.Tensor  # (B, Hkv, K) fp32
    scale: float
    softcap: float | None
    extra_logits: torch.Tensor | None
    virtual_sink_logit: torch.Tensor | None
    beta: torch.Tensor | None
    rows: torch.Tensor  # (B, Hq) the call's rows that see a non-sink key (its sink statistics' count)


def sample_call(call, *, rows_wanted: int, min_queries: int, layouts: LayoutCache | None = None) -> SampledCall:
    """The part of the prompt measures that must run while the call's tensors are current: the
    sampled rows of the queries and of the log-sum-exp, and the value norms. ``layouts``: a cache
    the caller keeps for one forward, so that layers with the same layout share its tensors."""
    q = call.query
    batch, q_heads, _, dim = q.shape
    kv_heads = call.key.shape[1]
    lay = _cached_layout(call, rows_wanted, min_queries, layouts)
    if lay.row_index is None:
        lse, q_sampled = call.result.lse[:, :, lay.row_slice], q[:, :, lay.row_slice]
    else:  # each prompt's own rows (a gather: padding moves them)
        lse = call.result.lse.gather(2, lay.row_index.expand(-1, q_heads, -1))
        q_sampled = q.gather(2, lay.row_index[..., None].expand(-1, q_heads, -1, dim))
    lse = lse.to(torch.float32)
    if lay.blind_rows:  # a padding row's is garbage; it sees nothing anyway
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
    rows = lse.shape[-1]
    # one copy, dtype and layout at once (reshape then .to made two for 16-bit queries: one more
    # operation per layer, which on a GPU is a kernel launch of its own; .to(memory_format=...) keeps
    # a transposed layout), then a view
    q_rows = torch.empty(batch, q_heads, rows, dim, dtype=torch.float32, device=q.device)
    q_rows = q_rows.copy_(q_sampled).view(batch * kv_heads, q_heads // kv_heads * rows, dim)
    norms = norms32(call.value)
    if call.result.sink_stats is None:
        # a request whose first forward is one new token on a cache (a one-token chat turn): an
        # identity decode call leaves its statistics to the listener (AttentionCall.sink_stats_deferred),
        # and its one row, unmasked over K >= 2 keys, sees a non-sink key
        row_count = torch.ones(batch, q_heads, dtype=torch.float32, device=q.device)
    else:
        row_count = call.result.sink_stats[..., 1]
    return SampledCall(call.layer, lay, q_rows, lse, call.key, norms, call.scale, call.softcap, call.extra_logits,
                       call.virtual_sink_logit, call.beta, row_count)


def _real_probabilities(sampled: SampledCall, keys: torch.Tensor, part: tuple[int, int, int],
                        workspace: Workspace | None = None) -> torch.Tensor:
    """(B, Hq, rows, E) fp32 ``exp(s_ij - lse_i)`` of one part of the sampled rows over the first
    ``E`` keys (``part`` = first row, end row, E), 0 where a row may not look: the stock softmax over
    the real keys, rebuilt from the call's own log-sum-exp. ``keys``: (B * Hkv, D, K) fp32.

    The exponent is clamped to [_EXP_FLOOR, _EXP_CEILING] before ``exp_`` and the keys a row may not
    see are zeroed after it, instead of adding a -inf bias: on CPU, ``exp`` of an argument whose
    result is subnormal (below ~-87.3) or of -inf takes a slow path (a 3 x 192 x 512 block took
    2.0 ms with the bias, 0.5 ms clamped, one thread), and a sink-dominated head puts most of its
    keys there. A clamped probability is ``exp(-87) = 1.6e-38`` instead of a smaller one."""
    lay, (start, end, k_end) = sampled.layout, part
    batch, q_heads, rows = sampled.lse.shape
    kv_heads, group = sampled.key.shape[1], q_heads // sampled.key.shape[1]
    lse = sampled.lse if (start, end) == (0, rows) else sampled.lse[..., start:end]
    q_rows = sampled.q_rows
    if (start, end) != (0, rows):  # the part's rows of every head of the group (a small copy)
        q_rows = q_rows.view(batch * kv_heads, group, rows, -1)[:, :, start:end].reshape(
            batch * kv_heads, group * (end - start), -1)
    neg_lse = lse.neg().reshape(batch * kv_heads, group * (end - start), 1)
    keys = keys if k_end == keys.shape[-1] else keys[..., :k_end]
    out = None if workspace is None else workspace.take(
        "scores", (q_rows.shape[0], q_rows.shape[1], keys.shape[-1]), torch.float32, keys.device)
    if sampled.softcap is None:  # the scale goes into the product (alpha), not into a scaled copy of q
        scores = torch.baddbmm(neg_lse, q_rows, keys, alpha=sampled.scale, out=out)
    else:
        softcap = sampled.softcap
        scores = torch.bmm(q_rows, keys, out=out).mul_(sampled.scale / softcap).tanh_().mul_(softcap).add_(neg_lse)
    # the ceiling only matters for keys the row may not see (a later key can score far above the
    # row's log-sum-exp): their exp must stay finite for the zeroing product below
    probs = scores.clamp_(min=_EXP_FLOOR, max=_EXP_CEILING).exp_().view(batch, q_heads, end - start, k_end)
    return probs if lay.visible is None else probs.mul_(lay.visible[:, :, start:end, :k_end])


def _zero_value_share(call: SampledCall, part: tuple[int, int, int]) -> torch.Tensor | None:
    """(B, Hq, rows) for one part of the sampled rows: the share of each row's mass the real keys keep
    beside the zero-value logits (virtual sink logit, learned sinks), ``sigmoid(lse - lse_zero)``;
    None without such logits."""
    start, end, _ = part
    zero = zero_value_lse(call.extra_logits, call.virtual_sink_logit, call.layout.has_n[..., start:end])
    return None if zero is None else torch.sigmoid(call.lse[..., start:end] - zero)


def _row_factors(call: SampledCall, probs: torch.Tensor, part: tuple[int, int, int]) -> torch.Tensor:
    """(B, Hq, rows) for one part of the sampled rows: what turns a row's stock probability of a
    non-sink key into the one the call applied: the share the zero-value logits leave, times beta's
    redistribution ``(p_N + (1 - beta) p_S) / p_N = 1 + (1 - beta) p_S / p_N`` (docs/formulas.md);
    0 for a row that sees no non-sink key. Sink columns are not needed downstream."""
    lay = call.layout
    start, end, k_end = part
    has_n = lay.has_n[..., start:end]
    factors = _zero_value_share(call, part)
    if call.beta is not None:
        # p_S and p_N of every row in one product with the two indicator rows; p_N summed over the
        # non-sink keys themselves, never as 1 - p_S: in a row whose sink takes almost everything
        # (p_S = 1 - 1e-8 is common in SmolLM2) the difference cancels to 0 in fp32 and the factor
        # blew up to 1e29 (seen as dormancy scores of 1e19). A part's rows see no key past k_end,
        # so the indicators' first k_end columns are the whole sums.
        p_s, p_n = torch.matmul(lay.indicators[..., :k_end], probs.transpose(-1, -2)).unbind(-2)  # (B, Hq, rows)
        moved = (1 - call.beta.to(torch.float32))[None, :, None]
        scaling = p_s.div_(p_n.clamp_(min=1e-30)).mul_(moved).add_(1)
        factors = scaling if factors is None else factors.mul_(scaling)
    if factors is None:
        return has_n.to(torch.float32).expand(probs.shape[:3])
    # a row that sees no non-sink key (padding, or only the sink) counts as 0; torch.where, not a
    # product, because such a row's factor may be inf or NaN
    return torch.where(has_n, factors, 0.0)


def _keys32(sampled: SampledCall, workspace: Workspace | None = None) -> torch.Tensor:
    """(B * Hkv, D, K) fp32: the call's keys as the probability blocks multiply them."""
    k = sampled.key
    keys = k.reshape(k.shape[0] * k.shape[1], k.shape[2], k.shape[3])
    if keys.dtype != torch.float32:
        keys = (keys.float() if workspace is None
                else workspace.take("keys32", tuple(keys.shape), torch.float32, keys.device).copy_(keys))
    return keys.transpose(1, 2)


def _sink_slot_sums(call: SampledCall, probs: torch.Tensor, part: tuple[int, int, int]) -> torch.Tensor:
    """(B, Hq, NS) one part's attention on each slot of a several-position sink set before sink
    scaling, summed over its rows that see a non-sink key (the rows the sink statistics count): how
    the call's exact sink mass divides among the sink keys. Each row's stock probabilities times the
    share the zero-value logits leave it (pooled without it, a virtual logit of 2 put the dormancy
    1e-3 off). Only the NS columns are gathered from the block."""
    lay = call.layout
    start, end, k_end = part
    slots = lay.sink_slots
    inside = (slots >= 0) & (slots < k_end)  # (B, 1, NS): a part's rows see no key past k_end
    index = slots.clamp(0, k_end - 1)[:, :, None, :].expand(-1, probs.shape[1], end - start, -1)
    has_n = lay.has_n[..., start:end]
    share = _zero_value_share(call, part)
    rows = has_n.to(torch.float32) if share is None else torch.where(has_n, share, 0.0)
    return (probs.gather(-1, index) * rows[..., None]).sum(2) * inside


def _applied_column_sums(sampled: SampledCall, workspace: Workspace | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, Hq, K) the applied attention summed over the sampled rows, per key, part by part of the
    rows (:func:`_row_chunks`): under the causal rule the parts skip the keys their rows cannot see,
    37.5% of a 512-token prompt's block with four parts. With a several-position sink set, also
    :func:`_sink_slot_sums` over every part (None otherwise), from the same blocks."""
    keys = _keys32(sampled, workspace)
    k_len = keys.shape[-1]
    columns = slot_sums = None
    for part in reversed(sampled.layout.chunks):  # the last part sees every key: the sums start from it
        probs = _real_probabilities(sampled, keys, part, workspace)
        if sampled.layout.sink_slots is not None:
            sums = _sink_slot_sums(sampled, probs, part)
            slot_sums = sums if slot_sums is None else slot_sums.add_(sums)
        sums = torch.matmul(_row_factors(sampled, probs, part)[..., None, :], probs).squeeze(-2)  # (B, Hq, E)
        if columns is None:
            columns = sums if part[2] == k_len else torch.nn.functional.pad(sums, (0, k_len - part[2]))
        else:
            columns[..., :part[2]] += sums
    return columns, slot_sums


def measure_sampled(sampled: SampledCall, *, threshold: float, workspace: Workspace | None = None) -> PromptMeasures:
    """The drain weights and the sampled hidden-sink estimates of one sampled attention call."""
    lay = sampled.layout
    batch, q_heads, _ = sampled.lse.shape
    kv_heads, k_len = sampled.key.shape[1], sampled.key.shape[2]
    group = q_heads // kv_heads
    weights, sink_weight, drain = _value_weights(sampled.value_norms, lay)
    # ACT's criterion is on the column sums' mean over the rows that see the key; the dormancy's
    # hidden-sink part, sum_rows sum_{j hidden} p_ij w_j, is the same column sums dotted with the
    # hidden keys' weights
    columns, slot_sums = _applied_column_sums(sampled, workspace)
    sink_weight = sink_weight.repeat_interleave(group, dim=1)
    if slot_sums is not None:
        # several sink keys, each with its own drain weight: the exact sink mass's weight is the
        # sampled rows' mean of them, weighted by each key's share of the sink mass (exact when every
        # counted row is sampled; the first key's weight alone was off by up to 0.073 with n_sink=4)
        slots = lay.sink_slots[:, 0, :]  # (B, NS)
        slot_weights = weights.gather(-1, slots.clamp(min=0)[:, None, :].expand(-1, kv_heads, -1))
        slot_weights = slot_weights.repeat_interleave(group, dim=1)  # (B, Hq, NS)
        total = slot_sums.sum(-1)
        sink_weight = torch.where(total > 0, (slot_sums * slot_weights).sum(-1) / total.clamp(min=1e-30), sink_weight)
    hidden = (columns * lay.inv_seen > threshold) & lay.judged
    by_kv = (batch, kv_heads, group, k_len)
    hidden_weighted = torch.where(hidden.view(by_kv), columns.view(by_kv) * weights[:, :, None, :], 0.0)
    hidden_part = hidden_weighted.sum(-1).view(batch, q_heads) * lay.inv_counted
    if lay.sink_absent is not None:
        # no sink key in the prompt: no drain to report (the first slot's clamp read column 0, a padding
        # token in a left-padded row), and NaN marks the sink share undefined (records.py), as inspect has it
        drain = drain.masked_fill(lay.sink_absent, float("nan"))
        sink_weight = sink_weight.masked_fill(lay.sink_absent, float("nan"))
    return PromptMeasures(sink_weight, drain, hidden.sum(-1).to(torch.float32), hidden_part)


def _merge_key(call: SampledCall) -> tuple:
    """Calls with equal keys are measured as one: the same layout object, shapes, dtypes, scale and
    softcap, and the same kinds of correction (a policy's tensors present or not, of one shape).
    Compared with ``==``, never hashed (:class:`LayoutCache` says why)."""
    def shape(t: torch.Tensor | None):
        return None if t is None else (tuple(t.shape), t.dtype, t.device)

    return (id(call.layout), tuple(call.q_rows.shape), shape(call.key), tuple(call.value_norms.shape), call.scale,
            call.softcap, shape(call.extra_logits), shape(call.virtual_sink_logit), shape(call.beta))


def _merged(calls: list[SampledCall], workspace: Workspace | None = None) -> SampledCall:
    """Several layers' calls as one call whose heads are all of theirs, layer after layer: every
    tensor of the measures is per head (or per kv head, query heads grouped under theirs), and the
    layout is shared, so the measures of the merged call are the layers' measures side by side."""
    first = calls[0]
    batch, q_heads, rows = first.lse.shape
    kv_heads = first.key.shape[1]

    def cat(name: str, dim: int) -> torch.Tensor | None:
        parts = [getattr(call, name) for call in calls]
        if parts[0] is None:
            return None
        if workspace is None or name != "key":
            return torch.cat(parts, dim=dim)
        shape = list(parts[0].shape)
        shape[dim] = sum(part.shape[dim] for part in parts)
        return torch.cat(parts, dim=dim, out=workspace.take(name, tuple(shape), parts[0].dtype, parts[0].device))

    q_rows = torch.cat([call.q_rows.view(batch, kv_heads, *call.q_rows.shape[1:]) for call in calls], dim=1)
    return first._replace(
        layer=-1, q_rows=q_rows.view(batch * kv_heads * len(calls), *first.q_rows.shape[1:]), lse=cat("lse", 1),
        key=cat("key", 1), value_norms=cat("value_norms", 1), extra_logits=cat("extra_logits", 0),
        virtual_sink_logit=cat("virtual_sink_logit", 0), beta=cat("beta", 0), rows=cat("rows", 1))


def _split(measures: PromptMeasures, layers: int) -> list[PromptMeasures]:
    """The measures of a merged call cut back into its layers' (every field is per head, layer after layer)."""
    fields = [field.chunk(layers, dim=1) for field in measures]
    return [PromptMeasures(*parts) for parts in zip(*fields)]


def merged_block_limit(device: torch.device) -> int:
    """Elements of the probability block that calls measured together may reach on ``device``:
    :data:`MERGED_BLOCK_ELEMENTS` on the CPU (cache-sized), :data:`MERGED_BLOCK_ELEMENTS_GPU` elsewhere."""
    return MERGED_BLOCK_ELEMENTS if device.type == "cpu" else MERGED_BLOCK_ELEMENTS_GPU


#: How many calls (layers) a traced forward may measure together besides all of them at once: the
#: largest whose block fits the limit. A symbolic prompt length makes each comparison a guard on a
#: range of lengths, so a compiled forward gets one graph per rung of this ladder its prompts reach,
#: not one per length. Measuring the layers one by one instead cost 1.044x of a compiled SmolLM2
#: prefill (512 tokens, one thread) where the ladder's batches cost 1.016x (one-off runs, docs/monitoring.md).
TRACED_BATCH_LADDER = (8, 2)


def _calls_per_batch(calls: int, block: int, limit: int) -> int:
    """How many calls of one merge group :func:`measure_sampled_many` measures together, ``block``
    elements each: as many as fit ``limit``, at least one. Eager, exactly that; traced, the largest
    of ``calls`` and :data:`TRACED_BATCH_LADDER` that fits (one when none does)."""
    if calls == 1:
        return 1
    if not torch.compiler.is_compiling():
        return max(1, limit // max(1, block))
    for size in (calls, *TRACED_BATCH_LADDER):
        if size <= calls and size * block <= limit:
            return size
    return 1


def measure_sampled_many(sampled: list[SampledCall], *, threshold: float,
                         max_block: int | None = None, workspace: Workspace | None = None) -> list[PromptMeasures]:
    """:func:`measure_sampled` of several calls, in their order. Calls that can be merged
    (:func:`_merge_key`: in a forward, usually every layer) are measured together, as many at a time
    as keep the probability block within ``max_block`` elements (default: :func:`merged_block_limit`
    of the calls' device): one operation per step for all of them instead of one per layer (SmolLM2,
    30 layers, a real 512-token prefill, one thread: 23.7 ms one by one, 20.1 ms batched in parts;
    ``benchmarks/bench_prompt_measures.py``)."""
    groups: list[tuple[tuple, list[int]]] = []
    for index, call in enumerate(sampled):
        key = _merge_key(call)
        for known, indices in groups:
            if known == key:
                indices.append(index)
                break
        else:
            groups.append((key, [index]))
    out: list[PromptMeasures | None] = [None] * len(sampled)
    for _, indices in groups:
        call = sampled[indices[0]]
        limit = merged_block_limit(call.key.device) if max_block is None else max_block
        most = _calls_per_batch(len(indices), call.lse.numel() * call.key.shape[2], limit)
        step = math.ceil(len(indices) / math.ceil(len(indices) / most))  # even batches: 30 layers by 7 -> 5 x 6
        for start in range(0, len(indices), step):
            batch = indices[start:start + step]
            if len(batch) == 1:
                out[batch[0]] = measure_sampled(sampled[batch[0]], threshold=threshold, workspace=workspace)
                continue
            merged = measure_sampled(_merged([sampled[i] for i in batch], workspace), threshold=threshold,
                                     workspace=workspace)
            for index, measures in zip(batch, _split(merged, len(batch))):
                out[index] = measures
    return out


def measure_prompt(call, *, rows_wanted: int, threshold: float, min_queries: int,
                   layouts: LayoutCache | None = None) -> PromptMeasures:
    """:func:`sample_call` and :func:`measure_sampled` at once: the drain weights and the sampled
    hidden-sink estimates of one attention call of the prompt."""
    return measure_sampled(sample_call(call, rows_wanted=rows_wanted, min_queries=min_queries, layouts=layouts),
                           threshold=threshold)
