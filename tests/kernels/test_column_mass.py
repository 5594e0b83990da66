"""The column-mass kernel (content-dependent sinks) against the fp64 column statistics.

Per (batch row, query head, key): the stock attention mass the key receives, summed over the query
rows that see it, and (per batch row and key) how many rows see it
(:func:`sinkfix.ops.content_reference.column_stats_reference`). Small tiles (16 x 16) so every
case has several key programs and query tiles, ragged at both ends. Cases: GQA, causal with a
chunk offset (Q < K), left padding given as key ranges, a window with a softcap, a dense mask,
no causal rule, bf16 inputs with the prefill kernel's own lse.
"""

from __future__ import annotations

import pytest
import torch

from ..conftest import require_triton_kernels

require_triton_kernels()

from sinkfix.kernels.attention_prefill import sink_attention_prefill  # noqa: E402
from sinkfix.kernels.column_mass import column_mass  # noqa: E402
from sinkfix.ops.content_reference import column_stats_reference  # noqa: E402
from sinkfix.ops.reference import reference_sink_attention  # noqa: E402

from .conftest import DEVICE, make_qkv  # noqa: E402

# Each visible (row, key) pair adds exp(s - lse) <= 1 in fp32 from fp32 scores (16-bit inputs:
# exact products, fp32 sums), ~1e-7 per pair against fp64; 1e-5 per seeing row leaves margin and
# is still 1e3 below what a wrong row set or a missing lse term costs (>= 1e-2 per row).
ROW_ATOL = 1e-5
TILES = dict(block_m=16, block_n=16)


def _padding(batch: int, k_len: int, left: int) -> torch.Tensor:
    pad = torch.ones(batch, k_len, dtype=torch.bool)
    pad[-1, :left] = False  # the last sequence is left-padded
    return pad.to(DEVICE)


def _check(q, k, mass, rows, label, *, key_padding=None, **rules):
    if key_padding is not None:
        rules["attn_mask"] = key_padding[:, None, None, :] if rules.get("attn_mask") is None \
            else rules["attn_mask"] & key_padding[:, None, None, :]
    ref = column_stats_reference(q, k, **rules)
    assert torch.equal(rows.double().cpu(), ref.rows.cpu()), f"{label}: row counts {rows} vs {ref.rows}"
    assert torch.isfinite(mass).all(), f"{label}: non-finite mass"
    err = (mass.double().cpu() - ref.mass.cpu()).abs()
    allowed = ROW_ATOL * ref.rows.cpu()[:, None, :].clamp(min=1)
    assert (err <= allowed).all(), f"{label}: mass error {err.max().item():.3g}"
    return ref


def _stock_lse(q, k, v, *, key_padding=None, **rules):
    """fp32 row lse of the fp64 reference (stock attention; the kernel's input)."""
    if key_padding is not None:
        rules["attn_mask"] = key_padding[:, None, None, :] if rules.get("attn_mask") is None \
            else rules["attn_mask"] & key_padding[:, None, None, :]
    _, _, lse = reference_sink_attention(q, k, v, **rules)
    return lse.float()


CASES = {
    # label: (batch, q heads, kv heads, Q, K, D, rules, left padding)
    "gqa causal chunk": (2, 6, 2, 13, 37, 24, dict(causal=True, causal_offset=24), 0),
    "causal square padded": (2, 3, 1, 29, 29, 16, dict(causal=True), 5),
    "window softcap": (1, 4, 2, 23, 31, 20, dict(causal=True, causal_offset=8, sliding_window=7, softcap=5.0), 3),
    "not causal padded": (2, 2, 2, 9, 19, 32, dict(), 6),
}


@pytest.mark.parametrize("label", list(CASES))
def test_column_mass_fp32(label):
    batch, hq, hk, q_len, k_len, d, rules, left = CASES[label]
    q, k, v = make_qkv(batch, hq, hk, q_len, k_len, d, torch.float32, sink_cols=torch.zeros(batch, 1, dtype=torch.long),
                       sink_boost=3.0, seed=len(label))
    pad = _padding(batch, k_len, left) if left else None
    lse = _stock_lse(q, k, v, key_padding=pad, **rules)
    mass, rows = column_mass(q, k, lse, key_padding=pad, **rules, **TILES)
    ref = _check(q, k, mass, rows, label, key_padding=pad, **rules)
    # the planted sink (key 0 of real keys) takes most of the mass: the case is not trivially flat
    assert ref.mass.max() > 2 * ref.mass.mean()


def test_column_mass_dense_mask():
    batch, hq, hk, q_len, k_len, d = 2, 4, 2, 11, 40, 16
    q, k, v = make_qkv(batch, hq, hk, q_len, k_len, d, torch.float32, seed=3)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(batch, 1, q_len, k_len, generator=g) > 0.4
    mask[0, 0, 2] = False  # a row that sees nothing (lse = -inf) adds nothing
    mask = mask.to(DEVICE)
    lse = _stock_lse(q, k, v, attn_mask=mask)
    assert torch.isinf(lse[0, :, 2]).all()
    mass, rows = column_mass(q, k, lse, attn_mask=mask, **TILES)
    _check(q, k, mass, rows, "dense mask", attn_mask=mask)


def test_column_mass_bf16_with_kernel_lse():
    """bf16 inputs, the lse from the prefill kernel's LSE_ONLY variant (the chain the content path
    runs), which must equal the full kernel's lse bit for bit (same statistics, no P.V)."""
    batch, hq, hk, q_len, k_len, d = 2, 4, 1, 19, 27, 32
    first = torch.zeros(batch, 1, dtype=torch.long)
    q, k, v = make_qkv(batch, hq, hk, q_len, k_len, d, torch.bfloat16, sink_cols=first, sink_boost=3.0, seed=5)
    pad = _padding(batch, k_len, 4)
    rules = dict(causal=True, causal_offset=k_len - q_len)
    out, lse = sink_attention_prefill(q, k, v, key_padding=pad, **rules, block_m=16, block_n=16, lse_only=True)
    assert out is None
    _, full_lse = sink_attention_prefill(q, k, v, key_padding=pad, **rules, block_m=16, block_n=16)
    assert torch.equal(lse, full_lse)
    mass, rows = column_mass(q, k, lse, key_padding=pad, **rules, **TILES)
    # the kernel's lse differs from fp64 by ~1e-6 (fp32 sums of exact bf16 products): per row a
    # relative 1e-6 of its mass, inside ROW_ATOL
    _check(q, k, mass, rows, "bf16", key_padding=pad, **rules)


def test_lse_only_refuses_a_policy():
    q, k, v = make_qkv(1, 2, 1, 5, 7, 16, torch.float32)
    with pytest.raises(ValueError, match="lse_only"):
        sink_attention_prefill(q, k, v, lse_only=True, beta=torch.ones(2, device=DEVICE))


def test_column_mass_bad_lse():
    q, k, _ = make_qkv(1, 2, 1, 5, 7, 16, torch.float32)
    with pytest.raises(ValueError, match="lse must be"):
        column_mass(q, k, torch.zeros(1, 2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="lse must be"):
        column_mass(q, k, torch.zeros(1, 2, 5, dtype=torch.float64, device=DEVICE))
