"""Integration with HuggingFace transformers: one call patches a loaded model, per model, reversibly.

How it works (transformers 5.x): sinkfix registers one attention function under the name
``"sinkfix"`` in both ``AttentionInterface`` and ``AttentionMaskInterface``. transformers looks the
function up by name on every forward, globally, so everything model-specific lives on the attention
modules themselves (``module._sinkfix``): a model that was never patched runs the identity, and two
models in one process can carry different policies.

``patch()`` switches the model to ``"sinkfix"``, runs a 3-token dummy forward to find the attention
modules that really route through the interface (transformers only *warns* for models that do not),
resolves the policy against what it saw, and attaches the per-layer state. ``remove()`` restores the
previous implementation and detaches everything.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from sinkfix.errors import UnsupportedModelError
from sinkfix.ops.attention import AttentionResult, resolve_backend, sink_attention
from sinkfix.ops.residual import clip_residual, relative_threshold
from sinkfix.policy import LayerPolicy, Policy

__all__ = ["IMPL_NAME", "register", "patch", "PatchHandle", "AttentionCall", "SUPPORTED_ARCHITECTURES"]

IMPL_NAME = "sinkfix"

# Tested end to end (tests/test_models.py); others that route attention through transformers'
# interface usually work too, and those that do not are refused with UnsupportedModelError.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel", "GptOssForCausalLM",
)

# kwargs with semantics this implementation does not reproduce: computing dense attention while
# ignoring them would silently give wrong results.
_UNSUPPORTED_KWARGS = ("indices", "position_bias", "sinks", "block_indices", "cu_seq_lens_q", "cu_seq_lens_k")


@dataclass
class AttentionCall:
    """What an observer sees for one attention call (used by ``sinkfix.inspect``)."""

    layer: int
    module: nn.Module
    query: torch.Tensor  # (B, Hq, Q, D)
    key: torch.Tensor  # (B, Hkv, K, D)
    value: torch.Tensor  # (B, Hkv, K, D)
    attn_mask: torch.Tensor | None  # (B, 1, Q, K) bool or None
    causal: bool
    scale: float
    softcap: float | None
    sink_cols: torch.Tensor  # (B, NS) key columns of the sink set, -1 = absent
    first_real_col: torch.Tensor  # (B,) key column of the first real (non-padding) token
    extra_logits: torch.Tensor | None  # (Hq, E) zero-value logits counted in every row (s_aux, ...)
    virtual_logit: torch.Tensor | None  # (Hq,) the policy's, rows that see a non-sink key only
    result: AttentionResult


@dataclass
class _LayerState:
    layer: int
    policy: LayerPolicy
    backend: str
    observers: list[Callable[[AttentionCall], None]] = field(default_factory=list)
    # filled by each attention call, read by the residual-clip hook of the same decoder layer:
    # rows of the current queries that are sink tokens / padding.
    sink_rows: torch.Tensor | None = None
    first_real_row: torch.Tensor | None = None


_discovery = threading.local()


# -- sink positions -----------------------------------------------------------------------------
def _locate_sinks(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    causal: bool,
    sliding: bool,
    sink_offsets: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key columns of the sink set, (B, NS) with -1 where absent; the key column of the first real
    token (B,); and the key column of the last query row (B,).

    Full-attention layers and cache-less prefill read the first real token off the mask (the first
    column any query row may see), which handles left padding even when ``position_ids`` are not
    padding-aware (a plain forward). Sliding-window layers with a cache may have evicted token 0,
    so there the first real token is placed from the last query's position: ``last_col - pos``.
    """
    if attention_mask is None:
        first = torch.zeros(batch, dtype=torch.long, device=device)
        last_col = torch.full((batch,), (q_len - 1) if (causal and q_len > 1) else (k_len - 1), device=device)
    else:
        any_row = attention_mask[:, 0].any(dim=1)  # (B, K)
        cols = torch.arange(k_len, device=device)
        first = torch.where(any_row, cols, k_len).amin(dim=-1)
        last_seen = attention_mask[:, 0, -1]  # (B, K)
        last_col = torch.where(last_seen, cols, -1).amax(dim=-1)
    if sliding and not (q_len == k_len) and position_ids is not None:
        pos = position_ids if position_ids.ndim == 2 else position_ids[0]
        first = last_col - pos[:, -1].to(device).long().expand(batch)
    offsets = torch.tensor(sink_offsets, dtype=torch.long, device=device)
    sink_cols = first[:, None] + offsets[None, :]
    sink_cols = torch.where((sink_cols >= 0) & (sink_cols < k_len), sink_cols, -1)
    return sink_cols, first, last_col


