"""The attention function transformers calls for a model patched by sinkfix.

transformers 5 looks attention functions up by name (``"sinkfix"``), globally, on every forward;
the per-model policy therefore lives on each attention module (``module._sinkfix``, a
:class:`LayerState`). A module without that state runs plain softmax, so a model loaded with
``attn_implementation="sinkfix"`` but never patched is the stock model.

Contract (transformers' attention interface): query (B, Hq, Q, D), key/value (B, Hkv, K, D) after
RoPE, not repeated for GQA; the mask a bool (B, 1, Q, K) (True = attend) or None (causal,
upper-left aligned, when Q > 1); return ((B, Q, Hq, D), probabilities or None).
"""

from __future__ import annotations

import copy
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from sinkfix.errors import UsageError
from sinkfix.integrations.masks import PaddedCausalMask
from sinkfix.integrations.content_sinks import content_attention, follow_identity_call
from sinkfix.integrations.sink_location import locate_sinks, packed_sequences, sinks_in_columns
from sinkfix.ops.attention import AttentionResult, sink_attention
from sinkfix.policy import LayerPolicy

__all__ = ["AttentionCall", "CONTENT_REFUSAL", "LayerState", "attention_forward", "defers_sink_stats",
           "discover_attention_modules", "refuse_content_call"]

# kwargs with semantics this implementation does not reproduce: computing dense attention while
# ignoring them would silently give wrong results.
UNSUPPORTED_KWARGS = ("indices", "position_bias", "sinks", "block_indices", "cu_seq_lens_q", "cu_seq_lens_k")


@dataclass
class AttentionCall:
    """What an observer sees for one attention call (``PatchHandle.observing``; used by
    ``sinkfix.inspect``). Every policy value the call applied is here, so observers never read
    the module's private state."""

    layer: int
    module: nn.Module
    query: torch.Tensor  # (B, Hq, Q, D)
    key: torch.Tensor  # (B, Hkv, K, D)
    value: torch.Tensor  # (B, Hkv, K, D)
    attn_mask: torch.Tensor | None  # (B, 1, Q, K) bool or None
    causal: bool
    scale: float
    softcap: float | None
    sink_cols: torch.Tensor | None  # (B, NS) key columns of the sink set, -1 = absent; None = column 0 (telemetry)
    first_real_col: torch.Tensor | None  # (B,) key column of the first real (non-padding) token; None = 0
    extra_logits: torch.Tensor | None  # (Hq, E) zero-value logits counted in every row (s_aux, ...)
    virtual_sink_logit: torch.Tensor | None  # (Hq,) the policy's, rows that see a non-sink key only
    beta: torch.Tensor | None  # (Hq,) fp32 sink scaling applied, None = identity
    result: AttentionResult
    # telemetry only: ``result.sink_stats`` was not computed, and the listener computes it from
    # query, key column 0 and ``result.lse`` together with the step's other layers
    # (:func:`defers_sink_stats`)
    sink_stats_deferred: bool = False


def defers_sink_stats(*, identity: bool, first_column: bool, q_len: int, k_len: int, backend: str,
                      on_cpu: bool, other_needs: bool) -> bool:
    """Whether a monitored call leaves its sink statistics to the listener: an eager decode step
    (one query row, no mask) of plain softmax on the PyTorch path on the CPU, whose sink is key
    column 0. Its statistics are one product per row, ``exp(scale <q, k_0> - lse)``, which a monitor
    computes for all of a step's layers at once (``sinkfix.ops.attention.first_column_row_mass``):
    per layer the same few ops took 55 us of a SmolLM2 decode step on one CPU thread (1.6 ms of a
    50 ms step over 30 layers), mostly Python set-up. Kept per call: prompts (one product over many
    rows already), corrected layers (their split path yields the sums as a side output), the
    Triton kernels (they emit them), and a traced model (inductor fuses the per-call ops).
    ``on_cpu``: the call's tensors are on the CPU (``query.is_cpu``; ``device.type`` builds a string
    per call, and that cost 3.7 us per call inside a SmolLM2-shaped decode step, against 0.05 us)."""
    return (identity and first_column and q_len == 1 and k_len >= 2 and not other_needs and backend == "torch"
            and on_cpu and not torch.compiler.is_compiling())


PICKLE_REFUSAL = ("a patched model cannot be pickled: call remove() on its patch first (or pickle a copy.deepcopy "
                  "of it, which is unpatched) and patch it again after loading; torch.save(model.state_dict()) "
                  "works on a patched model")


