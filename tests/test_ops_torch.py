"""The PyTorch attention path against the fp64 reference of the written formula, on awkward shapes."""

from __future__ import annotations

import math

import pytest
import torch

from sinkfix.ops import flash
from sinkfix.ops.attention import sink_attention, sink_attention_torch
from sinkfix.ops.reference import reference_residual_clip, reference_sink_attention, visibility_mask
from sinkfix.ops.residual import relative_threshold, residual_clip

# fp32 path vs fp64 reference: the flash op accumulates in fp32; measured max error ~1e-6 on
# these shapes, so 2e-5 leaves margin without hiding a wrong formula (wrong formulas are off by 1e-2+).
ATOL = 2e-5


def _inputs(batch, q_heads, kv_heads, q_len, k_len, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(dtype)
    # make key 0 a strong sink, as in real models, so the policies move a lot of mass
    k[:, :, 0] += 2.0 * q.mean(dim=(1, 2))[:, None]
    return q, k, v


def _policies(q_heads):
    g = torch.Generator().manual_seed(1)
    beta = torch.rand(q_heads, generator=g)
    return {
        "identity": dict(),
        "scale": dict(beta=beta),
        "drop": dict(beta=torch.zeros(q_heads)),
        "virtual": dict(virtual_sink_logit=torch.randn(q_heads, generator=g)),
        "aux": dict(extra_logits=torch.randn(q_heads, 2, generator=g)),
        "scale+aux+virtual": dict(beta=beta, extra_logits=torch.randn(q_heads, 1, generator=g),
                                  virtual_sink_logit=torch.randn(q_heads, generator=g)),
    }


SHAPES = [
    # (B, Hq, Hkv, Q, K, D, layout)
    (2, 9, 3, 17, 17, 64, "causal"),  # GQA 3, odd length, no padding: fast path
    (1, 8, 1, 1, 113, 80, "decode"),  # GQA 8, decode against a long cache
    (2, 4, 4, 5, 23, 96, "chunked"),  # chunked prefill: bottom-right causal, Q != K
    (2, 6, 2, 17, 17, 64, "padded"),  # left padding: the sink is the first real column
    (1, 4, 2, 23, 23, 128, "sliding"),  # sliding window: the sink leaves the window
    (2, 4, 2, 6, 31, 64, "static"),  # static cache: upper-left causal with trailing empty slots
]


def _layout(kind, batch, q_len, k_len):
    """(structural kwargs, sink_cols) for a layout."""
    first = torch.zeros(batch, dtype=torch.long)
    kw: dict = {}
    if kind == "causal":
        kw = dict(causal=True)
    elif kind == "chunked":
        kw = dict(causal=True, causal_offset=k_len - q_len)
    elif kind == "padded":
        mask = visibility_mask(batch, q_len, k_len, causal=True).clone()
        mask[1, ..., :4] = False
        first = torch.tensor([0, 4])
        kw = dict(attn_mask=mask)
    elif kind == "sliding":
        kw = dict(causal=True, sliding_window=7)
    elif kind == "static":
        kw = dict(causal=True)
    return kw, first


@pytest.mark.parametrize("shape", SHAPES, ids=[s[-1] for s in SHAPES])
@pytest.mark.parametrize("policy", list(_policies(1)))
@pytest.mark.parametrize("n_sink", [1, 2])
def test_torch_path_matches_reference(shape, policy, n_sink):
    batch, q_heads, kv_heads, q_len, k_len, dim, kind = shape
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, k_len, dim)
    kw, first = _layout(kind, batch, q_len, k_len)
    sink_cols = first[:, None] + torch.arange(n_sink)[None, :]
    pol = _policies(q_heads)[policy]
    ref, ref_probs, ref_lse = reference_sink_attention(q, k, v, **kw, sink_cols=sink_cols, **pol)
    got = sink_attention_torch(q, k, v, **kw, sink_cols=sink_cols, need_sink_mass=True, **pol)
    assert got.out.shape == (batch, q_heads, q_len, dim) and got.out.dtype == q.dtype
    torch.testing.assert_close(got.out.double(), ref, atol=ATOL, rtol=0)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(got.lse.double()[finite], ref_lse[finite], atol=ATOL, rtol=0)
    # the sink mass before sink scaling (what inspect reports) equals the beta = 1 probabilities on
    # the sink columns, zero-value logits included
    _, stock_probs, _ = reference_sink_attention(q, k, v, **kw, sink_cols=sink_cols, extra_logits=pol.get("extra_logits"),
                                                 virtual_sink_logit=pol.get("virtual_sink_logit"))
    is_sink = torch.zeros(batch, k_len, dtype=torch.bool)
    is_sink[torch.arange(batch)[:, None], sink_cols] = True
    torch.testing.assert_close(got.sink_mass.double(), (stock_probs * is_sink[:, None, None]).sum(-1), atol=ATOL, rtol=0)
    # and the probabilities path (output_attentions) agrees with the reference too
    with_probs = sink_attention_torch(q, k, v, **kw, sink_cols=sink_cols, return_probs=True, **pol)
    torch.testing.assert_close(with_probs.probs.double(), ref_probs, atol=ATOL, rtol=0)
    torch.testing.assert_close(with_probs.out.double(), ref, atol=ATOL, rtol=0)


