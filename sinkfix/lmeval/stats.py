"""Paired statistics of two runs on the same items: a paired bootstrap interval for any metric, and
McNemar's exact test for metrics that are right or wrong per item (accuracy).

Both runs score the same items, so their scores are correlated: the sampling error of the
*difference* is far smaller than that of either score, which is why a change smaller than either
run's own standard error can still be told from noise, and why the two runs must be paired.

* **Paired bootstrap.** Draw the items with replacement (the same draw for both runs), aggregate
  each run's per-item values with the metric's own aggregation (a mean for accuracy, a token- or
  byte-weighted perplexity for rolling log-likelihood), and take the difference; the interval is the
  percentile interval of that difference over ``iterations`` draws. Its p-value is the interval
  inverted: twice the smaller share of draws on either side of zero (with the usual +1 so that it is
  never zero), the smallest two-sided level at which the percentile interval excludes zero.
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

__all__ = ["Paired", "compare_paired", "paired_bootstrap", "mcnemar_exact", "is_binary", "DEFAULT_ITERATIONS",
           "DEFAULT_CONFIDENCE"]

DEFAULT_ITERATIONS = 2000
DEFAULT_CONFIDENCE = 0.95
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
    test: str  # "mcnemar-exact" or "paired-bootstrap"
    p_value: float
    stock_only: int | None = None  # McNemar's b: right before the correction, wrong after
    corrected_only: int | None = None  # McNemar's c: wrong before, right after

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


def _bootstrap_p(deltas: np.ndarray) -> float:
    # a draw whose difference is NaN (a non-finite per-item value) lies on neither side of zero: counting
    # only the others would give a p-value for an interval that is itself NaN
    if np.isnan(deltas).any():
        return math.nan
    below = (np.count_nonzero(deltas <= 0) + 1) / (deltas.size + 1)
    above = (np.count_nonzero(deltas >= 0) + 1) / (deltas.size + 1)
    return min(1.0, 2 * min(below, above))


def compare_paired(stock: Sequence[Any], corrected: Sequence[Any], aggregate: Aggregate, *,
                   iterations: int = DEFAULT_ITERATIONS, confidence: float = DEFAULT_CONFIDENCE,
                   seed: int = 0) -> Paired:
    """Point estimates (``aggregate`` over all items), the paired-bootstrap interval of the difference,
    and McNemar's exact test when the per-item values are 0/1 (else the bootstrap p-value)."""
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must lie in (0, 1), got {confidence}")
    deltas = paired_bootstrap(stock, corrected, aggregate, iterations=iterations, seed=seed)
    low, high = np.quantile(deltas, [(1 - confidence) / 2, (1 + confidence) / 2])
    before, after = float(aggregate(list(stock))), float(aggregate(list(corrected)))
    common = {"items": len(stock), "stock": before, "corrected": after, "delta": after - before,
              "ci_low": float(low), "ci_high": float(high), "confidence": confidence, "iterations": iterations}
    if is_binary(stock) and is_binary(corrected):
        p, b, c = mcnemar_exact(stock, corrected)
        return Paired(**common, test="mcnemar-exact", p_value=p, stock_only=b, corrected_only=c)
    return Paired(**common, test="paired-bootstrap", p_value=_bootstrap_p(deltas))
