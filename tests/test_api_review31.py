"""The core API in the cases review 31 found wrong: a compiled patched model served while another
model is patched (its graph re-traced at every patch() and failed inside dynamo when the two ran in
two threads), and a deep copy of a patched model taken inside a monitor's request (the copy kept the
monitor's hooks and its first forward failed in them)."""

from __future__ import annotations

import copy

import pytest
import torch

import sinkfix
from sinkfix.patch import PatchHandle

from .conftest import tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _ids(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def test_a_compiled_model_served_during_another_models_patch_does_not_retrace():
    """The second model's discovery forward calls the compiled model from a hook (what a serving
    thread does while another thread patches): its graph must not be traced again."""
    torch._dynamo.reset()
    served = tiny_model("llama")
    sinkfix.patch(served, sinkfix.Policy(sink_scale=0.5))
    compiled = torch.compile(served, backend="eager", fullgraph=True)
    ids = _ids()
    with torch.no_grad():
        expected = compiled(input_ids=ids).logits
    other = tiny_model("llama", seed=4)
    seen = []

    def serve_meanwhile(module, args, kwargs):
        with torch.no_grad():
            seen.append(compiled(input_ids=ids).logits)

    hook = other.register_forward_pre_hook(serve_meanwhile, with_kwargs=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            handle = sinkfix.patch(other, sinkfix.Policy(sink_scale=0.3))
    finally:
        hook.remove()
    assert seen and all(torch.equal(logits, expected) for logits in seen)
    assert handle.active and len(handle.layer_policies()) == other.config.num_hidden_layers
    torch._dynamo.reset()


def test_a_deep_copy_taken_inside_a_request_carries_no_monitor_hooks():
    model = tiny_model("llama")
    stock = copy.deepcopy(model)
    ids = _ids(40)
    sinkfix.patch(model, sinkfix.Policy(sink_scale=0.5))
    with sinkfix.monitor(model) as mon, torch.no_grad():
        with mon.request():
            clone = copy.deepcopy(model)
            model(input_ids=ids)
        assert len(mon.records) == 1
    assert PatchHandle.of(clone) is None
    hooks = [h for m in clone.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert hooks == []
    with torch.no_grad():
        assert torch.equal(clone(input_ids=ids).logits, stock(input_ids=ids).logits)