def test_policies_really_differ_from_identity():
    """Guards the test above against a reference that silently ignores its policy arguments."""
    q, k, v = _inputs(1, 4, 2, 17, 17, 64)
    cols = torch.zeros(1, 1, dtype=torch.long)
    base, _, _ = reference_sink_attention(q, k, v, causal=True, sink_cols=cols)
    for name, pol in _policies(4).items():
        out, _, _ = reference_sink_attention(q, k, v, causal=True, sink_cols=cols, **pol)
        if name != "identity":
            assert (out - base).abs().max() > 1e-2, name


def test_reference_formula_by_hand():
    """One row, two keys, worked out on paper: sink logit 2, other logit 0, values 10 and 1."""
    q = torch.tensor([[[[1.0, 0.0]], ]]).expand(1, 1, 1, 2).clone()
    k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    v = torch.tensor([[[[10.0, 0.0], [1.0, 0.0]]]])
    e2 = torch.exp(torch.tensor(2.0, dtype=torch.float64))
    p_s = e2 / (e2 + 1)
    beta = 0.4
    out, probs, _ = reference_sink_attention(q, k, v, scale=1.0, sink_cols=torch.tensor([[0]]),
                                             beta=torch.tensor([beta]))
    expect_probs = torch.tensor([beta * p_s, 1 - beta * p_s], dtype=torch.float64)
    torch.testing.assert_close(probs[0, 0, 0], expect_probs)
    torch.testing.assert_close(out[0, 0, 0, 0], 10 * beta * p_s + 1 * (1 - beta * p_s))
    # virtual sink logit b = 0: an extra e^0 in the denominator, zero value
    for zero_value in (dict(extra_logits=torch.tensor([[0.0]])), dict(virtual_sink_logit=torch.tensor([0.0]))):
        out_v, probs_v, _ = reference_sink_attention(q, k, v, scale=1.0, sink_cols=torch.tensor([[0]]), **zero_value)
        torch.testing.assert_close(probs_v[0, 0, 0], torch.tensor([e2, 1.0], dtype=torch.float64) / (e2 + 2))
        torch.testing.assert_close(out_v[0, 0, 0, 0], (10 * e2 + 1) / (e2 + 2))


def test_zero_value_logits_on_sink_only_rows():
    """Row 0 sees only the sink (key 0): the model's own s_aux still counts there (stock
    behaviour), the policy's virtual logit does not (the sink's own row stays untouched)."""
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 2, 2).clone()
    k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    v = torch.tensor([[[[10.0, 0.0], [1.0, 0.0]]]])
    cols = torch.tensor([[0]])
    e2 = math.exp(2.0)
    out_aux, _, _ = reference_sink_attention(q, k, v, causal=True, scale=1.0, sink_cols=cols,
                                             extra_logits=torch.tensor([[0.0]]))
    out_virtual, _, _ = reference_sink_attention(q, k, v, causal=True, scale=1.0, sink_cols=cols,
                                                 virtual_sink_logit=torch.tensor([0.0]))
    assert out_aux[0, 0, 0, 0].item() == pytest.approx(10 * e2 / (e2 + 1))  # row 0: s_aux counted
    assert out_virtual[0, 0, 0, 0].item() == pytest.approx(10.0)  # row 0: virtual logit not counted
    for out in (out_aux, out_virtual):  # row 1 sees a non-sink key: both count
        assert out[0, 0, 1, 0].item() == pytest.approx((10 * e2 + 1) / (e2 + 2))
    torch_path = sink_attention_torch(q, k, v, causal=True, scale=1.0, sink_cols=cols, virtual_sink_logit=torch.tensor([0.0]))
    torch.testing.assert_close(torch_path.out.double(), out_virtual, atol=1e-6, rtol=0)


def test_sink_only_row_is_untouched():
    """Row 0 sees only the sink: any beta must leave it exactly as plain softmax (docs/formulas.md, "The sink's own row")."""
    q, k, v = _inputs(1, 4, 4, 9, 9, 64)
    cols = torch.zeros(1, 1, dtype=torch.long)
    for pol in (dict(beta=torch.zeros(4)), dict(beta=torch.zeros(4), virtual_sink_logit=torch.full((4,), 5.0))):
        got = sink_attention_torch(q, k, v, causal=True, sink_cols=cols, **pol)
        torch.testing.assert_close(got.out[:, :, 0], v[:, :, 0], atol=1e-6, rtol=0)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _inputs(2, 4, 2, 7, 7, 64)
    mask = visibility_mask(2, 7, 7, causal=True).clone()
    mask[1, ..., :3, :] = False  # left-padded query rows see nothing
    for pol in _policies(4).values():
        got = sink_attention_torch(q, k, v, attn_mask=mask, sink_cols=torch.tensor([[0], [3]]), **pol)
        assert torch.isfinite(got.out).all()
        assert (got.out[1, :, :3] == 0).all()


