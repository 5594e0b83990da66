"""window_nll: the chunked next-token NLL against an fp64 log_softmax reference, value and gradient."""

from __future__ import annotations

import pytest
import torch

from sinkfix.evaluate import window_nll


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * (targets != -100)).sum()


@pytest.mark.parametrize("batch, seq, vocab", [(1, 2, 5), (2, 67, 97), (3, 130, 301)])  # row chunks of 64: ragged
def test_value_and_gradient_match_fp64_reference(batch, seq, vocab):
    g = torch.Generator().manual_seed(seq)
    logits = (4 * torch.randn(batch, seq, vocab, generator=g)).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, : seq // 3] = -100  # a prefix that is not scored (BOS, padding)
    weight = torch.rand((), generator=g) + 0.5
    got, count = window_nll(logits, labels)
    (got * weight).backward()
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = _reference(ref_logits, labels)
    (ref * weight.double()).backward()
    assert count == int((labels[:, 1:] != -100).sum())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(logits.grad[:, -1] == 0)  # the last position predicts nothing


def test_reduced_precision_logits_give_fp32_sums_and_their_own_gradient_dtype():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 90, 50, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 50, (1, 90), generator=g)
    got, _ = window_nll(logits, labels)
    got.backward()
    assert got.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _reference(logits.detach().float(), labels), rtol=1e-5, atol=1e-4)


def test_nothing_scored_is_zero_with_zero_gradient():
    logits = torch.randn(1, 4, 7, requires_grad=True)
    got, count = window_nll(logits, torch.full((1, 4), -100))
    got.backward()
    assert count == 0 and float(got.detach()) == 0.0 and torch.all(logits.grad == 0)
