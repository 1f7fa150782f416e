"""evaluation.label_scoring: likelihood: each label's completion scored after the prompt (summed token
log-probabilities, all labels of a prompt in one forward), and the calibration of the probabilities it gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specialist.config import validate_config
from specialist.data import PromptTemplate
from specialist.errors import ConfigError
from specialist.evaluate.likelihood import (
    calibration_bins,
    calibration_report,
    expected_calibration_error,
    label_logprobs,
    softmax,
    threshold_table,
)
from specialist.generation import Engine

LABELS = ['{"level": "INFO"}', "null", "true false", "é✓"]


def by_hand(model, tokenizer, template, prompts, completions, shots=()) -> np.ndarray:
    """The reference: one plain forward per (prompt, label), the completion's token log-probabilities summed."""
    found = np.zeros((len(prompts), len(completions)))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            prompt_ids = template.encode_prompt(prompt, tokenizer, shots)
            for j, completion in enumerate(completions):
                ending = tokenizer(template.render_completion(completion), add_special_tokens=False)["input_ids"]
                ids = prompt_ids + ending
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
                found[i, j] = sum(logprobs[k - 1, ids[k]].item() for k in range(len(prompt_ids), len(ids)))
    return found


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_likelihood_scoring_equals_argmax_of_summed_label_logprobs_computed_by_hand(tiny_model, batch_size):
    model, tokenizer = tiny_model
    model.eval()
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse the log line into JSON.")
    prompts = ["Invalid user webmaster from 173.234.31.186", "INFO dfs.DataNode block blk_38865 terminating now", "",
               "[notice] workerEnv.init() ok"]
    shots = [("Dec 10 sshd: Invalid user admin", "null")]
    for given_shots in ((), shots):
        got = label_logprobs(Engine(model, tokenizer, template), prompts, LABELS, batch_size, given_shots)
        want = by_hand(model, tokenizer, template, prompts, LABELS, given_shots)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
        assert (got < 0).all()  # log-probabilities of whole completions


def test_chat_templates_are_scored_like_the_builtin_format(tiny_model):
    model, tokenizer = tiny_model
    tokenizer.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    template = PromptTemplate.for_tokenizer(tokenizer, "Label it.")
    assert template.kind == "chat"
    prompts = ["block blk_1 terminating", "Invalid user"]
    np.testing.assert_allclose(label_logprobs(Engine(model.eval(), tokenizer, template), prompts, LABELS, 8),
                               by_hand(model, tokenizer, template, prompts, LABELS), atol=1e-4)


def test_no_prompts_give_an_empty_table_and_no_labels_are_refused(tiny_model):
    model, tokenizer = tiny_model
    template = PromptTemplate.for_tokenizer(tokenizer)
    assert label_logprobs(Engine(model, tokenizer, template), [], LABELS).shape == (0, len(LABELS))
    with pytest.raises(ValueError, match="at least one completion"):
        label_logprobs(Engine(model, tokenizer, template), ["x"], [])


def test_softmax_turns_summed_logprobs_into_the_distribution_over_the_labels():
    scores = np.array([[np.log(0.2), np.log(0.6)], [-1000.0, -1001.0]])
    probabilities = softmax(scores)
    np.testing.assert_allclose(probabilities[0], [0.25, 0.75])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert np.isfinite(probabilities).all()  # very negative sums do not underflow to 0/0


# -- calibration -------------------------------------------------------------------------------------------------
def test_ece_is_the_row_weighted_gap_between_accuracy_and_confidence_per_bin():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.55, 0.45]])
    expected = [0, 1, 1, 0]  # the two confident rows: one right; the two unsure ones: both right
    # bin (14/15, 1]: accuracy 0.5, confidence 0.95; bin (8/15, 9/15]: accuracy 1, confidence 0.55
    assert expected_calibration_error(probabilities, expected) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    bins = calibration_bins(probabilities, expected)
    assert len(bins) == 15 and sum(b["rows"] for b in bins) == 4
    assert [b["rows"] for b in bins if b["rows"]] == [2, 2]


def test_a_calibrated_arm_has_no_error_and_an_unknown_expected_label_is_always_wrong():
    probabilities = np.array([[0.7, 0.3]] * 10)
    expected = [0] * 7 + [1] * 3
    assert expected_calibration_error(probabilities, expected) == pytest.approx(0.0, abs=1e-12)
    certain = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(certain, [-1, 1]) == pytest.approx(0.5)  # confidence 1.0 sits in the top bin
    assert expected_calibration_error(np.zeros((0, 2)), []) == 0.0