def test_gradients_flow_to_beta_and_match_reference():
    q, k, v = _inputs(1, 4, 2, 11, 11, 64)
    cols = torch.zeros(1, 1, dtype=torch.long)
    beta = torch.full((4,), 0.7, requires_grad=True)
    got = sink_attention_torch(q, k, v, causal=True, sink_cols=cols, beta=beta)
    (grad,) = torch.autograd.grad(got.out.square().sum(), beta)
    beta64 = beta.detach().double().requires_grad_()
    ref, _, _ = reference_sink_attention(q, k, v, causal=True, sink_cols=cols, beta=beta64)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), beta64)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_the_dtype_error(dtype):
    """Tolerance rule: error vs fp64 <= 2x the same-dtype dense PyTorch error + a small floor."""
    q, k, v = _inputs(2, 6, 2, 33, 33, 64, dtype=dtype)
    cols = torch.zeros(2, 1, dtype=torch.long)
    beta = torch.linspace(0, 1, 6)
    ref, _, _ = reference_sink_attention(q, k, v, causal=True, sink_cols=cols, beta=beta)
    same_dtype, _, _ = reference_sink_attention(q, k, v, causal=True, sink_cols=cols, beta=beta, compute_dtype=dtype)
    got = sink_attention_torch(q, k, v, causal=True, sink_cols=cols, beta=beta)
    assert got.out.dtype == dtype
    err = (got.out.double() - ref).abs().max()
    base = (same_dtype.double() - ref).abs().max()
    assert err <= 2 * base + 1e-3, (err, base)


def test_residual_clip_matches_reference():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 13, 576, generator=g)
    hidden[:, 0] *= 100  # the sink's massive residual
    hidden[1, 5] *= 20
    sink = torch.zeros(2, 13, dtype=torch.bool)
    sink[:, 0] = True
    norms = hidden.norm(dim=-1)
    thr = relative_threshold(norms, sink, 4.0)
    for sink_norm in (None, 300.0):
        got = residual_clip(hidden, thr, sink, sink_norm)
        ref = reference_residual_clip(hidden, thr, sink, sink_norm)
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)
    exempt = residual_clip(hidden, thr, sink, None)
    assert torch.equal(exempt[:, 0], hidden[:, 0])  # sink exempt: untouched, never zeroed
    clamped = residual_clip(hidden, thr, sink, 300.0)
    torch.testing.assert_close(clamped[:, 0].norm(dim=-1), torch.full((2,), 300.0))
    assert clamped[1, 5].norm() == pytest.approx(thr[1].item(), rel=1e-5)  # the outlier is capped
    median = norms[0, 1:].median()
    assert thr[0].item() == pytest.approx(4.0 * median.item(), rel=1e-6)


# -- the inference paths: what a patched model runs (no probabilities, no statistics) ------------
FIRST_COLUMN_SHAPES = [
    (2, 9, 3, 17, 17, 64, "causal"),  # prefill: row 0 sees only the sink
    (1, 8, 1, 1, 113, 80, "decode"),  # one query row against a cache: every row sees non-sink keys
    (2, 6, 2, 3, 40, 64, "full"),  # a few query rows, full attention (speculative decoding, chunks)
    (1, 4, 2, 1, 1, 64, "decode"),  # a cache holding only the sink
]


def _inference_paths(q, k, v, **kw):
    """Every way the inference path is reached: the PyTorch function, the dispatch, the custom op."""
    from sinkfix.ops.attention import sink_attention

    yield "sink_attention_torch", sink_attention_torch(q, k, v, **kw).out
    yield "sink_attention", sink_attention(q, k, v, backend="torch", **kw).out
    op_args = (q, k, v, kw.get("attn_mask"), None, None, kw.get("sink_cols"), kw.get("beta"), kw.get("extra_logits"),
               kw.get("virtual_sink_logit"), kw.get("causal", False), kw.get("causal_offset", 0),
               kw.get("sliding_window"), q.shape[-1] ** -0.5, None, kw.get("first_column_sink", False), "torch")
    yield "torch.ops.sinkfix.sink_attention", torch.ops.sinkfix.sink_attention(*op_args)[0].transpose(1, 2)


@pytest.mark.parametrize("shape", FIRST_COLUMN_SHAPES, ids=[f"{s[-1]}-K{s[4]}" for s in FIRST_COLUMN_SHAPES])
@pytest.mark.parametrize("policy", list(_policies(1)))
def test_first_column_sink_flag_matches_reference(shape, policy):
    """The layout says "the sink is key column 0 of every row" (no padding, n_sink = 1) instead of
    passing sink columns: the fast path must compute exactly the reference's formula."""
    batch, q_heads, kv_heads, q_len, k_len, dim, kind = shape
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, k_len, dim)
    causal = kind == "causal"
    pol = _policies(q_heads)[policy]
    ref, _, _ = reference_sink_attention(q, k, v, causal=causal, sink_cols=torch.zeros(batch, 1, dtype=torch.long),
                                         **pol)
    for name, out in _inference_paths(q, k, v, causal=causal, first_column_sink=True, **pol):
        assert out.shape == (batch, q_heads, q_len, dim), name
        torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


