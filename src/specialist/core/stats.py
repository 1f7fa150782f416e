"""Uncertainty for scores on a few dozen to a few thousand held-out rows: intervals that stay honest at the edges,
and paired comparisons of two arms scored on the same rows.

Which interval, and why:
- a proportion (every row scored 0 or 1): the Wilson score interval. A percentile bootstrap of 60 rows that all
  pass resamples nothing but ones and reports [1.000, 1.000]; Wilson reports [0.940, 1.000], which is what 60 of
  60 can actually tell apart from 94%.
- a mean of other scores: the BCa bootstrap (bias-corrected and accelerated, scipy.stats.bootstrap, fixed seed).
  When BCa cannot be computed (too few distinct values) the percentile interval of the same resamples is used.
  When every row has the same value, no resample differs, and the interval is that value with zero width: the
  data carry no spread to measure (method "constant"). One row gives no interval at all (low = high = None):
  a mean's range is unbounded, so "the full possible range" would be invented.
- no rows: the mean is reported as 0.0 with n = 0 and no interval; callers should show "no rows", not a score.
- a paired difference (arm b minus arm a on the same rows): for proportions, Newcombe's hybrid score interval for
  paired data (Newcombe 1998, Statistics in Medicine 17:2635, method 10) with an exact McNemar test (a two-sided
  binomial test on the discordant rows); otherwise BCa on the per-row differences with a sign-flip permutation test.
- a paired difference of macro-F1, a figure of the whole set with no per-row score: BCa over resampled rows (each
  row's expected label with both arms' answers, kept together) and an approximate randomization test (Noreen 1989;
  Yeh 2000, COLING: each row's two answers swapped at random, the usual test for F-score differences).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

CONFIDENCE = 0.95
BCA_MAX_ROWS = 5000  # paired_bootstrap_interval: above this many rows, percentile instead of BCa


@dataclass(frozen=True)
class Interval:
    """A mean with its interval. low/high are None where no interval exists (no rows, or one row of a mean)."""

    mean: float
    low: float | None
    high: float | None
    method: str = "percentile"  # wilson, bca, percentile, constant, newcombe-paired, none
    n: int = 0
    confidence: float = CONFIDENCE

    @property
    def bounded(self) -> bool:
        return self.low is not None and self.high is not None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "method": self.method, "n": self.n,
                "confidence": self.confidence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], mean: float | None = None) -> Interval:
        """From `as_dict()`'s form (eval.json), with `mean` in place of the stored one where given; a bound, count
        or confidence that is not a number reads as none (a file edited by hand is read, not trusted)."""
        def number(key: str, default: float | None = None) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, (int, float)) else default

        n = data.get("n")
        return cls(float(data["mean"] if mean is None else mean), number("low"), number("high"),
                   str(data.get("method", "none")), n if isinstance(n, int) else 0, number("confidence", CONFIDENCE))

    def format(self, spec: str = ".3f", scale: float = 1.0, unit: str = "", bound_unit: str = "") -> str:
        """"value [low, high]" as every table and report prints an interval (just "value" where it has none): each
        number times `scale` in format `spec`, `unit` after the value, `bound_unit` after each bound. E.g.
        `.format(".1f", 100, "%")` -> "80.0% [49.0, 94.3]"; `.format("+.1f", 100, " pts")` -> "+5.0 pts [-1.2,
        +11.0]"."""
        value = f"{self.mean * scale:{spec}}{unit}"
        return f"{value} {self.format_bounds(spec, scale, bound_unit)}" if self.bounded else value

    def format_bounds(self, spec: str = ".3f", scale: float = 1.0, unit: str = "") -> str:
        """"[low, high]" as `format` writes it, or "none" where there is no interval."""
        if not self.bounded:
            return "none"
        return f"[{self.low * scale:{spec}}{unit}, {self.high * scale:{spec}}{unit}]"

    def negated(self) -> Interval:
        """The interval of -x: the same evidence read the other way round (a drop instead of a gain)."""
        low = None if self.high is None else -self.high
        high = None if self.low is None else -self.low
        return Interval(-self.mean, low, high, self.method, self.n, self.confidence)