def test_threshold_table_counts_escalations_at_each_threshold():
    probabilities = np.array([[0.9, 0.1], [0.35, 0.65], [0.2, 0.8], [0.6, 0.4]])  # column 1 is "escalate"
    table = threshold_table(probabilities, [1, 1, 0, 0], escalation=1, thresholds=[0.5, 0.7])
    assert table[0] == {"threshold": 0.5, "recall": 0.5, "false_escalation_rate": 0.5, "escalated": 0.5}
    assert table[1] == {"threshold": 0.7, "recall": 0.0, "false_escalation_rate": 0.5, "escalated": 0.25}
    nobody = threshold_table(probabilities, [0, 0, 0, 0], escalation=1, thresholds=[0.5])
    assert nobody[0]["recall"] is None  # no row should escalate: no recall to speak of


def test_calibration_report_finds_the_escalation_label_ignoring_case():
    probabilities = np.array([[0.2, 0.8], [0.9, 0.1]])
    report = calibration_report(probabilities, [1, 0], ["billing", "Escalate"], "escalate")
    assert report["escalation"]["label"] == "Escalate" and len(report["escalation"]["thresholds"]) == 9
    assert report["accuracy"] == 1.0 and report["mean_confidence"] == pytest.approx(0.85)
    assert "escalation" not in calibration_report(probabilities, [1, 0], ["billing", "other"], "escalate")


# -- in an evaluation --------------------------------------------------------------------------------------------
@pytest.fixture
def labelled_config(tmp_path, tiny_model_dir):
    data = tmp_path / "labelled.jsonl"
    words = {"INFO": "block terminating", "WARN": "Invalid user", "ESCALATE": "workerEnv.init() failed"}
    data.write_text("".join(json.dumps({"text": f"{words[label]} {i}", "label": label}) + "\n"
                            for i, label in enumerate(["INFO", "WARN", "ESCALATE"] * 12)))
    return {
        "data": {"path": str(data), "dedupe": {"near": False}, "split_by": "stratified", "test_fraction": 0.25,
                 "label_template": '{"level": "{label}"}', "instruction": "Label the log line."},
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "method": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 96, "learning_rate": 0.01, "report_to": []},
        "evaluation": {"scorers": ["label_accuracy"], "label_json_key": "level", "label_scoring": "likelihood",
                       "escalation_label": "escalate", "few_shot_k": 2, "forgetting": False, "batch_size": 8,
                       "max_new_tokens": 8},
        "output": {"dir": str(tmp_path / "runs"), "run_name": "likely"},
    }