CAUSAL_PREFILL_SHAPES = [
    (2, 9, 3, 17, 17, 64),  # GQA 3, odd length
    (1, 4, 2, 2, 2, 32),  # the shortest prompt that takes the path: row 0 and one more row
    (1, 6, 6, 33, 33, 16),  # no GQA
]


@pytest.mark.parametrize("shape", CAUSAL_PREFILL_SHAPES, ids=[f"Q{s[3]}-G{s[1] // s[2]}" for s in CAUSAL_PREFILL_SHAPES])
@pytest.mark.parametrize("policy", list(_policies(1)))
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_causal_prefill_path_matches_reference_and_the_autograd_path(shape, policy, stats):
    """The eager no-grad causal prefill with the first-column sink writes its output straight into
    the (B, Q, Hq, D) layout transformers takes back: out and lse equal the fp64 reference and the
    path autograd takes (``_first_column_parts`` + ``_combine``), for queries in either memory layout."""
    batch, q_heads, kv_heads, q_len, k_len, dim = shape
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, k_len, dim)
    pol = _policies(q_heads)[policy]
    ref, _, ref_lse = reference_sink_attention(q, k, v, causal=True, sink_cols=torch.zeros(batch, 1, dtype=torch.long),
                                               **pol)
    # what transformers passes: q_proj's output viewed per head, rotated element-wise (which keeps
    # the layout), i.e. a (B, Q, Hq, D) buffer seen as (B, Hq, Q, D)
    query_heads_last = q.transpose(1, 2).contiguous().transpose(1, 2)
    for query in (q, query_heads_last):
        got = sink_attention_torch(query, k, v, causal=True, first_column_sink=True, need_sink_stats=stats, **pol)
        assert got.out.shape == (batch, q_heads, q_len, dim)
        # the layout transformers takes back, without a copy (the identity's fused op follows q's layout)
        assert got.out.transpose(1, 2).is_contiguous() or (policy == "identity" and query is q)
        torch.testing.assert_close(got.out.double(), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.lse.double(), ref_lse, atol=ATOL, rtol=0)
    # the autograd path (any input that requires grad takes it) computes the same numbers
    slow = sink_attention_torch(q.clone().requires_grad_(), k, v, causal=True, first_column_sink=True,
                                need_sink_stats=stats, **pol)
    torch.testing.assert_close(got.out, slow.out.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.lse, slow.lse.detach(), atol=1e-6, rtol=0)
    if stats:
        torch.testing.assert_close(got.sink_stats, slow.sink_stats.detach(), atol=1e-5, rtol=0)


def test_causal_prefill_path_takes_float64_policy_tensors():
    q, k, v = _inputs(1, 4, 2, 9, 9, 16)
    beta = torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = sink_attention_torch(q, k, v, causal=True, first_column_sink=True, beta=beta)
    ref, _, _ = reference_sink_attention(q, k, v, causal=True, sink_cols=torch.zeros(1, 1, dtype=torch.long), beta=beta)
    assert got.out.dtype == torch.float32
    torch.testing.assert_close(got.out.double(), ref, atol=ATOL, rtol=0)


def test_causal_prefill_path_in_bfloat16_keeps_dtype_and_layout():
    q, k, v = _inputs(1, 6, 2, 33, 33, 64, dtype=torch.bfloat16)
    pol = _policies(6)["scale+aux+virtual"]
    got = sink_attention_torch(q, k, v, causal=True, first_column_sink=True, **pol)
    assert got.out.dtype == torch.bfloat16 and got.out.transpose(1, 2).is_contiguous()
    slow = sink_attention_torch(q.clone().requires_grad_(), k, v, causal=True, first_column_sink=True, **pol)
    # both round once to bfloat16 from fp32 arithmetic: at most a unit in the last place apart
    torch.testing.assert_close(got.out.float(), slow.out.detach().float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[-1] for s in SHAPES])
@pytest.mark.parametrize("policy", ["identity", "scale+aux+virtual"])
def test_inference_paths_match_reference_on_every_layout(shape, policy):
    batch, q_heads, kv_heads, q_len, k_len, dim, kind = shape
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, k_len, dim)
    kw, first = _layout(kind, batch, q_len, k_len)
    pol = _policies(q_heads)[policy]
    ref, _, _ = reference_sink_attention(q, k, v, **kw, sink_cols=first[:, None], **pol)
    for name, out in _inference_paths(q, k, v, **kw, sink_cols=first[:, None], **pol):
        torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


