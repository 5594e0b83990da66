"""Grouped key/value heads on the CPU flash op: read natively where torch's op supports it, repeated
to the query heads where it does not (torch 2.6's op read heads that do not exist and its backward
wrote past its gradient buffers). Both routes against fp64 autograd of the formula, and the import
probe that chooses between them against an op that ignores the grouping."""

from __future__ import annotations

import pytest
import torch

from sinkfix.ops import flash
from sinkfix.ops.reference import reference_sink_attention, visibility_mask

pytestmark = pytest.mark.skipif(not flash.cpu_flash_available(torch.float32),
                                reason="this torch has no CPU flash-attention op")

# fp32 fused kernels against fp64: ~2e-6 relative on these shapes (tests/test_ops_torch.py); a key
# head read for the wrong query head is off by O(1)
TOL = dict(atol=5e-5, rtol=5e-4)


def _inputs(batch: int, q_heads: int, kv_heads: int, q_len: int, k_len: int, dim: int):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(batch, q_heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, k_len, dim, generator=g),
            torch.randn(batch, kv_heads, k_len, dim, generator=g))


def _visible(batch: int, q_len: int, k_len: int) -> torch.Tensor:
    visible = visibility_mask(batch, q_len, k_len, causal=True).clone()
    visible[-1, ..., :2] = False  # left padding of the last sequence
    visible[-1, ..., :2, :] = True  # whose first rows see everything (no empty row)
    return visible


@pytest.fixture(params=["as probed", "repeated"])
def route(request, monkeypatch):
    """The route this torch takes, and the repeat route forced (what an older torch takes)."""
    if request.param == "repeated":
        monkeypatch.setattr(flash, "_CPU_FLASH_NATIVE_GQA", False)
    return request.param


@pytest.mark.parametrize("shape", [(2, 6, 2, 13, 13, 32), (1, 9, 3, 7, 19, 16), (2, 4, 1, 5, 5, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_heads_forward_matches_fp64(route, shape, masked):
    batch, q_heads, kv_heads, q_len, k_len, dim = shape
    q, k, v = _inputs(*shape)
    visible = _visible(batch, q_len, k_len) if masked else None
    out, lse = flash.flash_with_lse(q, k, v, visible=visible, is_causal=not masked, scale=0.2)
    want_out, _, want_lse = reference_sink_attention(q.double(), k.double(), v.double(), attn_mask=visible,
                                                     causal=not masked, scale=0.2)
    torch.testing.assert_close(out.double(), want_out, **TOL)
    torch.testing.assert_close(lse.double(), want_lse, **TOL)


@pytest.mark.skipif(not flash.fused_lse_backward_available(torch.device("cpu"), torch.float32),
                    reason="this torch has no CPU flash-attention backward kernel")
def test_grouped_heads_gradients_match_fp64(route):
    """Gradients in q, k and v (k and v summed over each group's query heads) through the op's own
    backward kernel, with a loss on the output and on the log-sum-exp."""
    q, k, v = _inputs(2, 6, 2, 13, 13, 32)
    visible = _visible(2, 13, 13)
    g = torch.Generator().manual_seed(5)
    out_weights, lse_weights = torch.randn(2, 6, 13, 32, generator=g), torch.randn(2, 6, 13, generator=g)

    def grads(fn, tensors):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out, lse = fn(*leaves)
        loss = (out.double() * out_weights.double()).sum() + (lse.double() * lse_weights.double()).sum()
        return torch.autograd.grad(loss, leaves)

    got = grads(lambda *t: flash.flash_with_lse(*t, visible=visible, is_causal=False, scale=0.2), (q, k, v))
    want = grads(lambda *t: reference_sink_attention(*t, attn_mask=visible, scale=0.2)[::2],
                 (q.double(), k.double(), v.double()))
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, **TOL, msg=lambda m: f"d/d{name}: {m}")


def test_probe_tells_an_op_that_ignores_the_grouping(monkeypatch):
    """An op that reads key head h for query head h (torch 2.6's did) fails the probe; the real op of
    a torch that passes it gives the grouped numbers. The probe's key/value is a view of a two-head
    tensor, so the ignoring op reads inside it, never past it."""
    real = flash._CPU_FLASH_OP

    def ignores_grouping(q, k, v, *args, **kwargs):
        shape, strides = q.shape, (k.stride(0), k.stride(1), k.stride(2), k.stride(3))
        return real(q, k.as_strided(shape, strides), v.as_strided(shape, strides), *args, **kwargs)

    monkeypatch.setattr(flash, "_CPU_FLASH_OP", ignores_grouping)
    assert flash._probe_cpu_flash(torch.float32)  # it runs, and a shape check alone would pass it
    assert not flash._probe_cpu_flash_gqa()
    monkeypatch.setattr(flash, "_CPU_FLASH_OP", real)
    q, k, v = _inputs(1, 4, 2, 5, 5, 8)
    grouped = real(q, k, v, 0.0, True)[0]
    repeated = real(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.0, True)[0]
    assert flash._probe_cpu_flash_gqa() == torch.allclose(grouped, repeated, atol=1e-5)


def test_repeat_route_keeps_native_heads_alone(monkeypatch):
    """Without native grouping only grouped calls are repeated; equal head counts pass as they are."""
    monkeypatch.setattr(flash, "_CPU_FLASH_NATIVE_GQA", False)
    q, k, v = _inputs(1, 4, 2, 3, 3, 8)
    k2, v2 = flash._repeat_kv_heads(q, k, v)
    assert k2.shape[1] == v2.shape[1] == 4
    torch.testing.assert_close(k2[:, 1], k[:, 0])
    torch.testing.assert_close(k2[:, 2], k[:, 1])
    same_k, same_v = flash._repeat_kv_heads(q, k2, v2)
    assert same_k is k2 and same_v is v2