def pickle_refusal() -> UsageError:
    """The refusal to pickle a patched model; under ``torch.save`` it also says that the file named
    is already lost: torch opens (truncates) it before pickling anything, so a checkpoint at that
    path was emptied by a refused save, which no error raised from pickling can prevent."""
    frame, under_torch_save = sys._getframe(1), False
    while frame is not None and not under_torch_save:
        under_torch_save = frame.f_code.co_name == "save" and frame.f_code.co_filename.endswith("serialization.py")
        frame = frame.f_back
    lost = (" (torch.save opened its file before pickling: whatever that file held is gone, as with any "
            "object torch cannot pickle)") if under_torch_save else ""
    return UsageError(PICKLE_REFUSAL + lost)


@dataclass
class LayerState:
    """Per attention module: its resolved policy, backend, observers and telemetry listeners, plus
    what the last call found out about the sink set for the residual-clip hook of the same decoder
    layer.

    Observers (``sinkfix inspect``) get per-row sink masses and take the Python path; telemetry
    listeners (``sinkfix.monitor``) get only ``result.sink_stats``, the (B, Hq, 2) sums the fast
    path emits as a side output, so a monitored model keeps its inference path."""

    layer: int
    policy: LayerPolicy
    backend: str
    observers: list[Callable[[AttentionCall], None]] = field(default_factory=list)
    telemetry: list[Callable[[AttentionCall], None]] = field(default_factory=list)
    sink_rows: torch.Tensor | None = None  # (B, NS) query rows of the last call that are sinks, -1 = none
    first_real_row: torch.Tensor | None = None  # (B,)
    end_real_row: torch.Tensor | None = None  # (B,) one past the last real query row (right padding after it)
    cache: Any = None  # the KV cache of the current call, for content-dependent sinks (set by a forward hook)
    # the layer's content-sink policy is set aside (PatchHandle.run_as_identity): its calls keep the
    # cache's sink set in step (content_sinks.follow_identity_call)
    content_set_aside: bool = False

    def __reduce_ex__(self, protocol):
        """Pickling a patched model (``torch.save(model)``) is refused with a message that says what
        to do, rather than torch's or Python's error about one of the patch's parts."""
        raise pickle_refusal()

    def __deepcopy__(self, memo: dict) -> "LayerState":
        # copied with a patched model, whose copy drops it (PatchHandle.__deepcopy__): the listeners
        # (a monitor, with its log file and endpoint) and the last call's tensors are not copied
        return LayerState(self.layer, copy.deepcopy(self.policy, memo), self.backend)


# What discover_attention_modules records, set as an attribute on every module of the model being
# discovered for the length of its one dummy forward; calls record only from the discovering thread
# (another thread serving this model meanwhile added its calls, which numbered the layers wrongly).
# Not a module global: torch.compile guards on what traced code reads, and a global that every
# patch() of any model switched between None and a list made a compiled model served in another
# thread re-trace at each patch() and then fail inside dynamo ("Guard failed on the same frame it was
# created"); an attribute of this model's own modules changes nothing another model's graph reads.
_DISCOVERY_ATTRIBUTE = "_sinkfix_discovery"


class _Discovery:
    def __init__(self) -> None:
        self.calls: list = []
        self.thread = threading.get_ident()


# One discovery at a time: two threads patching their own models at once overwrote each other's
# record (8 of 60 patch() calls failed with a bare TypeError). Held outside any traced code.
_discovery_lock = threading.RLock()


def _attentions_requested(kwargs: dict) -> bool:
    """Whether the caller asked for the attention probabilities: the call's ``output_attentions``,
    or transformers' output collector asking for ``attentions``. Some models take the argument out
    of what they pass down (GPT-2 in transformers 5) and collect the probabilities from the
    attention modules' outputs: there the argument never arrives, and the patched model returned
    no attentions at all where the stock eager one returns them. Not read while dynamo traces (the
    collector is a context variable; compiled forwards pass the argument itself)."""
    if kwargs.get("output_attentions"):
        return True
    if torch.compiler.is_compiling():
        return False
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    collected = collector.get() if collector is not None else None
    return isinstance(collected, dict) and "attentions" in collected


CONTENT_REFUSAL = ("observers, telemetry and output_attentions are not implemented for content-dependent sinks; "
                   "measure with a positional policy or the stock model")


