"""One call patches a loaded transformers model, per model, reversibly.

How it works (transformers 5.x): sinkfix registers one attention function under the name
``"sinkfix"`` in both ``AttentionInterface`` and ``AttentionMaskInterface``
(:mod:`sinkfix.integrations.attention`). transformers looks the function up by name on every
forward, globally, so everything model-specific lives on the attention modules themselves: a
model that was never patched runs the identity, and two models in one process can carry different
policies.

``patch()`` switches the model to ``"sinkfix"``, runs a 3-token dummy forward to find the attention
modules that really route through the interface (transformers only *warns* for models that do not),
resolves the policy against what it saw, and only then attaches the per-layer state and the
residual-clip hooks. Every step before that last one changes nothing that is not undone when it
fails, so a failed ``patch()`` leaves the model exactly as it found it (patched or not).
``remove()`` restores the previous implementation and detaches everything.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from sinkfix.errors import PolicyError, UnsupportedModelError, UsageError
from sinkfix.evaluate import model_device
from sinkfix.integrations.after_import import call_after_import
from sinkfix.integrations.attention import (AttentionCall, AttentionDropoutError, BidirectionalAttentionError,
                                           LayerState, attention_forward, discover_attention_modules,
                                           pickle_refusal, refuse_content_call)
from sinkfix.integrations.masks import padded_causal_mask
from sinkfix.integrations.content_sinks import cache_hooks
from sinkfix.integrations.residual_clip import make_clip_hook
from sinkfix.ops.attention import resolve_backend
from sinkfix.policy import LayerPolicy, Policy

__all__ = ["IMPL_NAME", "register", "register_on_import", "patch", "PatchHandle", "AttentionCall", "SUPPORTED_ARCHITECTURES"]

IMPL_NAME = "sinkfix"

# Tested end to end (tests/test_patch.py, tests/test_real_models.py); others that route attention
# through transformers' interface usually work too, and those that do not are refused with
# UnsupportedModelError.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel", "GptOssForCausalLM",
    "FalconForCausalLM",  # rotary only, and only where transformers routes it (5.25 on); ALiBi is refused
)

_HANDLE_ATTRIBUTE = "_sinkfix_handle"

# Patches in force per config object. Models built from one config object share it (transformers
# keeps the reference: ``from_config(cfg)`` twice), and with it the attention setting that routes
# them to sinkfix: removing one model's patch restored the shared setting under the other, still
# patched model (its handle said active while it ran its stock attention), and the second removal
# left the setting on "sinkfix" for good. The setting is put back when the last patch on it ends.
_PATCHES_BY_CONFIG: dict[int, list[weakref.ref]] = {}


# -- the handle ---------------------------------------------------------------------------------
class PatchHandle:
    """Returned by :func:`patch`. ``remove()`` (or leaving the ``with`` block) restores the model.

    ``PatchHandle.of(model)`` finds the active handle of a model (None when it is not patched).
    A handle whose patch has ended (removed, its ``with`` block left, replaced by another patch, or
    its model garbage-collected) is not active and refuses a new ``with`` block: patch again.
    """

    def __init__(self, model: nn.Module, policy: Policy, backend: str, original_impl: str | None,
                 original_settings: list[tuple[Any, Any]], states: dict[str, LayerState],
                 clip_layers: dict[str, nn.Module]) -> None:
        self._model_ref = weakref.ref(model)
        self.policy = policy
        self.backend = backend
        self._original_impl = original_impl
        # (config, its own attention setting) for the config and its sub-configs before any patch:
        # what remove() puts back (one value for all of them would lose e.g. a vision tower's eager)
        self._original_settings = original_settings
        self._states = states  # attention module name -> its state
        self._clip_layers = clip_layers  # attention module name -> the decoder layer to clip after
        self._hooks: list = []
        # lists of hooks a listener (a monitor) keeps on the model while it records: a deep copy of
        # the model is stripped of them as of the patch's own (a copy taken inside a request kept the
        # monitor's hooks, and its first forward failed in them)
        self._listener_hooks: list[list] = []
        self._set_aside: dict[int, LayerPolicy] = {}  # layer -> its policy while it runs as the identity
        # layer -> its policy's device values while they are the identity's (run_as_identity(in_place=True))
        self._values_set_aside: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._replaced: PatchHandle | None = None  # the patch this one replaced: back in force when a with block ends
        self._dismissed = False  # remove() was called on it: a with block ending never brings it back
        self._on_collect = None  # puts the config's setting back if the model is collected while patched
        self._active = False
        self.tensor_parallel: tuple[int, int] | None = None  # (rank, size) when the attention heads are sharded
        # (rank, size) when the model is sharded but every rank computes all attention heads (transformers'
        # plans for Phi3's fused qkv and for GPT-OSS leave the attention whole): the policy is not sliced
        self.replicated_attention: tuple[int, int] | None = None

    @property
    def active(self) -> bool:
        """Whether this patch is in force: attached, not removed or replaced, and its model alive."""
        return self._active and self._model_ref() is not None

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value

    @classmethod
    def of(cls, model: nn.Module) -> "PatchHandle | None":
        """The active patch of ``model``, or None."""
        handle = getattr(model, _HANDLE_ATTRIBUTE, None)
        return handle if isinstance(handle, cls) and handle.active else None

    # -- attach / detach (the only places that change the model) ------------------------------
    def _attach(self) -> None:
        model = self._model_ref()
        by_name = dict(model.named_modules())
        try:
            device = model_device(model)
            for name, state in self._states.items():
                state.policy.tensors(device)  # upload once now, not inside the first (maybe compiled) forward
                by_name[name]._sinkfix = state
            for name, state in self._states.items():
                # the content-sink set travels with the cache; a sink set beyond position 0 is read in
                # the cache's columns once a SinkCache has evicted (integrations/attention.py)
                if state.policy.content is not None or any(p > 0 for p in state.policy.sink_positions):
                    self._hooks.extend(cache_hooks(by_name[name], state))
            first = by_name[min(self._states, key=lambda name: self._states[name].layer)]  # the forward's first
            if any(state.policy.content is not None for state in self._states.values()):
                # a call the content path refuses is refused at the forward's first attention module,
                # before any layer stores its keys in the cache (which then stays in step)
                refusal = functools.partial(refuse_content_call, tuple(self._ordered_states()))
                self._hooks.append(first.register_forward_pre_hook(refusal, prepend=True, with_kwargs=True))
            # the attention implementation switched after the patch (model.set_attn_implementation("eager"))
            # ran stock attention while the handle, and a monitor's records, still said corrected:
            # refused at the forward's first attention module, which reads the setting at dispatch
            config = getattr(first, "config", None) or model.config
            self._hooks.append(first.register_forward_pre_hook(functools.partial(_refuse_switched_attention, config),
                                                               prepend=True))
            for name, layer in self._clip_layers.items():
                hook = make_clip_hook(self._states[name])
                self._hooks.append(layer.register_forward_hook(hook, prepend=True, with_kwargs=True))
            setattr(model, _HANDLE_ATTRIBUTE, self)
            self.active = True
            _register_on_config(self, model)
            # a patch also ends when its model is collected: the config it may share with other models
            # stayed on "sinkfix" for good (and the next patch took that for the original)
            self._on_collect = weakref.finalize(model, _restore_collected, model.config, self._original_settings)
            self._on_collect.atexit = False  # at interpreter exit there is nothing to give back
        except BaseException:
            self._detach(model)
            raise

    def _detach(self, model: nn.Module) -> None:
        if self._on_collect is not None:
            self._on_collect.detach()
            self._on_collect = None
        self.restore_layers()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        by_name = dict(model.named_modules())
        for name, state in self._states.items():
            module = by_name.get(name)
            if module is not None and getattr(module, "_sinkfix", None) is state:
                del module._sinkfix
        if getattr(model, _HANDLE_ATTRIBUTE, None) is self:
            delattr(model, _HANDLE_ATTRIBUTE)
        self.active = False

    def remove(self) -> None:
        """Undo the patch: the model runs its own attention again. Idempotent; a no-op once the
        model has been garbage-collected. (Leaving a ``with`` block instead puts back the patch this
        one replaced, if any: :meth:`__exit__`.)"""
        if not self.active:
            self._dismissed = True
            return
        model = self._model_ref()
        self.active = False
        if model is None:
            return
        self._detach(model)
        self._restore_original_attention(model)

    def _restore_original_attention(self, model: nn.Module) -> None:
        if not _other_patches_on_config(model):  # another model patched on the same config still needs it
            _restore_attn_settings(model, self._original_impl, self._original_settings)

    # -- what is patched ----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._states)

    def _ordered_states(self) -> list[LayerState]:
        return sorted(self._states.values(), key=lambda s: s.layer)

    @property
    def layer_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, attention module) in layer order."""
        model = self._model_ref()
        if model is None:
            return []
        by_name = dict(model.named_modules())
        return sorted(((n, by_name[n]) for n in self._states), key=lambda item: self._states[item[0]].layer)

    def decoder_layers(self) -> list[nn.Module | None]:
        """The module around each attention module, in layer order: the decoder layer whose output
        is the residual stream (None where an attention module has no parent)."""
        model = self._model_ref()
        if model is None:
            return []
        by_name = dict(model.named_modules())
        return [by_name.get(name.rsplit(".", 1)[0]) if "." in name else None for name, _ in self.layer_modules]

    def layer_policies(self) -> list[LayerPolicy]:
        """The live per-layer policies, in layer order. ``LayerPolicy.set_parameters`` on them
        (e.g. with tensors that require grad, during calibration) changes the patched model at once."""
        return [s.policy for s in self._ordered_states()]

    def num_heads(self) -> list[int]:
        """Query heads per attention layer as this process computes them (a rank's share under
        tensor parallelism; :meth:`model_num_heads` gives the whole model's)."""
        return [s.policy.num_heads for s in self._ordered_states()]

    def model_num_heads(self) -> list[int]:
        """Query heads per attention layer of the whole model, on every rank."""
        size = 1 if self.tensor_parallel is None else self.tensor_parallel[1]
        return [heads * size for heads in self.num_heads()]

    # -- observers ----------------------------------------------------------------------------
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

    # -- telemetry (sinkfix.monitor) ------------------------------------------------------------
    def add_telemetry(self, listener: Callable[[AttentionCall], None]) -> None:
        """Call ``listener`` after every attention call with ``call.result.sink_stats`` filled (the
        fast path's (B, Hq, 2) side output); unlike an observer it does not force the Python path."""
        for state in self._states.values():
            state.telemetry.append(listener)

    def remove_telemetry(self, listener: Callable[[AttentionCall], None]) -> None:
        for state in self._states.values():
            if listener in state.telemetry:
                state.telemetry.remove(listener)

    def track_listener_hooks(self, hooks: list) -> None:
        """``hooks`` (a list of torch RemovableHandles the caller keeps filling and emptying) are a
        listener's hooks on this model: a deep copy of the model does not carry them."""
        if not any(held is hooks for held in self._listener_hooks):
            self._listener_hooks.append(hooks)

    def untrack_listener_hooks(self, hooks: list) -> None:
        self._listener_hooks = [held for held in self._listener_hooks if held is not hooks]

    def run_as_identity(self, layers: Iterable[int], *, in_place: bool = False) -> None:
        """Switch the correction off (plain softmax, no residual clip) in ``layers`` until
        :meth:`restore_layers`: the fallback a guard uses. The live policies are kept aside, not
        changed. A content-sink layer keeps the sink set its cache carries in step meanwhile: the
        keys of its identity calls are ordinary keys, their rows are not in the statistics, and
        nothing is decided (``content_sinks.follow_identity_call``); without that, the first call
        after :meth:`restore_layers` on that cache was refused.

        ``in_place``: for a compiled forward. A layer whose correction is its parameters alone (no
        residual clip, no content sinks) keeps its policy and code, and the values on its device
        become the identity's (sink scale 1, virtual sink logit -inf, LayerPolicy.identity_in_place):
        the graphs compiled for the correction serve the fallback, equal to the identity up to
        rounding. Swapped policies are other code in the graph, so each set of layers switched off
        compiled graphs of its own and a guard reached dynamo's recompile limit (docs/monitoring.md,
        "Prompts of many lengths")."""
        wanted = set(layers)
        for state in self._states.values():
            if state.layer not in wanted or state.layer in self._set_aside or state.layer in self._values_set_aside:
                continue
            if in_place and state.policy.can_run_as_identity_in_place:
                self._values_set_aside[state.layer] = state.policy.identity_in_place()
                continue
            self._set_aside[state.layer] = state.policy
            state.content_set_aside = state.policy.content is not None
            state.policy = state.policy.as_identity()

    def restore_layers(self) -> None:
        """Undo :meth:`run_as_identity`."""
        for state in self._states.values():
            if state.layer in self._set_aside:
                state.policy = self._set_aside.pop(state.layer)
                state.content_set_aside = False
            if state.layer in self._values_set_aside:
                state.policy.restore_in_place(self._values_set_aside.pop(state.layer))

    @property
    def identity_layers(self) -> list[int]:
        """Layers :meth:`run_as_identity` has switched off, sorted."""
        return sorted({*self._set_aside, *self._values_set_aside})

    def __enter__(self) -> "PatchHandle":
        # a handle whose patch has ended entered a block that then ran the stock model, silently
        if not self.active:
            why = ("its model no longer exists" if self._model_ref() is None
                   else "remove() was called, its with block ended, or another patch replaced it")
            raise UsageError(f"this PatchHandle's patch is no longer in force ({why}): a with block needs a patch "
                             "in force; patch the model again (with sinkfix.patch(model, policy): ...)")
        return self

    def __exit__(self, *exc) -> None:
        """Leave the model as the block found it: the patch this one replaced (an enclosing ``with
        sinkfix.patch(...)`` block, or a monitor's patch) is back in force, unless it was removed
        meanwhile; otherwise the model runs its own attention again."""
        previous, self._replaced = self._replaced, None
        model = self._model_ref()
        if (not self.active or model is None or previous is None or previous.active or previous._dismissed
                or previous._model_ref() is not model):
            self.remove()
            return
        self.active = False
        self._detach(model)
        try:
            previous._attach()
        except BaseException:
            self._restore_original_attention(model)
            raise

    def __deepcopy__(self, memo: dict) -> None:
        """``copy.deepcopy`` of a patched model gives an **unpatched** copy (patch it on its own):
        a handle is tied to one model, and a copy that shared it would be unpatched through the
        other model's handle. Runs while the model is being copied, after its submodules and config
        (attributes set at patch time come last in the model's ``__dict__``): it strips the copied
        modules of the patch's state and hooks and puts the copied configs back to the model's own
        attention; the copy's handle attribute is None."""
        model = self._model_ref()
        if model is None or not self.active or id(model) not in memo:
            raise UsageError("a PatchHandle cannot be copied on its own; copy the model (the copy is unpatched) "
                             "and patch it")
        modules = dict(model.named_modules())
        for name in self._states:
            copied = memo.get(id(modules[name]))
            if copied is not None:
                vars(copied).pop("_sinkfix", None)
        listeners = [hook for hooks in self._listener_hooks for hook in hooks]
        for hook in (*self._hooks, *listeners):  # torch's RemovableHandle: the hook's key in one or more hook dicts
            for ref in (hook.hooks_dict_ref, *getattr(hook, "extra_dict_ref", ())):
                original = ref()
                copied = None if original is None else memo.get(id(original))
                if copied is not None:
                    copied.pop(hook.id, None)
        for module in modules.values():
            config = getattr(module, "config", None)
            copied = None if config is None else memo.get(id(config))
            if copied is not None and getattr(copied, "_attn_implementation", None) == IMPL_NAME:
                copied._attn_implementation = self._original_impl or "eager"
        for config, value in self._original_settings:  # sub-configs keep their own setting
            copied = memo.get(id(config))
            if copied is not None:
                copied._attn_implementation_internal = value
        return None

    def __reduce_ex__(self, protocol):
        """Pickling a patched model (``torch.save(model)``) is refused with this message rather than
        torch's "cannot pickle 'weakref.ReferenceType' object"."""
        raise pickle_refusal()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({self.policy.describe()}, layers={self.num_layers}, backend={self.backend!r}, {state})"


