"""Content-dependent sink sets in a patched model: decided on the prompt, carried with the KV cache.

ACT's criterion is a column mean over the query rows that see a key. A decode step has one row,
and that row's criterion would call any strongly attended token a sink; so sinkfix decides the set
on the prompt and carries it, unchanged, through decoding (docs/formulas.md, "Content-dependent
sinks"):

* **Prefill** (any call with more than one query row, including prefill chunks): the column
  statistics of the call's rows are merged with those of earlier chunks of the same sequences and
  the set is decided on all of them.
* **Decode** (one query row): the stored set is applied; keys added since are not sinks. With
  ``ContentSinks.reevaluate_every = N`` the rows of decode steps are added to the column
  statistics and the set is decided again every N steps, on every row seen so far.

The set lives **with the cache** (:class:`ContentSinkStore`, an attribute of the transformers
``Cache`` object), per layer, as a (B, Hq, positions) mask over absolute positions. The store follows
the cache: ``reorder_cache`` (beam search), ``crop``, ``batch_select_indices`` and
``batch_repeat_interleave`` are applied to it too, and a sliding-window layer's evicted columns
are dropped from the left. The attention function does not receive the cache, so a forward
pre-hook on each corrected attention module hands it over (:func:`cache_hooks`).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from sinkfix.errors import EVICTED_CACHE_REFUSAL, EVICTED_CACHE_REMEDY, CacheError, PolicyError
from sinkfix.integrations.sink_location import locate_sinks, real_query_rows
from sinkfix.ops.attention import AttentionResult
from sinkfix.ops.content_attention import content_sink_attention, merge_column_stats
from sinkfix.ops.content_reference import ColumnStats, sink_candidates

__all__ = ["ContentSinkStore", "LayerSinkSet", "cache_hooks", "content_attention", "follow_identity_call",
           "sink_sets", "store_of", "use_sink_sets"]

_STORE_ATTRIBUTE = "_sinkfix_content_sinks"


@dataclass
class LayerSinkSet:
    """One layer's sink set over the *absolute* key positions of the sequences (0 = the first
    token the cache received), so that a sliding-window layer, whose cache drops old keys, maps
    its key columns onto it by an offset."""

    hidden: torch.Tensor  # (B, Hq, W) bool, W <= length (keys beyond W are not sinks)
    stats: ColumnStats | None  # column statistics of the rows seen so far (None in a frozen store)
    length: int = 0  # keys this layer's cache has received
    steps_since_decision: int = 0
    stats_end: int = 0  # the statistics hold the attention rows of the tokens before this position
    # a crop removed tokens whose rows are in the statistics: they cannot be taken out of the sums,
    # so deciding again on them would count tokens the cache no longer has
    stale: bool = False

    def map(self, fn_batch=None, fn_cols=None) -> None:
        def apply(t):
            if fn_batch is not None:
                t = fn_batch(t, 0)
            if fn_cols is not None:
                t = fn_cols(t, -1)
            return t

        self.hidden = apply(self.hidden)
        if self.stats is not None:
            self.stats = ColumnStats(apply(self.stats.mass), apply(self.stats.rows))


class ContentSinkStore:
    """The sink sets of one cache, per attention layer. ``frozen``: apply the stored sets and never
    decide (a forward that must reproduce a given set, see :func:`use_sink_sets`)."""

    def __init__(self, frozen: bool = False) -> None:
        self.layers: dict[int, LayerSinkSet] = {}
        self.frozen = frozen

    # -- following the cache ------------------------------------------------------------------
    def reorder(self, beam_idx: torch.Tensor) -> None:
        for entry in self.layers.values():
            entry.map(fn_batch=lambda t, axis: t.index_select(axis, beam_idx.to(t.device)))

    def select(self, indices: torch.Tensor) -> None:
        self.reorder(indices)

    def repeat_interleave(self, repeats: int) -> None:
        for entry in self.layers.values():
            entry.map(fn_batch=lambda t, axis: t.repeat_interleave(repeats, dim=axis))

    def crop(self, max_length: int) -> None:
        """transformers' ``Cache.crop``: a negative argument removes that many tokens, a positive
        one (older versions) keeps that many, 0 removes nothing (transformers 5 calls ``crop(0)``
        when assisted decoding accepts every candidate: read as "keep 0", it emptied the sets of a
        cache that still held its keys, and the next step failed)."""
        if max_length == 0:
            return
        for entry in self.layers.values():
            entry.length = max(entry.length + max_length, 0) if max_length < 0 else min(entry.length, max_length)
            entry.map(fn_cols=lambda t, axis, keep=entry.length: t[..., :keep])
            if entry.stats is not None and entry.length < entry.stats_end:
                entry.stale = True


    def reset(self) -> None:
        """transformers' ``Cache.reset`` (a new batch): the sets decided on the old keys go (they were
        merged into the next prompt's decision: logits 5.5 away from a fresh cache); sets given with
        :func:`use_sink_sets` stay, to apply from the first key column again."""
        if not self.frozen:
            self.layers.clear()
            return
        for entry in self.layers.values():
            entry.length, entry.stats, entry.steps_since_decision, entry.stale = 0, None, 0, False


_FOLLOWED = (("reorder_cache", "reorder"), ("crop", "crop"), ("batch_select_indices", "select"),
             ("batch_repeat_interleave", "repeat_interleave"), ("reset", "reset"))


def _attach_store(cache: Any, store: ContentSinkStore) -> ContentSinkStore:
    """Put ``store`` on ``cache`` and make the cache's batch/length operations apply to it too
    (instance attributes shadow the class's methods; the cache's own work runs first)."""
    if getattr(cache, "is_compileable", False):
        raise PolicyError(f"content-dependent sinks need a cache that grows with the sequence (DynamicCache); "
                          f"{type(cache).__name__} has fixed key columns, which the sink set cannot follow")
    if getattr(cache, _STORE_ATTRIBUTE, None) is None:
        for cache_method, store_method in _FOLLOWED:
            own = vars(cache).get(cache_method)  # a method set on the instance itself (rare): followed as it is
            if own is None and not callable(getattr(type(cache), cache_method, None)):
                continue
            # a partial of a module-level function, not a closure over the bound method: torch.compile
            # can rebuild it for a cache made inside the compiled forward (a closure failed fullgraph)
            setattr(cache, cache_method, functools.partial(_followed, cache_method, store_method, cache, own))
    setattr(cache, _STORE_ATTRIBUTE, store)
    return store


def _followed(cache_method: str, store_method: str, cache: Any, own: Callable | None, *args, **kwargs):
    """The cache's ``cache_method`` (its class's, or ``own``, the one its instance had), then the
    store's ``store_method`` with the same arguments."""
    result = (getattr(type(cache), cache_method)(cache, *args, **kwargs) if own is None
              else own(*args, **kwargs))
    getattr(getattr(cache, _STORE_ATTRIBUTE), store_method)(*args, **kwargs)
    return result


