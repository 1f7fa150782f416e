"""The cheap baselines cross-validated over every distinct prepared row: how far one split's figure moves.

A fine-tune is measured on one held-out split, and on a few hundred rows that split's figure is a draw: the
bug-triage recipe's linear model scores macro-F1 0.382 on its 104 test reports and 0.430 (sd 0.032) over five folds
of all 516, three shuffles. `specialist baselines --folds K` says, before any training, what the cheapest
alternatives score across splits and how far one split's figure can sit from that; a fine-tune beating the split's
baseline figure by less than the spread between folds has not shown much.

The folds follow data.split_by: grouped rows stay in one fold (whole groups are shuffled and dealt out),
stratified folds keep each label's share, random ones shuffle. Each fold's baselines are fitted on the other folds
only, as on a split's training rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from statistics import mean, pstdev
from typing import Any

import numpy as np

from specialist.data import Example
from specialist.errors import ConfigError

MAX_FOLDS = 100
MAX_REPEATS = 20
DEFAULT_REPEATS = 3


@dataclass
class FoldFigures:
    """Each baseline's headline figures, one value per fold and shuffle."""

    folds: int
    repeats: int
    rows: int
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # arm -> metric -> per fold

    def add(self, arm: str, figures: dict[str, float]) -> None:
        for metric, value in figures.items():
            if metric != "length":  # a length is no score
                self.values.setdefault(arm, {}).setdefault(metric, []).append(float(value))

    def summary(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """{arm: {metric: {mean, sd, folds}}}: sd over the folds (population sd, as over repeated folds)."""
        return {arm: {metric: {"mean": mean(values), "sd": pstdev(values), "folds": len(values)}
                      for metric, values in per_metric.items()}
                for arm, per_metric in self.values.items()}


def distinct_rows(split) -> list[Example]:
    """Every prepared row once: training, validation and test rows, without the balancing's repeated copies."""
    seen, rows = set(), []
    for ex in [*split.train, *split.val, *split.test]:
        key = (ex.prompt, ex.completion)
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    return rows


def check_folds(folds: int, repeats: int, rows: Sequence[Example], split_by: str) -> None:
    """Refuse what no fold scheme can answer, naming the option: every fold needs a row (a group) to hold out and
    the other folds a row to fit on."""
    check_fold_counts(folds, repeats)
    units = len({_group_of(ex, i) for i, ex in enumerate(rows)}) if split_by == "grouped" else len(rows)
    what = "groups" if split_by == "grouped" else "distinct rows"
    if units < folds:
        raise ConfigError(f"--folds {folds} needs at least {folds} {what} to hold out; the prepared data has {units}",
                          hint=f"use --folds {units} or fewer" if units >= 2 else "add rows, or leave --folds out")


def fold_options(folds: int | None, repeats: int | None) -> int | None:
    """--folds and --repeats as given: the shuffles to run (DEFAULT_REPEATS unless given; None without --folds).
    --repeats alone is refused rather than ignored."""
    if folds is None:
        if repeats is not None:
            raise ConfigError(f"--repeats {repeats} needs --folds", hint="add --folds 5, or leave --repeats out")
        return None
    repeats = DEFAULT_REPEATS if repeats is None else repeats
    check_fold_counts(folds, repeats)
    return repeats


def check_fold_counts(folds: int, repeats: int) -> None:
    """The options' own bounds, checked before any data is read."""
    if not 2 <= folds <= MAX_FOLDS:
        raise ConfigError(f"--folds must be between 2 and {MAX_FOLDS}, got {folds}", hint="e.g. --folds 5")
    if not 1 <= repeats <= MAX_REPEATS:
        raise ConfigError(f"--repeats must be between 1 and {MAX_REPEATS}, got {repeats}", hint="e.g. --repeats 3")


def fold_indices(rows: Sequence[Example], split_by: str, folds: int,
                 seed: int) -> Iterator[tuple[list[int], list[int]]]:
    """(fit rows, held-out rows) per fold, by data.split_by, shuffled by `seed`."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if split_by == "grouped":
        yield from _group_folds([_group_of(ex, i) for i, ex in enumerate(rows)], folds, seed)
        return
    index, labels = np.arange(len(rows)), [ex.label for ex in rows]
    counts = Counter(labels)
    if split_by == "stratified" and None not in counts and min(counts.values()) >= folds:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed).split(index, labels)
    else:  # a label with fewer rows than folds cannot be in every fold: plain shuffled folds
        splitter = KFold(folds, shuffle=True, random_state=seed).split(index)
    for fit, held in splitter:
        yield fit.tolist(), held.tolist()


def _group_folds(groups: list[str], folds: int, seed: int) -> Iterator[tuple[list[int], list[int]]]:
    order = sorted(set(groups))
    np.random.default_rng(seed).shuffle(order)
    fold_of = {group: i % folds for i, group in enumerate(order)}
    for fold in range(folds):
        held = [i for i, group in enumerate(groups) if fold_of[group] == fold]
        yield [i for i, group in enumerate(groups) if fold_of[group] != fold], held


def _group_of(ex: Example, i: int) -> str:
    return ex.group if ex.group is not None else f"\x00row {i}"  # a row without a group is its own group


def cross_validate(rows: Sequence[Example], split_by: str, folds: int, repeats: int, score_fold) -> FoldFigures:
    """`score_fold(fit rows, held-out rows)` -> {arm: headline figures} on every fold of `repeats` shuffles."""
    from rich.progress import track

    check_folds(folds, repeats, rows, split_by)
    figures = FoldFigures(folds, repeats, len(rows))
    plan = [fold for seed in range(repeats) for fold in fold_indices(rows, split_by, folds, seed)]
    for fit, held in track(plan, description=f"{folds} folds x {repeats}", transient=True):
        for arm, values in score_fold([rows[i] for i in fit], [rows[i] for i in held]).items():
            figures.add(arm, values)
    return figures


def summary_rows(figures: FoldFigures) -> list[list[Any]]:
    """Table rows: metric, then each arm's "mean (sd)" over the folds ("" where the arm lacks the metric), with
    "in k of n folds" where the arm was scored on only some (a label baseline needs two labels to fit on)."""
    summary = figures.summary()
    arms = list(summary)
    metrics = list(dict.fromkeys(metric for per_metric in summary.values() for metric in per_metric))
    total = figures.folds * figures.repeats
    return [[metric, *[_mean_sd(summary[arm].get(metric), total) for arm in arms]] for metric in metrics]


def _mean_sd(figure: dict[str, float | int] | None, total: int) -> str:
    if figure is None:
        return ""
    text = f"{100 * figure['mean']:.1f}% ({100 * figure['sd']:.1f})"
    return text if figure["folds"] >= total else f"{text} in {figure['folds']} of {total} folds"
