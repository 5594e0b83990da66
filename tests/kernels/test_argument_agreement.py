"""The two backends take the same arguments the same way: a per-head mask's sink visibility, a
non-integer causal offset, a bool window, the residual clip's threshold and sink norm."""

from __future__ import annotations

import pytest
import torch

from sinkfix.ops.attention import sink_attention
from sinkfix.ops.content_attention import content_sink_attention
from sinkfix.ops.reference import reference_sink_attention
from sinkfix.ops.residual import residual_clip

from .conftest import DEVICE

BACKENDS = ("torch", "triton")


def _qkv(batch=2, q_heads=4, kv_heads=2, q_len=7, k_len=45, dim=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, dim, generator=g) for h, n in ((q_heads, q_len), (kv_heads, k_len),
                                                                       (kv_heads, k_len)))
    k[:, :, 0] += 2.0 * q.mean((1, 2))[:, None]  # a sink worth the name in column 0
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stats", [False, True])
def test_a_mask_with_one_plane_per_head_hides_the_sink_per_head(backend, stats):
    """The PyTorch path read head 0's plane for the sink columns in every head: 0.39 off at beta 1,
    2.25 with per-head beta and two sinks; head 1's stock sink mass 0.516 where it sees no sink."""
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(1, 4, 7, 45, generator=g) > 0.3).to(DEVICE)
    mask[:, 1, :, 0] = False  # head 1 never sees column 0
    mask[:, 2, :, 0] = True
    kw = dict(causal=True, causal_offset=38, sink_cols=torch.tensor([[0, 33]], device=DEVICE),
              beta=torch.tensor([0.3, 0.0, 1.0, 0.5], device=DEVICE))
    result = sink_attention(q, k, v, backend=backend, attn_mask=mask, need_sink_stats=stats, **kw)
    out, _, lse = reference_sink_attention(q, k, v, attn_mask=mask, **kw)
    assert (result.out.double() - out).abs().max() < 2e-6
    seen = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(result.lse), seen)
    assert (result.lse.double() - lse)[seen].abs().max() < 2e-6
    if stats:
        plain = reference_sink_attention(q, k, v, attn_mask=mask, causal=True, causal_offset=38,
                                         sink_cols=kw["sink_cols"])[1]
        sink_visible = mask.expand(2, 4, 7, 45)[..., [0, 33]] & torch.ones(7, 45, dtype=torch.bool,
                                                                             device=DEVICE).tril(38)[:, [0, 33]]
        mass = (plain[..., [0, 33]] * sink_visible).sum(-1)
        sees_rest = (mask.expand(2, 4, 7, 45) & torch.ones(7, 45, dtype=torch.bool, device=DEVICE).tril(38))
        sees_rest[..., [0, 33]] = False
        counted = sees_rest.any(-1)
        assert (result.sink_stats[..., 0].double() - (mass * counted).sum(-1)).abs().max() < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_content_sinks_refuse_a_mask_with_one_plane_per_head(backend):
    q, k, v = _qkv()
    mask = torch.ones(1, 4, 7, 45, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="one mask for every head"):
        content_sink_attention(q, k, v, backend=backend, attn_mask=mask, hidden_beta=torch.full((4,), 0.5),
                               threshold=0.1, causal=True, causal_offset=38)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_integer_causal_offset_is_refused_not_truncated(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="causal_offset must be an integer, got 2.5"):
        sink_attention(q, k, v, backend=backend, causal=True, causal_offset=2.5)
    with pytest.raises(ValueError, match="causal_offset must be an integer"):
        sink_attention(q, k, v, backend=backend, causal=True, causal_offset=True)
    assert sink_attention(q, k, v, backend=backend, causal=True, causal_offset=38.0).out.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bool_sliding_window_is_refused(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="sliding_window must be an integer >= 1, got True"):
        sink_attention(q, k, v, backend=backend, causal=True, causal_offset=38, sliding_window=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_clip_takes_the_same_arguments_on_both_backends(backend):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 5, 8, generator=g) * 3).to(DEVICE)
    is_sink = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    is_sink[:, 0] = True
    out = residual_clip(hidden, 2.0, backend=backend)  # one number: a raw AttributeError on "torch"
    assert torch.allclose(out.norm(dim=-1).max(), torch.tensor(2.0, device=DEVICE))
    with pytest.raises(ValueError, match="never zeroed"):  # "torch" zeroed the sink
        residual_clip(hidden, 2.0, is_sink, 0.0, backend=backend)
    with pytest.raises(ValueError, match="give is_sink with it"):  # "torch" ignored it
        residual_clip(hidden, 2.0, None, 1.0, backend=backend)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        residual_clip(hidden, -1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_negative_one_value_threshold_tensor_is_refused(backend):
    hidden = torch.ones(1, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="threshold must be >= 0"):  # flipped every token's sign
        residual_clip(hidden, torch.tensor(-1.0, device=DEVICE), backend=backend)
