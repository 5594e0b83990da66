"""Combining per-domain fits: the rules, the leave-one-domain-out selection, and a synthetic case where
fitting one domain provably hurts another while the robust rule does not."""

from __future__ import annotations

import math

import pytest
import torch

from sinkfix.analysis.robust import (IDENTITY, SELECTION_RULES, Candidate, Selection, candidate_parameters, candidates,
                                     choose, combine, select, worst_case_choice)


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


def test_an_amplified_combination_gives_away_at_most_the_whole_sink():
    beta, logit = combine([_params(0.2, 0.9, logits=[0.0, -1.0])], "mean", shrink=2.0)
    torch.testing.assert_close(beta, torch.tensor([[0.0, 0.8]]))  # 1 - 2 * 0.8 would be negative
    torch.testing.assert_close(logit, torch.tensor([[math.log(2.0), -1.0 + math.log(2.0)]]))


def test_a_fit_without_virtual_logits_combines_to_none():
    beta, logit = combine([_params(0.5, 0.5), _params(0.7, 0.9)], "mean")
    assert logit is None and torch.allclose(beta, torch.tensor([[0.6, 0.7]]))


def test_candidate_pool_and_parameters():
    pool = candidates([("consensus", 1.0)], global_betas=(0.9,))
    assert [c.name for c in pool] == ["identity", "global 0.9", "consensus x1"]
    assert [c.name for c in candidates()] == ["identity", "global 0.95", "global 0.9", "consensus x1",
                                             "consensus x0.5", "mean x0.5", "mean x1"]
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


@pytest.mark.parametrize("rule", SELECTION_RULES)
@pytest.mark.parametrize("seed", range(60))
def test_pruned_selection_chooses_what_the_full_table_chooses(seed, rule):
    """Random score tables, many with ties (scores on a coarse grid): skipping the scores that cannot
    change the choice gives the same candidate, only true scores are recorded, and fewer are made."""
    generator = torch.Generator().manual_seed(seed)
    n_candidates, n_domains = 2 + seed % 6, 2 + seed % 4
    domains = [f"d{i}" for i in range(n_domains)]
    pool = [Candidate(f"c{i}") for i in range(n_candidates)]
    grid = 3 if seed % 2 else 1000  # a coarse grid makes ties common
    table = {c.name: {d: float(torch.randint(-grid, grid, (1,), generator=generator)) / grid for d in domains}
             for c in pool}
    table["c0"] = dict.fromkeys(domains, 0.0)  # the identity's place: safe-mean always has a candidate
    calls = []

    def score(candidate, domain):
        calls.append((candidate.name, domain))
        return table[candidate.name][domain]

    full_choice, full = choose(pool, domains, score, rule=rule)
    assert len(calls) == n_candidates * n_domains and full == table
    calls.clear()
    chosen, pruned = choose(pool, domains, score, rule=rule, prune=True)
    assert chosen is full_choice
    assert len(calls) == len(set(calls)) <= n_candidates * n_domains
    assert list(pruned) == [c.name for c in pool] and pruned[chosen.name] == table[chosen.name]
    worst = max(table[chosen.name].values())
    for name, per in pruned.items():
        assert per == {d: table[name][d] for d in per}  # every recorded score is the true one
        if len(per) < n_domains:  # stopped early: what was scored already rules it out
            assert max(per.values()) >= worst if rule == "worst" else max(per.values()) > 0
    if rule == "safe-mean":  # the chosen candidate qualifies and no qualifying one has a better mean
        assert worst <= 0
        means = {n: sum(per.values()) / n_domains for n, per in table.items() if max(per.values()) <= 0}
        assert sum(table[chosen.name].values()) / n_domains == min(means.values())


