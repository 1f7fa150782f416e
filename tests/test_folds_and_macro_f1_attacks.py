"""Attacks on the paired macro-F1 comparison and on `specialist baselines --folds`: hostile labels and sizes,
arms that never predict a class, gates without an interval, scikit-learn by hand on every fold, a planted
held-out answer no fold may read, and bad options refused by name with nothing written."""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from specialist.core.stats import _randomization_p, paired_macro_f1
from specialist.data import Example
from specialist.errors import ConfigError
from specialist.evaluate.cross_validation import check_folds, fold_indices, summary_rows

from tests.test_baselines import TICKETS

HOSTILE = ["", "\u202e", "x" * 5_000, "ünïcödé", "<script>", "a b", "\x00", "Major"]


def sklearn_macro(expected, answers) -> float:
    from sklearn.metrics import f1_score

    answers = ["\x01<none>" if answer is None else answer for answer in answers]
    return f1_score(expected, answers, labels=sorted(set(expected)), average="macro", zero_division=0)


def report_macro(expected, answers) -> float:
    """The label report's macro-F1 on labels given as they are (its extract never gives None)."""
    from specialist.core.scorers import LabelRule, label_report

    answers = ["\x01<none>" if answer is None else answer for answer in answers]
    return label_report(answers, expected, LabelRule(lowercase=False, pattern=r"^([\s\S]*)$"))["macro_f1"]


def labelled_config(split_by: str = "stratified", scorers=("label_accuracy",)):
    from specialist.config import validate_config

    grouped = {"group_column": "group"} if split_by == "grouped" else {}
    return validate_config({"data": {"path": "unused.jsonl", "split_by": split_by,
                                     "label_template": '{"label": "{label}"}', **grouped},
                            "model": {"name": "unused"},
                            "evaluation": {"scorers": list(scorers), "label_json_key": "label"}})


def ticket_rows(copies: int = 3, groups: int | None = 6) -> list[Example]:
    return [Example(f"{text} #{i}", json.dumps({"label": label}), line=len(TICKETS) * i + j + 1, label=label,
                    group=None if groups is None else f"g{j % groups}")
            for i in range(copies) for j, (text, label) in enumerate(TICKETS)]


def crossed(config, rows, folds, repeats):
    from specialist.evaluate.runner import cross_validated_baselines

    return cross_validated_baselines(config, SimpleNamespace(train=rows, val=[], test=[]), folds, repeats)


# --- paired_macro_f1 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_hostile_labels_give_scikit_learns_difference_and_finite_figures(seed):
    rng = random.Random(seed)
    expected = rng.choices(HOSTILE, k=60)
    a = [rng.choice(HOSTILE + [None, "invented"]) for _ in expected]
    b = [want if rng.random() < 0.5 else rng.choice(HOSTILE + [None]) for want in expected]
    result = paired_macro_f1(expected, a, b, samples=200, seed=seed)
    assert result.difference.mean == pytest.approx(report_macro(expected, b) - report_macro(expected, a))
    # scikit-learn reads labels through numpy strings, where "\x00" is "": compare it on the others only
    clean = [i for i, want in enumerate(expected) if want != "\x00"]
    kept = [[labels[i] if labels[i] != "\x00" else "nul" for i in clean] for labels in (expected, a, b)]
    assert paired_macro_f1(*kept, samples=100).difference.mean == pytest.approx(
        sklearn_macro(kept[0], kept[2]) - sklearn_macro(kept[0], kept[1]))
    assert all(math.isfinite(x) for x in (result.difference.low, result.difference.high, result.p_value))
    assert result.difference.low <= result.difference.mean <= result.difference.high
    assert 0 < result.p_value <= 1


def test_an_arm_that_never_predicts_a_class_is_scored_zero_for_it_not_nan():
    expected = ["a", "b", "c"] * 20
    only_a, only_b = ["a"] * 60, ["b"] * 60
    result = paired_macro_f1(expected, only_a, only_b, samples=200)
    assert result.difference.mean == pytest.approx(0.0) and result.better == "no difference"
    assert result.difference.bounded and math.isfinite(result.difference.low)
    nothing = paired_macro_f1(expected, [None] * 60, ["zzz"] * 60, samples=200)  # neither arm ever right
    assert (nothing.difference.mean, nothing.difference.low, nothing.difference.high) == (0.0, 0.0, 0.0)
    assert nothing.p_value == 1.0