def score_interval(values: Sequence[float], samples: int = 1000, confidence: float = CONFIDENCE,
                   seed: int = 0) -> Interval:
    """The interval the evaluation reports for one score: Wilson for 0/1 rows, BCa bootstrap for the rest."""
    data = _as_array(values, confidence)
    if data.size and is_binary(data):
        return wilson_interval(int(data.sum()), int(data.size), confidence)
    return bootstrap_ci(data, samples, confidence, seed)


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    """True when every value is 0 or 1: the mean is a proportion."""
    data = np.asarray(values, dtype=float)
    return bool(np.all((data == 0.0) | (data == 1.0)))


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval for successes/n (Newcombe 1998, Statistics in Medicine 17:857, method 3).

    Unlike the Wald or percentile-bootstrap intervals it never collapses to zero width at 0/n or n/n.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return Interval(0.0, None, None, "none", 0, confidence)
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0/n and n/n the formula gives exactly 0 and 1 up to rounding; pin them so a gate sees the true bound.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, "wilson", n, confidence)


def bootstrap_ci(values: Sequence[float], samples: int = 1000, confidence: float = CONFIDENCE,
                 seed: int = 0) -> Interval:
    """BCa bootstrap interval of the mean (resample rows `samples` times, seeded), percentile where BCa fails.

    Trade-off: BCa corrects the percentile interval's bias and skew at the cost of a jackknife (n extra means,
    computed in batches so memory stays O(n * 256)); it is undefined when the resampled means barely vary.
    """
    data = _as_array(values, confidence)
    n = int(data.size)
    if n == 0:
        return Interval(0.0, None, None, "none", 0, confidence)
    mean = float(data.mean())
    if n == 1:
        return Interval(mean, None, None, "none", 1, confidence)
    if np.all(data == data[0]):  # the value itself: summing n copies would add rounding error
        value = float(data[0])
        return Interval(value, value, value, "constant", n, confidence)
    for method in ("BCa", "percentile"):
        low, high = _scipy_bootstrap((data,), _mean_statistic, samples, confidence, seed, method)
        if math.isfinite(low) and math.isfinite(high):
            return Interval(mean, min(low, mean), max(high, mean), method.lower(), n, confidence)
    return Interval(mean, None, None, "none", n, confidence)


@dataclass(frozen=True)
class PairedComparison:
    difference: Interval  # mean of (b - a) per row, with its interval
    p_value: float  # two-sided: exact McNemar for 0/1 scores, sign-flip permutation otherwise
    better: str  # "b", "a" or "no difference" at the 1 - confidence level
    test: str = "sign-flip permutation"

    def as_dict(self) -> dict[str, object]:
        return {"difference": self.difference.as_dict(), "p_value": self.p_value, "better": self.better,
                "test": self.test}


def paired_comparison(a: Sequence[float], b: Sequence[float], samples: int = 1000, seed: int = 0,
                      confidence: float = CONFIDENCE) -> PairedComparison:
    """Does arm b beat arm a on the same rows? The interval of mean(b - a) and a two-sided test of "no difference".

    0/1 scores: Newcombe's paired interval and the exact McNemar test. Other scores: BCa on the per-row
    differences and a sign-flip permutation test (under "no difference" each row's difference is as likely to
    have either sign, so the share of sign-flipped sums at least as far from zero as the observed one is p).
    """
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs the same rows in both arms, got {len(a)} and {len(b)}")
    left, right = _as_array(a, confidence), _as_array(b, confidence)
    if left.size and is_binary(left) and is_binary(right):
        difference = newcombe_paired_interval(left, right, confidence)
        p_value, test = mcnemar_exact_p(left, right), "mcnemar exact"
    else:
        difference = bootstrap_ci(right - left, samples, confidence, seed)
        p_value, test = sign_flip_p(right - left, samples, seed + 1), "sign-flip permutation"
    return PairedComparison(difference, p_value, _better(p_value, difference.mean, confidence), test)


def _better(p_value: float, difference: float, confidence: float) -> str:
    """Which arm a paired test says is better: "b" (b minus a above zero), "a", or "no difference"."""
    if p_value < 1 - confidence and difference != 0:
        return "b" if difference > 0 else "a"
    return "no difference"


