"""The tolerance rule itself (docs/testing.md) must catch plausible kernel bugs: ``check_attention`` is
fed the fp64 reference of a *mutated* call (a head's beta off, a virtual logit off, a window or causal
offset off by one, the scale off by 2%), rounded to the input dtype, and must refuse it in every dtype;
likewise an lse shifted by 1e-4. No kernel runs here: the rule is checked, not a kernel."""

from __future__ import annotations

import sys

import pytest
import torch

from sinkfix.ops.reference import reference_sink_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BETAS = torch.tensor([0.4, 0.9, 0.0])


def _wrong(q, k, v, kw, mutated):
    out, _, lse = reference_sink_attention(q, k, v, **mutated)
    return out.to(q.dtype), lse.float()


def _cases(kt, dtype):
    sink = torch.zeros(2, 1, dtype=torch.long)
    q, k, v = kt.make_qkv(2, 3, 1, 113, 113, 64, dtype, sink_cols=sink, sink_boost=4.0, seed=1)
    base = dict(causal=True, sink_cols=sink, beta=BETAS)
    virtual = dict(causal=True, sink_cols=sink, virtual_sink_logit=torch.full((3,), 1.5))
    window = dict(base, sliding_window=16)
    yield "beta of head 0 off by 0.05", (q, k, v), base, dict(base, beta=torch.tensor([0.45, 0.9, 0.0]))
    yield "beta of head 1 ignored", (q, k, v), base, dict(base, beta=torch.tensor([0.4, 1.0, 0.0]))
    yield "virtual logit 1.5 applied as 2.0", (q, k, v), virtual, dict(virtual, virtual_sink_logit=torch.full((3,), 2.0))
    yield "window off by one", (q, k, v), window, dict(window, sliding_window=17)
    yield "scale off by 2%", (q, k, v), base, dict(base, scale=64 ** -0.5 * 1.02)
    qc, kc, vc = kt.make_qkv(2, 4, 2, 17, 113, 64, dtype, sink_cols=sink, sink_boost=3.0, seed=2)
    chunk = dict(causal=True, causal_offset=96, sink_cols=sink, beta=torch.tensor([0.4, 0.9, 0.0, 0.7]))
    yield "causal offset off by one", (qc, kc, vc), chunk, dict(chunk, causal_offset=95)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_plausible_kernel_bugs_fail_the_rule(kt, dtype):
    for label, (q, k, v), kw, mutated in _cases(kt, dtype):
        out, lse = _wrong(q, k, v, kw, mutated)
        with pytest.raises(AssertionError):
            kt.check_attention(out, lse, q, k, v, label=label, **kw)
    # the right answer, rounded the same way, passes: the rule is not merely strict
    recorded = sys.modules[type(kt).__module__].ERRORS  # the kernels' error summary: these are not kernels
    before = len(recorded)
    for label, (q, k, v), kw, _ in _cases(kt, dtype):
        out, lse = _wrong(q, k, v, kw, kw)
        kt.check_attention(out, lse, q, k, v, label=label, **kw)
    del recorded[before:]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_an_lse_off_by_1e_4_fails_the_rule(kt, dtype):
    """The lse's yardstick has fp32 scores: the same-dtype one let an lse off by 5e-2 pass in bf16."""
    sink = torch.zeros(2, 1, dtype=torch.long)
    q, k, v = kt.make_qkv(2, 3, 1, 113, 113, 64, dtype, sink_cols=sink, sink_boost=4.0, seed=1)
    kw = dict(causal=True, sink_cols=sink, beta=BETAS)
    out, lse = _wrong(q, k, v, kw, kw)
    with pytest.raises(AssertionError, match="lse error"):
        kt.check_attention(out, lse + 1e-4, q, k, v, label="lse shifted", **kw)


def _gap_case(dtype, gap):
    """A positional sink ``gap`` nats above every other key (built in fp32, then rounded)."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 16) * 0.1
    q[..., 0] = 1.0
    k = torch.randn(1, 1, 6, 16) * 0.1
    k[:, :, 0, 0] = gap * 16 ** 0.5
    v = torch.randn(1, 1, 6, 16)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_a_beta_ignoring_output_fails_the_rule_at_a_110_nat_sink_gap(kt, dtype):
    """The yardstick once decided 'the row sees a non-sink key' from l_N > 0, which underflows in
    fp32 at a gap of ~110 nats: it then ignored beta itself (2.66 off), the tolerance became 5.33
    and an output that ignores beta (2.66 off) passed."""
    q, k, v = _gap_case(dtype, 110.0)
    kw = dict(causal=True, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 0.0]))
    out, lse = _wrong(q, k, v, kw, dict(kw, beta=None))
    with pytest.raises(AssertionError, match="out error"):
        kt.check_attention(out, lse, q, k, v, label="beta ignored at a 110-nat gap", **kw)
    recorded = sys.modules[type(kt).__module__].ERRORS
    before = len(recorded)
    out, lse = _wrong(q, k, v, kw, kw)
    kt.check_attention(out, lse, q, k, v, label="110-nat gap", **kw)
    del recorded[before:]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_an_lse_off_by_1_fails_the_rule_with_a_virtual_logit_of_120(kt, dtype):
    """The lse yardstick once put the zero-value logits in the row maximum: with a virtual logit of
    120 log(l_S + l_N) underflowed to -inf on every row but the sink's, and any lse passed."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16).to(dtype), torch.randn(1, 1, 6, 16).to(dtype),
               torch.randn(1, 1, 6, 16).to(dtype))
    kw = dict(causal=True, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 0.9]),
              virtual_sink_logit=torch.tensor([120.0, 120.0]))
    out, lse = _wrong(q, k, v, kw, kw)
    with pytest.raises(AssertionError, match="lse error"):
        kt.check_attention(out, lse + 1.0, q, k, v, label="lse off by 1.0, virtual logit 120", **kw)
    recorded = sys.modules[type(kt).__module__].ERRORS
    before = len(recorded)
    kt.check_attention(out, lse, q, k, v, label="virtual logit 120", **kw)
    del recorded[before:]
