"""The baseline arms of an evaluation, and which of them the tuned arm must beat.

A fine-tune is worth shipping only if it beats the cheapest thing that could replace it, so every evaluation
scores, beside base and few-shot, the arms of core.baselines (`nearest`, `majority`, `linear`) and `retrieval`
(the base model prompted with the k nearest training rows), on the same rows with the same scorers. The best of
them on each metric is "the best baseline": the report and the CLI lead with each tuned arm (tuned, and
tuned+constrained where scored) against it, and a gate can name it (`tuned - best_baseline >= 0 on exact_match`,
`tuned+constrained - best_baseline > 0 on field_accuracy confidently`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from specialist.core.baselines import LabelAnswers, linear_answers, majority_answers, training_labels
from specialist.core.gates import BASELINE_ARM_NAMES
from specialist.core.retrieval import DEFAULT_NEAR_DUPLICATE, RetrievalIndex

if TYPE_CHECKING:  # results is the report's module; only its record type is named here
    from specialist.evaluate.results import VersusBest

NOT_COMPARED = ("length", "ece")  # not "higher is better" figures


def default_retrieval_k(evaluation) -> int:
    """Rows the retrieval arm is shown: retrieval_k, else few_shot_k (0: no retrieval arm, like no few-shot arm)."""
    return evaluation.retrieval_k if evaluation.retrieval_k is not None else evaluation.few_shot_k


def baseline_index(config, train: list, k: int = 3) -> RetrievalIndex:
    """The training rows as the baselines search them, with the run's near-duplicate rule (data.retrieval's, else
    the default) and `k` rows for a retrieval arm."""
    near = config.data.retrieval.near_duplicate if config.data.retrieval else DEFAULT_NEAR_DUPLICATE
    return RetrievalIndex.of_examples(train, near, k)


def no_model_baselines(evaluation, index: RetrievalIndex,
                       render: Callable[[str], str]) -> dict[str, Callable[[list[str]], Any]]:
    """{arm name: answer(prompts) -> (texts, seconds, LabelAnswers | None)} for the baselines that need no model;
    `render` writes a label as the rows' completions do (data.label_template)."""
    wanted, found = evaluation.baselines, {}
    if "nearest" in wanted and len(index):
        found["nearest"] = _timed(lambda prompts: (index.nearest_answers(prompts), None))
    labels = training_labels(index)
    if labels is not None and "majority" in wanted:
        found["majority"] = _timed(lambda prompts: _rendered(majority_answers(labels, len(prompts)), render))
    if labels is not None and "linear" in wanted:
        found["linear"] = _timed(lambda prompts: _rendered(linear_answers(index.inputs, labels, prompts), render))
    return found


def _rendered(answers: LabelAnswers, render: Callable[[str], str]) -> tuple[list[str], LabelAnswers]:
    return [render(label) for label in answers.labels], answers


def _timed(answer: Callable[[list[str]], tuple[list[str], LabelAnswers | None]]):
    def timed(prompts: list[str]):
        started = time.perf_counter()
        texts, labelled = answer(prompts)
        return texts, time.perf_counter() - started, labelled
    return timed


def best_baselines(arms: dict[str, Any]) -> dict[str, str]:
    """{metric: the baseline arm with the highest value on it} over the metrics the tuned arm has (ties: the arm
    listed first in BASELINE_ARM_NAMES); empty without a tuned arm or a baseline arm."""
    if "tuned" not in arms:
        return {}
    candidates = [name for name in BASELINE_ARM_NAMES if name in arms]
    best = {}
    for metric in arms["tuned"].headline():
        if metric in NOT_COMPARED:
            continue
        scored = [(arms[name].headline()[metric], -i, name) for i, name in enumerate(candidates)
                  if metric in arms[name].headline()]
        if scored:
            best[metric] = max(scored)[2]
    return best


def versus_best_lines(report) -> list[str]:
    """One line per tuned arm and metric: that arm against the best baseline on it, with the paired interval and
    test, e.g. `exact_match: tuned 95.0% vs nearest 98.3%: -3.3 pts [-10.1, +3.5], mcnemar exact p=0.48 (no
    difference)`; a tuned+constrained line follows tuned's on each metric it has."""
    return [versus_best_line(entry) for entry in report.versus_best_baseline()]


def versus_best_line(entry: VersusBest) -> str:
    """One tuned arm against the best baseline on one metric, in words."""
    tuned, other = entry.tuned_value, entry.baseline_value
    line = (f"{entry.metric}: {entry.tuned} {100 * tuned:.1f}% vs {entry.baseline} {100 * other:.1f}%: "
            f"{100 * (tuned - other):+.1f} pts")
    comparison = entry.comparison
    if comparison is None:
        return line + " (no per-row scores: no paired test)"
    if comparison.difference.bounded:
        line += f" {comparison.difference.format_bounds('+.1f', 100)}"
    verdict = {"b": f"{entry.tuned} ahead", "a": f"{entry.tuned} behind"}.get(comparison.better, "no difference")
    return line + f", {comparison.test} p={comparison.p_value:.3g} ({verdict})"