def paired_macro_f1(expected: Sequence[str], a: Sequence[str | None], b: Sequence[str | None], samples: int = 1000,
                    seed: int = 0, confidence: float = CONFIDENCE) -> PairedComparison:
    """Does arm b beat arm a on macro-F1 over the same rows? `expected` and each arm's answers are labels (None or
    any other string for an answer outside the expected labels). Macro-F1 as the label report computes it: the mean
    F1 over the labels expected in the rows (a resample's rows, in the bootstrap)."""
    if not len(expected) == len(a) == len(b):
        raise ValueError(f"a paired comparison needs the same rows in both arms, got {len(expected)} expected, "
                         f"{len(a)} and {len(b)} answers")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    classes = sorted(set(expected))
    code = {label: i for i, label in enumerate(classes)}
    kind = np.int16 if len(classes) < 2**15 else np.int32  # the resamples copy these: small codes, less memory
    want, got_a, got_b = (np.array([code.get(label, -1) for label in labels], dtype=kind)
                          for labels in (expected, a, b))

    def difference(want_rows: np.ndarray, a_rows: np.ndarray, b_rows: np.ndarray, axis: int = -1) -> np.ndarray:
        return (_macro_f1(want_rows, b_rows, len(classes), axis) - _macro_f1(want_rows, a_rows, len(classes), axis))

    observed = float(difference(want, got_a, got_b))
    interval = paired_bootstrap_interval((want, got_a, got_b), difference, observed, samples, confidence, seed)
    p_value = _randomization_p(want, got_a, got_b, difference, samples, seed + 1)
    return PairedComparison(interval, p_value, _better(p_value, observed, confidence), "approximate randomization")


def _macro_f1(want: np.ndarray, got: np.ndarray, classes: int, axis: int = -1) -> np.ndarray:
    """Macro-F1 of label codes along `axis`: F1 = 2tp / (2tp + fp + fn) per class expected in the rows, averaged
    over those classes (0 where none is expected)."""
    total = present = 0
    for label in range(classes):
        expected, answered = want == label, got == label
        hits, support = np.count_nonzero(expected & answered, axis), np.count_nonzero(expected, axis)
        wrong = support + np.count_nonzero(answered, axis) - 2 * hits  # false positives and false negatives
        f1 = np.divide(2.0 * hits, 2.0 * hits + wrong, out=np.zeros(np.shape(hits)), where=(2 * hits + wrong) > 0)
        seen = support > 0
        total, present = total + np.where(seen, f1, 0.0), present + seen
    return np.divide(total, np.maximum(present, 1))


def _randomization_p(want: np.ndarray, a: np.ndarray, b: np.ndarray, difference, samples: int, seed: int) -> float:
    """Two-sided p of "no difference": the share of random swaps of each row's two answers whose difference is at
    least as far from zero as the observed one (counting the observed, so p is never 0)."""
    observed = abs(float(difference(want, a, b)))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, samples, 256):  # batches keep memory at 256 x n
        swap = rng.random((min(256, samples - start), want.size)) < 0.5
        swapped = difference(want, np.where(swap, b, a), np.where(swap, a, b))
        extreme += int(np.sum(np.abs(swapped) >= observed - 1e-12))
    return (extreme + 1) / (samples + 1)


def newcombe_paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Interval for p_b - p_a from 0/1 scores of the same rows: Newcombe (1998) method 10, square-and-add of the
    two Wilson intervals with the correlation of the pair (phi, continuity-corrected when positive)."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = int(a_arr.size)
    if n == 0:
        return Interval(0.0, None, None, "none", 0, confidence)
    both = int(np.sum((b_arr == 1) & (a_arr == 1)))
    only_b = int(np.sum((b_arr == 1) & (a_arr == 0)))
    only_a = int(np.sum((b_arr == 0) & (a_arr == 1)))
    neither = n - both - only_b - only_a
    p_b, p_a = (both + only_b) / n, (both + only_a) / n
    wilson_b, wilson_a = wilson_interval(both + only_b, n, confidence), wilson_interval(both + only_a, n, confidence)
    phi = _paired_phi(both, only_b, only_a, neither)
    estimate = p_b - p_a
    below_b, above_b = p_b - wilson_b.low, wilson_b.high - p_b
    below_a, above_a = p_a - wilson_a.low, wilson_a.high - p_a
    low = estimate - math.sqrt(max(0.0, below_b**2 + above_a**2 - 2 * phi * below_b * above_a))
    high = estimate + math.sqrt(max(0.0, below_a**2 + above_b**2 - 2 * phi * below_a * above_b))
    return Interval(estimate, max(-1.0, low), min(1.0, high), "newcombe-paired", n, confidence)


