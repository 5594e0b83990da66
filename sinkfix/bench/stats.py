"""Repeated measurements: their spread (:class:`Spread`) and the order they are taken in (:func:`alternate`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

__all__ = ["Spread", "alternate"]

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
