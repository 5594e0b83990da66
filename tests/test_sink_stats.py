"""The fast path's sink statistics (AttentionResult.sink_stats) against the fp64 reference.

Per batch row and query head: the sink mass before sink scaling (zero-value logits counted) summed
over the rows that see a non-sink key, and that row count, on every layout and policy of the
PyTorch path's own tests, through the split path, the decode path, the identity's single fused call
and the dense path, and through the custom op variant that torch.compile sees.
"""

from __future__ import annotations

import pytest
import torch

from sinkfix.ops import custom_ops
from sinkfix.ops.attention import first_column_row_mass, sink_attention, sink_attention_torch
from sinkfix.ops.reference import reference_sink_attention, sink_key_mask, visibility_mask

from .test_ops_torch import ATOL, SHAPES, _inputs, _layout, _policies


def _expected(q, k, v, kw, sink_cols, pol) -> torch.Tensor:
    """(B, Hq, 2) fp64 from the reference: beta = 1 probabilities on the sink columns, summed over
    the rows that see at least one key outside the sink set."""
    _, probs, _ = reference_sink_attention(q, k, v, **kw, sink_cols=sink_cols, extra_logits=pol.get("extra_logits"),
                                           virtual_sink_logit=pol.get("virtual_sink_logit"))
    batch, k_len = q.shape[0], k.shape[2]
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)
    visible = visibility_mask(batch, q.shape[2], k_len, **kw)
    has_n = (visible & ~is_sink[:, None, None, :]).any(-1).expand(batch, q.shape[1], q.shape[2])
    row_mass = (probs * is_sink[:, None, None, :]).sum(-1)
    return torch.stack((torch.where(has_n, row_mass, 0).sum(-1), has_n.sum(-1).double()), dim=-1)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[-1] for s in SHAPES])
@pytest.mark.parametrize("policy", list(_policies(1)))
@pytest.mark.parametrize("n_sink", [1, 2])
def test_sink_stats_match_reference(shape, policy, n_sink):
    batch, q_heads, kv_heads, q_len, k_len, dim, kind = shape
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, k_len, dim)
    kw, first = _layout(kind, batch, q_len, k_len)
    sink_cols = first[:, None] + torch.arange(n_sink)[None, :]
    pol = _policies(q_heads)[policy]
    expected = _expected(q, k, v, kw, sink_cols, pol)
    # a sum over up to Q rows of per-row errors of ~1e-6 (test_ops_torch.ATOL per row)
    atol = ATOL * q_len
    plain_first_column = n_sink == 1 and kind in ("causal", "decode")
    for first_column_sink in (False, True) if plain_first_column else (False,):
        got = sink_attention_torch(q, k, v, **kw, sink_cols=sink_cols, first_column_sink=first_column_sink,
                                   need_sink_stats=True, **pol)
        assert got.sink_stats.shape == (batch, q_heads, 2) and got.sink_stats.dtype == torch.float32
        torch.testing.assert_close(got.sink_stats.double(), expected, atol=atol, rtol=0)
        # the statistics leave the output untouched
        plain = sink_attention_torch(q, k, v, **kw, sink_cols=sink_cols, first_column_sink=first_column_sink, **pol)
        torch.testing.assert_close(got.out, plain.out, atol=0, rtol=0)
        assert plain.sink_stats is None
    # the dense path (probabilities requested) gives the same sums
    dense = sink_attention_torch(q, k, v, **kw, sink_cols=sink_cols, return_probs=True, need_sink_stats=True, **pol)
    torch.testing.assert_close(dense.sink_stats.double(), expected, atol=atol, rtol=0)


def test_stats_are_not_trivial():
    """Guards the test above: the sums differ between heads and move with the sink's strength."""
    q, k, v = _inputs(1, 4, 2, 17, 17, 64)
    stats = sink_attention_torch(q, k, v, causal=True, first_column_sink=True, need_sink_stats=True).sink_stats
    assert stats[0, :, 1].tolist() == [16.0] * 4  # row 0 sees only the sink
    assert stats[0, :, 0].std() > 0.1 and 0 < stats[0, :, 0].min() and stats[0, :, 0].max() < 16
    k2 = k.clone()
    k2[:, :, 0] -= 4.0 * q.mean(dim=(1, 2))[:, None]
    weaker = sink_attention_torch(q, k2, v, causal=True, first_column_sink=True, need_sink_stats=True).sink_stats
    assert (weaker[0, :, 0] < stats[0, :, 0]).all()


