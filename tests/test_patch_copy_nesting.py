"""A patched model copied with ``copy.deepcopy``, ``with sinkfix.patch(...)`` blocks inside one
another, and a refused patch on a model whose attention setting lives in a sub-config."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import Policy, ResidualClip, UnsupportedModelError
from sinkfix.errors import MonitorError, UsageError
from sinkfix.patch import PatchHandle

from .conftest import tiny_model

IDS = torch.tensor([[5, 9, 2, 7, 3, 11, 4, 8]])
CLIPPING = Policy(sink_scale=0.0, residual_clip=ResidualClip(1.05))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _patch_traces(model) -> dict:
    """What a patch leaves on a model: per-module state and the number of forward hooks."""
    return {
        "states": sorted(name for name, m in model.named_modules() if hasattr(m, "_sinkfix")),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def test_a_deep_copy_of_a_patched_model_is_an_unpatched_copy():
    model = tiny_model("llama")
    stock, stock_traces = _logits(model), _patch_traces(model)
    handle = sinkfix.patch(model, CLIPPING)
    patched = _logits(model)
    assert not torch.allclose(patched, stock)  # the policy changes the output, so the checks below can fail
    observed = []
    handle.add_observer(observed.append)  # a listener of the original's patch: not copied

    twin = copy.deepcopy(model)

    assert PatchHandle.of(twin) is None and twin.config._attn_implementation == "sdpa"
    assert _patch_traces(twin) == stock_traces  # no state, no clip hooks left on the copy
    torch.testing.assert_close(_logits(twin), stock, rtol=0, atol=0)
    assert observed == []  # the copy's forward reached none of the original's listeners
    # the original keeps its patch, and the copy patches and unpatches on its own
    assert PatchHandle.of(model) is handle and handle.active
    observed.clear()
    torch.testing.assert_close(_logits(model), patched, rtol=0, atol=0)
    assert observed  # the original's observer still runs
    with sinkfix.patch(twin, CLIPPING):
        torch.testing.assert_close(_logits(twin), patched, rtol=0, atol=0)
    torch.testing.assert_close(_logits(twin), stock, rtol=0, atol=0)
    assert PatchHandle.of(model) is handle
    handle.remove()
    torch.testing.assert_close(_logits(model), stock, rtol=0, atol=0)


def test_a_handle_alone_cannot_be_copied():
    model = tiny_model("llama")
    with sinkfix.patch(model) as handle, pytest.raises(UsageError, match="copy the model"):
        copy.deepcopy(handle)


def test_nested_with_blocks_end_as_they_began():
    model = tiny_model("llama")
    stock = _logits(model)
    outer_policy, inner_policy = Policy(sink_scale=0.0), Policy(sink_scale=0.5)
    with sinkfix.patch(model, outer_policy) as outer:
        outer_logits = _logits(model)
        with sinkfix.patch(model, inner_policy) as inner:
            inner_logits = _logits(model)
            assert not outer.active and not torch.allclose(inner_logits, outer_logits)
        # the outer block's policy is back in force, through the outer handle
        assert PatchHandle.of(model) is outer and outer.active and not inner.active
        torch.testing.assert_close(_logits(model), outer_logits, rtol=0, atol=0)
    assert PatchHandle.of(model) is None
    torch.testing.assert_close(_logits(model), stock, rtol=0, atol=0)


def test_remove_unpatches_and_a_removed_patch_is_not_brought_back():
    model = tiny_model("llama")
    stock = _logits(model)
    outer = sinkfix.patch(model, Policy(sink_scale=0.0))
    inner = sinkfix.patch(model, Policy(sink_scale=0.5))
    inner.remove()  # remove() undoes the patch: the model runs its own attention
    assert PatchHandle.of(model) is None
    torch.testing.assert_close(_logits(model), stock, rtol=0, atol=0)

    outer = sinkfix.patch(model, Policy(sink_scale=0.0))
    with sinkfix.patch(model, Policy(sink_scale=0.5)):
        outer.remove()  # the replaced patch, removed inside the block: it stays removed
    assert PatchHandle.of(model) is None and not outer.active
    torch.testing.assert_close(_logits(model), stock, rtol=0, atol=0)


def test_a_monitor_works_again_after_a_with_block_replaced_its_patch():
    model = tiny_model("llama")
    monitor = sinkfix.monitor(model)  # patches with the identity itself
    try:
        with sinkfix.patch(model, Policy(sink_scale=0.5)):
            # named as a newer patch in force, not as a removed one: it comes back when this block ends
            with pytest.raises(MonitorError, match="another patch is in force"):
                with monitor.request():
                    model(IDS)
        with monitor.request():
            model(IDS)
        assert len(monitor.records) == 1 and monitor.records[0]["tokens"] == IDS.shape[1]
    finally:
        monitor.close()
    assert PatchHandle.of(model) is None


def test_a_refused_patch_leaves_sub_configs_as_they_were():
    # MPT keeps its attention setting in a sub-config (attn_config), None on a fresh config
    config = tf.MptConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=97)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    before = (model.config._attn_implementation_internal, model.config.attn_config._attn_implementation_internal)
    with pytest.raises(UnsupportedModelError):
        sinkfix.patch(model)
    after = (model.config._attn_implementation_internal, model.config.attn_config._attn_implementation_internal)
    assert after == before
