"""Gradients through residual clipping: the defects black-box reviews found, each pinned by a test that
failed before its fix."""

from __future__ import annotations

import pytest
import torch

import sinkfix
from sinkfix import Policy, ResidualClip
from sinkfix.ops.residual import residual_clip_torch

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _own_clip64(hidden: torch.Tensor, cap: torch.Tensor, exempt: torch.Tensor) -> torch.Tensor:
    """The written rule in float64: a token whose norm exceeds its cap is scaled to it, exempt tokens
    and the others are left as they are (the scaled branch only is built, so its gradient is that of
    h * cap / ||h|| alone)."""
    norms = hidden.norm(dim=-1, keepdim=True)
    out = []
    for b in range(hidden.shape[0]):
        rows = []
        for s in range(hidden.shape[1]):
            h, n = hidden[b, s], norms[b, s]
            rows.append(h if exempt[b, s] or not n > cap[b] else h * (cap[b] / n))
        out.append(torch.stack(rows))
    return torch.stack(out)


def test_clip_gradients_are_finite_for_an_exempt_sink_and_a_zero_token():
    # an exempt sink has an infinite cap; a zero token is never scaled. Both made NaN gradients before
    # (0 * d(cap / norm) with cap = inf or norm = 0), though the output equalled the input there
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64) * torch.tensor([30.0, 1, 1, 9, 1], dtype=torch.float64)[:, None]
    hidden[1, 2] = 0
    hidden.requires_grad_(True)
    is_sink = torch.zeros(2, 5, dtype=torch.bool)
    is_sink[:, 0] = True
    cap = torch.tensor([4.0, 5.0], dtype=torch.float64)
    weights = torch.randn(2, 5, 8, dtype=torch.float64)

    (residual_clip_torch(hidden, cap, is_sink) * weights).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    (_own_clip64(hidden, cap, is_sink) * weights).sum().backward()
    assert torch.isfinite(got).all()
    # the clip takes its norms and factors in float32, as the kernel does: float32 agreement
    assert torch.allclose(got, hidden.grad, rtol=1e-6, atol=1e-6)
    clipped = hidden.detach().norm(dim=-1) > cap[:, None]
    assert (clipped & ~is_sink).any() and not torch.equal(got[clipped & ~is_sink], weights[clipped & ~is_sink])
    assert torch.equal(got[:, 0], weights[:, 0])  # the exempt sink passes its gradient through


@pytest.mark.parametrize("clip", [ResidualClip(1e9, mode="absolute"), ResidualClip(100.0), ResidualClip(1.0)],
                         ids=["absolute-never-fires", "relative-never-fires", "relative-fires"])
def test_backward_through_a_clipped_model_is_finite(clip):
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    model.train()
    with sinkfix.patch(model, Policy(residual_clip=clip)):
        model(ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    if clip.threshold != 1.0:  # a clip that never fires leaves the gradients of the unclipped policy
        reference = tiny_model("llama")
        reference.train()
        with sinkfix.patch(reference, Policy()):
            reference(ids, labels=ids).loss.backward()
        for name, p in reference.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name