# -- registration -------------------------------------------------------------------------------
_registered = False


def _register_attention(modeling_utils) -> None:
    modeling_utils.AttentionInterface.register(IMPL_NAME, attention_forward)


def _register_masks(masking_utils) -> None:
    # sdpa_mask's arguments and results, except that padded causal masks come back as key ranges
    # (PaddedCausalMask) that the kernels read instead of a (B, 1, Q, K) tensor
    masking_utils.AttentionMaskInterface.register(IMPL_NAME, padded_causal_mask)


def register() -> None:
    """Register ``"sinkfix"`` with transformers (both registries; idempotent).

    The mask registry matters: without it every mask builder returns None, so padding would be
    silently ignored and static-cache generation would go wrong.
    """
    global _registered
    if _registered:
        return
    import transformers.masking_utils
    import transformers.modeling_utils

    _register_attention(transformers.modeling_utils)
    _register_masks(transformers.masking_utils)
    _registered = True


def register_on_import() -> None:
    """What ``import sinkfix`` does: register ``"sinkfix"`` in each of transformers' two registries
    as soon as the module defining it is imported (now, if it already is). Importing those modules
    ourselves would make ``import sinkfix`` (and so every ``sinkfix`` command, ``--help`` included)
    pay for most of transformers. The functions run inside transformers' own import and so touch
    only the module they are handed (:mod:`sinkfix.integrations.after_import`)."""
    call_after_import("transformers.modeling_utils", _register_attention)
    call_after_import("transformers.masking_utils", _register_masks)