def test_every_generative_arm_answers_its_most_probable_label_with_calibration(labelled_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialist.pipeline import run
    from specialist.run_folder import RunFolder

    summary = run(validate_config(labelled_config), "likely")
    folder = RunFolder(summary.run_dir)
    split, template = folder.split(), folder.template()
    labels = ["ESCALATE", "INFO", "WARN"]  # the training rows' labels, sorted
    rendered = [f'{{"level": "{label}"}}' for label in labels]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [ex.prompt for ex in split.test]
    shots = [(ex.prompt, ex.completion) for ex in split.train[:2]]
    predictions = [json.loads(line) for line in folder.predictions.read_text().splitlines()]
    for arm, arm_shots in (("base", ()), ("few_shot", shots)):
        want = softmax(by_hand(base, tokenizer, template, prompts, rendered, arm_shots))
        got = np.array([[row["probabilities"][arm][label] for label in labels] for row in predictions])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert [row[arm] for row in predictions] == [rendered[i] for i in want.argmax(axis=1)]
    report = json.loads(folder.eval_json.read_text())
    assert report["decoding"]["label_scoring"] == "likelihood"
    for arm in ("base", "few_shot", "tuned"):
        calibration = report["arms"][arm]["calibration"]
        assert calibration["rows"] == len(prompts) and 0 <= calibration["ece"] <= 1
        assert calibration["escalation"]["label"] == "ESCALATE"
    markdown = folder.report_md.read_text()
    assert "ECE over 15 confidence bins" in markdown and "| 0.5 |" in markdown


def test_likelihood_scoring_without_labels_says_how_to_give_them(tiny_run_dir):
    from specialist.evaluate.runner import evaluate_run
    from specialist.run_folder import RunFolder

    config = RunFolder(tiny_run_dir).config(["evaluation.label_scoring=likelihood"])
    with pytest.raises(ConfigError, match="label set") as caught:
        evaluate_run(tiny_run_dir, config)
    assert "data.labels" in caught.value.hint


def test_label_scoring_accepts_only_its_two_modes(tiny_config):
    tiny_config["evaluation"]["label_scoring"] = "mean_per_token"
    with pytest.raises(ConfigError, match="label_scoring"):
        validate_config(tiny_config)


def test_a_shared_prefix_is_computed_once_and_scores_as_without_it(tiny_model, monkeypatch):
    """Few-shot prompts share their instruction and examples: that prefix goes through the model once per pass,
    each prompt once for all its labels, and every score equals the plain computation."""
    import specialist.generation as generation

    model, tokenizer = tiny_model
    model.eval()
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse the log line into JSON with its level and component.")
    prompts = ["Invalid user webmaster from 173.234.31.186", "INFO dfs.DataNode block blk_38865 terminating now"]
    shots = [("Dec 10 sshd: Invalid user admin", "null"), ("081109 INFO dfs.FSNamesystem: allocateBlock", "true false")]
    lengths = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        shared = label_logprobs(Engine(model, tokenizer, template), prompts, LABELS, 64, shots)
    finally:
        hook.remove()
    prompt_length = len(template.encode_prompt(prompts[1], tokenizer, shots))
    longest_label = max(len(tokenizer(template.render_completion(c), add_special_tokens=False)["input_ids"])
                        for c in LABELS)
    # the shared prefix, then each prompt's own tokens (once), then every label's tokens on the prompts' cache
    assert len(lengths) == 3 and lengths[1] < prompt_length - 16 and lengths[2] == longest_label
    monkeypatch.setattr(generation, "PREFIX_CACHE_MIN_TOKENS", 10**9)
    plain = label_logprobs(Engine(model, tokenizer, template), prompts, LABELS, 64, shots)
    np.testing.assert_allclose(shared, plain, atol=1e-4)
    np.testing.assert_allclose(shared, by_hand(model, tokenizer, template, prompts, LABELS, shots), atol=1e-4)


def test_batch_calibration_divides_out_each_labels_mean_and_keeps_rows_normalised():
    from specialist.evaluate.likelihood import batch_calibrate

    # a model that learnt the prior: the first label wins every row although the evidence ranks the rows apart
    raw = np.array([[0.7, 0.2, 0.1], [0.6, 0.1, 0.3], [0.8, 0.15, 0.05], [0.5, 0.1, 0.4]])
    calibrated = batch_calibrate(raw)
    by_hand = raw / raw.mean(axis=0)
    np.testing.assert_allclose(calibrated, by_hand / by_hand.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)
    assert list(raw.argmax(axis=1)) == [0, 0, 0, 0] and list(calibrated.argmax(axis=1)) == [1, 2, 0, 2]
    np.testing.assert_allclose(batch_calibrate(raw[:2]), raw[:2])  # fewer rows than labels: no bias to estimate
    np.testing.assert_allclose(batch_calibrate(np.array([[1.0, 0.0, 0.0]] * 3)).sum(axis=1), 1.0)  # zero means


def test_an_evaluation_with_batch_calibration_answers_by_the_calibrated_probabilities(labelled_config,
                                                                                     tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialist.evaluate.likelihood import batch_calibrate
    from specialist.pipeline import run
    from specialist.run_folder import RunFolder

    labelled_config["evaluation"]["label_calibration"] = "batch"
    labelled_config["output"]["run_name"] = "calibrated"
    folder = RunFolder(run(validate_config(labelled_config), "calibrated").run_dir)
    labels = ["ESCALATE", "INFO", "WARN"]
    rendered = [f'{{"level": "{label}"}}' for label in labels]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [ex.prompt for ex in folder.split().test]
    want = batch_calibrate(softmax(by_hand(base, tokenizer, folder.template(), prompts, rendered, ())))
    predictions = [json.loads(line) for line in folder.predictions.read_text().splitlines()]
    got = np.array([[row["probabilities"]["base"][label] for label in labels] for row in predictions])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [row["base"] for row in predictions] == [rendered[i] for i in want.argmax(axis=1)]
    assert json.loads(folder.eval_json.read_text())["decoding"]["label_calibration"] == "batch"


def test_batch_calibration_without_probabilities_to_calibrate_is_refused(tiny_run_dir):
    from specialist.evaluate.runner import label_scoring
    from specialist.run_folder import RunFolder

    folder = RunFolder(tiny_run_dir)
    config = folder.config(["evaluation.label_calibration=batch"])  # generated answers: nothing to calibrate
    with pytest.raises(ConfigError, match="label_calibration") as error:
        label_scoring(folder, config, folder.split().train)
    assert "label_scoring: likelihood" in error.value.hint
    with pytest.raises(ConfigError, match="label_calibration"):
        folder.config(["evaluation.label_calibration=platt"])
