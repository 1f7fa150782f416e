"""`specialist baselines --folds`: the cheap baselines cross-validated over every distinct prepared row. Folds
follow data.split_by (a group never on both sides, label shares kept), each fold's baselines are fitted on the
other folds only and agree with scikit-learn run by hand, and impossible fold counts are refused by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from specialist.data import Example
from specialist.errors import ConfigError
from specialist.evaluate.cross_validation import check_folds, distinct_rows, fold_indices

from tests.test_baselines import TICKETS


def ticket_rows(copies: int = 3) -> list[Example]:
    return [Example(f"{text} #{i}", json.dumps({"label": label}), line=len(TICKETS) * i + j + 1, label=label,
                    group=f"g{j % 6}")
            for i in range(copies) for j, (text, label) in enumerate(TICKETS)]


@pytest.mark.parametrize("split_by", ["random", "stratified", "grouped"])
def test_every_row_is_held_out_once_per_shuffle_and_never_fitted_on_in_its_fold(split_by):
    rows = ticket_rows()
    for seed in range(3):
        held_all = []
        for fit, held in fold_indices(rows, split_by, 3, seed):
            assert not set(fit) & set(held) and sorted(fit + held) == list(range(len(rows)))
            held_all += held
            if split_by == "grouped":  # a group is on one side only
                assert not {rows[i].group for i in fit} & {rows[i].group for i in held}
            if split_by == "stratified":  # each label's share kept: 4 of the 12 rows of each label per fold
                assert sorted(rows[i].label for i in held) == ["bug"] * 4 + ["feature"] * 4 + ["question"] * 4
        assert sorted(held_all) == list(range(len(rows)))
    shuffles = [[held for _, held in fold_indices(rows, split_by, 3, seed)] for seed in (0, 1, 0)]
    assert shuffles[0] == shuffles[2] and shuffles[0] != shuffles[1]  # seeded: repeatable, and shuffles differ


def test_a_label_rarer_than_the_folds_falls_back_to_plain_folds():
    rows = ticket_rows() + [Example("a lone praise", "{}", line=99, label="praise")]
    folds = list(fold_indices(rows, "stratified", 3, 0))
    assert len(folds) == 3 and sorted(i for _, held in folds for i in held) == list(range(len(rows)))


def test_distinct_rows_drop_the_balancings_copies_and_keep_every_split():
    rows = ticket_rows(1)
    split = SimpleNamespace(train=rows[:8] + rows[:3], val=rows[8:10], test=rows[10:] + rows[10:11])
    assert distinct_rows(split) == rows


@pytest.mark.parametrize(("folds", "repeats", "split_by", "message"), [
    (1, 3, "random", "between 2 and 100"), (0, 3, "random", "between 2 and 100"), (-5, 3, "random", "between 2"),
    (101, 3, "random", "between 2 and 100"), (5, 0, "random", "--repeats"), (5, 21, "random", "--repeats"),
    (37, 1, "random", "needs at least 37 distinct rows to hold out; the prepared data has 36\n  hint: use --folds 36"),
    (7, 1, "grouped", "needs at least 7 groups to hold out; the prepared data has 6"),
])
def test_impossible_fold_counts_are_refused_naming_the_option(folds, repeats, split_by, message):
    with pytest.raises(ConfigError, match=message):
        check_folds(folds, repeats, ticket_rows(), split_by)
    with pytest.raises(ConfigError, match="at least 2"):
        check_folds(2, 1, ticket_rows()[:1], "random")


def test_each_folds_linear_figure_is_scikit_learns_on_that_fold(tmp_path):
    from sklearn.metrics import f1_score

    from specialist.config import validate_config
    from specialist.core.baselines import linear_answers
    from specialist.evaluate.runner import cross_validated_baselines

    config = validate_config({"data": {"path": str(tmp_path / "unused.jsonl"), "split_by": "stratified",
                                       "label_template": '{"label": "{label}"}'},
                              "model": {"name": "unused"},
                              "evaluation": {"scorers": ["label_accuracy"], "label_json_key": "label"}})
    rows = ticket_rows()
    split = SimpleNamespace(train=rows[:30], val=[], test=rows[30:])
    figures = cross_validated_baselines(config, split, 3, 2)
    assert figures.rows == 36 and {"nearest", "majority", "linear"} == set(figures.values)
    by_hand = []
    for seed in range(2):
        for fit, held in fold_indices(rows, "stratified", 3, seed):
            answers = linear_answers([rows[i].prompt for i in fit], [rows[i].label for i in fit],
                                     [rows[i].prompt for i in held])
            by_hand.append(f1_score([rows[i].label for i in held], answers.labels, average="macro"))
    assert figures.values["linear"]["macro_f1"] == pytest.approx(by_hand)
    summary = figures.summary()["linear"]["macro_f1"]
    assert summary["folds"] == 6 and summary["mean"] == pytest.approx(sum(by_hand) / 6)
    assert cross_validated_baselines(config, split, 3, 2).values == figures.values  # deterministic


def test_the_baselines_command_prints_and_writes_the_cross_validated_figures(tiny_config, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from specialist.cli import app

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    base = ["baselines", str(config), "--out", str(tmp_path / "prepared")]
    result = CliRunner().invoke(app, [*base, "--folds", "3", "--repeats", "2", "--json", str(tmp_path / "b.json")],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "cross-validated: 3 folds x 2 shuffles over" in " ".join(result.output.split())  # the title may wrap
    crossed = json.loads((tmp_path / "b.json").read_text())["nearest"]["cross_validation"]
    assert crossed["exact_match"]["folds"] == 6 and 0 <= crossed["exact_match"]["mean"] <= 1
    for bad, why in (("1", "between 2 and 100"), ("100000", "between 2 and 100"), ("-1", "between 2"),
                     ("41", "needs at least 41 distinct rows")):
        refused = CliRunner().invoke(app, [*base, "--folds", bad], terminal_width=200)
        assert refused.exit_code == 2 and why in refused.output, refused.output
    refused = CliRunner().invoke(app, [*base, "--folds", "five"], terminal_width=200)
    assert refused.exit_code == 2 and "Invalid value for '--folds'" in refused.output
