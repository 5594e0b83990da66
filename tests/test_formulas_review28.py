"""Formulas against the code in the cases review 28 found wrong: a sink column listed twice on the
fused PyTorch content path, the monitor's sink share and value drain where the prompt's sink set names
no key, and its dormancy with several sink positions and a virtual sink logit."""

from __future__ import annotations

import math

import pytest
import torch

import sinkfix
from sinkfix.analysis.metrics import measure_extreme_tokens
from sinkfix.ops.content_attention import content_sink_attention
from sinkfix.ops.content_reference import reference_content_sink_attention

from .conftest import tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("cols", [[[0, 0]], [[0, -1, 0]], [[3, 0, 3]]])
def test_a_repeated_sink_column_counts_once_on_the_fused_content_path(cols):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)  # Q > 8: fused
    hidden = torch.zeros(1, 2, 12, dtype=torch.bool)
    hidden[:, :, 5] = True
    beta, hidden_beta = torch.tensor([0.5, 0.8]), torch.tensor([0.3, 0.6])
    sink_cols = torch.tensor(cols)
    ref, _, _ = reference_content_sink_attention(q.double(), k.double(), v.double(), causal=True, sink_cols=sink_cols,
                                                 beta=beta.double(), hidden=hidden, hidden_beta=hidden_beta.double())
    got = content_sink_attention(q, k, v, backend="torch", causal=True, sink_cols=sink_cols, beta=beta,
                                 hidden=hidden, hidden_beta=hidden_beta).out
    assert (got.double() - ref).abs().max() < 2e-6


def test_a_prompt_whose_sink_set_names_no_key_has_no_sink_share_or_drain():
    """Policy(n_sink=0, extra_sink_positions=(18,)): the 24-token prompt has its sink, the 10-token one
    (left-padded by 14) has none: null, as inspect reports it, not 0 and not a padding token's drain."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(2, 97, (1, 24), generator=g), torch.randint(2, 97, (1, 10), generator=g)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 14, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :14] = 0
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy(n_sink=0, extra_sink_positions=(18,))):
        alone = measure_extreme_tokens(model, [short[0]])
        assert torch.isnan(alone.sink_share).all() and torch.isnan(alone.value_drain).all()
        with sinkfix.monitor(model) as mon:
            mon.forward(input_ids=batch, attention_mask=mask, use_cache=False)
    with_sink, without = mon.records
    assert all(x is None for layer in without["sink_share"] for x in layer)
    assert all(x is None for layer in without["value_drain"] for x in layer)
    assert all(x is not None and x > 0 for layer in with_sink["sink_share"] for x in layer)
    assert all(x is not None and math.isfinite(x) for layer in with_sink["value_drain"] for x in layer)
    # the dormancy is the hidden-sink part alone there, and stays defined
    assert all(x is not None for layer in without["dormancy"] for x in layer)


def test_dormancy_of_several_sinks_with_a_virtual_logit_matches_fp64():
    """Each row's sink probabilities carry its own zero-value share; pooled without it the dormancy was
    1e-3 off with a virtual logit of 2. Reference: the patched model's own attention probabilities
    (they include the virtual logit) and fp64 drain weights of its values, hidden sinks switched off."""
    model = tiny_model("llama")
    ids = torch.randint(2, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    sinks = [0, 12]
    policy = sinkfix.Policy(extra_sink_positions=(12,), virtual_sink_logit=2.0)
    values = {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out.double()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad(), sinkfix.patch(model, policy):
        attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    for hook in hooks:
        hook.remove()
    cfg = model.config
    kv, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    expected = []
    for index, probs in enumerate(attentions):
        probs, n = probs[0].double(), probs.shape[-1]
        norms = values[index][0].view(n, kv, dim).norm(dim=-1).T
        weights = (1 - norms / norms.median(-1).values[:, None]).clamp(0, 1)
        weights = weights.repeat_interleave(cfg.num_attention_heads // kv, 0)
        rows = [i for i in range(n) if any(j not in sinks for j in range(i + 1))]
        expected.append((probs[:, rows][:, :, sinks] * weights[:, None, sinks]).sum(-1).mean(-1))
    with torch.no_grad(), sinkfix.patch(model, policy), \
            sinkfix.monitor(model, sample_rows=64, hidden_sink_threshold=0.99) as mon:
        mon.forward(input_ids=ids, use_cache=False)
    record = mon.records[0]
    assert sum(map(sum, record["hidden_sinks"])) == 0
    torch.testing.assert_close(torch.tensor(record["dormancy"], dtype=torch.float64), torch.stack(expected),
                               atol=2e-6, rtol=0)
