"""The patch API on tiny random models: per model, reversible, exact under identity, loud on bad input."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix.patch import PatchHandle
from sinkfix import Policy, ResidualClip, UnsupportedModelError
from sinkfix.integrations.attention import attention_forward

from .conftest import ARCHS, tiny_model


def _batch(seed=0, pad=3, length=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_reproduces_stock_and_policies_take_effect(arch):
    model = tiny_model(arch)
    ids, mask = _batch()
    real = mask.bool()
    stock = model(ids, attention_mask=mask).logits
    with sinkfix.patch(model, Policy()):
        identity = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(identity[real], stock[real], atol=1e-4, rtol=0)
    # a non-identity policy must change the output: guards against a silent no-op patch
    with sinkfix.patch(model, Policy(sink_scale=0.5)) as handle:
        corrected = model(ids, attention_mask=mask).logits
        assert handle.num_layers == 2
    assert (corrected[real] - stock[real]).abs().max() > 1e-3
    assert torch.equal(model(ids, attention_mask=mask).logits, stock)  # removed: bit-exact


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gptoss"])
def test_identity_matches_eager_too(arch):
    model = tiny_model(arch)
    ids, mask = _batch()
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    with sinkfix.patch(model):
        identity = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(identity[mask.bool()], eager[mask.bool()], atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "eager"  # restored to what it was


@torch.no_grad()
def test_left_padding_puts_the_sink_on_the_first_real_token():
    model = tiny_model("llama")
    ids, mask = _batch(pad=4)
    with sinkfix.patch(model, Policy(sink_scale=0.3, virtual_sink_logit=0.0)):
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 4:]).logits
    torch.testing.assert_close(batched[1, 4:], alone[0], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gptoss"])
def test_generate_greedy_identical_to_stock_under_identity(arch):
    model = tiny_model(arch)
    ids, mask = _batch(length=6)
    runs = {
        "single": dict(input_ids=ids[:1]),
        "left_padded": dict(input_ids=ids, attention_mask=mask),
        "static": dict(input_ids=ids[:1], cache_implementation="static"),
    }
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    stock = {name: model.generate(**run, **kwargs) for name, run in runs.items()}
    with sinkfix.patch(model):
        for name, run in runs.items():
            assert torch.equal(model.generate(**run, **kwargs), stock[name]), name


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gptoss"])
def test_cached_decode_matches_full_forward_under_a_policy(arch):
    """KV-cache decoding (incl. sliding layers whose cache drops token 0) must apply the policy exactly
    as a full forward over the same tokens does, with and without left padding."""
    model = tiny_model(arch)
    ids = torch.randint(1, 97, (1, 4), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with sinkfix.patch(model, Policy(sink_scale=0.3, virtual_sink_logit=0.5)):
        out = model.generate(ids, **kwargs)
        incremental = torch.stack(out.logits, 1)[0]
        full = model(out.sequences).logits[0, ids.shape[1] - 1 : -1]
        padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
        out_pad = model.generate(padded, attention_mask=(padded != 0).long(), **kwargs)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(out_pad.logits, 1)[0], incremental, atol=1e-5, rtol=0)


@torch.no_grad()
def test_output_attentions_returns_the_corrected_probabilities():
    model = tiny_model("llama")
    ids, mask = _batch(pad=2)
    model.set_attn_implementation("eager")
    stock = model(ids, attention_mask=mask, output_attentions=True).attentions
    beta = 0.25
    with sinkfix.patch(model, Policy(sink_scale=beta)):
        fixed = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(fixed) == 2
    for layer, (p_stock, p_fixed) in enumerate(zip(stock, fixed)):
        # batch 0: sink = column 0; batch 1 (2 pad columns): sink = column 2; rows after the sink row
        for b, sink in ((0, 0), (1, 2)):
            rows = slice(sink + 1, None)
            torch.testing.assert_close(p_fixed[b, :, rows].sum(-1), torch.ones_like(p_fixed[b, :, rows, 0]))
            if layer > 0:
                continue  # later layers see corrected inputs, so only layer 0 compares with stock
            torch.testing.assert_close(p_fixed[b, :, rows, sink], beta * p_stock[b, :, rows, sink], atol=1e-5, rtol=0)
            # the freed mass goes to the other keys in proportion to their weight
            others = p_stock[b, :, rows].clone()
            others[..., sink] = 0
            scale = (1 - beta * p_stock[b, :, rows, sink]) / others.sum(-1)
            expect = others * scale[..., None]
            expect[..., sink] = beta * p_stock[b, :, rows, sink]
            torch.testing.assert_close(p_fixed[b, :, rows], expect, atol=1e-5, rtol=0)
            # the sink's own row is untouched
            torch.testing.assert_close(p_fixed[b, :, sink], p_stock[b, :, sink], atol=1e-6, rtol=0)


@torch.no_grad()
def test_sliding_window_layers_leave_rows_that_cannot_see_the_sink_untouched():
    """Documented rule: on a sliding-window layer, a query whose window no longer contains the sink
    runs plain softmax; rows that still see the sink get the policy."""
    model = tiny_model("mistral")  # every layer slides, window 5
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    model.set_attn_implementation("eager")
    stock = model(ids, output_attentions=True).attentions[0]
    with sinkfix.patch(model, Policy(sink_scale=0.0)):
        fixed = model(ids, output_attentions=True).attentions[0]  # layer 0: same inputs as stock
    window = model.config.sliding_window
    torch.testing.assert_close(fixed[0, :, window:], stock[0, :, window:], atol=1e-6, rtol=0)
    assert (fixed[0, :, 1:window, 0] == 0).all()  # dropped where the sink is visible
    assert (stock[0, :, 1:window, 0] > 0).all()


@torch.no_grad()
def test_patches_are_per_model():
    a, b, c = tiny_model("llama", 0), tiny_model("llama", 0), tiny_model("llama", 0)
    ids, _ = _batch()
    stock = c(ids).logits
    ha = sinkfix.patch(a, Policy(sink_scale=0.2))
    hb = sinkfix.patch(b, Policy(sink_scale=0.9))
    out_a, out_b, out_c = a(ids).logits, b(ids).logits, c(ids).logits
    assert (out_a - out_b).abs().max() > 1e-3
    assert torch.equal(out_c, stock)  # the unpatched model is never affected
    ha.remove()
    assert torch.equal(a(ids).logits, stock)
    assert torch.equal(b(ids).logits, out_b)  # removing one patch leaves the other alone
    hb.remove()


@torch.no_grad()
def test_patching_twice_replaces_and_remove_is_idempotent():
    model = tiny_model("llama")
    ids, _ = _batch()
    stock = model(ids).logits
    first = sinkfix.patch(model, Policy(sink_scale=0.2))
    second = sinkfix.patch(model, Policy(sink_scale=0.7))
    assert not first.active and second.active
    with sinkfix.patch(model, Policy(sink_scale=0.7)):
        expect = model(ids).logits
    second = sinkfix.patch(model, Policy(sink_scale=0.7))
    torch.testing.assert_close(model(ids).logits, expect)
    first.remove()  # stale handle: no effect
    torch.testing.assert_close(model(ids).logits, expect)
    second.remove()
    second.remove()
    assert torch.equal(model(ids).logits, stock)
    assert model.config._attn_implementation == "sdpa"


def test_patch_then_delete_the_model():
    model = tiny_model("llama")
    handle = sinkfix.patch(model, Policy(sink_scale=0.5))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the handle does not keep the model alive
    handle.remove()  # and removing afterwards is harmless
    assert not handle.active


@torch.no_grad()
def test_from_pretrained_with_sinkfix_implementation_is_identity_until_patched(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    ids, mask = _batch()
    stock = model(ids, attention_mask=mask).logits
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sinkfix").eval()
    assert loaded.config._attn_implementation == "sinkfix"
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits[mask.bool()], stock[mask.bool()], atol=1e-5, rtol=0)
    with sinkfix.patch(loaded, Policy(sink_scale=0.5)):
        assert (loaded(ids).logits - model(ids).logits).abs().max() > 1e-3


def _refused_and_restored(model, match):
    before = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=match):
        sinkfix.patch(model, Policy(sink_scale=0.5))
    assert model.config._attn_implementation == before
    assert PatchHandle.of(model) is None


class _OwnAttentionModel(tf.PreTrainedModel):
    """A model that accepts any attention implementation and then ignores it: its attention is its own
    softmax, the silent no-op that transformers only warns about."""

    config_class = tf.LlamaConfig
    _supports_attention_backend = True
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.post_init()

    def forward(self, input_ids=None, use_cache=None, **kwargs):
        q, k, v = self.qkv(self.embed(input_ids)).chunk(3, dim=-1)
        causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        return scores.softmax(-1) @ v


def test_model_that_ignores_the_implementation_switch_is_refused_and_restored():
    model = _OwnAttentionModel(tf.LlamaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2)).eval()
    _refused_and_restored(model, "_OwnAttentionModel.*AttentionInterface")


def test_architecture_with_its_own_attention_is_refused_and_restored():
    # GPT-Neo computes attention itself in every transformers release sinkfix supports
    model = tf.AutoModelForCausalLM.from_config(
        tf.GPTNeoConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4,
                        attention_types=[[["global", "local"], 1]], window_size=8)
    ).eval()
    _refused_and_restored(model, "GPTNeoForCausalLM")


def test_alibi_position_bias_is_refused_and_restored():
    """ALiBi Falcon adds its per-head position bias to the attention mask. transformers 5.25 routes
    Falcon through the attention interface (earlier releases do not): either way the patch must refuse
    it rather than drop the bias."""
    model = tf.AutoModelForCausalLM.from_config(
        tf.FalconConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    ).eval()
    _refused_and_restored(model, "FalconForCausalLM.*(AttentionInterface|ALiBi)")


def _falcon_routes_attention() -> bool:
    from transformers.models.falcon import modeling_falcon
    return hasattr(modeling_falcon, "ALL_ATTENTION_FUNCTIONS")


@torch.no_grad()
@pytest.mark.skipif(not _falcon_routes_attention(),
                    reason="this transformers release computes Falcon attention itself (routed from 5.25 on)")
@pytest.mark.parametrize("layout", ["multi_query", "new_decoder_architecture"])
def test_rotary_falcon_is_patched_where_transformers_routes_it(layout):
    torch.manual_seed(0)
    extra = dict(new_decoder_architecture=True, num_kv_heads=2) if layout == "new_decoder_architecture" else {}
    model = tf.AutoModelForCausalLM.from_config(
        tf.FalconConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **extra)
    ).eval()
    ids, mask = _batch()
    real = mask.bool()
    stock = model(ids, attention_mask=mask).logits
    stock_generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    with sinkfix.patch(model, Policy()):
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], stock[real], atol=1e-4, rtol=0)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False), stock_generated)
    with sinkfix.patch(model, Policy(sink_scale=0.5)) as handle:
        corrected = model(ids, attention_mask=mask).logits
        assert handle.num_layers == 2
    assert (corrected[real] - stock[real]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_sequences_are_refused_by_a_policy_and_exact_under_identity(arch):
    """Without a cache and a mask, position ids that restart inside a row are transformers' packed
    format: each sequence attends only to itself. A sink policy would miss the later sequences'
    sinks, so it refuses; the identity reproduces stock, and with a cache (no packing) nothing is
    refused."""
    model = tiny_model(arch)
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randint(2, 97, (1, 7), generator=generator), torch.randint(2, 97, (1, 9), generator=generator)
    packed = torch.cat([first, second], dim=1)
    restart = torch.cat([torch.arange(7), torch.arange(9)])[None]
    stock = model(packed, position_ids=restart, use_cache=False).logits
    torch.testing.assert_close(stock[0, 7:], model(second, use_cache=False).logits[0], atol=1e-5, rtol=0)
    with sinkfix.patch(model, Policy()):
        torch.testing.assert_close(model(packed, position_ids=restart, use_cache=False).logits, stock,
                                   atol=1e-5, rtol=0)
    with sinkfix.patch(model, Policy(sink_scale=0.5)):
        with pytest.raises(NotImplementedError, match="packed sequences"):
            model(packed, position_ids=restart, use_cache=False)
        one_sequence = torch.arange(16)[None]
        plain = model(packed, use_cache=False).logits
        torch.testing.assert_close(model(packed, position_ids=one_sequence, use_cache=False).logits, plain,
                                   atol=1e-5, rtol=0)
        model(packed, position_ids=restart)  # with a cache transformers does not pack: one sequence, no refusal
        reused = torch.arange(16)[None]
        model(packed, position_ids=reused, use_cache=False)
        reused[0, 7:] = torch.arange(9)  # the same tensor written in place: judged again
        with pytest.raises(NotImplementedError, match="packed sequences"):
            model(packed, position_ids=reused, use_cache=False)


@torch.no_grad()
def test_padding_with_restarting_position_ids_is_not_taken_for_packing():
    """generate's position ids restart at the first real token of a left-padded row (and a
    right-padded row's pads restart too); with a dense mask (a 4-D one from the caller) that must
    not read as packed sequences."""
    model = tiny_model("llama")
    ids, mask = _batch(pad=3, length=10)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate computes
    dense = mask.bool()[:, None, None, :] & torch.ones(10, 10, dtype=torch.bool).tril()
    right_ids, right_mask = ids.clone(), mask.clone()
    right_ids[1], right_mask[1] = ids[1].roll(-3), mask[1].roll(-3)  # row 1's three pads moved to its end
    right_positions = (right_mask.cumsum(-1) - 1).masked_fill(right_mask == 0, 1)
    right_dense = right_mask.bool()[:, None, None, :] & torch.ones(10, 10, dtype=torch.bool).tril()
    with sinkfix.patch(model, Policy(sink_scale=0.5)):
        from_2d = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        from_4d = model(ids, attention_mask=dense, position_ids=positions, use_cache=False).logits
        right = model(right_ids, attention_mask=right_dense, position_ids=right_positions, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(from_4d[real], from_2d[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(right[1, :7], from_2d[1, 3:], atol=1e-5, rtol=0)


def test_float_masks_keep_or_drop_keys_and_refuse_a_bias():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[1, :, :, 0] = False  # a padded first key in row 1
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    from_bool, _ = attention_forward(module, q, k, v, keep)
    from_float, _ = attention_forward(module, q, k, v, additive)
    torch.testing.assert_close(from_float, from_bool, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="bias"):
        attention_forward(module, q, k, v, additive + 0.5 * keep)
    with pytest.raises(NotImplementedError, match="per-head"):
        attention_forward(module, q, k, v, additive.expand(2, 4, 5, 5))


def test_bad_policy_shape_is_refused_and_model_restored():
    model = tiny_model("llama")
    with pytest.raises(sinkfix.PolicyError, match=r"\[2, 4\]"):
        sinkfix.patch(model, Policy(sink_scale=torch.ones(3, 4)))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="Policy or sinkfix.Profile"):
        sinkfix.patch(model, {"sink_scale": 0.5})


@pytest.mark.parametrize("kwarg", ["indices", "position_bias", "sinks", "block_indices"])
def test_unimplemented_semantic_kwargs_raise(kwarg):
    module = torch.nn.Module()
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match=kwarg):
        attention_forward(module, q, q, q, None, **{kwarg: torch.zeros(1)})


def test_attention_dropout_is_refused():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="inference-only"):
        attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)


def test_mixed_input_dtypes_run_in_the_widest():
    """Under torch.autocast v arrives in bfloat16 while rotary embeddings have promoted q and k to
    float32: the call must give what float32 inputs give, not fail on the kernels' one-dtype rule."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, 5, 8, generator=generator) for _ in range(2))
    v = torch.randn(1, 2, 5, 8, generator=generator).to(torch.bfloat16)
    k = k[:, :2]
    mixed, _ = attention_forward(torch.nn.Module(), q, k, v, None)
    plain, _ = attention_forward(torch.nn.Module(), q, k, v.float(), None)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    model = tiny_model("llama")
    ids = torch.randint(2, 90, (1, 12))
    with sinkfix.patch(model, Policy(sink_scale=0.8)), torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=ids).logits.float()
        full = model(input_ids=ids).logits
    assert torch.allclose(autocast, full, atol=0.05 * float(full.abs().max()))


