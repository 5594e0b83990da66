"""Paired statistics of two runs on the same items: a paired bootstrap interval for any metric, and
McNemar's exact test for metrics that are right or wrong per item (accuracy).

Both runs score the same items, so their scores are correlated: the sampling error of the
*difference* is far smaller than that of either score, which is why a change smaller than either
run's own standard error can still be told from noise, and why the two runs must be paired.

* **Paired bootstrap.** Draw the items with replacement (the same draw for both runs), aggregate
  each run's per-item values with the metric's own aggregation (a mean for accuracy, a token- or
  byte-weighted perplexity for rolling log-likelihood), and take the difference; the interval is the
  percentile interval of that difference over ``iterations`` draws (with one item there is no
  spread to resample: the interval is undefined, NaN).
* **Paired sign-flip test** for the p-value of any other metric: under "the correction changes
  nothing" the two runs' values of an item are exchangeable, so each item's pair is swapped or not
  and the difference of the aggregates recomputed; the p-value is the share of swap patterns whose
  difference is at least as large in magnitude as the observed one. Exact (all ``2**n`` patterns)
  up to :data:`EXACT_SIGN_FLIP_ITEMS` items, else ``iterations`` random patterns (with the usual +1).
  With n items it cannot go below ``2 / 2**n``: three documents can never show p < 0.25, where the
  inverted bootstrap interval, used before, gave 0.001 for any change.
* **McNemar's exact test** for 0/1 per-item values: only the discordant items count, ``b`` right
  before and wrong after, ``c`` the reverse; under "no change" each is a fair coin flip, so the
  two-sided p-value is ``min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from sinkfix.errors import UsageError

__all__ = ["Paired", "compare_paired", "paired_bootstrap", "mcnemar_exact", "sign_flip_test", "is_binary",
           "DEFAULT_ITERATIONS", "DEFAULT_CONFIDENCE", "EXACT_SIGN_FLIP_ITEMS"]

DEFAULT_ITERATIONS = 2000
DEFAULT_CONFIDENCE = 0.95
#: Up to this many items the sign-flip test enumerates every swap pattern (4096 at 12, the built-in
#: rolling tasks' document count: a fraction of a second of aggregations).
EXACT_SIGN_FLIP_ITEMS = 12
Aggregate = Callable[[list], float]


@dataclass(frozen=True)
class Paired:
    """One metric of one task, stock vs corrected on the same items."""

    items: int
    stock: float
    corrected: float
    delta: float  # corrected - stock
    ci_low: float
    ci_high: float
    confidence: float
    iterations: int
    test: str  # "mcnemar-exact", "sign-flip-exact" or "sign-flip-random"
    p_value: float
    stock_only: int | None = None  # McNemar's b: right before the correction, wrong after
    corrected_only: int | None = None  # McNemar's c: wrong before, right after
    undefined_draws: int = 0  # bootstrap draws without a difference (inf - inf, a NaN item)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def is_binary(values: Sequence[Any]) -> bool:
    """True when every per-item value is 0 or 1 (bools included): right or wrong per item."""
    return all(isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)) and v in (0, 1) for v in values)


def mcnemar_exact(stock: Sequence[Any], corrected: Sequence[Any]) -> tuple[float, int, int]:
    """``(p_value, b, c)`` of McNemar's exact two-sided test on paired 0/1 outcomes."""
    b = sum(1 for s, c in zip(stock, corrected, strict=True) if s and not c)
    c = sum(1 for s, c in zip(stock, corrected, strict=True) if c and not s)
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail), b, c


def paired_bootstrap(stock: Sequence[Any], corrected: Sequence[Any], aggregate: Aggregate, *,
                     iterations: int = DEFAULT_ITERATIONS, seed: int = 0) -> np.ndarray:
    """``aggregate(corrected draw) - aggregate(stock draw)`` for ``iterations`` paired resamples of the items."""
    n = len(stock)
    if n == 0 or n != len(corrected):
        raise UsageError(f"paired bootstrap needs the same non-zero number of items in both runs, got {n} and "
                         f"{len(corrected)}")
    if iterations < 1:
        raise UsageError(f"bootstrap iterations must be >= 1, got {iterations}")
    if seed < 0:
        raise UsageError(f"bootstrap seed must be >= 0, got {seed}")
    draws = np.random.default_rng(seed).integers(0, n, size=(iterations, n))
    return np.array([aggregate([corrected[i] for i in row]) - aggregate([stock[i] for i in row]) for row in draws],
                    dtype=np.float64)


