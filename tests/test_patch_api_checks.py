"""Defects of the patch API and the policy objects found by an outside review, each with the
behaviour it now has: a handle whose patch has ended refuses a ``with`` block, an empty layer list is
refused, bidirectional (encoder) models are refused, bools are refused as numbers and numpy numbers
accepted alike in every field, and a float64 model's sink row stays the stock row."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import ContentSinks, Policy, PolicyError, ResidualClip, UnsupportedModelError
from sinkfix.errors import UsageError
from sinkfix.patch import PatchHandle

from .conftest import tiny_model


def _ids(length: int = 9) -> torch.Tensor:
    return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(5))


# -- a handle whose patch has ended ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["with_block_ended", "removed", "replaced"])
def test_a_handle_whose_patch_ended_refuses_a_with_block(how):
    model, ids = tiny_model("llama"), _ids()
    with torch.no_grad():
        stock = model(ids).logits
        handle = sinkfix.patch(model, Policy(sink_scale=0.2))
        if how == "with_block_ended":
            with handle:
                assert not torch.equal(model(ids).logits, stock)
        elif how == "removed":
            handle.remove()
        else:
            replacement = sinkfix.patch(model, Policy(sink_scale=0.5))
        assert not handle.active
        # before: the block ran, and ran the stock model (or the replacement) under the old handle's name
        with pytest.raises(UsageError, match="no longer in force"):
            with handle:
                pass
        if how == "replaced":
            assert PatchHandle.of(model) is replacement  # the refusal changed nothing
            replacement.remove()
        assert torch.equal(model(ids).logits, stock)


def test_a_handle_of_a_collected_model_is_not_active():
    model = tiny_model("llama")
    handle = sinkfix.patch(model, Policy(sink_scale=0.2))
    assert handle.active and "active" in repr(handle)
    del model
    gc.collect()
    assert not handle.active  # before: True, and the repr said "active" for a model that no longer exists
    assert repr(handle).endswith("removed)")
    with pytest.raises(UsageError, match="its model no longer exists"):
        with handle:
            pass
    handle.remove()  # still a no-op


# -- an empty layer list ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: Policy.parse("sink_scale=0.5,layers="),
                                  lambda: Policy(sink_scale=0.5, layers=()),
                                  lambda: Policy(sink_scale=0.5, layers=[])])
def test_an_empty_layer_list_is_refused(make):
    # before: a policy that corrected no layer while its description said sink_scale=0.5
    with pytest.raises(PolicyError, match="layers is empty"):
        make()


# -- bidirectional (encoder-only) models --------------------------------------------------------------------

def _bert_config(**kwargs) -> tf.BertConfig:
    return tf.BertConfig(vocab_size=97, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                         intermediate_size=32, **kwargs)


def test_an_encoder_with_bidirectional_attention_is_refused_and_left_as_it_was():
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(_bert_config()).eval()
    before = model.config._attn_implementation
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
    # before: patched without a word, [CLS] treated as a causal sink in attention that sees later tokens
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        sinkfix.patch(model, Policy(sink_scale=0.3))
    assert PatchHandle.of(model) is None
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock)


def test_the_same_architecture_as_a_causal_decoder_is_patched():
    torch.manual_seed(0)
    model = tf.BertLMHeadModel(_bert_config(is_decoder=True)).eval()
    with sinkfix.patch(model, Policy(sink_scale=0.3)) as handle:
        assert handle.num_layers == 2


# -- one rule for numbers in every field ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: Policy(sink_scale=True),
    lambda: Policy(sink_scale=[[True, 0.5]]),
    lambda: Policy(sink_scale=np.bool_(True)),
    lambda: Policy(sink_scale=torch.tensor([[True, False]])),
    lambda: Policy(virtual_sink_logit=False),
    lambda: ContentSinks(hidden_sink_scale=False),
    lambda: ResidualClip([2.0, True]),
    lambda: ContentSinks(min_rows=True),
    lambda: ContentSinks(reevaluate_every=1.5),
])
def test_a_bool_or_a_fraction_is_refused_where_a_number_or_an_int_is_expected(make):
    # before: the first six were read as 1.0 / 0.0 (sink_scale=True is the identity)
    with pytest.raises(PolicyError):
        make()


def test_numpy_numbers_are_accepted_in_every_field():
    # before: refused in ContentSinks, accepted in Policy; the threshold's message said np.float32(0.1)
    # was not "a finite number in (0, 1)"
    rule = ContentSinks(threshold=np.float32(0.25), min_rows=np.int64(4), reevaluate_every=np.int32(3))
    assert (rule.threshold, rule.min_rows, rule.reevaluate_every) == (0.25, 4, 3)
    assert type(rule.min_rows) is int and type(rule.reevaluate_every) is int
    assert Policy(n_sink=np.int64(2), sink_scale=np.float32(0.5)).n_sink == 2
    with pytest.raises(PolicyError, match="threshold"):
        ContentSinks(threshold=np.float64("nan"))


# -- float64 models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_float64_models_sink_row_is_the_stock_row(arch):
    model = tiny_model(arch).double()
    ids = torch.tensor([[5]])  # one token: its row sees only the sink
    with torch.no_grad():
        stock = model(ids).logits
        with sinkfix.patch(model, Policy(sink_scale=0.5, virtual_sink_logit=1.0)):
            patched = model(ids).logits
    # before: 1.3e-8 (llama) and 4.3e-8 (gemma3) off, the policy's float32 parameters in float64 attention
    assert torch.equal(patched, stock)


# -- policy specs: numbers as typed, one spelling per policy ---------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("n_sink=1_0", "not an integer"),  # before: 10
    ("n_sink=\u0663", "not an integer"),  # before: 3 (an Arabic-Indic digit)
    ("layers=\u0661", "not a layer"),
    ("sink_scale=1_0", "not a number"),
    ("sink_scale=1e-400", "too small for a float"),  # before: 0, the drop policy
    ("colour=red", "^unknown policy key 'colour'"),  # before: "bad value for 'colour'"
    ("act,sink_scale=0.9", "'act' is a whole policy"),  # before: "'act' is not key=value"
    ("identity,clip=8", "leave it out"),
])
def test_spec_numbers_and_keys_are_read_as_typed(spec, message):
    with pytest.raises(PolicyError, match=message):
        Policy.parse(spec)


def test_minus_zero_is_the_drop_policy_under_one_name():
    # before: described as sink_scale=-0, a second name (and a second bench variant) for drop
    for policy in (Policy.parse("sink_scale=-0"), Policy(sink_scale=-0.0)):
        assert policy == Policy.parse("drop")
        assert policy.describe() == "sink_scale=0"


def test_policies_compare_by_value_whatever_holds_the_numbers():
    # before: a tensor never equalled the same number written as a float or a nested list
    assert Policy(sink_scale=0.5) == Policy(sink_scale=torch.tensor(0.5))
    assert hash(Policy(sink_scale=0.5)) == hash(Policy(sink_scale=torch.tensor(0.5)))
    per_head = [[0.5, 0.25], [1.0, 0.75]]
    assert Policy(sink_scale=per_head) == Policy(sink_scale=torch.tensor(per_head, dtype=torch.float64))
    assert Policy(sink_scale=per_head) != Policy(sink_scale=[[0.5, 0.25], [1.0, 0.5]])
    assert ContentSinks(threshold=torch.tensor(0.25)).threshold == 0.25


def test_two_layer_indices_naming_one_layer_are_refused():
    # before: layers=0:-2 on a 2-layer model listed layer 0 twice and was accepted (layers=1:1 was refused)
    with pytest.raises(PolicyError, match=r"layers \[0, -2\] name the same layer"):
        sinkfix.patch(tiny_model("llama"), Policy.parse("sink_scale=0.5,layers=0:-2"))
    model = tiny_model("llama")
    with sinkfix.patch(model, Policy.parse("sink_scale=0.5,layers=0:-1")) as handle:
        assert handle.num_layers == 2


# -- a profile on a torch.compile wrapper ---------------------------------------------------------------

def test_a_profile_patches_the_compiled_wrapper_of_its_model():
    """The wrapper's class name and the `_orig_mod.` prefix of its parameters made the profile's
    model check see another architecture and other weights (before: ProfileError, also with
    without_weights_check())."""
    from sinkfix.profile import ModelIdentity, Profile

    model, ids = tiny_model("llama"), _ids(10)
    profile = Profile(model=ModelIdentity.of(model), sink_scale=torch.full((2, 4), 0.5))
    with torch.no_grad():
        with sinkfix.patch(model, profile):
            want = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for given in (profile, profile.without_weights_check()):
            with sinkfix.patch(compiled, given):
                torch.testing.assert_close(compiled(input_ids=ids).logits, want, atol=1e-6, rtol=0)


def test_every_public_name_resolves():
    # before: Profile, SinkCache and monitor were public (README) but missing from __all__
    for name in sinkfix.__all__:
        assert getattr(sinkfix, name) is not None, name
    assert {"Profile", "SinkCache", "monitor"} <= set(sinkfix.__all__)


def test_remove_puts_back_an_implementation_that_cannot_be_loaded_now(monkeypatch):
    """A model whose config names flash_attention_2 without flash-attn installed is patched (the patch
    replaces it); remove() raised transformers' ImportError and left "sinkfix" in the config. It puts
    back the setting the model had."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # transformers looks for a kernel on the hub first
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(ids).logits
    model.config._attn_implementation = "flash_attention_2"
    handle = sinkfix.patch(model, sinkfix.Policy(sink_scale=0.5))
    handle.remove()
    assert model.config._attn_implementation == "flash_attention_2" and sinkfix.PatchHandle.of(model) is None
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock)