# -- patch ----------------------------------------------------------------------------------------
def _as_policy(policy: Any, model: nn.Module) -> Policy:
    if policy is None:
        return Policy()
    if isinstance(policy, Policy):
        return policy
    to_policy = getattr(policy, "policy_for", None)
    if to_policy is None:
        raise TypeError(f"patch() takes a sinkfix.Policy or sinkfix.Profile, got {type(policy).__name__}")
    return to_policy(_compiled_original(model))  # a Profile: checks that it was made for this model


def _compiled_original(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s wrapper (the model itself otherwise): the wrapper's class
    name and its parameters' ``_orig_mod.`` prefix made a profile for the very same model read as
    one for another architecture and other weights."""
    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def _select_sinkfix_attention(model: nn.Module, arch: str) -> None:
    """Switch the model to the "sinkfix" implementation, or raise (transformers only warns when
    a model ignores the switch, so the result is checked)."""
    try:
        model.set_attn_implementation(IMPL_NAME)
    except (ValueError, ImportError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"{arch} refuses custom attention implementations: {exc}") from None
    if model.config._attn_implementation != IMPL_NAME:
        raise UnsupportedModelError(_unsupported_message(arch))


def _dummy_input(model: nn.Module) -> torch.Tensor:
    config = model.config
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 8)
    return torch.arange(3, device=model_device(model)).remainder(max(int(vocab), 1))[None, :]


def tensor_parallel_size(model: nn.Module) -> int:
    """How many ranks transformers sharded ``model`` over (it records the size on the model); 1 when not."""
    return getattr(model, "_tp_size", None) or 1


def tensor_parallel_rank(model: nn.Module) -> tuple[int, int] | None:
    """(rank, size) of this process in the model's tensor-parallel group, or None when the model
    is not sharded (transformers records the size on the model it shards)."""
    size = tensor_parallel_size(model)
    if size <= 1:
        return None
    mesh_manager = getattr(model, "_mesh_manager", None)
    if mesh_manager is not None:
        return mesh_manager.get_mesh("tp").get_local_rank(), size
    return torch.distributed.get_rank() % size, size


def require_process_group(model: nn.Module, error: type[Exception] = UsageError, why: str = "") -> None:
    """Raise ``error`` when ``model`` is sharded with tensor parallelism and this process has no
    initialised process group: its forward (patch()'s discovery pass among them) runs collectives,
    and torch's own "Could not resolve the process group" came from inside a DTensor op."""
    size = tensor_parallel_size(model)
    if size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise error(f"this model is sharded with tensor parallelism over {size} ranks, but torch.distributed is not "
                    f"initialised in this process: its forward runs collectives over the process group transformers "
                    f"sharded it over{why}; call this where that group is initialised (under torchrun, before "
                    "torch.distributed.destroy_process_group())")


def _heads_are_sharded(model: nn.Module, local_heads: list[int], size: int) -> bool:
    """Whether this rank computes a 1/size block of each layer's query heads (q/k/v sharded) or all
    of them (a plan that shards the rest of the model only). Decided from the config's head count:
    a rank that sees all of them is not sharded; one that sees neither that nor its share is refused."""
    config = model.config  # a multimodal model's head count is its text config's
    configured = getattr(getattr(config, "text_config", None) or config, "num_attention_heads", None)
    if not isinstance(configured, int) or not local_heads:
        return True
    if all(heads == configured for heads in local_heads):
        return False
    if all(heads * size == configured for heads in local_heads):
        return True
    raise UnsupportedModelError(f"{type(model).__name__} is sharded over {size} ranks and its attention layers see "
                                f"{sorted(set(local_heads))} query heads, neither the config's {configured} nor "
                                f"{configured} / {size}: sinkfix cannot tell which heads this rank computes")


def _resolve_policy(model: nn.Module, policy: Policy,
                    local_heads: list[int]) -> tuple[list[LayerPolicy], tuple | None, bool]:
    """Per-layer policies for the heads this process computes, this process's (rank, size) in a
    tensor-parallel group (None: not sharded) and whether its heads are a shard of them. Under tensor parallelism (q/k/v sharded column-wise, so rank r holds the r-th contiguous
    block of query heads) the policy is written for the whole model and each rank applies its slice
    of every per-head parameter; where the plan leaves the attention whole, every rank applies all of it."""
    tp = tensor_parallel_rank(model)
    if tp is None or not _heads_are_sharded(model, local_heads, tp[1]):
        return policy.resolve(len(local_heads), local_heads), tp, False
    rank, size = tp
    global_heads = [heads * size for heads in local_heads]
    try:
        full = policy.resolve(len(local_heads), global_heads)
    except PolicyError as exc:
        first = rank * local_heads[0]
        raise PolicyError(f"{exc} (tensor parallelism over {size} ranks: rank {rank} computes query heads "
                          f"{first}..{first + local_heads[0] - 1} of {global_heads[0]} and applies that slice of a "
                          "policy written for the whole model)") from None
    sliced = [lp.head_slice(rank * heads, (rank + 1) * heads) for lp, heads in zip(full, local_heads)]
    return sliced, tp, True


def _plan(model: nn.Module, policy: Policy, backend: str, original: str | None,
          original_settings: list[tuple[Any, Any]], previous: "PatchHandle | None") -> PatchHandle:
    """Everything patch() decides before changing the model: which modules, which policy per
    layer, which decoder layers to clip. Raises on any problem."""
    arch = type(model).__name__
    require_process_group(model, why=" (patch() runs one forward to find the attention modules)")
    try:
        order = discover_attention_modules(model, _dummy_input(model))
    except AttentionDropoutError:
        raise UsageError(f"{arch} is in training mode and asks for attention dropout, which sinkfix attention "
                         "does not implement (it is inference-only): call model.eval() before patch()") from None
    except BidirectionalAttentionError as exc:
        raise UnsupportedModelError(
            f"{exc}: sinkfix corrects decoder-only (causal) language models, whose first token every later "
            "token sees; in an encoder it is no such sink. Supported and tested: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}.") from None
    except NotImplementedError as exc:  # raised by our attention function: an argument it does not implement
        raise UnsupportedModelError(f"{arch} calls attention with something sinkfix does not implement: {exc}") from None
    if not order:
        raise UnsupportedModelError(_unsupported_message(arch))
    _refuse_overlapping_patch(model, order, previous)
    layer_policies, tp, heads_sharded = _resolve_policy(model, policy, [heads for _, heads in order])
    names = {id(m): n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    states: dict[str, LayerState] = {}
    clip_layers: dict[str, nn.Module] = {}
    for (module, _), layer_policy in zip(order, layer_policies):
        name = names[id(module)]
        states[name] = LayerState(layer_policy.layer, layer_policy, backend)
        if layer_policy.clip is not None:
            parent = by_name.get(name.rsplit(".", 1)[0]) if "." in name else None
            if parent is None:
                raise UnsupportedModelError(f"cannot find the decoder layer around {name} for residual clipping")
            clip_layers[name] = parent
    handle = PatchHandle(model, policy, backend, original, original_settings, states, clip_layers)
    handle.tensor_parallel, handle.replicated_attention = (tp, None) if heads_sharded else (None, tp)
    return handle


def patch(model: nn.Module, policy: "Policy | Any | None" = None, backend: str = "auto") -> PatchHandle:
    """Patch a loaded transformers model with a sink-aware attention policy (or a calibrated profile).

    One call, per model, reversible: returns a :class:`PatchHandle` whose ``remove()`` (or ``with``
    block) restores the model bit-exactly. Patching an already patched model replaces the previous
    patch (the old handle becomes inactive); ``remove()`` then leaves the model unpatched, while
    leaving a ``with`` block puts the replaced patch back (nested blocks end as they began). When any
    step fails the model is left as it was found, still carrying its previous patch if it had one.
    ``copy.deepcopy`` of a patched model gives an unpatched copy.

    patch() finds the attention modules with one 3-token forward of the model (no cache, no
    gradient), which the model's own forward hooks see like any other.

    Raises UnsupportedModelError for models whose attention does not route through transformers'
    attention interface and for encoder-decoder models, PolicyError for bad parameters, ProfileError for a profile made for another
    model, RuntimeError when ``backend="triton"`` cannot run here.
    """
    register()
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    if getattr(config, "is_encoder_decoder", False):
        # the policy would act on every call the interface routes: the encoder's bidirectional
        # attention and the cross-attention too, whose first key is the encoder's first token
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model: sinkfix corrects decoder-only language models "
            "(a policy would also act on the encoder's bidirectional attention and on cross-attention, where the "
            f"'sink' would be the encoder's first token). Supported and tested: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    policy = _as_policy(policy, model)
    backend_name = resolve_backend(backend, model_device(model), getattr(model, "dtype", None))
    previous = PatchHandle.of(model)
    current = config._attn_implementation
    settings = _attn_settings(config)
    original = previous._original_impl if previous is not None else current
    sharing = _other_patches_on_config(model)
    if previous is None and sharing:  # the config already selects sinkfix for another model's patch
        original, settings = sharing[0]._original_impl, sharing[0]._original_settings
    try:
        if backend_name == "triton":  # the kernels' first-column sink tensor, made once (ops/custom_ops.py)
            from sinkfix.ops.custom_ops import prepare_first_column_sink

            prepare_first_column_sink(model_device(model))
        if current != IMPL_NAME:
            _select_sinkfix_attention(model, type(model).__name__)
        handle = _plan(model, policy, backend_name, original,
                       previous._original_settings if previous is not None else settings, previous)
    except BaseException:
        if not sharing:
            _restore_attn_settings(model, current, settings)
        raise
    if previous is not None:
        previous._detach(model)
    try:
        handle._attach()
    except BaseException:
        if previous is not None:
            previous._attach()
        if not sharing:
            _restore_attn_settings(model, current, settings)
        raise
    handle._replaced = previous
    return handle


def _patches_on(config) -> list[PatchHandle]:
    """The patches in force on models whose config is this very object."""
    in_force = []
    for ref in _PATCHES_BY_CONFIG.get(id(config), []):
        handle = ref()
        owner = None if handle is None else handle._model_ref()
        if handle is not None and handle.active and owner is not None and owner.config is config:
            in_force.append(handle)
    return in_force


def _refuse_switched_attention(config, module: nn.Module, args) -> None:
    """A forward pre-hook on a patched model's first attention module: refuse a forward whose
    config no longer names sinkfix's attention (switched after the patch), which transformers would
    run on its own attention, the correction silently off."""
    current = getattr(config, "_attn_implementation", IMPL_NAME)
    if current != IMPL_NAME:
        raise UsageError(f"the model's attention implementation was switched to {current!r} after sinkfix.patch, "
                         "so the correction would not run: remove the patch (handle.remove()) before switching, "
                         "or patch again after it")


def _register_on_config(handle: PatchHandle, model: nn.Module) -> None:
    _PATCHES_BY_CONFIG[id(model.config)] = [*map(weakref.ref, _patches_on(model.config)), weakref.ref(handle)]


def _restore_collected(config, settings: list[tuple[Any, Any]]) -> None:
    """A patched model was collected: its config (maybe shared) gets its own settings back unless
    another model's patch on it is still in force."""
    if not _patches_on(config):
        _put_back_internal_settings(settings)


def _other_patches_on_config(model: nn.Module) -> list[PatchHandle]:
    """The patches in force on other models that share ``model``'s config object."""
    return [h for h in _patches_on(getattr(model, "config", None)) if h._model_ref() is not model]


def _refuse_overlapping_patch(model: nn.Module, order: list[tuple[nn.Module, int]],
                              previous: "PatchHandle | None") -> None:
    """Refuse to patch a module whose attention layers already carry another model's patch: a
    module inside a patched model (``patch(model.model)`` after ``patch(model)``) or a model around
    a patched module. The two patches would share the layers and the config, and removing either
    one silently took the other off while its handle still said it was active."""
    own = set() if previous is None else {id(state) for state in previous._states.values()}
    names = {id(m): n for n, m in model.named_modules()}
    for module, _ in order:
        state = getattr(module, "_sinkfix", None)
        if state is not None and id(state) not in own:
            raise UsageError(
                f"{names.get(id(module), type(module).__name__)} of {type(model).__name__} is already patched "
                "through another module (a model around this one, or a part of it): remove that patch before "
                "patching this module, or patch one of them only")


def _attn_settings(config) -> list[tuple[Any, Any]]:
    """(config, the attention implementation it holds itself) for a model's config and its
    sub-configs, recursively: what a refused patch() puts back. Switching a model's attention goes
    through every sub-config (MPT keeps it in ``attn_config``), and setting the top-level value back
    would overwrite the sub-configs' own values (None on a fresh MPT config) with it."""
    found, stack = [], [config]
    while stack:
        current = stack.pop()
        found.append((current, getattr(current, "_attn_implementation_internal", None)))
        stack.extend(sub for key in getattr(current, "sub_configs", None) or {}
                     if (sub := getattr(current, key, None)) is not None)
    return found


def _restore_attn_settings(model: nn.Module, current: str | None, settings: list[tuple[Any, Any]]) -> None:
    if model.config._attn_implementation != current:
        try:
            model.set_attn_implementation(current or "eager")
        except (ImportError, ValueError):
            # the implementation the model held before the patch cannot be loaded now (flash_attention_2
            # set by hand without flash-attn installed): remove() raised transformers' ImportError and left
            # "sinkfix" in the config; the recorded settings, put back below, are that state as it was
            pass
    _put_back_internal_settings(settings)


def _put_back_internal_settings(settings: list[tuple[Any, Any]]) -> None:
    """Each config and sub-config its own recorded attention setting (see :func:`_attn_settings`)."""
    for config, value in settings:
        if getattr(config, "_attn_implementation_internal", None) != value:
            config._attn_implementation_internal = value


def _unsupported_message(arch: str) -> str:
    return (
        f"{arch} does not route attention through transformers' AttentionInterface, so sinkfix cannot "
        f"patch it (transformers would only log a warning and keep its own attention). Supported and "
        f"tested: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )
