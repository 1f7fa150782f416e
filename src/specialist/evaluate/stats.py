"""Uncertainty for scores on a few hundred held-out rows: bootstrap intervals and a paired comparison."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap_ci(values: list[float], samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean: resample rows with replacement `samples` times."""
    if not values:
        return Interval(0.0, 0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    tail = (1 - confidence) / 2
    low = means[int(tail * samples)]
    high = means[min(samples - 1, int((1 - tail) * samples))]
    return Interval(sum(values) / n, low, high)


@dataclass(frozen=True)
class PairedComparison:
    difference: Interval  # mean of (b - a) per row, with its bootstrap interval
    p_value: float  # two-sided, paired sign-flip permutation test
    better: str  # "b", "a" or "no difference" at the 5% level

    def as_dict(self) -> dict[str, object]:
        return {"difference": self.difference.as_dict(), "p_value": self.p_value, "better": self.better}


def paired_comparison(a: list[float], b: list[float], samples: int = 1000, seed: int = 0) -> PairedComparison:
    """Does arm b beat arm a on the same rows? Bootstrap interval of the mean difference and a sign-flip test.

    The permutation test flips the sign of each row's difference at random: under "no difference" either sign
    is as likely, so the share of flipped means at least as far from zero as the observed one is the p-value.
    """
    if len(a) != len(b):
        raise ValueError("a paired comparison needs the same rows in both arms")
    diffs = [y - x for x, y in zip(a, b)]
    interval = bootstrap_ci(diffs, samples, seed=seed)
    observed = abs(sum(diffs))
    rng = random.Random(seed + 1)
    extreme = sum(1 for _ in range(samples) if abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12)
    p_value = (extreme + 1) / (samples + 1)
    better = "no difference"
    if p_value < 0.05:
        better = "b" if interval.mean > 0 else "a"
    return PairedComparison(interval, p_value, better)
