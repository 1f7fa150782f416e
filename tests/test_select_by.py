"""training.select_by: the validation rows answered and scored at every evaluation, the best checkpoint kept by
that score (not by the lowest validation loss), the score logged and drawn beside the loss."""

from __future__ import annotations

import json

import pytest
import torch

from specialist.config import validate_config
from specialist.errors import ConfigError
from specialist.pipeline import train_only
from specialist.run_folder import RunFolder

VAL_ROWS = 5
PREFERRED = {"evaluation": 1}  # which evaluation (0-based) the scorer below likes; a test may change it
_calls = {"n": 0}


def prefer_one_evaluation(output: str, expected: str) -> float:
    """A custom scorer that likes the answers of one evaluation only (it is called once per validation row)."""
    evaluation = _calls["n"] // VAL_ROWS
    _calls["n"] += 1
    return 1.0 if evaluation == PREFERRED["evaluation"] else 0.0


@pytest.fixture
def fixed_val_config(tiny_config, tmp_path):
    """tiny_config with exactly VAL_ROWS validation rows (data.val_path), 8 steps, an evaluation every 2."""
    _calls["n"] = 0
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    (tmp_path / "val.jsonl").write_text("\n".join(lines[:VAL_ROWS]) + "\n")
    (tmp_path / "train.jsonl").write_text("\n".join(lines[VAL_ROWS:]) + "\n")
    tiny_config["data"].update({"path": str(tmp_path / "train.jsonl"), "val_path": str(tmp_path / "val.jsonl")})
    tiny_config["training"].update({"max_steps": 8, "eval_steps": 2, "learning_rate": 0.02,
                                    "select_by": "test_select_by:prefer_one_evaluation"})
    return tiny_config


def logged(run: RunFolder, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in run.metrics_log.read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_select_by_keeps_the_checkpoint_with_the_best_score_not_the_lowest_loss(fixed_val_config):
    from safetensors.torch import load_file

    run = RunFolder(train_only(validate_config(fixed_val_config), "tiny").run_dir)
    scores = logged(run, "eval_test_select_by:prefer_one_evaluation")
    assert scores == [(2, 0.0), (4, 1.0), (6, 0.0), (8, 0.0)]
    losses = dict(logged(run, "eval_loss"))
    assert min(losses, key=losses.get) != 4  # the loss alone would have kept another checkpoint
    best = json.loads(run.metrics.read_text())["train"]["best_checkpoint"]
    assert best.endswith("checkpoint-4")
    saved = load_file(run.adapter / "adapter_model.safetensors")
    at_best = load_file(f"{best}/adapter_model.safetensors")
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)  # the adapter kept is the best one's


def test_early_stopping_waits_on_the_select_by_score(fixed_val_config):
    PREFERRED["evaluation"] = 0
    try:
        fixed_val_config["training"]["early_stopping_patience"] = 1
        run = RunFolder(train_only(validate_config(fixed_val_config), "tiny").run_dir)
    finally:
        PREFERRED["evaluation"] = 1
    assert json.loads(run.metrics.read_text())["train"]["steps"] == 4  # best at 2, no better at 4: stop
    assert [step for step, _ in logged(run, "eval_test_select_by:prefer_one_evaluation")] == [2, 4]


def test_a_built_in_scorer_selects_among_generated_validation_answers(tiny_config):
    tiny_config["training"].update({"max_steps": 4, "eval_steps": 2, "select_by": "exact_match"})
    run = RunFolder(train_only(validate_config(tiny_config), "tiny").run_dir)
    scores = logged(run, "eval_exact_match")
    assert [step for step, _ in scores] == [2, 4] and all(0.0 <= value <= 1.0 for _, value in scores)
    first_best = max(scores, key=lambda item: item[1])[0]  # a tie keeps the earlier checkpoint
    assert json.loads(run.metrics.read_text())["train"]["best_checkpoint"].endswith(f"checkpoint-{first_best}")