def test_safe_mean_keeps_a_large_gain_that_the_worst_case_rule_gives_up():
    """Measured shape (SmolLM2 without BOS, docs/calibration.md): the full-strength mean helps every
    held-out domain, most of them a lot; the halved one has a slightly better worst domain and a
    much smaller mean. The worst-case rule takes the halved one, safe-mean the full one; neither
    takes a candidate that made one domain worse, however large its mean gain."""
    table = {"identity": {"a": 0.0, "b": 0.0, "c": 0.0},
             "strong but unsafe": {"a": -0.06, "b": -0.05, "c": 0.001},
             "half": {"a": -0.012, "b": -0.011, "c": -0.006},
             "full": {"a": -0.019, "b": -0.012, "c": -0.004}}
    pool = [Candidate(name) for name in table]

    def score(candidate, domain):
        return table[candidate.name][domain]

    for prune in (False, True):
        assert choose(pool, list("abc"), score, rule="worst", prune=prune)[0].name == "half"
        assert choose(pool, list("abc"), score, rule="safe-mean", prune=prune)[0].name == "full"
    assert choose(pool, list("abc"), score, prune=True)[0].name == "full"  # safe-mean is the default
    selection = Selection(pool[3], table, rule="safe-mean")
    assert selection.mean("full") == pytest.approx(-0.035 / 3)
    assert "safe-mean" in selection.summary() and "-1.17%" in selection.summary()
    assert selection.to_dict()["rule"] == "safe-mean" and "made no held-out" in selection.to_dict()["score"]
    with pytest.raises(ValueError, match="no candidate made every held-out domain"):
        choose(pool[1:2], list("abc"), score, rule="safe-mean")
    with pytest.raises(ValueError, match="unknown selection rule 'median'"):
        choose(pool, list("abc"), score, rule="median")


def test_pruned_selection_on_a_measured_table_skips_most_scores():
    """SmolLM2's selection over five domains (validation changes of the default pool, in percent, BOS,
    the default fits at learning rate 0.5): the same choice from 11 of 35 scores, 10 of them with
    forward passes."""
    percent = {
        "identity": dict.fromkeys(("pydoc", "python", "readme", "legal", "cpp"), 0.0),
        "global 0.95": {"pydoc": -0.46, "python": -0.63, "readme": -0.09, "legal": -1.61, "cpp": 0.0},
        "global 0.9": {"pydoc": -0.43, "python": -0.78, "readme": 0.21, "legal": -2.61, "cpp": -0.08},
        "consensus x1": {"pydoc": -0.65, "python": -0.58, "readme": -0.48, "legal": -0.35, "cpp": -0.50},
        "consensus x0.5": {"pydoc": -0.37, "python": -0.36, "readme": -0.28, "legal": -0.20, "cpp": -0.31},
        "mean x0.5": {"pydoc": -2.74, "python": -2.22, "readme": -2.82, "legal": -3.79, "cpp": -1.89},
        "mean x1": {"pydoc": -3.57, "python": -2.40, "readme": -2.46, "legal": -3.62, "cpp": -1.96},
    }
    table = {name: {d: v / 100 for d, v in per.items()} for name, per in percent.items()}
    pool, calls = candidates(), []

    def score(candidate, domain):
        calls.append(candidate.name)
        return table[candidate.name][domain]

    chosen, changes = worst_case_choice(pool, list(table["identity"]), score, prune=True)
    assert chosen.name == "mean x1" and len(calls) == 11 and calls.count("identity") == 1
    assert chosen is worst_case_choice(pool, list(table["identity"]), score)[0]
    record = Selection(chosen, changes, rule="worst").to_dict()
    assert set(record["not_scored"]) == {"identity", "global 0.95", "global 0.9", "consensus x1", "consensus x0.5",
                                         "mean x0.5"}
    # cpp, mean x1's weakest domain, is scored first and rules every other candidate out
    assert record["not_scored"]["mean x0.5"] == ["legal", "pydoc", "python", "readme"]
    assert "could not win" in record["not_scored_reason"]
    assert "not_scored" not in Selection(chosen, table).to_dict()
    for empty_pool, domains in (([], ["pydoc"]), (pool, [])):
        with pytest.raises(ValueError, match="at least one candidate and one domain"):
            worst_case_choice(empty_pool, domains, score, prune=True)


def test_selection_table_marks_the_scores_pruning_skipped():
    from rich.console import Console

    from sinkfix.commands.calibrate import _selection_table

    record = {"texts": {"a": {}, "b": {}},
              "selection": {"chosen": "mean x1", "changes": {"identity": {"b": 0.0}, "mean x1": {"a": -0.02, "b": -0.01}},
                            "not_scored": {"identity": ["a"]}}}
    table = _selection_table(record)
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert ">= +0.00%" in text and "-1.00%" in text and "could not win" in table.caption