# -- gradients without a stored score matrix --------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=[s[-1] for s in SHAPES])
def test_blockwise_backward_matches_dense_autograd(shape, monkeypatch):
    """The calibration path (fused forward, backward recomputed one block of query rows at a time)
    gives the gradients of plain dense autograd, for q, k, v and every policy parameter; blocks of
    3 rows force several blocks on every shape."""
    from sinkfix.ops import attention_grad

    monkeypatch.setattr(attention_grad, "_rows_per_block", lambda batch, heads, k_len: 3)
    batch, q_heads, kv_heads, q_len, k_len, dim, kind = shape
    q, k, v = (t.double() for t in _inputs(batch, q_heads, kv_heads, q_len, k_len, dim))
    kw, first = _layout(kind, batch, q_len, k_len)
    pol = _policies(q_heads)["scale+aux+virtual"]
    params = {name: t.double() for name, t in pol.items()}
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(batch, q_heads, q_len, dim, generator=g, dtype=torch.float64)
    # lse is fp32 by contract, so its incoming gradient is rounded to fp32: weights exact in fp32
    lse_weights = torch.randn(batch, q_heads, q_len, generator=g).double()

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, *params.values())]
        out, lse = fn(*leaves)
        loss = (out * weights).sum() + (torch.where(torch.isfinite(lse), lse, 0) * lse_weights).sum()
        return torch.autograd.grad(loss, leaves)

    def blockwise(q_, k_, v_, beta, extra, virtual):
        return attention_grad.sink_attention_with_grad(q_, k_, v_, **kw, sink_cols=first[:, None], beta=beta,
                                                       extra_logits=extra, virtual_sink_logit=virtual)

    def dense(q_, k_, v_, beta, extra, virtual):
        out, _, lse = reference_sink_attention(q_, k_, v_, **kw, sink_cols=first[:, None], beta=beta,
                                               extra_logits=extra, virtual_sink_logit=virtual)
        return out, lse

    for name, got, want in zip(["q", "k", "v", *params], grads(blockwise), grads(dense)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7, msg=lambda m: f"d/d{name}: {m}")


def test_blockwise_backward_with_frozen_inputs():
    """Calibration's case: q, k, v come from frozen weights and need no gradient, only beta and the
    virtual sink logits do (the log-sum-exp then has no gradient to give)."""
    from sinkfix.ops.attention_grad import sink_attention_with_grad

    q, k, v = (t.double() for t in _inputs(2, 9, 3, 17, 17, 64))
    beta = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    virtual = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cols = torch.zeros(2, 1, dtype=torch.long)
    weights = torch.randn(2, 9, 17, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got_leaves = [beta.clone().requires_grad_(), virtual.clone().requires_grad_()]
    out, lse = sink_attention_with_grad(q, k, v, causal=True, sink_cols=cols, beta=got_leaves[0],
                                        virtual_sink_logit=got_leaves[1])
    assert not lse.requires_grad or lse.grad_fn is not None
    got = torch.autograd.grad((out * weights).sum(), got_leaves)
    want_leaves = [beta.clone().requires_grad_(), virtual.clone().requires_grad_()]
    ref, _, _ = reference_sink_attention(q, k, v, causal=True, sink_cols=cols, beta=want_leaves[0],
                                         virtual_sink_logit=want_leaves[1])
    want = torch.autograd.grad((ref * weights).sum(), want_leaves)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, atol=1e-9, rtol=1e-7)


# -- gradients through the split path (fused op with its own backward kernel) -------------------------
_needs_fused_backward = pytest.mark.skipif(not flash.fused_lse_backward_available(torch.device("cpu"), torch.float32),
                                reason="this torch has no CPU flash-attention backward kernel")

# fp32 fused kernels against fp64 autograd: measured max error ~2e-6 relative on these shapes; a wrong
# term (a lost log-sum-exp gradient, a lost sink column) is off by 1e-2 or more.
SPLIT_GRAD_TOL = dict(atol=5e-5, rtol=5e-4)


def _grads(fn, tensors, out_weight: float = 1.0):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out, lse = fn(*leaves)
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    lse_weights = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    loss = out_weight * (out.double() * weights).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * lse_weights).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _assert_split_grads_match_dense(q, k, v, params: dict, split_kw: dict, dense_kw: dict) -> None:
    """Gradients of ``sink_attention`` (fp32, the split path) in q, k, v and every policy parameter
    equal fp64 autograd of the reference formula."""
    names = list(params)

    def split(q_, k_, v_, *ps):
        result = sink_attention(q_, k_, v_, backend="torch", **split_kw, **dict(zip(names, ps)))
        return result.out, result.lse

    def dense(q_, k_, v_, *ps):
        out, _, lse = reference_sink_attention(q_, k_, v_, **dense_kw, **dict(zip(names, ps)))
        return out, lse

    got = _grads(split, (q, k, v, *params.values()))
    want = _grads(dense, (q.double(), k.double(), v.double(), *(p.double() for p in params.values())))
    for name, a, b in zip(["q", "k", "v", *names], got, want):
        assert a is not None and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, **SPLIT_GRAD_TOL, msg=lambda m: f"d/d{name}: {m}")