@pytest.mark.parametrize("policy", ["identity", "scale+aux+virtual"])
def test_dispatch_and_custom_op_variant(policy):
    """sink_attention (eager: the op's Python function; compiled: the registered op) returns the same
    statistics, and the registered op passes torch.library's consistency checks (fake shapes)."""
    q, k, v = _inputs(2, 6, 2, 9, 9, 32)
    pol = _policies(6)[policy]
    ref = sink_attention_torch(q, k, v, causal=True, first_column_sink=True, need_sink_stats=True, **pol)
    got = sink_attention(q, k, v, backend="torch", causal=True, first_column_sink=True, need_sink_stats=True, **pol)
    torch.testing.assert_close(got.sink_stats, ref.sink_stats, atol=0, rtol=0)
    torch.testing.assert_close(got.out, ref.out, atol=0, rtol=0)
    args = (q, k, v, None, None, None, None, pol.get("beta"), pol.get("extra_logits"), pol.get("virtual_sink_logit"),
            True, 0, None, 32 ** -0.5, None, True, "torch")
    out, lse, stats = torch.ops.sinkfix.sink_attention_stats(*args)
    torch.testing.assert_close(stats, ref.sink_stats, atol=0, rtol=0)
    torch.library.opcheck(custom_ops.sink_attention_stats_op, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_stats_with_gradients_take_the_differentiable_path():
    q, k, v = _inputs(1, 4, 2, 7, 7, 16)
    beta = torch.full((4,), 0.8, requires_grad=True)
    got = sink_attention(q, k, v, backend="torch", causal=True, first_column_sink=True, beta=beta,
                         need_sink_stats=True)
    got.out.sum().backward()
    assert beta.grad is not None and got.sink_stats.shape == (1, 4, 2)


@pytest.mark.parametrize("lead,q_heads,kv_heads,dim", [((1,), 4, 4, 8), ((3, 2), 9, 3, 64), ((5, 1), 6, 1, 16),
                                                       ((2, 3), 8, 2, 40)])
def test_first_column_row_mass_many_rows_at_once(lead, q_heads, kv_heads, dim):
    """The sink mass of single decode rows of plain softmax, for several layers and sequences in one
    product, against the fp64 reference's probability of key 0 (each row's own keys and lse)."""
    g = torch.Generator().manual_seed(sum(lead) + q_heads + dim)
    k_len = 7
    q = torch.randn(*lead, q_heads, dim, generator=g)
    k = torch.randn(*lead, kv_heads, k_len, dim, generator=g)
    k[..., 0, :] += 2.0 * q.unflatten(-2, (kv_heads, q_heads // kv_heads)).mean(-2)  # a sink worth measuring
    flat_q, flat_k = q.reshape(-1, q_heads, 1, dim), k.reshape(-1, kv_heads, k_len, dim)
    _, probs, lse = reference_sink_attention(flat_q, flat_k, flat_k, scale=dim ** -0.5, sink_cols=None)
    expected = probs[..., 0, 0].reshape(*lead, q_heads)
    assert expected.min() > 0.01 and expected.mean() > 0.2  # a sink worth measuring, not a sum of zeros
    scale = torch.full((*lead, 1), dim ** -0.5)
    for s in (dim ** -0.5, scale):
        got = first_column_row_mass(q, k[..., 0, :], lse[..., 0].reshape(*lead, q_heads).float(), s)
        assert got.dtype == torch.float32 and got.shape == (*lead, q_heads)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    lse_rows = lse[..., 0].reshape(*lead, q_heads)
    half = first_column_row_mass(q.bfloat16(), k[..., 0, :].bfloat16(), lse_rows, dim ** -0.5)
    torch.testing.assert_close(half.double(), expected, atol=0.05, rtol=0.05)  # bf16 inputs, fp32 arithmetic


def test_first_column_row_mass_refuses_rows_that_do_not_match():
    q, k0 = torch.randn(2, 4, 8), torch.randn(2, 3, 8)  # 4 query heads cannot share 3 kv heads
    with pytest.raises(ValueError, match="same rows"):
        first_column_row_mass(q, k0, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="same rows"):
        first_column_row_mass(torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.zeros(3, 4), 1.0)
