"""The fp64 content reference (sinkfix/ops/content_reference.py) where a row's shared maximum makes a
mass underflow: which keys a row sees comes from the mask, and the lse from the real keys under
their own maximum, as in reference_sink_attention. With an empty hidden set it is the positional
formula (docs/formulas.md), whatever the gap between the sink and the other keys."""

from __future__ import annotations

import torch

from sinkfix.ops.content_reference import reference_content_sink_attention
from sinkfix.ops.reference import reference_sink_attention


def _gap_inputs(gap, col=0, seed=0):
    """q, k, v (1, 2, 6, 16) where key ``col`` scores about ``gap`` nats above every other key."""
    torch.manual_seed(seed)
    q = torch.randn(1, 2, 6, 16) * 0.1
    q[..., 0] = 1.0
    k = torch.randn(1, 1, 6, 16) * 0.1
    k[:, :, col, 0] = gap * 16 ** 0.5
    v = torch.randn(1, 1, 6, 16)
    return q, k, v


def _no_hidden(heads=2, k_len=6):
    return dict(hidden=torch.zeros(1, heads, k_len, dtype=torch.bool), hidden_beta=torch.ones(heads))


def test_empty_hidden_set_is_the_positional_formula_at_any_sink_gap():
    """Before: has_n = l_N > 0, so once l_N underflowed (a gap of 800 nats in fp64, 110 in fp32)
    beta_S was ignored: 2.66 off the positional reference in both."""
    kw = dict(causal=True, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 0.0]))
    cases = [(80.0, torch.float64, 1e-12), (110.0, torch.float64, 1e-12), (800.0, torch.float64, 1e-12),
             (110.0, torch.float32, 1e-6)]
    for gap, cd, tol in cases:
        q, k, v = _gap_inputs(gap)
        want, want_probs, want_lse = reference_sink_attention(q.double(), k.double(), v.double(), **kw)
        out, probs, lse = reference_content_sink_attention(q.double(), k.double(), v.double(), **_no_hidden(), **kw,
                                                           compute_dtype=cd)
        assert (out.double() - want).abs().max().item() <= tol, (gap, cd)
        assert (probs.double() - want_probs).abs().max().item() <= tol, (gap, cd)
        assert (lse.double() - want_lse).abs().max().item() <= tol * 120, (gap, cd)  # lse ~ gap: a few ulp of it
        # beta matters here: ignoring it moves the output by far more than the tolerance
        ignored, _, _ = reference_sink_attention(q.double(), k.double(), v.double(), causal=True,
                                                 sink_cols=torch.tensor([[0]]))
        assert (ignored - want).abs().max().item() > 1.0


def test_a_virtual_logit_of_120_leaves_the_lse_finite():
    """Before: lse = log(l_S + l_H + l_N) + row_max with the virtual logit in row_max; in fp32 the
    real keys' masses underflowed under a maximum of 120 and the lse was -inf on every row that
    counts the virtual logit."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    kw = dict(causal=True, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 0.9]),
              virtual_sink_logit=torch.tensor([120.0, 120.0]))
    want, _, want_lse = reference_sink_attention(q.double(), k.double(), v.double(), **kw)
    for cd in (torch.float64, torch.float32):
        out, _, lse = reference_content_sink_attention(q.double(), k.double(), v.double(), **_no_hidden(), **kw,
                                                       compute_dtype=cd)
        assert torch.isfinite(lse).all(), cd
        assert (lse.double() - want_lse).abs().max().item() <= 1e-5, cd
        assert (out.double() - want).abs().max().item() <= 1e-6, cd


def test_a_hidden_sink_far_above_the_rest_still_hands_out_its_mass():
    """A hidden sink ~110 nats above every other key, fp32: l_S + l_N underflows under the row's
    maximum. Before: has_rest = l_S + l_N > 0 was False there, so beta_H was ignored (the output was
    the hidden sink's value alone, 0.7 of the freed mass missing). The formula does not depend on
    the gap once it is this large, so fp32 at 110 nats and fp64 at 800 equal fp64 at 110."""
    hidden = torch.zeros(1, 2, 6, dtype=torch.bool)
    hidden[:, :, 3] = True
    kw = dict(causal=True, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 1.0]), hidden=hidden,
              hidden_beta=torch.tensor([0.3, 0.0]))
    q, k, v = _gap_inputs(110.0, col=3)
    want, _, want_lse = reference_content_sink_attention(q.double(), k.double(), v.double(), **kw)
    out32, _, lse32 = reference_content_sink_attention(q, k, v, **kw, compute_dtype=torch.float32)
    assert (out32.double() - want).abs().max().item() <= 1e-6
    assert (lse32.double() - want_lse).abs().max().item() <= 1e-4
    q8, k8, v8 = _gap_inputs(800.0, col=3)
    out800, _, _ = reference_content_sink_attention(q8.double(), k8.double(), v8.double(), **kw)
    assert (out800 - want).abs().max().item() <= 1e-12
    # and the correction matters in those rows: beta_H = 1 (stock) is far from it
    stock, _, _ = reference_content_sink_attention(q.double(), k.double(), v.double(),
                                                   **dict(kw, hidden_beta=torch.ones(2)))
    assert (stock - want)[:, :, 3:].abs().max().item() > 0.1