@_needs_fused_backward
def test_flash_op_gradient_includes_the_log_sum_exp():
    """The fused op's own autograd formula drops the log-sum-exp's gradient; ours must not (GQA, a mask)."""
    q, k, v = _inputs(2, 6, 2, 13, 13, 32)
    visible = visibility_mask(2, 13, 13, causal=True).clone()
    visible[1, ..., :3] = False  # left padding: key columns 0..2 of row 1
    visible[1, ..., :3, :] = True  # ... and its first three query rows see everything (no empty row)

    def fused(q_, k_, v_):
        return flash.flash_with_lse(q_, k_, v_, visible=visible, is_causal=False, scale=0.2)

    def dense(q_, k_, v_):
        out, _, lse = reference_sink_attention(q_, k_, v_, attn_mask=visible, scale=0.2)
        return out, lse

    got = _grads(fused, (q, k, v))
    want = _grads(dense, (q.double(), k.double(), v.double()))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, **SPLIT_GRAD_TOL, msg=lambda m: f"d/d{name}: {m}")


@_needs_fused_backward
@pytest.mark.parametrize("route", ["shifted output", "appended feature"])
@pytest.mark.parametrize("loss_on", ["out and lse", "lse only"])
def test_both_log_sum_exp_gradient_routes_match_dense_autograd(route, loss_on, monkeypatch):
    """The lse gradient reaches the backward kernel either through a shifted output or through one
    appended feature (the fallback: reduced precision, or rows with a zero output gradient, as when
    the loss reads only the log-sum-exp); both equal fp64 autograd of the formula."""
    if route == "appended feature":
        monkeypatch.setattr(flash, "_shifted_output", lambda *args: None)
    q, k, v = _inputs(2, 6, 2, 13, 13, 32)
    out_weight = 1.0 if loss_on == "out and lse" else 0.0
    got = _grads(lambda *t: flash.flash_with_lse(*t, visible=None, is_causal=True, scale=0.2), (q, k, v), out_weight)
    want = _grads(lambda *t: reference_sink_attention(*t, causal=True, scale=0.2)[::2],
                  (q.double(), k.double(), v.double()), out_weight)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, **SPLIT_GRAD_TOL, msg=lambda m: f"d/d{name}: {m}")


def test_shifted_output_refuses_what_it_cannot_carry():
    """No shift for reduced precision or for a row whose output gradient vanishes while its
    log-sum-exp has a gradient; otherwise ``dO . O'`` is ``dO . O - g`` row by row."""
    out, grad_out = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    grad_lse = torch.randn(1, 2, 5)
    shifted = flash._shifted_output(out, grad_out, grad_lse)
    torch.testing.assert_close((grad_out * shifted).sum(-1), (grad_out * out).sum(-1) - grad_lse)
    assert flash._shifted_output(out.bfloat16(), grad_out.bfloat16(), grad_lse) is None
    grad_out[0, 1, 3] = 0
    assert flash._shifted_output(out, grad_out, grad_lse) is None
    grad_lse[0, 1, 3] = 0  # no gradient to carry on that row: the shift is zero there
    torch.testing.assert_close(flash._shifted_output(out, grad_out, grad_lse)[0, 1, 3], out[0, 1, 3])


@_needs_fused_backward
@pytest.mark.parametrize("shape", SHAPES, ids=[s[-1] for s in SHAPES])
@pytest.mark.parametrize("policy", ["scale", "drop", "scale+aux+virtual"])
def test_split_path_gradients_match_dense_autograd(shape, policy):
    """What calibration back-propagates through: ``sink_attention`` with parameters that need
    gradients, every input differentiated."""
    batch, q_heads, kv_heads, q_len, k_len, dim, kind = shape
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, k_len, dim)
    kw, first = _layout(kind, batch, q_len, k_len)
    _assert_split_grads_match_dense(q, k, v, _policies(q_heads)[policy], dict(**kw, sink_cols=first[:, None]),
                                    dict(**kw, sink_cols=first[:, None]))


@_needs_fused_backward
@pytest.mark.parametrize("layout", ["causal", "decode", "full"])
def test_first_column_sink_gradients_match_dense_autograd(layout):
    """The layouts calibration and decoding really use: the sink is key column 0 of every row, no
    mask built (the causal window's row 0 sees only the sink)."""
    q_len, k_len = {"causal": (19, 19), "decode": (1, 29), "full": (3, 29)}[layout]
    q, k, v = _inputs(2, 6, 3, q_len, k_len, 64)
    causal = layout == "causal"
    _assert_split_grads_match_dense(q, k, v, _policies(6)["scale+aux+virtual"],
                                    dict(causal=causal, first_column_sink=True),
                                    dict(causal=causal, sink_cols=torch.zeros(2, 1, dtype=torch.long)))


