"""The prefill kernel's content-dependent-sink variant (HAS_HIDDEN) against the fp64 reference.

A given per-(batch, head) hidden-sink mask and per-head hidden beta
(:func:`sinkfix.ops.content_reference.reference_content_sink_attention`): the hidden keys keep
beta_H of their mass and hand the rest to the other visible keys, then the positional rule. The
inputs have planted sinks (a positional sink at the first real key and two hidden sinks that take
real mass: keys aligned with the mean query), so the correction moves the output by far more than
the tolerance. Small tiles (16 x 16): several query and key tiles, ragged ends, masked and
unmasked key tiles. Tolerance rule of docs/testing.md: at most twice the error of the same formula
run in the input dtype (fp32 statistics, P.V in the input dtype) plus the dtype's floor.
"""

from __future__ import annotations

import pytest
import torch

from ..conftest import require_triton_kernels

require_triton_kernels()

from sinkfix.kernels.attention_prefill import sink_attention_prefill  # noqa: E402
from sinkfix.ops.content_reference import reference_content_sink_attention  # noqa: E402

from .conftest import ATOL, DEVICE, LSE_ATOL, make_qkv, poisoned  # noqa: E402

TILES = dict(block_m=16, block_n=16)
HIDDEN_COLS = (6, 19)


def _planted(batch, hq, hk, q_len, k_len, d, dtype, *, left=0, seed=0):
    """q, k, v with a sink at each sequence's first real key and hidden sinks at HIDDEN_COLS (+ the
    padding), and the hidden mask: the planted columns in every other head, plus random columns
    (some not attended at all, one on the positional sink, which must be ignored)."""
    firsts = torch.tensor([0] * (batch - 1) + [left])
    q, k, v = make_qkv(batch, hq, hk, q_len, k_len, d, torch.float32, sink_cols=firsts[:, None], sink_boost=4.0,
                       seed=seed)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    q_dir = q.mean(dim=(1, 2))
    q_dir = q_dir / q_dir.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(batch, hq, k_len, generator=g) > 0.85
    for b in range(batch):
        for c in HIDDEN_COLS:
            col = c + int(firsts[b])
            if col < k_len:
                k[b, :, col] = q_dir[b] * 2.5 * d ** 0.5 / 1.5
                hidden[b, ::2, col] = True
        hidden[b, 1, firsts[b]] = True  # a positional sink marked hidden: ignored (S wins)
    to = dict(device=DEVICE, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), hidden.to(DEVICE), firsts


