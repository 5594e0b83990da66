"""A failed patch() leaves the model exactly as it found it: stock, or still carrying its previous patch.

One test per failure point of patch(): the implementation switch refused, a model that ignores it,
the discovery forward raising, nothing routed through the interface, a policy that does not fit,
no decoder layer around an attention module for residual clipping, and attaching the state itself.
"""

from __future__ import annotations

import pytest
import torch

import sinkfix
import importlib
from sinkfix import Policy, ResidualClip, UnsupportedModelError
from sinkfix.patch import PatchHandle

# sinkfix.patch is also the name of the function the package exports: take the module itself
patch_module = importlib.import_module("sinkfix.patch")

from .conftest import tiny_model


def _snapshot(model) -> dict:
    """Everything patch() may touch: the implementation, per-module state, hooks, the handle."""
    return {
        "impl": model.config._attn_implementation,
        "states": {name: id(m._sinkfix) for name, m in model.named_modules() if hasattr(m, "_sinkfix")},
        "hooks": {name: len(m._forward_hooks) for name, m in model.named_modules()},
        "handle": PatchHandle.of(model),
    }


IDS = torch.tensor([[5, 9, 2, 7, 3, 11]])


@pytest.fixture(params=["stock", "patched"])
def model_and_previous(request):
    """A tiny Llama, unpatched or carrying a clipping patch (state, hooks and a handle to keep)."""
    model = tiny_model("llama")
    previous = None
    if request.param == "patched":
        previous = sinkfix.patch(model, Policy(sink_scale=0.5, residual_clip=ResidualClip(2.0)))
    return model, previous


def _assert_unchanged(model, previous, before: dict, logits_before: torch.Tensor) -> None:
    assert _snapshot(model) == before
    if previous is not None:
        assert previous.active
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits_before)


def _run_failing(model, previous, failing_patch, error, match) -> None:
    before = _snapshot(model)
    with torch.no_grad():
        logits_before = model(IDS).logits
    with pytest.raises(error, match=match):
        failing_patch()
    _assert_unchanged(model, previous, before, logits_before)


# The two switch tests use an unpatched model only: a model patched before is already on the
# sinkfix implementation, so patching it again switches nothing.
def test_switch_refused(monkeypatch):
    model, previous = tiny_model("llama"), None

    def refuse(name):
        raise ValueError("this model refuses custom attention")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    _run_failing(model, previous, lambda: sinkfix.patch(model, Policy(sink_scale=0.9)), UnsupportedModelError,
                 "refuses custom attention")


def test_switch_silently_ignored(monkeypatch):
    model, previous = tiny_model("llama"), None
    original = model.set_attn_implementation
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: original("eager") if name == "sinkfix"
                        else original(name))
    _run_failing(model, previous, lambda: sinkfix.patch(model, Policy(sink_scale=0.9)), UnsupportedModelError,
                 "does not route attention")


def test_discovery_forward_raises(model_and_previous, monkeypatch):
    model, previous = model_and_previous

    def broken(model, input_ids):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(patch_module, "discover_attention_modules", broken)
    _run_failing(model, previous, lambda: sinkfix.patch(model, Policy(sink_scale=0.9)), RuntimeError,
                 "forward failed")


def test_nothing_routed_through_the_interface(model_and_previous, monkeypatch):
    model, previous = model_and_previous
    monkeypatch.setattr(patch_module, "discover_attention_modules", lambda model, input_ids: [])
    _run_failing(model, previous, lambda: sinkfix.patch(model, Policy(sink_scale=0.9)), UnsupportedModelError,
                 "does not route attention")


def test_policy_does_not_fit(model_and_previous):
    model, previous = model_and_previous
    _run_failing(model, previous, lambda: sinkfix.patch(model, Policy(sink_scale=torch.ones(3, 4))),
                 sinkfix.PolicyError, r"\[2, 4\]")


def test_no_decoder_layer_for_residual_clipping(model_and_previous, monkeypatch):
    model, previous = model_and_previous
    # an attention module without a parent module: its name has no "." in it
    monkeypatch.setattr(patch_module, "discover_attention_modules", lambda model, input_ids: [(model.lm_head, 4)])
    _run_failing(model, previous, lambda: sinkfix.patch(model, Policy(residual_clip=ResidualClip(4.0))),
                 UnsupportedModelError, "decoder layer")


def test_attaching_fails_midway(model_and_previous, monkeypatch):
    """The second clip hook of the new patch fails to register, after the first one did: the
    half-attached patch is taken off again (and a previous patch re-attached, which calls the
    factory again and must succeed)."""
    model, previous = model_and_previous
    real = patch_module.make_clip_hook
    calls = []

    def factory(state):
        calls.append(state)
        if len(calls) == 2:
            raise RuntimeError("cannot register the hook")
        return real(state)

    monkeypatch.setattr(patch_module, "make_clip_hook", factory)
    _run_failing(model, previous, lambda: sinkfix.patch(model, Policy(residual_clip=ResidualClip(4.0))),
                 RuntimeError, "cannot register the hook")