@_needs_fused_backward
def test_rows_that_see_nothing_give_finite_zero_gradients():
    """Left-padded query rows that see no key at all: zeros out, and no NaN leaks into any gradient."""
    q, k, v = _inputs(2, 4, 2, 7, 7, 64)
    mask = visibility_mask(2, 7, 7, causal=True).clone()
    mask[1, ..., :3, :] = False
    mask[1, ..., :3] = False
    beta = torch.full((4,), 0.6, requires_grad=True)
    virtual = torch.zeros(4, requires_grad=True)
    qg = q.clone().requires_grad_()
    result = sink_attention(qg, k, v, backend="torch", attn_mask=mask, sink_cols=torch.tensor([[0], [3]]), beta=beta,
                            virtual_sink_logit=virtual)
    assert (result.out[1, :, :3] == 0).all()
    result.out.square().sum().backward()
    for name, t in (("q", qg), ("beta", beta), ("virtual", virtual)):
        assert torch.isfinite(t.grad).all(), name
    assert (qg.grad[1, :, :3] == 0).all()
    assert beta.grad.abs().sum() > 0


# -- the CUDA fused op's inputs, checked without CUDA -------------------------------------------
def test_additive_mask_rows_are_aligned_for_the_cuda_op():
    """The CUDA op refuses a mask whose strides are not 16-byte aligned (rows of 1023 keys in bf16,
    seen on an H200): the mask is a view into rows padded to 16 elements, with the same values."""
    visible = torch.rand(2, 1, 5, 1023, generator=torch.Generator().manual_seed(0)) > 0.3
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bias = flash._additive(visible, dtype, flash._BIAS_ALIGN)
        assert bias.shape == visible.shape and bias.stride(-1) == 1
        assert all(stride % 16 == 0 for stride in bias.stride()[:-1])
        assert torch.equal(bias == 0, visible) and bool((bias[~visible] == torch.finfo(dtype).min).all())


def test_a_refused_head_size_does_not_turn_the_fused_op_off_for_others(monkeypatch):
    """One refusal (an odd head size: no fp32 kernel on an H200) sends that kind of input to the
    dense formula, not every later call of the same dtype."""
    calls = []

    def fake_op(q, k, v, bias, compute_lse, dropout, is_causal, scale):
        calls.append(q.shape[-1])
        if q.shape[-1] % 2:
            raise RuntimeError("cutlassF: no kernel found to launch!")
        return v.clone(), torch.zeros(*q.shape[:3]), None, None

    monkeypatch.setattr(flash, "_CUDA_EFFICIENT_OP", fake_op)
    monkeypatch.setattr(flash, "_refused", set())
    odd, even = (torch.randn(1, 2, 4, d) for d in (17, 16))
    with pytest.warns(UserWarning, match="head size 17"):
        assert flash._cuda_efficient(odd, odd, odd, None, True, 1.0) is None
    assert flash._cuda_efficient(odd, odd, odd, None, True, 1.0) is None  # remembered: not tried again
    assert flash._cuda_efficient(even, even, even, None, True, 1.0) is not None
    assert calls == [17, 16]
    assert flash.fused_lse_available(torch.device("cuda"), torch.float32)


