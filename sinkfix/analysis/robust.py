"""Combine per-domain calibrations into one profile that does not trade one domain for another.

Each calibration domain gets its own fit (beta and virtual sink logit per head,
:func:`sinkfix.analysis.calibration.fit_domains`). This module turns those fits into candidate
parameter sets and picks one by **leave-one-domain-out on validation windows**: a candidate is
built from the fits of every domain but one and scored on the held-out domain's validation windows
(text no fit involved in the candidate has seen, of a kind it has not seen). Two selection rules
(:data:`SELECTION_RULES`) read those scores:

* ``safe-mean`` (the default): only candidates that made **no** held-out domain worse than the
  unpatched model (every change <= 0) qualify, and of those the one with the best **mean** change
  wins;
* ``worst``: the candidate whose **worst** held-out domain changes least.

The identity scores 0 everywhere and qualifies under both, so the chosen candidate never made a
held-out domain of the calibration set worse. ``safe-mean`` refuses the same trades as ``worst``
(a gain on one domain bought with a loss on another) but does not give up a large gain on every
domain for a slightly better worst one; ``docs/calibration.md`` has the measurements behind the
choice and the limits of both.

Candidates (:func:`candidates`):

* ``identity``;
* ``global B``: one sink-scaling beta B for every head, no virtual logit (the "best single global
  beta" baseline, here chosen on the calibration domains);
* ``RULE xS``: the fits combined head by head by RULE, then shrunk toward the identity by S.

Combination rules work on what each parameter does to the attention mass: ``1 - beta`` is the
share of the sink's mass a head gives away, ``exp(logit)`` the mass of the virtual logit.

* ``consensus``: the smallest correction any domain asked for, head by head (the largest beta, the
  smallest virtual logit). A head that one domain wants corrected and another leaves alone (the
  active/dormant flip of Guo et al. 2024, where a correction fitted where a head is dormant hurts
  where it is active) stays near the identity.
* ``mean``: the mean of ``1 - beta`` and of ``exp(logit)`` over domains (close to what one fit on
  the pooled text would do).

Shrinking by S in (0, 1] multiplies both masses by S: ``beta -> 1 - S (1 - beta)``,
``logit -> logit + log S``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["Candidate", "Selection", "RULES", "IDENTITY", "candidates", "combine", "candidate_parameters", "select",
           "choose", "worst_case_choice", "DEFAULT_COMBINATIONS", "DEFAULT_GLOBAL_BETAS", "SELECTION_RULES",
           "DEFAULT_SELECTION_RULE"]

RULES = ("consensus", "mean")
# (rule, shrink) pairs of the default pool. Every candidate costs forward passes on every held-out
# domain's validation windows, so the pool is small; docs/calibration.md compares more. `mean x0.5`
# was added because without a BOS token SmolLM2's selections, left without python or cpp, found no
# full-strength combination safe (they chose consensus x1 and the identity: unseen -0.37% and +0.00%,
# where a global beta gave -0.66% and -1.17%); `mean x0.5` was safe there (unseen -1.75%, -2.66%).
DEFAULT_COMBINATIONS = (("consensus", 1.0), ("consensus", 0.5), ("mean", 0.5), ("mean", 1.0))
DEFAULT_GLOBAL_BETAS = (0.95, 0.9)

Parameters = tuple[torch.Tensor, "torch.Tensor | None"]  # beta [L, H], virtual logit [L, H] or None

# How a selection reads its table of held-out scores (module docstring). `safe-mean` became the
# default on 2026-12-03: over SmolLM2's 24 leave-one-domain-out selections it chose differently in
# 12, gaining 0.35-1.30 points on 9 unseen domains and losing 0.72 on one (docs/calibration.md,
# "The selection rule").
SELECTION_RULES = ("safe-mean", "worst")
DEFAULT_SELECTION_RULE = "safe-mean"
SCORE_DESCRIPTIONS = {
    "safe-mean": "mean held-out domain's validation perplexity change, among candidates that made no held-out "
                 "domain worse (every change <= 0)",
    "worst": "worst held-out domain's validation perplexity change",
}
NOT_SCORED_REASONS = {
    "safe-mean": "scoring stopped once one held-out domain was made worse than unpatched (the candidate no longer "
                 "qualified)",
    "worst": "scoring stopped once one held-out domain showed the candidate could not win (no better than the "
             "chosen candidate's worst domain)",
}


@dataclass(frozen=True)
class Candidate:
    """One way to turn per-domain fits into a parameter set."""

    name: str
    rule: str | None = None  # a combination rule, or None for identity / global
    shrink: float = 1.0
    global_beta: float | None = None

    @property
    def uses_fits(self) -> bool:
        return self.rule is not None


IDENTITY = Candidate("identity")


def candidates(combinations: Sequence[tuple[str, float]] = DEFAULT_COMBINATIONS,
               global_betas: Sequence[float] = DEFAULT_GLOBAL_BETAS) -> list[Candidate]:
    """identity, ``global B`` for each B, and ``RULE xS`` for each (rule, shrink) pair."""
    for rule, shrink in combinations:
        if rule not in RULES:
            raise ValueError(f"unknown combination rule {rule!r}; rules: {', '.join(RULES)}")
        if not 0 < shrink <= 1:
            raise ValueError(f"shrinks must lie in (0, 1], got {shrink}")
    if any(not 0 <= b < 1 for b in global_betas):
        raise ValueError("global betas must lie in [0, 1)")
    out = [IDENTITY]
    out += [Candidate(f"global {b:g}", global_beta=float(b)) for b in global_betas]
    out += [Candidate(f"{rule} x{s:g}", rule=rule, shrink=float(s)) for rule, s in combinations]
    return out


def combine(fits: Sequence[Parameters], rule: str, shrink: float = 1.0) -> Parameters:
    """Head-by-head combination of per-domain fits (module docstring), shrunk toward the identity."""
    if not fits:
        raise ValueError("nothing to combine")
    give = torch.stack([1 - beta for beta, _ in fits])  # share of the sink mass given away
    # A fit without virtual logits (one that never beat the unpatched model is the identity) asked for
    # no virtual-logit mass: it counts as mass 0, not as absent. Leaving it out gave `consensus` the
    # other domains' full virtual logits and `mean` their mass divided by too few domains (SmolLM2:
    # a left-out domain made 0.15% worse by a "consensus" that should have been the identity).
    logits = [logit for _, logit in fits if logit is not None]
    if rule == "consensus":
        give_c = give.min(0).values
        logit_c = torch.stack(logits).min(0).values if logits and len(logits) == len(fits) else None
    elif rule == "mean":
        give_c = give.mean(0)
        logit_c = torch.logsumexp(torch.stack(logits), 0) - math.log(len(fits)) if logits else None
    else:
        raise ValueError(f"unknown combination rule {rule!r}; rules: {', '.join(RULES)}")
    # a shrink above 1 (an amplified combination, measured in benchmarks/calibration_lodo.py) may give
    # away more than the whole sink; below 1 this clamp changes nothing (every fit's beta is >= 0)
    beta = (1 - shrink * give_c).clamp_min(0.0)
    return beta, None if logit_c is None else logit_c + math.log(shrink)


def candidate_parameters(candidate: Candidate, fits: Sequence[Parameters], shape: tuple[int, int]) -> Parameters:
    """The parameter set ``candidate`` stands for, built from ``fits`` (ignored unless it combines them)."""
    if candidate.uses_fits:
        return combine(fits, candidate.rule, candidate.shrink)
    beta = 1.0 if candidate.global_beta is None else candidate.global_beta
    return torch.full(shape, beta, dtype=torch.float32), None


@dataclass
class Selection:
    """The chosen candidate and every candidate's score: per held-out domain, the perplexity change
    of the candidate built without that domain, on that domain's validation windows. A candidate
    whose scoring stopped early (``prune``, :func:`choose`) has only the domains it was scored on:
    its :meth:`worst` is then a lower bound, already enough to rule it out under ``rule``."""

    chosen: Candidate
    changes: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> domain -> change
    rule: str = DEFAULT_SELECTION_RULE

    def worst(self, name: str) -> float:
        return max(self.changes[name].values())

    def mean(self, name: str) -> float:
        return math.fsum(self.changes[name].values()) / len(self.changes[name])  # in any domain order alike

    def summary(self) -> str:
        """One line on the chosen candidate, as the rule judged it."""
        name = self.chosen.name
        return (f"chosen: {name} (selection rule {self.rule}: mean held-out domain {100 * self.mean(name):+.2f}%, "
                f"worst {100 * self.worst(name):+.2f}%)")

    def to_dict(self) -> dict:
        domains = set().union(*map(set, self.changes.values())) if self.changes else set()
        record = {"chosen": self.chosen.name, "rule": self.rule, "score": SCORE_DESCRIPTIONS[self.rule],
                  "changes": self.changes}
        cut = {name: sorted(domains - set(per)) for name, per in self.changes.items() if set(per) != domains}
        if cut:  # say which scores were skipped, and why, so the table is not read as complete
            record["not_scored"] = cut
            record["not_scored_reason"] = NOT_SCORED_REASONS[self.rule]
        return record


def select(pool: Sequence[Candidate], fits: Mapping[str, Parameters], shape: tuple[int, int],
           change: Callable[[Parameters, str], float], *, prune: bool = True,
           rule: str = DEFAULT_SELECTION_RULE) -> Selection:
    """Leave-one-domain-out selection by ``rule`` (module docstring; default ``safe-mean``).

    ``change(parameters, domain)`` is the perplexity change (e.g. -0.02 = 2% lower) of the model
    patched with ``parameters`` on ``domain``'s validation windows. A candidate built from fits is
    rebuilt for each held-out domain from the other domains' fits; ties go to the earlier candidate
    in ``pool`` (identity and global betas come first: the simpler choice wins a tie). ``prune``
    (default) skips the scores that cannot change the choice (:func:`choose`).
    """
    if len(fits) < 2:
        raise ValueError("leave-one-domain-out selection needs at least two domains")

    def score(candidate: Candidate, held_out: str) -> float:
        if candidate is IDENTITY or candidate == IDENTITY:
            return 0.0
        others = [params for name, params in fits.items() if name != held_out]
        return change(candidate_parameters(candidate, others, shape), held_out)

    chosen, changes = choose(pool, list(fits), score, rule=rule, prune=prune)
    for candidate in pool:
        if candidate == IDENTITY:
            # its scores cost no forward pass and are 0 everywhere: pruning under "worst" stopped it after
            # one domain (0 is no better than a winner's worst), and the table printed the fallback every
            # other candidate is measured against as "not scored" (">= +0.00%"). Complete, it cannot
            # change the choice: a candidate pruned under either rule could not have won.
            changes[candidate.name] = {held_out: 0.0 for held_out in fits}
    return Selection(chosen, changes, rule=rule)


def choose(pool: Sequence, domains: Sequence[str], score: Callable[[Any, str], float], *,
           rule: str = DEFAULT_SELECTION_RULE, prune: bool = False):
    """The selection rule itself, for any kind of candidate, with ``score(candidate, held_out)``.
    Returns (chosen, {name: {domain: score}}), names in ``pool`` order; ties go to the earlier
    candidate in ``pool``.

    ``rule="worst"``: the candidate whose worst held-out domain scores lowest. ``rule="safe-mean"``:
    of the candidates whose every held-out domain scores <= 0, the one with the lowest mean; a pool
    whose first candidate is the identity (scores 0) always has one, and a pool where no candidate
    qualifies is an error.

    Without ``prune`` every candidate is scored on every domain. With it the choice is the same and
    the scores that cannot change it are skipped. Under ``worst`` a candidate stops being scored as
    soon as one domain scores no better than the best fully scored candidate's worst domain (ties
    counted as the rule counts them), since its own worst can only be higher: in SmolLM2's selections
    over its five domains with the default pool that made 10 (BOS) and 14 (no BOS) of the 30 scores
    that cost forward passes (the identity's cost none). Under ``safe-mean`` a candidate stops as soon
    as one domain scores above 0 (a mean cannot be bounded before every domain is scored, so a
    qualifying candidate is always scored in full). Candidates are scored from the last in ``pool``
    to the first (pools list the simplest first and the strongest corrections, which most often win,
    last), each on the domains where a loser shows soonest: under ``worst`` the current best
    candidate's weakest domains, under ``safe-mean`` the domains where the candidates scored so far
    did worst."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; rules: {', '.join(SELECTION_RULES)}")
    if not pool or not domains:
        raise ValueError("the selection needs at least one candidate and one domain")

    def key(index: int, scores: Mapping[str, float]):  # lower wins; None: does not qualify
        values = list(scores.values())
        if rule == "worst":
            return max(values), index
        # an exact sum (fsum): a tie is a tie in whatever order the domains were scored (pruning
        # scores them in another order than the whole table, and a rounding broke exact ties)
        return None if max(values) > 0 else (math.fsum(values) / len(values), index)

    def finish(changes):
        keys = {i: key(i, changes[c.name]) for i, c in enumerate(pool) if len(changes[c.name]) == len(domains)}
        qualified = [i for i, k in keys.items() if k is not None]
        if not qualified:
            raise ValueError("no candidate made every held-out domain at least as good as unpatched; put the "
                             "identity in the pool")
        return pool[min(qualified, key=keys.__getitem__)], {c.name: changes[c.name] for c in pool}

    if not prune:
        return finish({c.name: {held_out: score(c, held_out) for held_out in domains} for c in pool})
    changes: dict[str, dict[str, float]] = {}
    best, best_key = None, None  # the best fully scored, qualifying candidate so far, and its key
    for index in reversed(range(len(pool))):
        candidate = pool[index]
        if rule == "worst":  # the current best's weakest domains first
            order = list(domains) if best is None else sorted(domains, key=lambda d: -changes[best.name][d])
        else:  # the domains where the candidates scored so far did worst first
            order = sorted(domains, key=lambda d: -max((per[d] for per in changes.values() if d in per),
                                                       default=-math.inf))
        scores: dict[str, float] = {}
        for held_out in order:
            scores[held_out] = score(candidate, held_out)
            if rule == "worst" and best_key is not None and (scores[held_out], index) >= best_key:
                break  # its worst is at least this: it cannot win
            if rule == "safe-mean" and scores[held_out] > 0:
                break  # made a held-out domain worse: it does not qualify
        changes[candidate.name] = scores
        if len(scores) == len(domains):
            k = key(index, scores)
            if k is not None and (best_key is None or k < best_key):
                best, best_key = candidate, k
    return finish(changes)


def worst_case_choice(pool: Sequence, domains: Sequence[str], score: Callable[[Any, str], float], *,
                      prune: bool = False):
    """:func:`choose` with ``rule="worst"``: the candidate whose worst held-out domain scores lowest."""
    return choose(pool, domains, score, rule="worst", prune=prune)
