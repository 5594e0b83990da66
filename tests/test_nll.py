"""window_nll: the chunked next-token NLL against an fp64 log_softmax reference, value and gradient;
perplexity's arguments and which tokens the windows score."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sinkfix.errors import UsageError
from sinkfix.evaluate import PerplexityResult, make_windows, perplexity, window_nll

from .conftest import CharTokenizer, tiny_model


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


# -- perplexity's arguments ------------------------------------------------------------------------
_TEXT = "Attention sinks park the mass of dormant heads on the first token. " * 3  # 201 tokens


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model("llama")  # 256 positions


def test_one_row_of_ids_is_the_text_and_other_shapes_are_refused(model):
    tok = CharTokenizer()
    ids = tok(_TEXT).input_ids  # (1, S), as a tokenizer returns them
    by_text = perplexity(model, tok, _TEXT, seq_len=64)
    by_row, by_ids = perplexity(model, tok, ids, seq_len=64), perplexity(model, tok, ids[0], seq_len=64)
    assert by_row == by_ids == by_text and by_text.tokens == ids.shape[1] - 4  # 4 windows, each opener unscored
    for shape in [(2, 30), (1, 1, 30), ()]:
        with pytest.raises(UsageError, match="1-D or one row"):
            perplexity(model, tok, torch.ones(shape, dtype=torch.long), seq_len=64)
    with pytest.raises(UsageError, match="must be 1-D"):
        make_windows(ids, 64)


@pytest.mark.parametrize("ids", [[5], [], [[5]]])
def test_ids_of_fewer_than_two_tokens_are_refused_like_a_short_string(model, ids):
    with pytest.raises(UsageError, match="too short"):
        perplexity(model, CharTokenizer(), torch.tensor(ids, dtype=torch.long), seq_len=16)
    with pytest.raises(UsageError, match="too short"):
        perplexity(model, CharTokenizer(), "a", seq_len=16)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch size must be >= 1, got 0"),
    ({"batch_size": -1}, "batch size must be >= 1, got -1"),
    ({"max_windows": 0}, "max_windows must be >= 1"),
    ({"max_windows": -2}, "max_windows must be >= 1"),
    ({"seq_len": 257}, "seq_len 257 is larger than the model supports (max_position_embeddings = 256)"),
    ({"seq_len": 2, "bos": True}, "seq_len must be >= 3 with a BOS"),
    ({"seq_len": 1}, "seq_len must be >= 2"),
])
def test_bad_arguments_are_refused_before_the_model_runs(model, monkeypatch, kwargs, message):
    def forward(*args, **kw):
        raise AssertionError("the model ran before the bad argument was refused")

    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(UsageError, match=re.escape(message)):
        perplexity(model, CharTokenizer(), _TEXT, **{"seq_len": 64, **kwargs})


def test_max_windows_limits_and_a_full_length_window_is_accepted(model):
    one = perplexity(model, CharTokenizer(), _TEXT, seq_len=64, max_windows=1)
    assert one.windows == 1 and one.tokens == 63
    assert perplexity(model, CharTokenizer(), _TEXT * 2, seq_len=256).windows == 2


def test_no_scored_token_is_no_perplexity():
    empty = PerplexityResult(nll_sum=0.0, tokens=0, windows=0, seq_len=8, stride=8, bos=False)
    assert math.isnan(empty.nll) and math.isnan(empty.ppl)


@pytest.mark.parametrize("stride, bos, unscored", [
    (None, False, "each window's first token"),  # windows that do not overlap, no BOS
    (5, False, "the first token only"),
    (None, True, "none"),
])
def test_which_tokens_the_windows_score(stride, bos, unscored):
    """What the module docstring says: no token twice; without a BOS, a window's opener is not scored."""
    ids = torch.arange(2, 40)
    windows = make_windows(ids, 8, stride, 1 if bos else None)
    scored = [int(t) for w in windows for t in w.labels[1:] if t != -100]  # position i predicts label i + 1
    assert len(scored) == len(set(scored))
    missing = sorted(set(ids.tolist()) - set(scored))
    openers = sorted({int(w.input_ids[0]) for w in windows})
    expected = {"each window's first token": openers, "the first token only": [2], "none": []}[unscored]
    assert missing == expected