def _same_dtype(q, k, v, **kw):
    """The formula with fp32 statistics and P.V in the input dtype: the yardstick of the rule."""
    _, probs, lse = reference_content_sink_attention(q, k, v, **kw, compute_dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    return probs.to(q.dtype) @ v.repeat_interleave(group, 1), lse


def _check(out, lse, q, k, v, label, *, key_padding=None, **kw):
    if key_padding is not None:
        kw["attn_mask"] = key_padding[:, None, None, :] if kw.get("attn_mask") is None \
            else kw["attn_mask"] & key_padding[:, None, None, :]
    ref_out, _, ref_lse = reference_content_sink_attention(q, k, v, **kw)
    lp_out, lp_lse = _same_dtype(q, k, v, **kw)
    assert torch.isfinite(out).all(), f"{label}: non-finite output (unwritten?)"
    err = (out.double() - ref_out).abs().max().item()
    err_lp = (lp_out.double() - ref_out).abs().max().item()
    assert err <= 2 * err_lp + ATOL[q.dtype], f"{label}: out error {err:.3g} vs same-dtype {err_lp:.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{label}: -inf pattern of lse"
    fin = torch.isfinite(ref_lse)
    lse_err = (lse.double() - ref_lse)[fin].abs().max().item()
    lse_err_lp = (lp_lse.double() - ref_lse)[fin].abs().max().item()
    assert lse_err <= 2 * lse_err_lp + LSE_ATOL, f"{label}: lse error {lse_err:.3g}"
    return ref_out


def _positional(q, k, v, *, key_padding=None, **kw):
    kw = {n: t for n, t in kw.items() if n not in ("hidden", "hidden_beta")}
    if key_padding is not None:
        kw["attn_mask"] = key_padding[:, None, None, :] if kw.get("attn_mask") is None \
            else kw["attn_mask"] & key_padding[:, None, None, :]
    return reference_content_sink_attention(q, k, v, hidden=torch.zeros(1, 1, 1, dtype=torch.bool).expand(
        q.shape[0], q.shape[1], k.shape[2]), hidden_beta=torch.ones(q.shape[1]), **kw)[0]


HQ = 4
HIDDEN_BETA = torch.tensor([0.4, 0.0, 1.0, 0.7])

CASES = {
    # label: (dtype, batch, kv heads, Q, K, D, left padding, extra keyword arguments)
    "gqa chunk": (torch.float32, 2, 2, 13, 53, 24, 0, dict(causal=True, causal_offset=40)),
    "padded policy": (torch.float32, 2, 1, 29, 29, 16, 3,
                      dict(causal=True, beta=torch.tensor([0.5, 0.9, 0.0, 1.0]), extra_logits=torch.randn(HQ, 1),
                           virtual_sink_logit=torch.full((HQ,), 0.5))),
    "window softcap": (torch.float32, 1, 2, 23, 31, 20, 0,
                       dict(causal=True, causal_offset=8, sliding_window=12, softcap=6.0)),
    "bf16 padded": (torch.bfloat16, 2, 2, 21, 33, 32, 4, dict(causal=True, causal_offset=12,
                                                              beta=torch.full((HQ,), 0.8))),
    # head dim 72 (not a multiple of 16): the variant whose compiled code spills (docs/testing.md)
    "bf16 hd72": (torch.bfloat16, 1, 2, 19, 27, 72, 0, dict(causal=True, causal_offset=8,
                                                            beta=torch.full((HQ,), 0.6))),
}


@pytest.mark.parametrize("label", list(CASES))
def test_hidden_variant(label):
    dtype, batch, hk, q_len, k_len, d, left, extra = CASES[label]
    q, k, v, hidden, firsts = _planted(batch, HQ, hk, q_len, k_len, d, dtype, left=left, seed=len(label))
    pad = (torch.arange(k_len)[None, :] >= torch.tensor([0] * (batch - 1) + [left])[:, None]).to(DEVICE) \
        if left else None
    extra = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in extra.items()}
    kw = dict(hidden=hidden, hidden_beta=HIDDEN_BETA.to(DEVICE), sink_cols=firsts[:, None].to(DEVICE), **extra)
    out, lse = poisoned(q)
    sink_attention_prefill(q, k, v, key_padding=pad, **kw, out=out, lse=lse, **TILES)
    ref = _check(out, lse, q, k, v, label, key_padding=pad, **kw)
    # the hidden sinks matter: the positional formula alone is far from the reference
    assert (ref - _positional(q, k, v, key_padding=pad, **kw)).abs().max() > 50 * ATOL[dtype]


def test_hidden_rows_that_see_only_hidden_sinks():
    """Row 0 sees only key 0, a hidden sink (no positional sink): it stays stock; a dense mask gives
    a row that sees nothing (out 0, lse -inf)."""
    q, k, v = make_qkv(1, 2, 1, 9, 9, 16, torch.float32, seed=4)
    hidden = torch.zeros(1, 2, 9, dtype=torch.bool, device=DEVICE)
    hidden[0, :, 0] = True
    hidden[0, 1, 4] = True
    mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None].clone()
    mask[0, 0, 3] = False
    kw = dict(hidden=hidden, hidden_beta=torch.tensor([0.3, 0.0], device=DEVICE), attn_mask=mask.to(DEVICE))
    out, lse = poisoned(q)
    sink_attention_prefill(q, k, v, **kw, out=out, lse=lse, **TILES)
    _check(out, lse, q, k, v, "hidden-only rows", **kw)
    assert torch.isinf(lse[0, :, 3]).all() and (out[0, :, 3] == 0).all()


def test_no_hidden_equals_positional_kernel():
    """An empty hidden set gives the positional kernel's result (to rounding: another epilogue)."""
    q, k, v = make_qkv(2, 4, 2, 17, 17, 16, torch.float32, seed=2)
    kw = dict(causal=True, sink_cols=torch.zeros(2, 1, dtype=torch.long, device=DEVICE),
              beta=torch.full((4,), 0.6, device=DEVICE))
    out, lse = sink_attention_prefill(q, k, v, **kw, **TILES)
    out_h, lse_h = sink_attention_prefill(q, k, v, **kw, hidden=torch.zeros(2, 4, 17, dtype=torch.bool, device=DEVICE),
                                          hidden_beta=torch.full((4,), 0.4, device=DEVICE), **TILES)
    torch.testing.assert_close(out_h, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse_h, lse, atol=1e-6, rtol=0)