# -- the attention function transformers calls --------------------------------------------------
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
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"sinkfix attention does not implement the {name!r} argument that "
                f"{type(module).__name__} passed; refusing to compute dense attention and ignore it"
            )
    if dropout and dropout > 0:
        raise NotImplementedError(
            f"sinkfix attention is inference-only: attention dropout {dropout} requested (call model.eval())"
        )
    batch, q_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    if q_heads % key.shape[1]:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {key.shape[1]}")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        # a float additive mask (0 = attend): e.g. a 4D mask passed by the caller
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if attention_mask is not None and attention_mask.shape[1] != 1:
        raise NotImplementedError(f"per-head attention masks {tuple(attention_mask.shape)} are not supported")
    causal_flag = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal_flag) and attention_mask is None and q_len > 1

    found = getattr(_discovery, "calls", None)
    if found is not None:
        found.append((module, q_heads))
    state: _LayerState | None = getattr(module, "_sinkfix", None)
    want_probs = bool(kwargs.get("output_attentions"))

    extra_logits = None if s_aux is None else s_aux.reshape(q_heads, 1).to(device=query.device, dtype=torch.float32)
    beta = virtual = None
    sink_cols = None
    if state is not None:
        beta, virtual = state.policy.tensors(query.device)
        if virtual is not None and state.policy.virtual_on_sink_rows:
            # counted in every row, like the model's own s_aux
            column = virtual.reshape(q_heads, 1)
            extra_logits = column if extra_logits is None else torch.cat([extra_logits, column], dim=1)
            virtual = None
        elif virtual is not None:
            virtual = virtual.reshape(q_heads)

    needs_sinks = state is not None and (
        not state.policy.attention_is_identity or state.observers or state.policy.clip is not None
    )
    if needs_sinks:
        sink_cols, first_col, last_col = _locate_sinks(
            attention_mask, kwargs.get("position_ids"), batch, q_len, k_len, causal,
            sliding_window is not None, state.policy.sink_offsets, query.device,
        )
        # rows of the current queries: query i sits at key column last_col - (Q - 1) + i
        row0 = last_col - (q_len - 1)
        sink_rows = sink_cols - row0[:, None]
        state.sink_rows = torch.where((sink_cols >= 0) & (sink_rows >= 0) & (sink_rows < q_len), sink_rows, -1)
        state.first_real_row = (first_col - row0).clamp(min=0)

    result = sink_attention(
        query, key, value,
        backend=state.backend if state is not None else "auto",
        attn_mask=attention_mask, causal=causal, scale=scaling, softcap=softcap,
        sink_cols=sink_cols, beta=beta, extra_logits=extra_logits, virtual_logit=virtual,
        return_probs=want_probs, need_sink_mass=bool(state is not None and state.observers),
    )
    if state is not None and state.observers:
        call = AttentionCall(
            state.policy.layer, module, query, key, value, attention_mask, causal,
            query.shape[-1] ** -0.5 if scaling is None else scaling, softcap, sink_cols, first_col, extra_logits, virtual,
            result,
        )
        for observer in state.observers:
            observer(call)
    return result.out.transpose(1, 2).contiguous(), result.probs