def _paired_phi(both: int, only_b: int, only_a: int, neither: int) -> float:
    """Newcombe's correlation estimate for the 2x2 paired table; 0 when a margin is empty."""
    margins = (both + only_b) * (only_a + neither) * (both + only_a) * (only_b + neither)
    if margins == 0:
        return 0.0
    n = both + only_b + only_a + neither
    cross = both * neither - only_b * only_a
    if cross > n / 2:
        return (cross - n / 2) / math.sqrt(margins)
    return 0.0 if cross >= 0 else cross / math.sqrt(margins)


def mcnemar_exact_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p: a binomial test of the rows only b got right against those only a got right."""
    from scipy.stats import binomtest

    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    only_b = int(np.sum((b_arr == 1) & (a_arr == 0)))
    only_a = int(np.sum((b_arr == 0) & (a_arr == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_b, only_a + only_b, 0.5).pvalue)


def sign_flip_p(differences: Sequence[float], samples: int = 1000, seed: int = 1) -> float:
    """Two-sided paired permutation p-value: flip each row's difference's sign at random `samples` times."""
    diffs = np.asarray(differences, dtype=float)
    if diffs.size == 0:
        return 1.0
    observed = abs(float(diffs.sum()))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, samples, 256):  # batches keep memory at 256 x n
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(256, samples - start), diffs.size))
        extreme += int(np.sum(np.abs(signs @ diffs) >= observed - 1e-12))
    return (extreme + 1) / (samples + 1)


def paired_bootstrap_interval(samples_data: tuple[np.ndarray, ...], statistic, observed: float, samples: int = 1000,
                              confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """BCa (percentile where BCa fails) interval of `statistic(*arrays, axis=-1)` resampling the rows of all
    arrays together, e.g. texts with their loss before and after. `observed` is the statistic on the data."""
    n = int(samples_data[0].size)
    if n < 2:
        return Interval(observed, None, None, "none", n, confidence)
    # BCa's jackknife re-scores the set once per row left out: O(n^2) for a figure of the whole set (macro-F1:
    # 83 s a pair at 50,000 rows). Past BCA_MAX_ROWS the percentile interval, whose bias BCa corrects, is used.
    for method in ("BCa", "percentile") if n <= BCA_MAX_ROWS else ("percentile",):
        low, high = _scipy_bootstrap(samples_data, statistic, samples, confidence, seed, method, paired=True)
        if math.isfinite(low) and math.isfinite(high):
            return Interval(observed, min(low, observed), max(high, observed), method.lower(), n, confidence)
    return Interval(observed, observed, observed, "constant", n, confidence)


def _scipy_bootstrap(data: tuple[np.ndarray, ...], statistic, samples: int, confidence: float, seed: int,
                     method: str, paired: bool = False) -> tuple[float, float]:
    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        # scipy warns (and returns NaN) when BCa is degenerate; the caller falls back on NaN.
        warnings.simplefilter("ignore")
        result = bootstrap(data, statistic, n_resamples=samples, confidence_level=confidence, method=method,
                           rng=np.random.default_rng(seed), vectorized=True, paired=paired, batch=256)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _mean_statistic(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


def _as_array(values: Sequence[float], confidence: float) -> np.ndarray:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    try:
        data = np.asarray(list(values), dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be numbers: {exc}") from None
    if data.ndim != 1:
        raise ValueError("scores must be a flat list of numbers, one per row")
    if not np.all(np.isfinite(data)):
        raise ValueError("scores must be finite numbers; a scorer returned NaN or infinity")
    return data


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)
