"""Combining per-domain fits: the rules, the leave-one-domain-out selection, and a synthetic case where
fitting one domain provably hurts another while the robust rule does not."""

from __future__ import annotations

import math

import pytest
import torch

from sinkfix.analysis.robust import IDENTITY, Candidate, candidate_parameters, candidates, combine, select


def _params(*betas, logits=None):
    beta = torch.tensor([list(betas)], dtype=torch.float32)
    return beta, None if logits is None else torch.tensor([list(logits)], dtype=torch.float32)


def test_consensus_keeps_the_smallest_correction_and_mean_averages_the_masses():
    a = _params(0.5, 0.9, 1.0, logits=[0.0, -2.0, math.log(0.5)])
    b = _params(1.0, 0.7, 0.8, logits=[-1.0, -2.0, math.log(1.5)])
    beta, logit = combine([a, b], "consensus")
    torch.testing.assert_close(beta, torch.tensor([[1.0, 0.9, 1.0]]))
    torch.testing.assert_close(logit, torch.tensor([[-1.0, -2.0, math.log(0.5)]]))
    beta, logit = combine([a, b], "mean")
    torch.testing.assert_close(beta, torch.tensor([[0.75, 0.8, 0.9]]))
    # the mean of the virtual masses e^logit, not of the logits
    torch.testing.assert_close(logit.exp(), torch.tensor([[(1 + math.exp(-1)) / 2, math.exp(-2), 1.0]]))


def test_shrinking_scales_both_masses_toward_the_identity():
    beta, logit = combine([_params(0.6, 1.0, logits=[1.0, -3.0])], "consensus", shrink=0.25)
    torch.testing.assert_close(beta, torch.tensor([[0.9, 1.0]]))
    torch.testing.assert_close(logit, torch.tensor([[1.0 + math.log(0.25), -3.0 + math.log(0.25)]]))


def test_a_fit_without_virtual_logits_combines_to_none():
    beta, logit = combine([_params(0.5, 0.5), _params(0.7, 0.9)], "mean")
    assert logit is None and torch.allclose(beta, torch.tensor([[0.6, 0.7]]))


def test_candidate_pool_and_parameters():
    pool = candidates([("consensus", 1.0)], global_betas=(0.9,))
    assert [c.name for c in pool] == ["identity", "global 0.9", "consensus x1"]
    assert [c.name for c in candidates()] == ["identity", "global 0.95", "global 0.9", "consensus x1",
                                             "consensus x0.5", "mean x1"]
    beta, logit = candidate_parameters(pool[1], [], (2, 3))
    assert logit is None and torch.equal(beta, torch.full((2, 3), 0.9))
    assert torch.equal(candidate_parameters(IDENTITY, [], (1, 2))[0], torch.ones(1, 2))
    with pytest.raises(ValueError, match="unknown combination rule"):
        candidates([("median", 1.0)])
    with pytest.raises(ValueError, match="shrinks"):
        candidates([("mean", 0.0)])


def test_selection_minimises_the_worst_held_out_domain_and_ties_go_to_the_simpler():
    fits = {"a": _params(0.5), "b": _params(0.5), "c": _params(0.5)}
    pool = [IDENTITY, Candidate("global 0.9", global_beta=0.9), Candidate("consensus x1", rule="consensus")]
    # every candidate helps a and c; on b "consensus" (beta 0.5) hurts a little, "global" (0.9) helps a little
    def change(params, domain):
        beta = float(params[0][0, 0])
        return {"a": -(1 - beta), "b": 0.01 * (1 - beta) if beta < 0.6 else -0.001, "c": -(1 - beta)}[domain]

    chosen = select(pool, fits, (1, 1), change)
    assert chosen.chosen.name == "global 0.9"
    assert chosen.worst("consensus x1") > 0 and chosen.worst("identity") == 0
    flat = select(pool, fits, (1, 1), lambda params, domain: 0.0)
    assert flat.chosen is IDENTITY  # a tie: the identity comes first
    with pytest.raises(ValueError, match="at least two domains"):
        select(pool, {"a": fits["a"]}, (1, 1), change)


# -- a synthetic case ----------------------------------------------------------------------------
# Two heads. Head 1 wastes attention on its sink in every domain: all of them gain from beta = 0.8.
# Head 0 is dormant on "docs" and "prose" (they gain from beta = 0.5) but active on "code" and "data",
# where any correction costs a lot (weight 10): the active/dormant flip. Each domain's change in NLL
# is a quadratic with its optimum at its target, and 0 at the identity:
#   change_d(beta) = sum_h w_dh [(beta_h - t_dh)^2 - (1 - t_dh)^2]
TARGETS = {"docs": (0.5, 0.8), "prose": (0.5, 0.8), "code": (1.0, 0.8), "data": (1.0, 0.8)}
WEIGHTS = {"docs": (1.0, 1.0), "prose": (1.0, 1.0), "code": (10.0, 1.0), "data": (10.0, 1.0)}


def _change(params, domain: str) -> float:
    beta = params[0][0]
    return sum(w * ((float(b) - t) ** 2 - (1 - t) ** 2) for b, t, w in zip(beta, TARGETS[domain], WEIGHTS[domain]))


def _own_fits() -> dict:
    """What fitting each domain alone finds: its own optimum (no virtual logits in this case)."""
    return {d: _params(*TARGETS[d]) for d in TARGETS}


def test_fitting_one_domain_hurts_another_and_the_robust_rule_does_not():
    fits = _own_fits()
    # fitting on docs alone, or pooling docs and prose, corrects head 0 and makes code worse
    assert _change(fits["docs"], "code") > 0
    assert _change(combine([fits["docs"], fits["prose"]], "mean"), "code") > 0
    # the mean of all four fits (what one pooled fit would do) still trades code for docs
    assert _change(combine(list(fits.values()), "mean"), "code") > 0

    selection = select(candidates(), fits, (1, 2), _change)
    chosen = candidate_parameters(selection.chosen, list(fits.values()), (1, 2))
    assert selection.chosen.rule == "consensus"
    assert all(_change(chosen, d) < 0 for d in TARGETS)  # every domain gains, none is traded
    # and with any one domain left out of the calibration, it is not made worse either
    for held_out in TARGETS:
        others = [p for d, p in fits.items() if d != held_out]
        assert _change(candidate_parameters(selection.chosen, others, (1, 2)), held_out) <= 0
    # the mean rule was seen to hurt a held-out domain, so it was not chosen
    assert selection.worst("mean x1") > 0


def test_when_no_candidate_is_safe_the_identity_is_chosen():
    fits = {d: p for d, p in _own_fits().items() if d != "data"}  # code is the only domain with head 0 active
    selection = select(candidates(), fits, (1, 2), _change)
    # leaving code out, every candidate corrects head 0 and hurts code; nothing beats doing nothing
    assert selection.chosen is IDENTITY