# -- residual clipping ---------------------------------------------------------------------------
def _make_clip_hook(state: _LayerState):
    def hook(module: nn.Module, args, kwargs, output):
        clip = state.policy.clip
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        batch, seq, _ = hidden.shape
        sink = torch.zeros(batch, seq, dtype=torch.bool, device=hidden.device)
        pad = torch.zeros_like(sink)
        if state.sink_rows is not None and state.sink_rows.shape[0] == batch:
            rows = state.sink_rows
            valid = rows >= 0
            sink[torch.arange(batch, device=hidden.device)[:, None].expand_as(rows)[valid], rows[valid]] = True
            pad = torch.arange(seq, device=hidden.device)[None, :] < state.first_real_row[:, None]
        if clip.mode == "relative":
            norms = hidden.float().norm(dim=-1)
            threshold = relative_threshold(norms, sink | pad, clip.threshold)
        else:
            threshold = torch.full((batch,), clip.threshold, device=hidden.device)
        clipped = clip_residual(hidden, threshold, sink, clip.sink_norm, backend=_clip_backend(state, hidden))
        if isinstance(output, torch.Tensor):
            return clipped
        return (clipped, *output[1:])

    return hook


def _clip_backend(state: _LayerState, hidden: torch.Tensor) -> str:
    # resolve_backend already checked that triton can run here (CUDA, or the CPU interpreter)
    return "triton" if state.backend == "triton" else "torch"


# -- the handle ---------------------------------------------------------------------------------
class PatchHandle:
    """Returned by :func:`patch`. ``remove()`` (or leaving the ``with`` block) restores the model."""

    def __init__(self, model: nn.Module, policy: Policy, backend: str, original_impl: str | None,
                 states: dict[str, _LayerState], hooks: list) -> None:
        self._model_ref = weakref.ref(model)
        self.policy = policy
        self.backend = backend
        self._original_impl = original_impl
        self._states = states
        self._hooks = hooks
        self.active = True

    @property
    def num_layers(self) -> int:
        return len(self._states)

    @property
    def layer_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, attention module) in layer order."""
        model = self._model_ref()
        if model is None:
            return []
        by_name = dict(model.named_modules())
        return sorted(((n, by_name[n]) for n in self._states), key=lambda item: self._states[item[0]].layer)

    def layer_policies(self) -> list[LayerPolicy]:
        """The live per-layer policies, in layer order. Mutating ``beta`` / ``virtual_logit`` on them
        (e.g. with tensors that require grad, during calibration) changes the patched model at once."""
        return [s.policy for s in sorted(self._states.values(), key=lambda s: s.layer)]

    def num_heads(self) -> list[int]:
        return [len(s.policy.beta) for s in sorted(self._states.values(), key=lambda s: s.layer)]

    def add_observer(self, observer: Callable[[AttentionCall], None]) -> None:
        for state in self._states.values():
            state.observers.append(observer)

    def remove_observer(self, observer: Callable[[AttentionCall], None]) -> None:
        for state in self._states.values():
            if observer in state.observers:
                state.observers.remove(observer)

    @contextlib.contextmanager
    def observing(self, observer: Callable[[AttentionCall], None]) -> Iterator[None]:
        self.add_observer(observer)
        try:
            yield
        finally:
            self.remove_observer(observer)

    def remove(self) -> None:
        """Undo the patch. Idempotent; a no-op once the model has been garbage-collected."""
        if not self.active:
            return
        self.active = False
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        model = self._model_ref()
        if model is None:
            return
        by_name = dict(model.named_modules())
        for name in self._states:
            module = by_name.get(name)
            if module is not None and hasattr(module, "_sinkfix"):
                del module._sinkfix
        if getattr(model, "_sinkfix_handle", None) is self:
            del model._sinkfix_handle
        model.set_attn_implementation(self._original_impl or "eager")

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({self.policy.describe()}, layers={self.num_layers}, backend={self.backend!r}, {state})"


# -- registration and patch ---------------------------------------------------------------------
_registered = False


def register() -> None:
    """Register ``"sinkfix"`` with transformers (both registries; idempotent).

    The mask registry matters: without it every mask builder returns None, so padding would be
    silently ignored and static-cache generation would go wrong.
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, attention_forward)
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)
    _registered = True