def test_hidden_bad_input():
    q, k, v = make_qkv(1, 2, 1, 5, 7, 16, torch.float32)
    hidden = torch.zeros(1, 2, 7, dtype=torch.bool, device=DEVICE)
    beta = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="go together"):
        sink_attention_prefill(q, k, v, hidden=hidden)
    with pytest.raises(ValueError, match="hidden must be"):
        sink_attention_prefill(q, k, v, hidden=hidden[..., :5], hidden_beta=beta)
    with pytest.raises(ValueError, match="hidden_beta must"):
        sink_attention_prefill(q, k, v, hidden=hidden, hidden_beta=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="sink_stats"):
        sink_attention_prefill(q, k, v, hidden=hidden, hidden_beta=beta,
                               sink_stats=torch.zeros(1, 2, 2, device=DEVICE))


@pytest.mark.parametrize("gap", [80.0, 95.0, 105.0, 120.0])
def test_a_hidden_sink_far_above_every_other_key(gap):
    """A hidden sink that out-scores every other key by more than fp32's exponent range: N and H
    once shared one running max, so l_N underflowed and the output was NaN (gaps 95-105 nats) or
    left the hidden sink unscaled (1.4 off at 120). The formula stays finite and O(1)."""
    torch.manual_seed(1)
    batch, heads, q_len, k_len, d = 1, 2, 8, 24, 16
    q = torch.zeros(batch, heads, q_len, d)
    q[..., 0] = 20.0
    q[..., 1:] = torch.randn(batch, heads, q_len, d - 1) * 0.1
    k = torch.randn(batch, 1, k_len, d) * 0.1
    k[0, 0, 5, 0] = gap / 5.0  # key 5 scores about `gap` nats above the rest
    v = torch.randn(batch, 1, k_len, d)
    kw = dict(causal=True, causal_offset=16, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 1.0]),
              hidden=(torch.arange(k_len) == 5).expand(1, heads, k_len).clone(), hidden_beta=torch.tensor([0.3, 0.3]))
    to = dict(device=DEVICE)
    out, lse = sink_attention_prefill(q.to(**to), k.to(**to), v.to(**to),
                                      **{n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in kw.items()},
                                      **TILES)
    # The file's rule (twice the same-dtype formula's error plus the floor), not a bound of its own.
    _check(out.cpu(), lse.cpu(), q, k, v, f"gap {gap}", **kw)


def test_the_rule_fails_a_beta_ignoring_output_and_a_wrong_lse_where_masses_underflow():
    """No kernel: the rule of this file itself. Its yardstick is the content reference in fp32, which
    once decided 'the row sees a key of N' from l_N > 0 and took lse = log(l_S + l_H + l_N) + row_max
    with the zero-value logits in row_max: at a sink gap of 110 nats it ignored beta_S (2.66 off, so
    a beta-ignoring output passed), and with a virtual logit of 120 its lse was -inf (any lse passed)."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 16) * 0.1
    q[..., 0] = 1.0
    k = torch.randn(1, 1, 6, 16) * 0.1
    k[:, :, 0, 0] = 110.0 * 16 ** 0.5  # the positional sink, 110 nats above every other key
    v = torch.randn(1, 1, 6, 16)
    hidden = torch.zeros(1, 2, 6, dtype=torch.bool)
    hidden[:, 0, 3] = True
    kw = dict(hidden=hidden, hidden_beta=torch.tensor([0.3, 1.0]), causal=True, sink_cols=torch.tensor([[0]]),
              beta=torch.tensor([0.5, 0.0]))
    right, _, lse = reference_content_sink_attention(q, k, v, **kw)
    wrong, _, _ = reference_content_sink_attention(q, k, v, **dict(kw, beta=None))
    _check(right.float(), lse.float(), q, k, v, "110-nat gap", **kw)
    with pytest.raises(AssertionError, match="out error"):
        _check(wrong.float(), lse.float(), q, k, v, "beta_S ignored at a 110-nat gap", **kw)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    kw = dict(kw, beta=torch.tensor([0.5, 0.9]), virtual_sink_logit=torch.tensor([120.0, 120.0]))
    right, _, lse = reference_content_sink_attention(q, k, v, **kw)
    _check(right.float(), lse.float(), q, k, v, "virtual logit 120", **kw)
    with pytest.raises(AssertionError, match="lse error"):
        _check(right.float(), (lse + 1.0).float(), q, k, v, "lse off by 1.0", **kw)