def test_identical_arms_and_a_single_class_are_no_difference_and_runs_repeat_exactly():
    expected = ["only"] * 30
    answers = ["only"] * 20 + ["other"] * 10
    same = paired_macro_f1(expected, answers, list(answers), samples=200)
    assert same.difference.mean == 0 and same.p_value == 1.0 and same.better == "no difference"
    assert same.difference.low == 0 == same.difference.high
    better = paired_macro_f1(expected, answers, expected, samples=300, seed=4)
    assert better.difference.mean == pytest.approx(1 - sklearn_macro(expected, answers))
    assert better == paired_macro_f1(expected, answers, expected, samples=300, seed=4)  # deterministic
    assert better.better == "b" and better.difference.low > 0


def test_a_label_seen_on_one_row_only_cannot_make_a_confident_claim():
    expected = ["a"] * 10 + ["rare"]
    result = paired_macro_f1(expected, ["a"] * 11, expected, samples=500)
    assert result.difference.mean == pytest.approx(1 - sklearn_macro(expected, ["a"] * 11))
    assert result.p_value == 1.0 and result.better == "no difference"  # one discordant row: every swap as extreme
    assert result.difference.low <= 0  # a resample without the rare row shows no difference


def test_the_randomization_test_stays_in_batches_at_fifty_thousand_rows():
    rng = np.random.default_rng(0)
    n = 50_000
    want = rng.integers(0, 5, n)
    a = np.where(rng.random(n) < 0.5, want, rng.integers(0, 5, n))
    b = np.where(rng.random(n) < 0.6, want, rng.integers(0, 5, n))

    def difference(w, x, y, axis=-1):
        from specialist.core.stats import _macro_f1

        return _macro_f1(w, y, 5, axis) - _macro_f1(w, x, 5, axis)

    tracemalloc.start()
    p = _randomization_p(want, a, b, difference, 1000, 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert p == pytest.approx(1 / 1001)  # 10 points apart on 50,000 rows: no swap comes close
    assert peak < 800 * 2**20  # 256 rows of swaps at a time, not 1000 x 50,000 at once (400 MB per array)


def test_the_bootstrap_of_a_few_thousand_rows_stays_bounded():
    rng = random.Random(1)
    expected = rng.choices("abcde", k=3000)
    a = [x if rng.random() < 0.5 else rng.choice("abcde") for x in expected]
    b = [x if rng.random() < 0.6 else rng.choice("abcde") for x in expected]
    tracemalloc.start()
    result = paired_macro_f1(expected, a, b, samples=1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.difference.method == "bca" and result.difference.low > 0
    assert peak < 200 * 2**20


@pytest.mark.parametrize("n", [0, 1])
def test_a_confident_macro_f1_gate_without_an_interval_fails_with_a_reason_instead_of_crashing(n):
    from specialist.core.gates import check_gates
    from specialist.evaluate.results import ArmPair, ArmResult, EvalReport
    from specialist.evaluate.runner import figures_of, macro_f1_comparisons
    from specialist.core.scorers import LabelRule

    expected = ['{"label": "a"}'] * n
    outputs = {"tuned": ['{"label": "a"}'] * n, "linear": ['{"label": "b"}'] * n}
    comparisons = macro_f1_comparisons(outputs, expected, LabelRule(json_key="label"), 200)
    assert set(comparisons) == {ArmPair("tuned", "linear")}
    arms = {name: ArmResult(name, {}, {}, labels={"macro_f1": float(name == "tuned" and n > 0)})
            for name in outputs}
    report = EvalReport(run_dir=".", n_eval=n, max_new_tokens=0, decoding={}, arms=arms,
                        comparisons={pair: {"macro_f1": c} for pair, c in comparisons.items()},
                        best_baseline={"macro_f1": "linear"})
    [result] = check_gates(["tuned - best_baseline > 0 on macro_f1 confidently"], figures_of(report))
    assert not result.passed and f"no interval from {n} row(s)" in result.reason
    json.loads(json.dumps(report.to_json(), allow_nan=False))  # eval.json stays strict JSON


# --- cross-validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_by", ["random", "grouped", "stratified"])
def test_every_folds_majority_and_linear_figures_are_scikit_learns_by_hand(split_by):
    from sklearn.metrics import accuracy_score, f1_score

    from specialist.core.baselines import linear_answers

    rows = ticket_rows()
    figures = crossed(labelled_config(split_by), rows, 3, 2)
    majority, linear = {"label_accuracy": [], "macro_f1": []}, {"label_accuracy": [], "macro_f1": []}
    for seed in range(2):
        for fit, held in fold_indices(rows, split_by, 3, seed):
            fit_labels, want = [rows[i].label for i in fit], [rows[i].label for i in held]
            counts = Counter(fit_labels)
            top = max(counts, key=lambda label: (counts[label], -fit_labels.index(label)))
            guess = linear_answers([rows[i].prompt for i in fit], fit_labels, [rows[i].prompt for i in held]).labels
            for found, answers in ((majority, [top] * len(held)), (linear, guess)):
                found["label_accuracy"].append(accuracy_score(want, answers))
                found["macro_f1"].append(f1_score(want, answers, labels=sorted(set(want)), average="macro",
                                                  zero_division=0))
    for arm, by_hand in (("majority", majority), ("linear", linear)):
        for metric, values in by_hand.items():
            assert figures.values[arm][metric] == pytest.approx(values), (arm, metric)
            summary = figures.summary()[arm][metric]
            assert summary["mean"] == pytest.approx(np.mean(values)) and summary["sd"] == pytest.approx(np.std(values))


def test_no_fold_fits_on_a_planted_held_out_answer(monkeypatch):
    import specialist.evaluate.baseline_arms as baseline_arms
    import specialist.evaluate.runner as runner

    planted = Example("a planted report nobody else wrote", json.dumps({"label": "planted"}), line=999,
                      label="planted", group="g-planted")
    rows = ticket_rows() + [planted]
    seen = []
    real_index, real_linear = runner.baseline_index, baseline_arms.linear_answers

    def spy_index(config, train, k=3):
        seen.append(("index", [ex.prompt for ex in train]))
        return real_index(config, train, k)

    def spy_linear(inputs, labels, queries, seed=0):
        assert planted.prompt not in queries or "planted" not in labels
        assert not set(inputs) & set(queries)  # never fitted on a row it is asked
        found = real_linear(inputs, labels, queries, seed)
        assert "planted" not in found.labels or planted.prompt not in queries
        return found

    monkeypatch.setattr(runner, "baseline_index", spy_index)
    monkeypatch.setattr(baseline_arms, "linear_answers", spy_linear)
    for split_by in ("random", "stratified", "grouped"):
        seen.clear()
        figures = crossed(labelled_config(split_by), rows, 4, 2)
        held_sets = [[rows[i].prompt for i in held] for seed in range(2)
                     for _, held in fold_indices(rows, split_by, 4, seed)]
        assert len(seen) == len(held_sets) == 8
        for (_, fitted), held in zip(seen, held_sets):
            assert not set(fitted) & set(held)
        assert len(figures.values["linear"]["label_accuracy"]) == 8


def test_unique_answers_are_never_looked_up_from_their_own_fold():
    from specialist.config import validate_config

    config = validate_config({"data": {"path": "unused.jsonl"}, "model": {"name": "unused"},
                              "evaluation": {"scorers": ["exact_match"]}})
    rows = [Example(f"question number {i} about topic {i % 7}", f"answer {i}", line=i + 1) for i in range(30)]
    figures = crossed(config, rows, 5, 2)
    assert set(figures.values) == {"nearest"}  # free text: no label baselines
    assert figures.values["nearest"]["exact_match"] == [0.0] * 10  # an answer only its own row has is never found


def test_a_label_baseline_missing_from_some_folds_says_so_in_the_table():
    rows = [Example(f"{text} #{i}", json.dumps({"label": "bug"}), line=12 * i + j, label="bug")
            for i in range(2) for j, (text, _) in enumerate(TICKETS)]
    rows.append(Example("please add praise", json.dumps({"label": "praise"}), line=999, label="praise"))
    figures = crossed(labelled_config("stratified"), rows, 3, 2)
    summary = figures.summary()
    assert summary["nearest"]["macro_f1"]["folds"] == 6
    assert summary["majority"]["macro_f1"]["folds"] == 4  # the folds holding out "praise" fit on one label
    table = {row[0]: row[1:] for row in summary_rows(figures)}
    assert table["macro_f1"][0].endswith(")")  # every fold: nothing to add
    assert table["macro_f1"][1].endswith("in 4 of 6 folds") and table["macro_f1"][2].endswith("in 4 of 6 folds")


def test_a_single_class_leaves_only_nearest_and_leave_one_out_holds_out_each_row_once():
    rows = [Example(f"{text} #{i}", json.dumps({"label": "bug"}), line=12 * i + j, label="bug")
            for i in range(2) for j, (text, _) in enumerate(TICKETS)]
    figures = crossed(labelled_config("stratified"), rows, len(rows), 1)
    assert set(figures.values) == {"nearest"} and figures.summary()["nearest"]["label_accuracy"]["folds"] == 24
    assert figures.summary()["nearest"]["label_accuracy"]["mean"] == 1.0
    held = [h for _, h in fold_indices(rows, "random", len(rows), 0)]
    assert sorted(i for h in held for i in h) == list(range(24)) and all(len(h) == 1 for h in held)


def test_grouped_folds_without_groups_or_with_one_group():
    loose = ticket_rows(groups=None)
    check_folds(36, 1, loose, "grouped")  # no group: each row is its own
    for fit, held in fold_indices(loose, "grouped", 36, 0):
        assert len(held) == 1 and len(fit) == 35
    one = [Example(ex.prompt, ex.completion, ex.line, label=ex.label, group="all") for ex in loose]
    with pytest.raises(ConfigError, match="needs at least 2 groups to hold out; the prepared data has 1") as caught:
        check_folds(2, 1, one, "grouped")
    assert "add rows, or leave --folds out" in str(caught.value)


# --- the command --------------------------------------------------------------------------------------------


@pytest.fixture
def tickets_config(tmp_path, tiny_model_dir):
    import yaml

    rows = [{"text": f"{text} #{i}", "label": label} for i in range(3) for text, label in TICKETS]
    rows.append({"text": "ünïcödé \u202e " + "x" * 60, "label": "Ünïcödé long " + "y" * 60})
    (tmp_path / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"data": {"path": str(tmp_path / "tickets.jsonl"), "dedupe": {"near": False}, "split_by": "stratified",
                       "test_fraction": 0.25},
              "model": {"name": str(tiny_model_dir), "dtype": "float32"},
              "evaluation": {"scorers": ["label_accuracy"]}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(config, tmp_path, *options):
    from typer.testing import CliRunner

    from specialist.cli import app

    return CliRunner().invoke(app, ["baselines", str(config), "--out", str(tmp_path / "prepared"),
                                    "--json", str(tmp_path / "b.json"), *options], terminal_width=200)


def test_the_json_stays_strict_json_with_every_arms_cross_validation(tickets_config, tmp_path):
    result = invoke(tickets_config, tmp_path, "--folds", "4", "--repeats", "2")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "b.json").read_text(), parse_constant=lambda bad: pytest.fail(bad))
    assert set(scores) == {"nearest", "majority", "linear"}
    for arm, figures in scores.items():
        for metric in ("label_accuracy", "macro_f1"):
            figure = figures["cross_validation"][metric]
            assert figure["folds"] == 8 and 0 <= figure["mean"] <= 1 and figure["sd"] >= 0, (arm, metric)
    first = {arm: figures["cross_validation"] for arm, figures in scores.items()}
    assert invoke(tickets_config, tmp_path, "--folds", "4", "--repeats", "2").exit_code == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert {arm: figures["cross_validation"] for arm, figures in again.items()} == first  # deterministic


@pytest.mark.parametrize(("options", "why"), [
    (["--repeats", "0"], "--repeats 0 needs --folds"),  # was ignored: exit 0
    (["--repeats", "5"], "--repeats 5 needs --folds"),
    (["--folds", "5", "--repeats", "0"], "--repeats must be between 1 and 20"),
    (["--folds", "5", "--repeats", "-2"], "--repeats must be between 1 and 20"),
    (["--folds", "5", "--repeats", "99999999999999999999"], "--repeats must be between 1 and 20"),
    (["--folds", "0"], "--folds must be between 2 and 100"),
])
def test_a_bad_option_exits_2_naming_it_and_the_fix_with_nothing_written(tickets_config, tmp_path, options, why):
    result = invoke(tickets_config, tmp_path, *options)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and why in lines[0] and "hint:" in lines[1], result.output
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("bad", ["2.5", "", "three", "1e3"])
def test_a_non_integer_option_is_typers_usage_error(tickets_config, tmp_path, bad):
    for option in ("--folds", "--repeats"):
        extra = ["--folds", "3"] if option == "--repeats" else []
        result = invoke(tickets_config, tmp_path, *extra, option, bad)
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
        assert not (tmp_path / "b.json").exists()


def test_more_folds_than_rows_is_refused_before_any_score_is_written(tickets_config, tmp_path):
    import re

    result = invoke(tickets_config, tmp_path, "--folds", "100")
    assert result.exit_code == 2 and "--folds 100 needs at least 100 distinct rows" in result.output
    rows = int(re.search(r"the prepared data has (\d+)", result.output).group(1))
    assert rows >= 36 and f"use --folds {rows} or fewer" in result.output and not (tmp_path / "b.json").exists()
    assert "held-out results" not in result.output  # no table of scores printed before the refusal
    full = invoke(tickets_config, tmp_path, "--folds", str(rows), "--repeats", "1")  # folds == rows: leave one out
    assert full.exit_code == 0, full.output
    nearest = json.loads((tmp_path / "b.json").read_text())["nearest"]
    assert nearest["cross_validation"]["label_accuracy"]["folds"] == rows
