"""Content-dependent sinks on the PyTorch path when a hidden sink out-scores every other key by more
than fp32's exponent range: the formula's g = 1 + (1 - beta_H) p_H / (p_S + p_N) became inf (p_S + p_N
underflowed in shares of the whole row): inf and NaN outputs from a gap of about 92 nats, and the
differentiable path returned the stock output past about 105. Each path against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix.ops.content_attention import content_sink_attention_torch
from sinkfix.ops.content_reference import reference_content_sink_attention


def _planted(q_len: int, gap: float):
    """One key (column 3) out-scoring every other key by about ``gap`` nats in every row that sees it."""
    g = torch.Generator().manual_seed(0)
    dim = 16
    q = torch.randn(1, 2, q_len, dim, generator=g, dtype=torch.float64) * 0.1
    k = torch.randn(1, 1, q_len, dim, generator=g, dtype=torch.float64) * 0.1
    v = torch.randn(1, 1, q_len, dim, generator=g, dtype=torch.float64)
    q[..., 0] = 1.0
    k[:, :, 3, 0] = gap * dim ** 0.5
    hidden = torch.zeros(1, 2, q_len, dtype=torch.bool)
    hidden[..., 3] = True
    return q, k, v, hidden


@pytest.mark.parametrize("gap", [60.0, 95.0, 110.0, 150.0])
@pytest.mark.parametrize("path", ["fused", "few rows", "differentiable"])
def test_a_hidden_sink_far_above_every_other_key(path, gap):
    q_len = 6 if path == "few rows" else 12
    q, k, v, hidden = _planted(q_len, gap)
    kwargs = dict(hidden_beta=torch.tensor([0.4, 0.7], dtype=torch.float64), hidden=hidden, causal=True,
                  sink_cols=torch.zeros(1, 1, dtype=torch.long), beta=torch.tensor([0.8, 0.6], dtype=torch.float64))
    want, _, _ = reference_content_sink_attention(q, k, v, **kwargs)
    q32, k32, v32 = q.float(), k.float(), v.float()
    if path == "differentiable":
        q32.requires_grad_(True)
    got = content_sink_attention_torch(q32, k32, v32, **{**kwargs, "hidden_beta": kwargs["hidden_beta"].float(),
                                                        "beta": kwargs["beta"].float()}).out
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.detach().double(), want, atol=2e-6, rtol=0)


def test_act_on_a_model_with_a_dominant_token_stays_finite():
    """A tiny Llama whose token 50 out-scores every other key in layer 0 (gap above 92 nats):
    Policy.act() gave NaN logits in every row but the first; the stock model is finite."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attention_bias=True, initializer_range=0.2)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    dim, token = 16, 50
    with torch.no_grad():
        attention, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
        direction = model.model.embed_tokens.weight[token] * norm.weight
        direction = direction / direction.norm()
        for head in range(4):
            attention.q_proj.bias[head * dim + dim // 2 - 1] = 4.0
        for kv_head in range(2):
            attention.k_proj.weight[kv_head * dim + dim // 2 - 1] += 8.0 * direction
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    ids[ids == token] = 51
    ids[:, [9, 17, 30]] = token
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
        with sinkfix.patch(model, sinkfix.Policy.act()):
            assert torch.isfinite(model(input_ids=ids).logits).all()


def test_given_sink_sets_of_another_shape_or_layer_are_refused():
    """use_sink_sets checked dtype and rank only: a set of another batch or head count failed as a raw
    broadcast error inside the attention, and one for a layer the model lacks was ignored."""
    from transformers import DynamicCache

    from sinkfix.errors import PolicyError
    from sinkfix.integrations.content_sinks import use_sink_sets

    from .conftest import tiny_model

    model = tiny_model("llama")  # 2 layers, 4 query heads
    ids = torch.randint(3, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    with sinkfix.patch(model, sinkfix.Policy.act()), torch.no_grad():
        for sets, message in (({0: torch.zeros(2, 5, 21, dtype=torch.bool)}, "2 sequences x 5 query heads"),
                              ({0: torch.zeros(3, 4, 21, dtype=torch.bool)}, "3 sequences x 4 query heads")):
            with pytest.raises(PolicyError, match=message):
                model(input_ids=ids, past_key_values=use_sink_sets(DynamicCache(config=model.config), sets))
        with pytest.raises(PolicyError, match="layer 7: the cache has layers 0..1"):
            use_sink_sets(DynamicCache(config=model.config), {7: torch.ones(2, 4, 21, dtype=torch.bool)})
        fitting = {0: torch.zeros(2, 4, 21, dtype=torch.bool)}
        model(input_ids=ids, past_key_values=use_sink_sets(DynamicCache(config=model.config), fitting))


def test_a_misspelt_content_sinks_key_in_a_profile_is_refused(tmp_path):
    import json

    from sinkfix.errors import ProfileError
    from sinkfix.policy import ContentSinks
    from sinkfix.profile import ModelIdentity, Profile

    from .conftest import tiny_model

    model = tiny_model("llama")
    rule = ContentSinks(threshold=0.1, hidden_sink_scale=torch.full((2, 4), 0.5, dtype=torch.float64), min_rows=3)
    profile = Profile(ModelIdentity.of(model), torch.full((2, 4), 0.9, dtype=torch.float64), content_sinks=rule)
    data = profile.to_dict()
    path = tmp_path / "good.json"
    path.write_text(json.dumps(data))
    assert Profile.load(path).content_sinks.min_rows == 3
    data["policy"]["content_sinks"]["min_row"] = 32  # for min_rows: was ignored, the rule ran with 1
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="unknown key.*'min_row'"):
        Profile.load(path)