def refuse_content_call(states: tuple[LayerState, ...], module: nn.Module, args, kwargs) -> None:
    """A forward pre-hook on a patched model's first attention module (``states``: every layer's):
    refuse a call that a content-sink layer would refuse (observers, telemetry or the attention
    probabilities asked for), before any layer stores the call's keys in the cache. Refused by the
    content layer itself, the call left the layers before it (and its own: transformers stores the
    keys before it calls the attention function) one token ahead of the sink set, and every later
    call on that cache failed as "filled without this content-sink policy" (the next decode step
    after a refused ``output_attentions=True`` one). The policies are read per call: a layer that
    ``run_as_identity`` switched off refuses nothing."""
    content = [state for state in states if state.policy.content is not None]
    if content and (_attentions_requested(kwargs)
                    or any(len(state.observers) > 0 or len(state.telemetry) > 0 for state in content)):
        raise NotImplementedError(f"{CONTENT_REFUSAL}; nothing of this call was stored in the cache, which can go on")


class AttentionDropoutError(NotImplementedError):
    """Attention dropout was requested (a model in training mode): sinkfix attention is inference-only."""


class BidirectionalAttentionError(NotImplementedError):
    """Every attention call of the discovery forward let a row see later keys: an encoder (BERT-like),
    whose first token is no causal sink; sinkfix corrects decoder-only language models."""


def discover_attention_modules(model: nn.Module, input_ids: torch.Tensor) -> list[tuple[nn.Module, int]]:
    """Run one forward and return (attention module, query heads) in call order, first call of
    each module only. Modules that do not route through the "sinkfix" function are not seen."""
    modules = list(model.modules())
    with _discovery_lock:
        discovery = _Discovery()
        try:
            for module in modules:
                object.__setattr__(module, _DISCOVERY_ATTRIBUTE, discovery)
            with torch.no_grad():
                model(input_ids=input_ids, use_cache=False)
        finally:
            for module in modules:
                module.__dict__.pop(_DISCOVERY_ATTRIBUTE, None)
    calls = discovery.calls
    own = {id(module) for module in modules}
    seen: set[int] = set()
    order, bidirectional = [], []
    for module, heads, sees_later in calls:
        if id(module) in own and id(module) not in seen:
            seen.add(id(module))
            order.append((module, heads))
            bidirectional.append(sees_later)
    if order and all(bidirectional):
        raise BidirectionalAttentionError(
            f"every attention layer of {type(model).__name__} lets a token see later tokens (bidirectional "
            "attention, an encoder)")
    return order


def _sees_later_keys(attention_mask: torch.Tensor | None, causal_flag, q_len: int, k_len: int) -> bool | None:
    """Whether some query row of a discovery call may see a key after its own position (the last
    query row is the last key): bidirectional attention. Reads the mask on the host, which only the
    discovery forward does; None (unknown) while dynamo traces."""
    if q_len < 2:
        return False
    if attention_mask is None:
        return not causal_flag
    if isinstance(attention_mask, PaddedCausalMask):
        return False
    if torch.compiler.is_compiling():
        return None
    return bool(attention_mask[..., -q_len:, :].triu(k_len - q_len + 1).any())