def sign_flip_test(stock: Sequence[Any], corrected: Sequence[Any], aggregate: Aggregate, *,
                   iterations: int = DEFAULT_ITERATIONS, seed: int = 0) -> tuple[float, bool]:
    """``(p_value, exact)`` of the paired sign-flip test of ``aggregate(corrected) - aggregate(stock)``:
    every swap pattern of the items' pairs when there are at most :data:`EXACT_SIGN_FLIP_ITEMS` items,
    else ``iterations`` random ones. NaN when the observed difference is not finite."""
    n = len(stock)
    if n == 0 or n != len(corrected):
        raise UsageError(f"sign-flip test needs the same non-zero number of items in both runs, got {n} and "
                         f"{len(corrected)}")
    observed = aggregate(list(corrected)) - aggregate(list(stock))
    if not math.isfinite(observed):
        return math.nan, n <= EXACT_SIGN_FLIP_ITEMS
    exact = n <= EXACT_SIGN_FLIP_ITEMS
    if exact:
        codes = np.arange(2 ** n)[:, None]
        patterns = ((codes >> np.arange(n)) & 1).astype(bool)  # row k: the items swapped in pattern k
    else:
        patterns = np.random.default_rng(seed).integers(0, 2, size=(iterations, n)).astype(bool)
    # the observed pattern and its mirror reach |observed| exactly; rounding in other sums must not
    # move a tie to either side
    bound = abs(observed) * (1 - 1e-9)
    reached = 0
    for swap in patterns:
        a = [c if s else t for t, c, s in zip(stock, corrected, swap)]
        b = [t if s else c for t, c, s in zip(stock, corrected, swap)]
        difference = aggregate(b) - aggregate(a)
        reached += math.isnan(difference) or abs(difference) >= bound  # a NaN counts as extreme (conservative)
    if exact:
        return reached / len(patterns), True
    return (reached + 1) / (iterations + 1), False


def _percentile_interval(deltas: np.ndarray, confidence: float) -> tuple[float, float, int]:
    """``(low, high, undefined draws)``. A draw whose two aggregates both pass float's range
    (a word perplexity of a long unspaced document drawn several times) has no difference (inf - inf):
    such draws count as extreme on both sides, so the interval only widens; a bound they reach is
    unbounded, NaN. (One NaN made ``np.quantile`` return NaN for both bounds: the interval vanished,
    unsaid, at 84 such draws of 2000 with a finite delta.)"""
    undefined = np.isnan(deltas)
    lower_tail, upper_tail = (1 - confidence) / 2, (1 + confidence) / 2
    if not undefined.any():
        low, high = np.quantile(deltas, [lower_tail, upper_tail])
    else:  # no interpolation towards an infinite draw, which would make the bound NaN itself
        low = np.quantile(np.where(undefined, -np.inf, deltas), lower_tail, method="lower")
        high = np.quantile(np.where(undefined, np.inf, deltas), upper_tail, method="higher")
    low, high = (float(b) if math.isfinite(b) else math.nan for b in (low, high))
    return low, high, int(undefined.sum())


def compare_paired(stock: Sequence[Any], corrected: Sequence[Any], aggregate: Aggregate, *,
                   iterations: int = DEFAULT_ITERATIONS, confidence: float = DEFAULT_CONFIDENCE,
                   seed: int = 0) -> Paired:
    """Point estimates (``aggregate`` over all items), the paired-bootstrap interval of the difference,
    and McNemar's exact test when the per-item values are 0/1 (else the paired sign-flip test)."""
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must lie in (0, 1), got {confidence}")
    deltas = paired_bootstrap(stock, corrected, aggregate, iterations=iterations, seed=seed)
    low, high, undefined = _percentile_interval(deltas, confidence)
    if len(stock) < 2:  # every draw is the one item: a zero-width interval that says nothing
        low = high = math.nan
    before, after = float(aggregate(list(stock))), float(aggregate(list(corrected)))
    common = {"items": len(stock), "stock": before, "corrected": after, "delta": after - before,
              "ci_low": low, "ci_high": high, "confidence": confidence, "iterations": iterations,
              "undefined_draws": undefined}
    if is_binary(stock) and is_binary(corrected):
        p, b, c = mcnemar_exact(stock, corrected)
        return Paired(**common, test="mcnemar-exact", p_value=p, stock_only=b, corrected_only=c)
    p, exact = sign_flip_test(stock, corrected, aggregate, iterations=iterations, seed=seed)
    return Paired(**common, test="sign-flip-exact" if exact else "sign-flip-random", p_value=p)