def _dummy_forward(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """Run a 3-token forward and return (attention module, query heads) in call order."""
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    vocab = getattr(model.config, "vocab_size", None) or getattr(getattr(model.config, "text_config", None), "vocab_size", 8)
    input_ids = torch.arange(3, device=device).remainder(max(int(vocab), 1))[None, :]
    _discovery.calls = []
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return _discovery.calls
    finally:
        _discovery.calls = None


def patch(model: nn.Module, policy: "Policy | Any | None" = None, backend: str = "auto") -> PatchHandle:
    """Patch a loaded transformers model with a sink-aware attention policy (or a calibrated profile).

    One call, per model, reversible: returns a :class:`PatchHandle` whose ``remove()`` (or ``with``
    block) restores the model bit-exactly. Patching an already patched model replaces the previous
    patch (the old handle becomes inactive).

    Raises UnsupportedModelError for models whose attention does not route through transformers'
    attention interface, PolicyError for bad parameters, ProfileError for a profile made for another
    model, RuntimeError when ``backend="triton"`` cannot run here.
    """
    register()
    if policy is None:
        policy = Policy()
    if not isinstance(policy, Policy):
        to_policy = getattr(policy, "policy_for", None)
        if to_policy is None:
            raise TypeError(f"patch() takes a sinkfix.Policy or sinkfix.Profile, got {type(policy).__name__}")
        policy = to_policy(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    backend_name = resolve_backend(backend, device)
    previous: PatchHandle | None = getattr(model, "_sinkfix_handle", None)
    if previous is not None and previous.active:
        previous.remove()

    arch = type(model).__name__
    original = config._attn_implementation
    try:
        model.set_attn_implementation(IMPL_NAME)
    except (ValueError, ImportError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"{arch} refuses custom attention implementations: {exc}") from None
    if config._attn_implementation != IMPL_NAME:
        model.set_attn_implementation(original or "eager")
        raise UnsupportedModelError(_unsupported_message(arch))
    try:
        calls = _dummy_forward(model)
    except Exception:
        model.set_attn_implementation(original or "eager")
        raise
    if not calls:
        model.set_attn_implementation(original or "eager")
        raise UnsupportedModelError(_unsupported_message(arch))

    names = {id(m): n for n, m in model.named_modules()}
    order: list[tuple[nn.Module, int]] = []
    seen: set[int] = set()
    for module, heads in calls:
        if id(module) not in seen:
            seen.add(id(module))
            order.append((module, heads))
    try:
        layer_policies = policy.resolve(len(order), [heads for _, heads in order])
    except Exception:
        model.set_attn_implementation(original or "eager")
        raise

    states: dict[str, _LayerState] = {}
    hooks = []
    by_name = dict(model.named_modules())
    for (module, _), layer_policy in zip(order, layer_policies):
        state = _LayerState(layer_policy.layer, layer_policy, backend_name)
        module._sinkfix = state
        name = names[id(module)]
        states[name] = state
        if layer_policy.clip is not None:
            parent = by_name.get(name.rsplit(".", 1)[0]) if "." in name else None
            if parent is None:
                raise UnsupportedModelError(f"cannot find the decoder layer around {name} for residual clipping")
            hooks.append(parent.register_forward_hook(_make_clip_hook(state), prepend=True, with_kwargs=True))
    handle = PatchHandle(model, policy, backend_name, original, states, hooks)
    model._sinkfix_handle = handle
    return handle


def _unsupported_message(arch: str) -> str:
    return (
        f"{arch} does not route attention through transformers' AttentionInterface, so sinkfix cannot "
        f"patch it (transformers would only log a warning and keep its own attention). Supported and "
        f"tested: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )
