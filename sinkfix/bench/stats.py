"""Repeated measurements: their spread (:class:`Spread`), the order they are taken in
(:func:`alternate`), and how sure a ratio of two configurations' medians is (:func:`ratio_of_medians`,
:func:`ratio_of_block_medians`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

__all__ = ["Ratio", "Spread", "alternate", "ratio_of_block_medians", "ratio_of_medians"]

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """Repeated samples of one quantity; the summary always shows their spread."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a Spread needs at least one sample")

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    def percentile(self, q: float) -> float:
        """Linear interpolation between closest ranks (numpy's default)."""
        ordered = sorted(self.samples)
        pos = (len(ordered) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        return {
            "min": self.min * scale, "median": self.median * scale, "max": self.max * scale,
            "mean": self.mean * scale, "p50": self.percentile(50) * scale, "p90": self.percentile(90) * scale,
            "n": len(self.samples), "samples": [s * scale for s in self.samples],
        }


def alternate(
    names: Sequence[str],
    measure: Callable[[str], T],
    *,
    repeats: int,
    warmup: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, list[T]]:
    """Call ``measure(name)`` for every name, ``warmup + repeats`` rounds, in ABBA order.

    Reversing the order every other round cancels a linear drift (thermal, another process
    starting) to first order, and every variant sees the same share of the noise. Warm-up rounds
    are measured and discarded.
    """
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        order = list(names) if round_ % 2 == 0 else list(reversed(names))
        for name in order:
            value = measure(name)
            if round_ >= warmup:
                results[name].append(value)
            if on_step is not None:
                on_step(1)
    return results


@dataclass(frozen=True)
class Ratio:
    """``median(numerator) / median(denominator)`` and a paired-bootstrap percentile interval of it.

    ``low`` and ``high`` are None with fewer than 2 ``pairs``: resampling one unit only ever draws
    that unit again, a zero-width "interval" that says nothing about how sure the ratio is."""

    value: float
    low: float | None
    high: float | None
    confidence: float
    pairs: int

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float], *, confidence: float = 0.95,
                     iterations: int = 2000, seed: int = 0) -> Ratio:
    """The ratio of two configurations' medians, with how far the same protocol could move it.

    ``numerator[i]`` and ``denominator[i]`` must come from the same pass of :func:`alternate` (the
    same round, back to back): the interval draws passes with replacement, both configurations'
    measurements of a pass together, so the machine's speed changing between passes moves the
    interval as it moves the ratio, not twice. It is the percentile interval of the ratio over
    ``iterations`` draws (computed on the log scale, where the ratio is a difference). On a noisy
    machine a single run's ratio can miss a target its interval straddles: a verdict that holds is
    one whose whole interval lies on the right side.
    """
    return ratio_of_block_medians([[x] for x in numerator], [[y] for y in denominator], confidence=confidence,
                                  iterations=iterations, seed=seed)


def ratio_of_block_medians(numerator: Sequence[Sequence[float]], denominator: Sequence[Sequence[float]], *,
                           confidence: float = 0.95, iterations: int = 2000, seed: int = 0) -> Ratio:
    """:func:`ratio_of_medians` for measurements taken in blocks: ``numerator[r]`` and
    ``denominator[r]`` are all the samples of round ``r`` (the decode steps of one ``generate``, say),
    and the ratio is of the medians over every sample of every round. The interval draws **rounds**
    with replacement, all of a round's samples of both configurations together. Samples within a
    round share that round's machine state (a decode step's time moved by up to 20% from one
    ``generate`` to the next on the machine this was written on, while steps within one moved by a
    few percent), so drawing them one by one would make the interval far too narrow. ``pairs`` in
    the result counts rounds; with few rounds the interval is rough, and with one there is none
    (``low`` and ``high`` None).
    """
    import numpy as np

    from sinkfix.lmeval.stats import paired_bootstrap  # numpy only; shares the bootstrap with `sinkfix eval`

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"the two configurations need the same non-zero number of rounds, got {len(numerator)} "
                         f"and {len(denominator)}")
    if any(not block for block in (*numerator, *denominator)):
        raise ValueError("every round needs at least one measurement of each configuration")
    if any(not (math.isfinite(x) and x > 0) for block in (*numerator, *denominator) for x in block):
        raise ValueError("a ratio of medians needs finite positive measurements (times, sizes)")

    value = (statistics.median(x for block in numerator for x in block)
             / statistics.median(x for block in denominator for x in block))
    if len(numerator) < 2:  # one resampling unit: no interval (see Ratio)
        return Ratio(value, None, None, confidence, len(numerator))

    def log_median(blocks: list[Sequence[float]]) -> float:
        return math.log(statistics.median(x for block in blocks for x in block))

    # the same percentile interval `sinkfix eval` takes of its paired differences (lmeval.stats.compare_paired)
    logs = paired_bootstrap(list(denominator), list(numerator), log_median, iterations=iterations, seed=seed)
    low, high = np.quantile(logs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Ratio(value, math.exp(float(low)), math.exp(float(high)), confidence, len(numerator))