def test_the_loss_plot_draws_the_score_on_a_second_axis(tmp_path):
    from specialist.evaluate.report import plot_loss_curve, selection_points

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.6},
               {"step": 2, "eval_macro_f1": 0.4, "select_by": "macro_f1"}, {"step": 4, "loss": 1.0},
               {"step": 4, "eval_loss": 1.2}, {"step": 4, "eval_macro_f1": 0.7, "select_by": "macro_f1"}]
    assert selection_points(history) == ("macro_f1", [(2, 0.4), (4, 0.7)])
    assert selection_points([e for e in history if "select_by" not in e]) is None
    with_score = plot_loss_curve(history, tmp_path / "with.png").read_bytes()
    without = plot_loss_curve([e for e in history if "select_by" not in e], tmp_path / "without.png").read_bytes()
    assert with_score != without and len(with_score) > 1000


def test_selection_scores_are_means_or_macro_f1():
    from specialist.config import EvaluationConfig
    from specialist.train.select_by import selection_score

    evaluation = EvaluationConfig(label_json_key="t")
    outputs = ['{"t": "a"}', '{"t": "a"}', '{"t": "b"}', "garbage"]
    expected = ['{"t": "a"}', '{"t": "b"}', '{"t": "b"}', '{"t": "b"}']
    assert selection_score("exact_match", evaluation)(outputs, expected, [""] * 4) == pytest.approx(0.5)
    # a: precision 1/2, recall 1 -> F1 2/3; b: precision 1, recall 1/3 -> F1 1/2
    assert selection_score("macro_f1", evaluation)(outputs, expected, [""] * 4) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_select_by_is_refused_where_it_cannot_work(tiny_config, tmp_path):
    bad = {**tiny_config, "training": {**tiny_config["training"], "select_by": "exact_matsch"}}
    with pytest.raises(ConfigError, match="unknown scorer 'exact_matsch'"):
        validate_config(bad)
    for kind in ("dpo", "continued_pretraining"):
        refused = {**tiny_config, "method": {"kind": kind}, "training": {**tiny_config["training"],
                                                                          "select_by": "exact_match"}}
        with pytest.raises(ConfigError, match="select_by applies to method.kind"):
            validate_config(refused)
    no_val = {**tiny_config, "data": {**tiny_config["data"], "val_fraction": 0.0},
              "training": {**tiny_config["training"], "select_by": "exact_match"}}
    with pytest.raises(ConfigError, match="validation rows"):
        train_only(validate_config(no_val), "tiny")
    off_grid = {**tiny_config, "training": {**tiny_config["training"], "max_steps": 4, "eval_steps": 2,
                                            "save_steps": 3, "select_by": "exact_match"}}
    with pytest.raises(ConfigError, match="checkpoints at evaluation steps"):
        train_only(validate_config(off_grid), "tiny")


def test_a_classifier_selects_by_macro_f1_of_its_predicted_labels(tiny_config, tmp_path):
    data = tmp_path / "labelled.jsonl"
    words = {"high": "block", "low": "user"}
    data.write_text("".join(json.dumps({"text": f"{words[label]} {i}", "label": label}) + "\n"
                            for i, label in enumerate(["high", "low"] * 20)))
    tiny_config["data"].update({"path": str(data), "split_by": "stratified", "val_fraction": 0.2})
    tiny_config["method"]["kind"] = "classifier"
    tiny_config["training"].update({"max_steps": 6, "eval_steps": 2, "select_by": "macro_f1"})
    run = RunFolder(train_only(validate_config(tiny_config), "tiny").run_dir)
    scores = logged(run, "eval_macro_f1")
    assert [step for step, _ in scores] == [2, 4, 6] and all(0.0 <= value <= 1.0 for _, value in scores)
    first_best = max(scores, key=lambda item: item[1])[0]
    assert json.loads(run.metrics.read_text())["train"]["best_checkpoint"].endswith(f"checkpoint-{first_best}")


def test_an_unimportable_select_by_scorer_fails_before_any_training(tiny_config):
    from specialist.evaluate.runner import check_evaluation_inputs

    tiny_config["training"]["select_by"] = "no_such_module_here:score"
    with pytest.raises(ConfigError, match="cannot be imported"):
        check_evaluation_inputs(validate_config(tiny_config))