def test_a_sink_column_listed_twice_counts_once():
    """The sink set is a set (the reference's mask, the kernels): the PyTorch path gathered a
    repeated column twice and counted its mass twice (0.18 off with [[2, 2]] and beta 0.5)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g) for _ in range(3))
    beta = torch.tensor([0.5, 0.8])
    want = reference_sink_attention(q.double(), k.double(), v.double(), causal=True, sink_cols=torch.tensor([[2]]),
                                    beta=beta.double())[0]
    for cols in ([[2, 2]], [[2, 2, 2]], [[2, -1, 2]]):
        got = sink_attention_torch(q, k, v, causal=True, sink_cols=torch.tensor(cols), beta=beta).out
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_len, k_len", [(5, 0), (0, 5)])
def test_no_query_or_no_key_is_an_error_not_a_crash(q_len, k_len):
    # the fused CPU op divided by the length: the process died of SIGFPE
    q, k = torch.randn(1, 2, q_len, 16), torch.randn(1, 2, k_len, 16)
    with pytest.raises(ValueError, match=f"Q={q_len}, K={k_len}"):
        sink_attention_torch(q, k, k.clone())


def test_a_row_that_sees_nothing_has_lse_minus_infinity_on_the_identity_path():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 16, generator=g) for _ in range(3))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[:, :, 1] = False
    result = sink_attention_torch(q, k, v, attn_mask=mask, need_sink_stats=True)
    assert torch.isneginf(result.lse[:, :, 1]).all() and torch.isfinite(result.lse[:, :, [0, 2]]).all()
    assert (result.out[:, :, 1] == 0).all() and torch.isfinite(result.sink_stats).all()


@pytest.mark.parametrize("gap", [80.0, 110.0, 800.0])
def test_dense_path_applies_beta_when_the_sink_outscores_every_key_by_far(gap):
    """A sink whose score is ``gap`` above every other key: in fp32 (and past ~745 nats in fp64)
    l_N underflows under the row's maximum, and the dense path (return_probs, softcap, the
    gradient fallback) took such rows for sink-only ones and ignored beta (5.3 off at a gap of 110).
    Hand-computed: the non-sink keys share (1 - beta) of the row by their own softmax."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 16) * 0.01
    q[..., 0] = 1.0
    k = torch.randn(1, 2, 6, 16) * 0.1
    k[:, :, 0] = 0
    k[:, :, 0, 0] = gap * 16 ** 0.5
    v = torch.randn(1, 2, 6, 16)
    beta = torch.tensor([0.0, 0.5])
    scores = (q.double() @ k.double().transpose(-1, -2)) * 16 ** -0.5
    expected = torch.zeros(1, 2, 6, 16, dtype=torch.float64)
    for row in range(6):
        own = torch.softmax(scores[..., row, 1:row + 1], -1) if row else None
        for head in range(2):
            b = float(beta[head]) if row else 1.0
            expected[0, head, row] = b * v[0, head, 0].double()
            if row:
                expected[0, head, row] += (1 - b) * own[0, head] @ v[0, head, 1:row + 1].double()
    for kwargs in ({"return_probs": True}, {"softcap": 1e5}, {}):
        got = sink_attention(q, k, v, backend="torch", causal=True, first_column_sink=True, beta=beta, **kwargs)
        torch.testing.assert_close(got.out.double(), expected, atol=1e-5, rtol=0, msg=str(kwargs))
    ref, _, _ = reference_sink_attention(q.double(), k.double(), v.double(), causal=True,
                                         sink_cols=torch.zeros(1, 1, dtype=torch.long), beta=beta.double())
    torch.testing.assert_close(ref, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("virtual", [120.0, 800.0])
def test_lse_is_over_the_real_keys_whatever_the_virtual_logit(virtual):
    """lse = log(l_S + l_N) over the real keys (docs/formulas.md): with a large virtual logit the
    dense path and the reference took the row's maximum from it and returned -inf."""
    q, k, v = _inputs(1, 2, 2, 5, 5, 16, seed=3)
    logit = torch.tensor([virtual, 0.0])
    expected = torch.logsumexp((q.double() @ k.double().transpose(-1, -2) * 16 ** -0.5).masked_fill(
        ~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")), -1)
    split = sink_attention(q, k, v, backend="torch", causal=True, first_column_sink=True, virtual_sink_logit=logit)
    dense = sink_attention(q, k, v, backend="torch", causal=True, first_column_sink=True, virtual_sink_logit=logit,
                           return_probs=True)
    _, _, ref = reference_sink_attention(q.double(), k.double(), v.double(), causal=True,
                                         sink_cols=torch.zeros(1, 1, dtype=torch.long),
                                         virtual_sink_logit=logit.double())
    for got in (split.lse, dense.lse, ref):
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def _bad(q, k, v, **kw):
    return sink_attention(q, k, v, backend="torch", **kw)


@pytest.mark.parametrize("case, message", [
    (lambda q, k, v: _bad(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1)),
     "not a multiple of kv heads"),
    (lambda q, k, v: _bad(q, k[:1], v[:1]), "do not match q"),
    (lambda q, k, v: _bad(q, k, v[:, :, :-1]), "k and v must have the same shape"),
    (lambda q, k, v: _bad(q, k[:, :, :0], v[:, :, :0]), "at least one query row and one key"),
    (lambda q, k, v: _bad(q, k, v, extra_logits=torch.zeros(4)), "extra_logits must have shape"),
    (lambda q, k, v: _bad(q, k, v, sink_cols=torch.zeros(2, dtype=torch.long)), "sink_cols must have shape"),
    (lambda q, k, v: _bad(q, k, v, sink_cols=torch.zeros(2, 1)), "integer key columns"),
    (lambda q, k, v: _bad(q, k, v, beta=torch.ones(2)), "beta must have shape"),
    (lambda q, k, v: _bad(q, k, v, virtual_sink_logit=torch.ones(3)), "virtual_sink_logit must have shape"),
    (lambda q, k, v: _bad(q, k, v, softcap=0.0), "softcap must be a finite number > 0"),
    (lambda q, k, v: _bad(q, k, v, scale=-1.0), "scale must be a finite number > 0"),
    (lambda q, k, v: _bad(q, k, v, scale=float("nan")), "scale must be a finite number > 0"),
    (lambda q, k, v: _bad(q, k, v, sliding_window=0), "sliding_window must be an integer >= 1"),
    (lambda q, k, v: _bad(q, k, v, sliding_window=2.5), "sliding_window must be an integer >= 1"),
    (lambda q, k, v: sink_attention_torch(q, k, v, beta=torch.ones(2)), "beta must have shape"),
], ids=["gqa", "batch", "kv-length", "no-key", "extra-logits", "sink-cols-1d", "sink-cols-float", "beta", "virtual",
        "softcap-0", "scale-negative", "scale-nan", "window-0", "window-float", "torch-entry"])
def test_bad_arguments_are_named_not_internal_errors(case, message):
    """The PyTorch path failed on these with view / index errors from deep inside, or ran them
    silently (softcap 0: every score 0; scale 0: uniform rows; window 0: empty rows), where the
    Triton launcher names the argument."""
    q, k, v = _inputs(2, 4, 2, 5, 5, 16)
    with pytest.raises((ValueError, TypeError), match=message):
        case(q, k, v)
