"""Models built from one config object share it, and with it the attention setting that routes
them to sinkfix: one model's patch must not end another's, and the setting comes back when the last
patch on the config ends."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import PatchHandle, Policy
from sinkfix.integrations.attention import AttentionDropoutError

from .conftest import tiny_config


def _twins():
    config = tiny_config("llama")
    config.attention_dropout = 0.1
    torch.manual_seed(0)
    a = tf.AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(1)
    b = tf.AutoModelForCausalLM.from_config(config).eval()
    assert a.config is b.config
    return a, b


IDS = torch.tensor([[5, 17, 3, 44, 8, 61, 29, 12, 70]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("first_removed", ["a", "b"])
def test_removing_one_patch_keeps_the_other_model_patched_and_the_last_restores(one_thread, first_removed):
    a, b = _twins()
    original = a.config._attn_implementation
    stock = {"a": _logits(a), "b": _logits(b)}
    handles = {"a": sinkfix.patch(a, Policy(sink_scale=0.5)), "b": sinkfix.patch(b, Policy(sink_scale=0.1))}
    models = {"a": a, "b": b}
    patched = {name: _logits(m) for name, m in models.items()}
    assert not torch.equal(patched["a"], stock["a"]) and not torch.equal(patched["b"], stock["b"])
    other = "b" if first_removed == "a" else "a"

    handles[first_removed].remove()
    assert handles[other].active and PatchHandle.of(models[other]) is handles[other]
    assert torch.equal(_logits(models[other]), patched[other])  # still patched
    assert torch.equal(_logits(models[first_removed]), stock[first_removed])

    handles[other].remove()
    assert a.config._attn_implementation == original  # was left on "sinkfix"
    for name, model in models.items():
        assert torch.equal(_logits(model), stock[name])
    a.train()
    a(input_ids=IDS, use_cache=False)  # the stock attention trains with dropout again


def test_with_blocks_on_two_models_sharing_a_config(one_thread):
    a, b = _twins()
    original = a.config._attn_implementation
    stock_b = _logits(b)
    with sinkfix.patch(a, Policy(sink_scale=0.5)):
        with sinkfix.patch(b, Policy(sink_scale=0.1)) as hb:
            inner_b = _logits(b)
        assert not hb.active and torch.equal(_logits(b), stock_b)
        assert a.config._attn_implementation == "sinkfix"  # a's patch is still in force
        with sinkfix.patch(b, Policy(sink_scale=0.1)):
            assert torch.equal(_logits(b), inner_b)
    assert a.config._attn_implementation == original


def test_an_unpatched_model_sharing_the_config_computes_stock_and_says_why_it_cannot_train(one_thread):
    a, b = _twins()
    stock_b = _logits(b)
    with sinkfix.patch(a, Policy(sink_scale=0.5)):
        assert torch.equal(_logits(b), stock_b)
        b.train()
        with pytest.raises(AttentionDropoutError, match="shares its config object with a patched model"):
            b(input_ids=IDS, use_cache=False)
        b.eval()


def test_a_refused_patch_on_a_shared_config_leaves_the_other_patch_in_force(one_thread):
    a, b = _twins()
    ha = sinkfix.patch(a, Policy(sink_scale=0.5))
    patched_a = _logits(a)
    with pytest.raises(sinkfix.PolicyError):
        sinkfix.patch(b, Policy(sink_scale=torch.full((5, 4), 0.5)))  # 5 layers: b has 2
    assert ha.active and a.config._attn_implementation == "sinkfix"
    assert torch.equal(_logits(a), patched_a)
    ha.remove()
    assert a.config._attn_implementation == "sdpa"


def test_a_collected_patched_model_gives_the_shared_setting_back(one_thread):
    import gc

    a, b = _twins()
    config = a.config
    original = config._attn_implementation
    stock_b = _logits(b)
    handle = sinkfix.patch(a, Policy(sink_scale=0.5))
    del a, handle
    gc.collect()
    assert config._attn_implementation == original  # stayed "sinkfix" for good
    b.train()
    b(input_ids=IDS, use_cache=False)  # the stock attention trains with dropout
    b.eval()
    with sinkfix.patch(b, Policy(sink_scale=0.1)):
        assert config._attn_implementation == "sinkfix"
    assert config._attn_implementation == original and torch.equal(_logits(b), stock_b)


def test_a_collected_model_leaves_a_sibling_patch_in_force(one_thread):
    import gc

    a, b = _twins()
    config = a.config
    sinkfix.patch(a, Policy(sink_scale=0.5))
    hb = sinkfix.patch(b, Policy(sink_scale=0.1))
    patched_b = _logits(b)
    del a
    gc.collect()
    assert hb.active and config._attn_implementation == "sinkfix" and torch.equal(_logits(b), patched_b)
    hb.remove()
    assert config._attn_implementation == "sdpa"