def store_of(cache: Any, create: bool = True) -> ContentSinkStore | None:
    store = getattr(cache, _STORE_ATTRIBUTE, None)
    if store is None and create:
        store = _attach_store(cache, ContentSinkStore())
    return store


def sink_sets(cache: Any) -> dict[int, torch.Tensor]:
    """The hidden-sink sets a cache carries: layer -> (B, Hq, positions) bool over the absolute
    positions the layer has received (0 = the first token the cache received), not over the key
    columns it holds: a sliding-window layer holding 4 columns of 25 tokens returns 25 positions.
    The form :func:`use_sink_sets` takes."""
    store = store_of(cache, create=False)
    if store is None:
        return {}
    return {layer: _columns(entry.hidden, 0, entry.length) for layer, entry in store.layers.items()}


def use_sink_sets(cache: Any, sets: dict[int, torch.Tensor]) -> Any:
    """Make ``cache`` (empty, or holding the keys the sets were decided on) carry ``sets`` as fixed
    sink sets: forwards with it apply them (keys beyond their width are not sinks) and never decide.
    ``sets`` are over absolute positions (:func:`sink_sets`); each starts at the number of tokens its
    layer of ``cache`` has already received (its next key is that position). A layer without a set
    runs with no hidden sinks, on every call. Returns the cache."""
    store = ContentSinkStore(frozen=True)
    # a cache made with the model's config knows its layers: a set for a layer past them was ignored
    layers = getattr(cache, "layers", None)
    count = len(layers) if isinstance(layers, list) and layers else None
    for layer, hidden in sets.items():
        if not isinstance(hidden, torch.Tensor) or hidden.dtype != torch.bool or hidden.ndim != 3:
            raise PolicyError(f"sink set of layer {layer} must be a (B, Hq, K) bool tensor, got "
                              f"{tuple(getattr(hidden, 'shape', ()))} {getattr(hidden, 'dtype', type(hidden).__name__)}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 or (count is not None and layer >= count):
            raise PolicyError(f"sink set for layer {layer!r}: the cache has layers 0..{'?' if count is None else count - 1}")
        # the keys the cache holds are the positions before the next call's: a store starting at 0 on a
        # cache holding a prompt read the next call as "filled without this content-sink policy"
        store.layers[layer] = LayerSinkSet(hidden.clone(), None, length=_received(cache, layer))
    _attach_store(cache, store)
    return cache


def _received(cache: Any, layer: int) -> int:
    """How many tokens layer ``layer`` of ``cache`` has received: its absolute length, which a
    sliding-window layer counts beyond the columns it holds (transformers' ``get_seq_length`` of a
    cache layer; 0 for a layer the cache has not made yet)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or layer >= len(layers):
        return 0
    length = getattr(layers[layer], "get_seq_length", None)
    return int(length()) if callable(length) else 0


# -- hooks: handing the cache to the attention function --------------------------------------------
def cache_hooks(module: nn.Module, state) -> list:
    """Forward hooks that give ``state.cache`` the cache of the module's current call (or None),
    and drop the reference afterwards so that the state never keeps a cache alive. Partials of
    module-level functions, not closures: pickling a patched model reaches the state's own refusal."""
    return [module.register_forward_pre_hook(functools.partial(_hand_over_cache, state), with_kwargs=True),
            module.register_forward_hook(functools.partial(_drop_cache, state), with_kwargs=True)]


def _hand_over_cache(state, mod, args, kwargs):
    state.cache = kwargs.get("cache", kwargs.get("past_key_values"))


def _drop_cache(state, mod, args, kwargs, output):
    state.cache = None


# -- the attention call ----------------------------------------------------------------------------
def _columns(hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Absolute positions [start, stop) of a set; positions beyond its width are not sinks."""
    part = hidden[..., start:stop]
    extra = (stop - start) - part.shape[-1]
    return part if extra == 0 else torch.nn.functional.pad(part, (0, extra), value=False)


def _absolute(stats: ColumnStats, start: int) -> ColumnStats:
    """Call-column statistics placed at absolute positions (nothing before ``start``)."""
    pad = (start, 0)
    return ColumnStats(torch.nn.functional.pad(stats.mass, pad), torch.nn.functional.pad(stats.rows, pad))


def content_attention(state, query, key, value, attention_mask, *, causal: bool, scaling, softcap, sliding_window,
                      beta, extra_logits, virtual_sink_logit, position_ids, kernel_mask: dict | None = None
                      ) -> AttentionResult:
    """One attention call of a layer whose policy has content-dependent sinks, on the layer's
    backend. ``attention_mask`` is the dense bool mask (or None with ``causal``); ``kernel_mask``,
    when given, the same visibility as the Triton kernels read it (key padding, causal offset,
    window: ``PaddedCausalMask``), used on the Triton backend instead of the dense mask."""
    rule = state.policy.content
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    location = locate_sinks(attention_mask, position_ids, batch=batch, q_len=q_len, k_len=k_len, causal=causal,
                            sliding=sliding_window is not None, window=sliding_window,
                            sink_positions=state.policy.sink_positions, device=query.device)
    state.sink_rows, state.first_real_row, state.end_real_row = location.query_rows(q_len)
    hidden_beta, heads = rule.tensors(query.device)
    if attention_mask is not None and q_len > 1:
        on_kernels = state.backend == "triton" and kernel_mask is not None
        attention_mask, right_padded = _without_padding_rows(attention_mask, state.first_real_row,
                                                             state.end_real_row, ask=on_kernels)
        if right_padded:  # the kernels' key padding cannot say that a row sees nothing: the dense mask
            kernel_mask = None
    mask = dict(attn_mask=attention_mask, causal=causal)
    if state.backend == "triton" and kernel_mask is not None:
        mask = kernel_mask
    common = dict(**mask, scale=scaling, softcap=softcap, sink_cols=location.sink_cols, beta=beta,
                  extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit, hidden_beta=hidden_beta,
                  backend=state.backend)
    decide = dict(threshold=rule.threshold, min_rows=rule.min_rows, heads=heads)
    cache = getattr(state, "cache", None)
    layer = state.policy.layer
    past = k_len - q_len

    if cache is None:
        if past > 0:
            raise PolicyError(f"layer {layer}: an attention call over {past} earlier keys reached sinkfix without "
                              "its cache, so the sink set decided on the prompt cannot be carried into it; "
                              "content-dependent sinks need the model's attention modules to receive the cache")
        result = content_sink_attention(query, key, value, **common, **decide)
        return AttentionResult(result.out, result.lse, None, None)

    cache_layers = getattr(cache, "layers", None)
    cache_layer = cache_layers[layer] if isinstance(cache_layers, list) and layer < len(cache_layers) else None
    if not getattr(cache_layer, "columns_in_order", True):
        # the sets and statistics are kept per token from the first; a SinkCache that has evicted
        # hands over [kept sinks][window][new], and reading that as one run of tokens gave the kept
        # sinks the flags of evicted tokens (SmolLM2: logits 0.15-0.71 off at every decode step)
        # the cache itself refuses this at the call's first layer, before anything is stored; it reaches
        # here where it could not tell (torch.compile traced its update, or a pickled copy has not yet
        # seen this layer's module), after this layer and those before it stored the call's tokens
        stored = f"layer {layer}" if layer == 0 else f"layers 0 to {layer}"
        raise CacheError(f"layer {layer}: {EVICTED_CACHE_REFUSAL}; {EVICTED_CACHE_REMEDY}; {stored} stored this "
                         "call's tokens: reset() the cache before using it again")
    store = store_of(cache)
    entry = store.layers.get(layer)
    if entry is not None and entry.stale:
        # the sets were decided with the removed tokens' rows, and deciding again would count them
        # too: a single-token step on such a set was up to 0.10 off a fresh prefill of the kept tokens
        raise CacheError(f"layer {layer}: the cache was cropped below tokens whose attention rows are in the "
                         "content-sink statistics (they cannot be taken out of the sums, and the sink sets were "
                         "decided on them); assisted or speculative decoding that rejects tokens is not supported "
                         "with content-dependent sinks: reset() the cache and feed the kept tokens again")
    if store.frozen and entry is None:
        # given sets, none for this layer: no hidden sinks in any call (as in the prefill), so there is
        # no position to keep in step (a second call on such a layer was refused as a cache filled
        # without the policy)
        result = content_sink_attention(query, key, value, hidden=torch.zeros(batch, q_heads, k_len, dtype=torch.bool,
                                                                              device=query.device), **common)
        return AttentionResult(result.out, result.lse, None, None)
    length = 0 if entry is None else entry.length
    end = length + q_len  # absolute position after this call's keys
    first = end - k_len  # absolute position of the call's key column 0 (> 0 once a window dropped keys)
    if first < 0:
        # the set follows every call that reaches this function; the cache stores a call's keys before
        # it, so an error raised here after that (or in the attention module) also leaves it behind
        # (a crop does not repair it: the set follows the cache's crop too, and stays behind it)
        raise PolicyError(
            f"layer {layer}: the cache holds {past} keys but a sink set was decided for {length}: it was filled "
            "without this content-sink policy: before patching or by another model, while a patch without it was "
            "in force, or by a call that failed in this layer's attention after the cache had stored its keys; "
            "reset() the cache and feed the sequence again")

    if store.frozen:  # given sets: applied, never decided
        hidden = entry.hidden
        if tuple(hidden.shape[:2]) != (batch, q_heads):  # a raw broadcast error deep in the attention before
            raise PolicyError(f"layer {layer}: the given sink set is for {hidden.shape[0]} sequences x "
                              f"{hidden.shape[1]} query heads, and this call has {batch} x {q_heads}")
        result = content_sink_attention(query, key, value, hidden=_columns(hidden, first, end).to(query.device),
                                              **common)
        entry.length = end
        return AttentionResult(result.out, result.lse, None, None)

    if entry is None or q_len > 1:
        # prefill (or a prefill chunk): decide on every row seen so far
        prior = None if entry is None else entry.stats
        result = content_sink_attention(query, key, value, **common, **decide, prior=_call_prior(prior, first, end),
                                        kept_before=_kept_before(prior, first, rule))
        stats = merge_column_stats(prior, _absolute(result.stats, first))
        hidden = _absolute_hidden(entry, result.hidden, first, end)
        store.layers[layer] = LayerSinkSet(hidden, stats, length=end, stats_end=end)
        return AttentionResult(result.out, result.lse, None, None)

    hidden = _columns(entry.hidden, first, end)
    entry.length = end
    every = rule.reevaluate_every
    if every is None:
        result = content_sink_attention(query, key, value, hidden=hidden, **common)
        return AttentionResult(result.out, result.lse, None, None)

    entry.steps_since_decision += 1
    if entry.steps_since_decision >= every:
        # decide again on the prompt's rows and every generated row, this one included
        result = content_sink_attention(query, key, value, **common, **decide,
                                        prior=_call_prior(entry.stats, first, end),
                                        kept_before=_kept_before(entry.stats, first, rule))
        entry.hidden = _absolute_hidden(entry, result.hidden, first, end)
        entry.steps_since_decision = 0
    else:
        result = content_sink_attention(query, key, value, hidden=hidden, need_stats=True, **common)
    entry.stats = merge_column_stats(entry.stats, _absolute(result.stats, first))
    entry.stats_end = end
    return AttentionResult(result.out, result.lse, None, None)


def follow_identity_call(state, *, batch: int, q_heads: int, q_len: int, k_len: int, device: torch.device) -> None:
    """Keep a content-sink layer's set in step with its cache through a call that
    :meth:`~sinkfix.patch.PatchHandle.run_as_identity` ran as plain softmax: the cache stored the
    call's keys, and a set left at the old length refused every later call once the layer was
    restored. The call's keys are ordinary keys (not sinks, as a decode step's are) and nothing is
    decided; its rows are not in the column statistics (the rule did not run on them), so with
    ``reevaluate_every`` the next decisions count every row but these, and these steps do not count
    towards N."""
    cache = getattr(state, "cache", None)
    if cache is None:
        return
    layer = state.policy.layer
    store = store_of(cache)
    entry = store.layers.get(layer)
    if entry is not None:
        entry.length += q_len
    elif not store.frozen and k_len == q_len:  # the cache's first call: a set with no sink yet
        empty = torch.zeros(batch, q_heads, 0, dtype=torch.bool, device=device)
        store.layers[layer] = LayerSinkSet(empty, None, length=q_len)
    # else: a layer without a given set has nothing to keep in step, and a cache that held keys
    # before any content-sink call was filled without the policy (the restored layer says so)


def _without_padding_rows(attention_mask: torch.Tensor, first_real_row: torch.Tensor,
                          end_real_row: torch.Tensor, *, ask: bool) -> tuple[torch.Tensor, bool]:
    """The dense mask with the padding query rows seeing nothing. transformers masks padding on the
    key axis only, so a right-padding row sees every real key, and its attention counted in the
    column statistics that decide the hidden sinks: the same prompt right-padded by 6 tokens got
    other hidden sinks than alone (logits 0.19 apart on a tiny Llama). A padding row's own output is
    never read by a real token. With ``ask``, whether there were right-padding rows at all (one host
    read; without any, the mask is returned as it is and the kernels keep their key padding: left-
    padding rows already see nothing); without, True."""
    q_len = attention_mask.shape[2]
    if ask and not bool((end_real_row < q_len).any()):
        return attention_mask, False
    real = real_query_rows(first_real_row, end_real_row, q_len)  # (B, Q)
    return attention_mask & real[:, None, :, None], True


def _kept_before(stats: ColumnStats | None, first: int, rule) -> torch.Tensor | None:
    """(B, Hq) bool: the sequence has a candidate among the keys before the call's first column
    (those a sliding window dropped), so the rule's kept first candidate is there, not among the
    call's keys. Deciding on the call's columns alone kept the window's first candidate instead: fed
    in two chunks, a 20-token prompt on a window of 5 lost one hidden sink per head (logits 0.26
    apart from one call), and every re-decision lost one more. None when nothing was dropped."""
    if stats is None or first <= 0:
        return None
    before = ColumnStats(stats.mass[..., :first], stats.rows[..., :first])
    return sink_candidates(before, threshold=rule.threshold, min_rows=rule.min_rows).any(-1)


def _call_prior(stats: ColumnStats | None, first: int, end: int) -> ColumnStats | None:
    """Absolute statistics cut to the call's key columns [first, end)."""
    if stats is None:
        return None
    mass, rows = stats.mass[..., first:end], stats.rows[..., first:end]
    return ColumnStats(mass, rows)


def _absolute_hidden(entry: LayerSinkSet | None, call_hidden: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """The stored set with the call's columns [first, end) replaced by the call's decision (the
    keys a sliding window dropped keep the decision made while they were visible)."""
    if entry is None or first == 0:
        return call_hidden
    kept = _columns(entry.hidden, 0, first).to(call_hidden.device)
    return torch.cat([kept, call_hidden], dim=-1)
