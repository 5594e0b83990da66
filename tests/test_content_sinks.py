"""Content-dependent sinks (ACT's rule): the policy, the fp64 reference against an independent
literal implementation of the rule, and the PyTorch path against the reference on awkward shapes
with planted hidden sinks."""

from __future__ import annotations

import pytest
import torch

from sinkfix import ContentSinks, Policy, PolicyError
from sinkfix.ops.content_reference import (
    column_stats_reference, decide_hidden_sinks, reference_content_sink_attention,
)
from sinkfix.ops.reference import reference_sink_attention, visibility_mask

# fp32 path vs fp64 reference, as in test_ops_torch.py (measured max error ~1e-6 here)
ATOL = 2e-5
PLANTED = (5, 11)  # key columns made into hidden sinks in every head


def _planted(batch, q_heads, kv_heads, q_len, k_len, dim, seed=0):
    """Random q/k/v where every query shares a direction u, and key 0 and the keys at PLANTED
    point along u: key 0 takes ~0.6-0.85 of each row, each planted key ~0.15-0.75 (column means)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    u = torch.randn(batch, 1, 1, dim, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    q += 3.0 * u
    for col, length in ((0, 2.4), *((c, 2.0) for c in PLANTED)):
        if col < k_len:
            k[:, :, col] = length * dim ** 0.5 * u[:, :, 0]
    return q, k, v


def _literal_act(q, k, v, beta, threshold, scale=None, **layout):
    """ACT as the issue writes it, directly on the stock probability matrix (fp64): no split, no
    log-sum-exp, no shared code with the library."""
    b, hq, ql, d = q.shape
    kl = k.shape[2]
    group = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    scores = q.double() @ kk.transpose(-1, -2) * scale
    vis = visibility_mask(b, ql, kl, **layout).expand(b, hq, ql, kl)
    p = torch.softmax(scores.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0) * vis
    out = torch.zeros(b, hq, ql, d, dtype=torch.float64)
    hidden_all = torch.zeros(b, hq, kl, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            seen = vis[bi, h].sum(0)
            sinks = [j for j in range(kl) if seen[j] > 0 and p[bi, h, :, j].sum() / seen[j] > threshold]
            hidden = sinks[1:]  # the first sink is kept
            hidden_all[bi, h, hidden] = True
            pn = p[bi, h].clone()
            for i in range(ql):
                others = [j for j in range(kl) if vis[bi, h, i, j] and j not in hidden]
                mass_h = sum(p[bi, h, i, j] for j in hidden if vis[bi, h, i, j])
                if not others or mass_h == 0:
                    continue
                mass_o = sum(p[bi, h, i, j] for j in others)
                for j in hidden:
                    pn[i, j] = beta * p[bi, h, i, j]
                for j in others:
                    pn[i, j] = p[bi, h, i, j] + (1 - beta) * mass_h * p[bi, h, i, j] / mass_o
            out[bi, h] = pn @ vv[bi, h]
    return out, hidden_all


# -- the policy ------------------------------------------------------------------------------------
def test_act_constructor_has_the_published_defaults():
    pol = Policy.act()
    assert pol.content_sinks == ContentSinks(threshold=0.1, hidden_sink_scale=0.4)
    assert pol.sink_scale == 1.0 and not pol.is_identity
    (layer,) = pol.resolve(1, [3])
    assert layer.content.threshold == 0.1 and torch.equal(layer.content.beta, torch.full((3,), 0.4, dtype=torch.float64))
    assert bool(layer.content.heads.all()) and not layer.attention_is_identity
    assert Policy.parse("act") == pol
    assert Policy.parse("hidden_sink_scale=0.5,hidden_sink_threshold=0.2").content_sinks == ContentSinks(0.2, 0.5)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"), "0.1", True])
def test_threshold_outside_the_open_unit_interval_is_refused(threshold):
    with pytest.raises(PolicyError, match="threshold"):
        ContentSinks(threshold=threshold)
    if isinstance(threshold, float):
        with pytest.raises(PolicyError, match="threshold"):
            Policy.act(threshold=threshold)


@pytest.mark.parametrize("beta", [-0.1, 1.01, float("nan"), float("inf")])
def test_hidden_beta_outside_the_unit_interval_is_refused(beta):
    with pytest.raises(PolicyError, match="hidden_sink_scale"):
        Policy.act(beta=beta)
    with pytest.raises(PolicyError, match="hidden_sink_scale"):
        ContentSinks(hidden_sink_scale=torch.tensor([[0.5, beta]]))


def test_per_head_beta_heads_and_other_parameters_are_checked():
    rule = ContentSinks(hidden_sink_scale=torch.full((2, 3), 0.5), heads=torch.tensor([[True, False, True]] * 2))
    with pytest.raises(PolicyError, match=r"\[num_layers, num_heads\] = \[3, 3\]"):
        Policy(content_sinks=rule).resolve(3, [3, 3, 3])
    layers = Policy(content_sinks=rule).resolve(2, [3, 3])
    assert layers[1].content.heads.tolist() == [True, False, True]
    # a layer with every head off has no content rule (it runs the positional path)
    off = ContentSinks(heads=torch.tensor([[False] * 3, [True] * 3]))
    assert [lp.content is None for lp in Policy(content_sinks=off).resolve(2, [3, 3])] == [True, False]
    with pytest.raises(PolicyError, match="bool"):
        ContentSinks(heads=torch.ones(2, 3))
    with pytest.raises(PolicyError, match="min_rows"):
        ContentSinks(min_rows=0)
    with pytest.raises(PolicyError, match="reevaluate_every"):
        ContentSinks(reevaluate_every=0)
    with pytest.raises(PolicyError, match="content_sinks"):
        Policy(content_sinks=0.4)
    assert Policy(content_sinks=ContentSinks(hidden_sink_scale=1.0)).is_identity


# -- the reference against the rule as written -------------------------------------------------
LAYOUTS = {
    "causal": (2, 6, 3, 19, 19, dict(causal=True)),
    "full": (1, 4, 4, 7, 13, dict()),
    "sliding": (1, 4, 2, 23, 23, dict(causal=True, sliding_window=9)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("threshold,beta", [(0.1, 0.4), (0.05, 0.0), (0.15, 0.8)])
def test_reference_is_the_rule_as_written(name, threshold, beta):
    batch, hq, hkv, ql, kl, layout = LAYOUTS[name]
    q, k, v = _planted(batch, hq, hkv, ql, kl, 16)
    want, want_hidden = _literal_act(q, k, v, beta, threshold, **layout)
    stats = column_stats_reference(q, k, **layout)
    hidden = decide_hidden_sinks(stats, None, threshold=threshold, min_rows=1, heads=None)
    assert torch.equal(hidden, want_hidden)
    assert bool(hidden.any()) or threshold > 0.1  # the ACT-range cases correct something
    for sink_cols in (None, torch.zeros(batch, 1, dtype=torch.long)):  # a positional sink at beta = 1 changes nothing
        got, probs, _ = reference_content_sink_attention(q, k, v, hidden=hidden, hidden_beta=torch.full((hq,), beta, dtype=torch.float64),
                                                         sink_cols=sink_cols, **layout)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert not hidden.any() or not torch.allclose(got, reference_sink_attention(q, k, v, **layout)[0], atol=1e-3)


def test_planted_sinks_are_found_and_the_first_is_kept():
    q, k, v = _planted(2, 4, 2, 31, 31, 32)
    stats = column_stats_reference(q, k, causal=True)
    hidden = decide_hidden_sinks(stats, None, threshold=0.1, min_rows=8, heads=None)
    assert not bool(hidden[..., 0].any())  # key 0, the first sink, is kept
    assert bool(hidden[..., list(PLANTED)].all())
    assert int(hidden.sum()) == len(PLANTED) * 2 * 4  # nothing else with min_rows=8 on this input
    # the positional sink set and the head selection remove their columns / heads
    is_sink = torch.zeros(2, 31, dtype=torch.bool)
    is_sink[:, PLANTED[0]] = True
    heads = torch.tensor([True, False, True, True])
    fewer = decide_hidden_sinks(stats, is_sink, threshold=0.1, min_rows=8, heads=heads)
    assert not bool(fewer[..., PLANTED[0]].any()) and not bool(fewer[:, 1].any()) and bool(fewer[:, 0, PLANTED[1]].all())


def test_no_hidden_sinks_is_the_positional_formula():
    q, k, v = _planted(2, 4, 2, 9, 9, 16)
    g = torch.Generator().manual_seed(3)
    kw = dict(causal=True, sink_cols=torch.tensor([[0, 2], [0, -1]]), beta=torch.rand(4, generator=g),
              extra_logits=torch.randn(4, 1, generator=g), virtual_sink_logit=torch.randn(4, generator=g))
    got = reference_content_sink_attention(q, k, v, hidden=torch.zeros(2, 4, 9, dtype=torch.bool),
                                           hidden_beta=torch.full((4,), 0.3), **kw)
    want = reference_sink_attention(q, k, v, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# -- the PyTorch path against the reference ---------------------------------------------------------
def _content_layout(kind, batch, q_len, k_len):
    """(layout kwargs, positional sink columns (B, 2), -1 = absent) per layout."""
    cols = torch.tensor([[0, -1]] * batch)
    if kind == "causal":
        return dict(causal=True), cols
    if kind == "chunked":
        return dict(causal=True, causal_offset=k_len - q_len), cols
    if kind == "decode":
        return dict(), torch.tensor([[0, 3]] * batch)
    if kind == "padded":
        mask = visibility_mask(batch, q_len, k_len, causal=True).clone()
        mask[1, ..., :4] = False
        return dict(attn_mask=mask), torch.tensor([[0, -1], [4, -1]])
    if kind == "sliding":
        return dict(causal=True, sliding_window=9), cols
    raise ValueError(kind)


CONTENT_SHAPES = [
    # (B, Hq, Hkv, Q, K, D, layout)
    (2, 6, 3, 19, 19, 16, "causal"),  # GQA 2, odd length: no mask is built
    (2, 4, 4, 5, 23, 32, "chunked"),  # a prefill chunk after 18 cached tokens
    (1, 8, 1, 1, 37, 16, "decode"),  # one row against a cache, positional set {0, 3}
    (2, 4, 2, 17, 17, 16, "padded"),  # left padding: the sink is the first real column
    (1, 4, 2, 23, 23, 16, "sliding"),  # sliding window: early sinks leave the window
]


def _content_policies(q_heads):
    g = torch.Generator().manual_seed(5)
    return {
        "act": dict(),
        "act+scale": dict(beta=torch.rand(q_heads, generator=g)),
        "act+aux+virtual": dict(beta=torch.rand(q_heads, generator=g), extra_logits=torch.randn(q_heads, 1, generator=g),
                                virtual_sink_logit=torch.randn(q_heads, generator=g)),
    }


@pytest.mark.parametrize("shape", CONTENT_SHAPES, ids=[s[-1] for s in CONTENT_SHAPES])
@pytest.mark.parametrize("policy", list(_content_policies(1)))
@pytest.mark.parametrize("few_rows", [8, 0], ids=["auto", "passes"])
def test_torch_path_decides_and_applies_like_the_reference(shape, policy, few_rows, monkeypatch):
    from sinkfix.ops import content_attention
    from sinkfix.ops.content_attention import content_sink_attention_torch

    monkeypatch.setattr(content_attention, "FEW_ROWS", few_rows)  # 0: the fused passes on every shape

    batch, hq, hkv, ql, kl, dim, kind = shape
    q, k, v = _planted(batch, hq, hkv, ql, kl, dim)
    layout, sink_cols = _content_layout(kind, batch, ql, kl)
    kw = _content_policies(hq)[policy]
    hidden_beta = torch.linspace(0.0, 0.9, hq)
    heads = torch.ones(hq, dtype=torch.bool)
    heads[1] = False
    is_sink = torch.zeros(batch, kl, dtype=torch.bool).scatter_(1, sink_cols.clamp(min=0), sink_cols >= 0)
    stats = column_stats_reference(q, k, **layout)
    want_hidden = decide_hidden_sinks(stats, is_sink, threshold=0.1, min_rows=1, heads=heads)
    got = content_sink_attention_torch(q, k, v, hidden_beta=hidden_beta, threshold=0.1, heads=heads, need_stats=True,
                                       sink_cols=sink_cols, **layout, **kw)
    torch.testing.assert_close(got.stats.mass.double(), stats.mass, atol=ATOL, rtol=1e-5)
    assert torch.equal(got.stats.rows.double(), stats.rows)
    assert torch.equal(got.hidden, want_hidden)
    want, _, want_lse = reference_content_sink_attention(q, k, v, hidden=want_hidden, hidden_beta=hidden_beta,
                                                         sink_cols=sink_cols, **layout, **kw)
    torch.testing.assert_close(got.out.double(), want, atol=ATOL, rtol=0)
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(got.lse.double()[finite], want_lse[finite], atol=ATOL, rtol=0)
    # a stored set (the decode case) gives the same result without deciding
    given = content_sink_attention_torch(q, k, v, hidden_beta=hidden_beta, hidden=want_hidden, sink_cols=sink_cols,
                                         **layout, **kw)
    torch.testing.assert_close(given.out, got.out, atol=1e-6, rtol=0)
    assert given.stats is None


def test_planted_hidden_sinks_change_the_output_and_the_off_heads_do_not():
    from sinkfix.ops.content_attention import content_sink_attention_torch

    q, k, v = _planted(1, 4, 2, 29, 29, 16)
    heads = torch.tensor([True, True, False, False])
    got = content_sink_attention_torch(q, k, v, hidden_beta=torch.full((4,), 0.4), threshold=0.1, heads=heads,
                                       causal=True, sink_cols=torch.zeros(1, 1, dtype=torch.long))
    stock = reference_sink_attention(q, k, v, causal=True)[0]
    assert bool(got.hidden[:, :2, list(PLANTED)].all()) and not got.hidden[:, 2:].any()
    assert (got.out[:, :2, PLANTED[0]:] - stock[:, :2, PLANTED[0]:]).abs().amax() > 1e-2
    torch.testing.assert_close(got.out[:, 2:].double(), stock[:, 2:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.out[:, :, :PLANTED[0]].double(), stock[:, :, :PLANTED[0]], atol=ATOL, rtol=0)


def test_chunked_prefill_merges_the_column_statistics():
    """Deciding on two prefill chunks with the first chunk's statistics carried equals deciding on
    the whole prompt at once."""
    from sinkfix.ops.content_attention import content_sink_attention_torch, merge_column_stats

    q, k, v = _planted(2, 4, 2, 24, 24, 16)
    kw = dict(hidden_beta=torch.full((4,), 0.4), threshold=0.1, min_rows=3, sink_cols=torch.zeros(2, 1, dtype=torch.long))
    whole = content_sink_attention_torch(q, k, v, causal=True, **kw)
    first = content_sink_attention_torch(q[:, :, :10], k[:, :, :10], v[:, :, :10], causal=True, need_stats=True, **kw)
    second = content_sink_attention_torch(q[:, :, 10:], k, v, causal=True, causal_offset=10, prior=first.stats, **kw)
    assert torch.equal(second.hidden, whole.hidden)
    torch.testing.assert_close(second.out, whole.out[:, :, 10:], atol=1e-5, rtol=0)
    merged = merge_column_stats(first.stats, content_sink_attention_torch(
        q[:, :, 10:], k, v, causal=True, causal_offset=10, need_stats=True, **kw).stats)
    torch.testing.assert_close(merged.mass, whole.stats.mass, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.rows, whole.stats.rows)
