"""The real pretrained models that ship inside packages: identity is exact, policies behave as measured."""

from __future__ import annotations

import time

import pytest
import torch

import sinkfix
from sinkfix import ModelLoadError, Policy
from sinkfix.evaluate import bos_token_id

PROSE = (
    "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, "
    "the members agreed to postpone the decision until more information about the costs of the new "
    "library building was available. Several residents spoke in favour of the project, noting that "
    "the old building had been too small for decades."
)


def _identity_check(model, tok):
    enc = tok([PROSE, PROSE[:120]], return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = model(**enc).logits
        with sinkfix.patch(model, Policy()):
            patched = model(**enc).logits
        after = model(**enc).logits
    real = enc.attention_mask.bool()
    torch.testing.assert_close(patched[real], stock[real], atol=1e-4, rtol=0)
    assert torch.equal(after, stock)


@pytest.mark.slow
def test_smollm2_identity_matches_stock(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _identity_check(model, tok)


@pytest.mark.slow
def test_gemma3_identity_matches_stock(gemma3):
    model, tok = gemma3
    tok.padding_side = "left"
    _identity_check(model, tok)


@pytest.mark.slow
def test_smollm2_generate_identical_under_identity(smollm2):
    model, tok = smollm2
    ids = tok(PROSE[:80], return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        stock = model.generate(ids, **kwargs)
        with sinkfix.patch(model):
            assert torch.equal(model.generate(ids, **kwargs), stock)


@pytest.mark.slow
def test_smollm2_sink_scaling_behaves_as_measured(smollm2):
    """With a BOS the first token is the sink; beta = 0.9 changes NLL by about a percent, beta = 0.5
    hurts by 10-18 % (docs/formulas.md, "What is known"). Checked loosely on one short text: direction and size."""
    model, tok = smollm2
    ids = tok(PROSE, return_tensors="pt").input_ids
    ids = torch.cat([torch.tensor([[bos_token_id(tok)]]), ids], dim=1)
    with torch.no_grad():
        stock = model(ids, labels=ids).loss.item()
        with sinkfix.patch(model, Policy(sink_scale=0.9)):
            mild = model(ids, labels=ids).loss.item()
        with sinkfix.patch(model, Policy(sink_scale=0.5)):
            strong = model(ids, labels=ids).loss.item()
    assert abs(mild - stock) < 0.05 * stock
    assert strong > stock * 1.02


def test_hub_id_without_network_fails_fast_with_offline_alternatives(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://sinkfix-no-such-host.invalid")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        sinkfix.load_model("nobody-has/this-model")
    assert time.monotonic() - start < 30


def test_unknown_plain_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown model 'not-a-model'"):
        sinkfix.load_model("not-a-model")