def test_triton_backend_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="backend='triton' needs"):
        sinkfix.patch(model, Policy(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        sinkfix.patch(model, Policy(), backend="cuda")
    assert model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_residual_clip_relative_caps_tokens_and_exempts_the_sink():
    model = tiny_model("llama")
    ids, mask = _batch(pad=3)
    stock = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    with sinkfix.patch(model, Policy(residual_clip=ResidualClip(1.05))):
        clipped = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # hidden_states[l + 1] is the output of decoder layer l, as the next layer sees it (prepend=True)
    layer0 = clipped[1]
    for b, first in ((0, 0), (1, 3)):
        norms = layer0[b, first:].norm(dim=-1)
        median = norms[1:].median()
        assert (norms[1:] <= 1.05 * median * (1 + 1e-5)).all()
        torch.testing.assert_close(layer0[b, first], stock[1][b, first])  # the sink is exempt
    assert (layer0[0] - stock[1][0]).abs().max() > 1e-4  # and something was clipped


@torch.no_grad()
def test_residual_clip_absolute_clamps_the_sink_to_its_norm_never_zero():
    model = tiny_model("llama")
    ids, _ = _batch()
    stock = model(ids, output_hidden_states=True).hidden_states[1]
    target = stock[:, 0].norm(dim=-1).min().item() / 2
    with sinkfix.patch(model, Policy(residual_clip=ResidualClip(1e6, mode="absolute", sink_norm=target))):
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
    # hidden_states[1] is decoder layer 0's output (the last entry would be after the final norm)
    torch.testing.assert_close(hidden[:, 0].norm(dim=-1), torch.full((2,), target))
    torch.testing.assert_close(hidden[:, 1:], stock[:, 1:])  # non-sink tokens under the huge cap: untouched


@torch.no_grad()
def test_accelerate_offload_patches_and_runs(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    ids, mask = _batch()
    offloaded = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())  # some layers really live on disk
    stock = offloaded(ids, attention_mask=mask).logits
    with sinkfix.patch(offloaded, Policy(sink_scale=0.5)):
        fixed_offloaded = offloaded(ids, attention_mask=mask).logits
    with sinkfix.patch(model, Policy(sink_scale=0.5)):
        fixed_plain = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(fixed_offloaded, fixed_plain, atol=1e-5, rtol=0)
    assert torch.equal(offloaded(ids, attention_mask=mask).logits, stock)


@torch.no_grad()
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_hand_written_decode_loop_with_either_cache_keyword(arch, keyword):
    """transformers 5.24 renames the cache keyword `past_key_values` to `cache` (the old one is
    deprecated): a hand-written decode loop under a policy gives the full forward's logits with
    either name."""
    from transformers import DynamicCache

    model = tiny_model(arch)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with sinkfix.patch(model, Policy(sink_scale=0.4, virtual_sink_logit=0.3)):
        unclipped = model(ids).logits
    # tiny random models have residual norms ~0.16; an absolute cap is per token, so a decode step
    # clips exactly as the full forward does
    clip = ResidualClip(0.12, "absolute")
    with sinkfix.patch(model, Policy(sink_scale=0.4, virtual_sink_logit=0.3, residual_clip=clip)):
        full = model(ids).logits
        assert (unclipped - full).abs().max() > 1e-3  # the clip acts
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :4], use_cache=True, **{keyword: cache}).logits]
        for i in range(4, ids.shape[1]):
            steps.append(model(ids[:, i : i + 1], use_cache=True, **{keyword: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1]
