"""Macro-F1 of two arms on the same rows: the paired interval (rows resampled together) and the approximate
randomization test, checked against scikit-learn and the label report computed by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from specialist.core.stats import _macro_f1, paired_macro_f1

LABELS = ["Blocker", "Critical", "Major", "Minor", "Trivial"]


def noisy_answers(expected: list[str], right: float, seed: int, extra: tuple[str | None, ...] = ()) -> list:
    """Each expected label kept with probability `right`, else any label (or one of `extra`, labels outside the
    set: what a generated answer that parses to nothing reads as)."""
    rng = random.Random(seed)
    return [label if rng.random() < right else rng.choice(LABELS + list(extra)) for label in expected]


def expected_rows(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(LABELS, weights=[11, 12, 56, 15, 10], k=n)


def label_report_macro_f1(expected, answers) -> float:
    """The label report's macro-F1 (core.scorers.label_report) for labels given as they are."""
    from specialist.core.scorers import label_report

    class Same:
        lowercase = False

        @staticmethod
        def extract(text):
            return text

    answers = ["<no label>" if answer is None else answer for answer in answers]  # extract never gives None
    return label_report(answers, expected, Same())["macro_f1"]


def test_the_difference_is_scikit_learns_macro_f1_difference_with_invented_answers_too():
    from sklearn.metrics import f1_score

    expected = expected_rows(104)
    a = noisy_answers(expected, 0.4, 1, extra=("none", "Urgent"))
    b = noisy_answers(expected, 0.6, 2, extra=("none",))
    result = paired_macro_f1(expected, a, b, samples=300)
    # scikit-learn's macro over the expected labels only, as the label report counts an invented answer: wrong
    by_hand = (f1_score(expected, b, labels=sorted(set(expected)), average="macro", zero_division=0)
               - f1_score(expected, a, labels=sorted(set(expected)), average="macro", zero_division=0))
    assert result.difference.mean == pytest.approx(by_hand)
    assert result.difference.mean == pytest.approx(label_report_macro_f1(expected, b) - label_report_macro_f1(expected, a))
    assert result.difference.low <= result.difference.mean <= result.difference.high
    assert result.test == "approximate randomization" and result.difference.n == 104


def test_each_resample_is_scored_over_the_labels_it_expects():
    expected = expected_rows(40, seed=3)
    answers = noisy_answers(expected, 0.5, 4, extra=(None,))
    codes = {label: i for i, label in enumerate(sorted(set(expected)))}
    want = np.array([codes[label] for label in expected], dtype=float)
    got = np.array([codes.get(label, -1) for label in answers], dtype=float)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 40, size=(25, 12))  # small resamples, most missing a class or two
    batch = _macro_f1(want[rows], got[rows], len(codes))
    for i, picked in enumerate(rows):
        one = label_report_macro_f1([expected[j] for j in picked], [answers[j] for j in picked])
        assert batch[i] == pytest.approx(one)


def test_a_clearly_better_arm_is_ahead_with_an_interval_above_zero_and_the_order_matters():
    expected = expected_rows(300, seed=5)
    weak, strong = noisy_answers(expected, 0.2, 6), noisy_answers(expected, 0.9, 7)
    ahead = paired_macro_f1(expected, weak, strong, samples=500)
    assert ahead.better == "b" and ahead.difference.low > 0 and ahead.p_value < 0.01
    behind = paired_macro_f1(expected, strong, weak, samples=500)
    assert behind.better == "a" and behind.difference.high < 0
    assert behind.difference.mean == pytest.approx(-ahead.difference.mean)


def test_identical_arms_are_no_difference_and_the_result_is_deterministic():
    expected = expected_rows(80, seed=8)
    answers = noisy_answers(expected, 0.5, 9)
    same = paired_macro_f1(expected, answers, list(answers), samples=200)
    assert same.difference.mean == 0 and same.p_value == 1.0 and same.better == "no difference"
    other = noisy_answers(expected, 0.5, 10)
    assert paired_macro_f1(expected, answers, other, samples=200) == paired_macro_f1(expected, answers, other,
                                                                                       samples=200)


@pytest.mark.parametrize("n", [0, 1])
def test_no_rows_or_one_row_gives_no_interval_and_no_claim(n):
    expected = ["Major"] * n
    result = paired_macro_f1(expected, ["Minor"] * n, ["Major"] * n, samples=100)
    assert not result.difference.bounded and result.better == "no difference"


def test_hostile_inputs_are_refused_or_read_as_wrong_answers():
    with pytest.raises(ValueError, match="same rows"):
        paired_macro_f1(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="confidence"):
        paired_macro_f1(["a", "b"], ["a", "b"], ["a", "b"], confidence=1.5)
    expected = ["x" * 10_000, "<script>", "", "\x00"] * 10
    garbage = [None, "' OR 1=1", "\u202e", "x" * 10_000] * 10
    result = paired_macro_f1(expected, garbage, list(expected), samples=100)
    assert result.difference.mean == pytest.approx(1.0 - label_report_macro_f1(expected, garbage))


def test_past_bca_max_rows_the_interval_is_the_percentile_one_and_stays_quick():
    """BCa's jackknife re-scores the whole set once per row: quadratic for macro-F1. Above BCA_MAX_ROWS the
    percentile interval of the same resamples is used."""
    from specialist.core.stats import BCA_MAX_ROWS

    small = expected_rows(200, seed=11)
    assert paired_macro_f1(small, noisy_answers(small, 0.4, 12), noisy_answers(small, 0.6, 13),
                           samples=200).difference.method == "bca"
    large = expected_rows(BCA_MAX_ROWS + 1, seed=14)
    result = paired_macro_f1(large, noisy_answers(large, 0.4, 15), noisy_answers(large, 0.6, 16), samples=200)
    assert result.difference.method == "percentile" and result.difference.n == BCA_MAX_ROWS + 1
    assert result.difference.low < result.difference.mean < result.difference.high and result.better == "b"