def _check_arguments(module: nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs) -> None:
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"sinkfix attention does not implement the {name!r} argument that "
                f"{type(module).__name__} passed; refusing to compute dense attention and ignore it"
            )
    if dropout and dropout > 0:
        unpatched = "" if getattr(module, "_sinkfix", None) is not None else (
            "; this model carries no sinkfix patch, but its config selects sinkfix attention: it was loaded with "
            "attn_implementation='sinkfix', it shares its config object with a patched model (models built "
            "from one config object share its attention setting: build each from its own copy, copy.deepcopy(config)), "
            "or it was copied from such a model while the patch was in force (copy it with no patch in force)")
        raise AttentionDropoutError(
            f"sinkfix attention is inference-only: attention dropout {dropout} requested (call model.eval()){unpatched}"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads {query.shape[1]} are not a multiple of key/value heads {key.shape[1]}")


def _one_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v in the widest of their dtypes. They differ under ``torch.autocast``: the projections
    run in bfloat16, then rotary embeddings multiply q and k by float32 cos/sin, promoting them back,
    while v stays bfloat16. The kernels take one dtype, and attention is the part of a calibration
    step that the sink parameters act on, so it runs at the wider precision."""
    if query.dtype == key.dtype == value.dtype:  # always, outside autocast: nothing to do on the hot path
        return query, key, value
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.shape[1] != 1:
        raise NotImplementedError(
            f"per-head attention masks {tuple(attention_mask.shape)} are not supported (a mask with one plane "
            "per head carries a per-head position bias such as ALiBi, which the kernels do not add)")
    if attention_mask.dtype != torch.bool:
        # A float additive mask (0 = attend, very negative = masked), e.g. a 4D mask passed by the
        # caller. Any other finite value is a bias on the logits that the kernels would drop, so it
        # is refused rather than ignored; this rare path pays one pass over the mask and one host
        # read for it, which a compiled graph cannot hold without breaking: not checked there.
        attend = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        if not torch.compiler.is_compiling() and bool(torch.any(attention_mask.masked_fill(~attend, 0) != 0)):
            raise NotImplementedError(
                "float attention masks that add a bias to the logits (values other than 0 and the dtype's "
                "minimum) are not supported: sinkfix attention only keeps or removes keys")
        attention_mask = attend
    return attention_mask


def _columns_out_of_order(state: LayerState, k_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tokens (B, K), first real token (B,)) of this call's cache layer when its key columns are not
    one run of consecutive tokens (a SinkCache that has evicted), for a sink set beyond position 0;
    None otherwise. The cache reaches the state through the hooks patch() installs for such policies
    (:func:`~sinkfix.integrations.content_sinks.cache_hooks`)."""
    layers = getattr(getattr(state, "cache", None), "layers", None)
    index = state.policy.layer
    if not isinstance(layers, list) or index >= len(layers) or getattr(layers[index], "columns_in_order", True):
        return None
    layer = layers[index]
    tokens = getattr(layer, "last_columns", None)
    if not isinstance(tokens, torch.Tensor) or tokens.shape[-1] != k_len:
        return None
    return tokens, layer.first_real


def _policy_tensors(state: LayerState | None, s_aux: torch.Tensor | None, q_heads: int, device,
                    query_dtype: torch.dtype = torch.float32):
    """(beta (Hq,) or None, extra_logits (Hq, E) counted in every row or None, virtual_sink_logit
    (Hq,) counted in rows that see a non-sink key or None)."""
    # float64 attention keeps float64 parameters (float32 ones moved a float64 model's sink row by 1e-8)
    dtype = torch.float64 if query_dtype == torch.float64 else torch.float32
    extra_logits = None if s_aux is None else s_aux.reshape(q_heads, 1).to(device=device, dtype=dtype)
    if state is None:
        return None, extra_logits, None
    beta, virtual = state.policy.tensors(device, dtype)
    if virtual is not None and state.policy.virtual_logit_on_sink_rows:
        # counted in every row, like the model's own s_aux
        column = virtual.reshape(q_heads, 1)
        extra_logits = column if extra_logits is None else torch.cat([extra_logits, column], dim=1)
        virtual = None
    return beta, extra_logits, virtual


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention interface: q (B, Hq, Q, D), k/v (B, Hkv, K, D) -> ((B, Q, Hq, D), probs)."""
    _check_arguments(module, query, key, dropout, kwargs)
    query, key, value = _one_dtype(query, key, value)
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    # A padded causal mask from sinkfix's mask function (integrations/masks.py) reaches the
    # kernels as key padding + causal offset, never as a (Q, K) tensor; ``attention_mask`` then
    # stays the structured mask for sink location and the observers.
    padded = attention_mask if isinstance(attention_mask, PaddedCausalMask) else None
    if padded is not None and (padded.q_len, padded.k_len) != (q_len, k_len):
        raise ValueError(f"mask built for Q={padded.q_len}, K={padded.k_len}, attention called with Q={q_len}, K={k_len}")
    attention_mask = padded if padded is not None else _bool_mask(attention_mask)
    causal_flag = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal_flag) and attention_mask is None and q_len > 1
    mask_kwargs = dict(attn_mask=attention_mask, causal=causal)
    if padded is not None:
        mask_kwargs = dict(attn_mask=None, key_padding=padded.key_padding, key_ranges=padded.key_ranges, causal=True,
                           causal_offset=padded.causal_offset, sliding_window=padded.window)
    # dynamo cannot trace get_ident (patching a compiled wrapper traces this call): no thread check there
    discovery = getattr(module, _DISCOVERY_ATTRIBUTE, None)
    if discovery is not None and (torch.compiler.is_compiling() or threading.get_ident() == discovery.thread):
        discovery.calls.append((module, q_heads, _sees_later_keys(attention_mask, causal_flag, q_len, k_len)))
    state: LayerState | None = getattr(module, "_sinkfix", None)
    beta, extra_logits, virtual = _policy_tensors(state, s_aux, q_heads, query.device, query.dtype)
    # len() rather than bool(): torch 2.11's dynamo cannot trace bool() of a list of listeners
    observing = state is not None and len(state.observers) > 0
    monitored = state is not None and len(state.telemetry) > 0
    if (state is not None and (beta is not None or virtual is not None or observing or monitored
                               or state.policy.clip is not None or state.policy.content is not None)
            and packed_sequences(attention_mask, kwargs.get("position_ids"), q_len, k_len)):
        raise NotImplementedError(
            "packed sequences (position_ids that restart inside a batch row, with no attention mask and no "
            "cache) are not supported by a sink policy, residual clipping or measurement: each packed "
            "sequence needs its own sink, and sinkfix places one sink set per batch row. Pass one sequence "
            "per row with an attention mask (left padding), or use the identity policy")
    wants_probs = _attentions_requested(kwargs)
    if state is not None and state.policy.content is not None:
        if observing or monitored or wants_probs:  # normally refused before the forward's first layer
            raise NotImplementedError(CONTENT_REFUSAL)
        dense_mask = attention_mask if padded is None else padded.dense
        result = content_attention(state, query, key, value, dense_mask, causal=causal, scaling=scaling,
                                   softcap=softcap, sliding_window=sliding_window, beta=beta, extra_logits=extra_logits,
                                   virtual_sink_logit=virtual, position_ids=kwargs.get("position_ids"),
                                   kernel_mask=mask_kwargs if padded is not None else None)
        return result.out.transpose(1, 2).contiguous(), None
    if state is not None and state.content_set_aside:
        # the cache has stored this call's keys: the set it carries for the restored policy follows
        follow_identity_call(state, batch=batch, q_heads=q_heads, q_len=q_len, k_len=k_len, device=query.device)
    corrected = beta is not None or virtual is not None  # a policy that needs to know where the sink is

    # Where the sink is. Decided from the layout, never from tensor values: with no mask (no
    # padding) and the default one-token sink set, the sink is key column 0 of every row, except in
    # a sliding-window layer reading a cache, whose window may have dropped it.
    sliding_cache = sliding_window is not None and q_len != k_len
    first_column = (state is not None and state.policy.first_column_sink and attention_mask is None
                    and not sliding_cache)
    location = None
    if state is not None and (observing or state.policy.clip is not None
                              or ((corrected or monitored) and not first_column)):
        location = locate_sinks(
            attention_mask, kwargs.get("position_ids"), batch=batch, q_len=q_len, k_len=k_len, causal=causal,
            sliding=sliding_window is not None, window=sliding_window,
            sink_positions=state.policy.sink_positions, device=query.device,
        )
        columns = _columns_out_of_order(state, k_len)
        if columns is not None:
            location = sinks_in_columns(location, *columns, state.policy.sink_positions)
        state.sink_rows, state.first_real_row, state.end_real_row = location.query_rows(q_len)

    deferred = monitored and defers_sink_stats(
        identity=beta is None and extra_logits is None and virtual is None, first_column=first_column, q_len=q_len,
        k_len=k_len, backend=state.backend, on_cpu=query.is_cpu,
        other_needs=observing or wants_probs)
    result = sink_attention(
        query, key, value,
        backend=state.backend if state is not None else "auto",
        **mask_kwargs, scale=scaling, softcap=softcap,
        sink_cols=None if location is None else location.sink_cols,
        first_column_sink=first_column,
        beta=beta, extra_logits=extra_logits, virtual_sink_logit=virtual,
        return_probs=wants_probs, need_sink_mass=observing,
        need_sink_stats=monitored and not deferred,
    )
    if observing or monitored:
        call = AttentionCall(
            state.policy.layer, module, query, key, value, attention_mask if padded is None else padded.dense, causal,
            query.shape[-1] ** -0.5 if scaling is None else scaling, softcap,
            None if location is None else location.sink_cols,  # None: key column 0 of every row
            None if location is None else location.first_real_col, extra_logits, virtual, beta, result, deferred,
        )
        for listener in (*state.observers, *state.telemetry):
            listener(call)
    out = result.out.transpose(1, 2)  # (B, Q, Hq, D), what transformers reshapes to (B, Q, Hq * D)
    return (out if out.is_contiguous() else out.contiguous()), result.probs
