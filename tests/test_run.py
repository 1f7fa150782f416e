"""End to end on the tiny model: `run` writes a complete run folder whose adapter loads back and changes outputs."""

import json

import torch
from markupsafe import escape

from specialist.config import validate_config
from specialist.pipeline import overfitting_warning, run


def test_two_step_run_writes_a_complete_run_folder(tiny_config):
    summary = run(validate_config(tiny_config), config_name="tiny")
    run_dir = summary.run_dir
    expected = {"config.yaml", "manifest.json", "data", "template.json", "adapter", "checkpoints", "metrics.jsonl",
                "predictions.jsonl", "metrics.json", "eval.json", "loss.png", "figures", "report.html", "report.md"}
    assert expected <= {p.name for p in run_dir.iterdir()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"base", "few_shot", "nearest", "retrieval", "tuned"}
    assert set(metrics["best_baseline"]) == {"json_valid", "exact_match", "field_accuracy"}
    for arm in ("base", "few_shot", "nearest", "retrieval", "tuned"):
        assert set(metrics["scores"][arm]) >= {"json_valid", "exact_match", "field_accuracy"}
    assert metrics["train"]["steps"] == 2
    assert metrics["train"]["first_loss"] is not None and metrics["train"]["train_tokens"] > 0
    assert metrics["split"]["test"]["rows"] == 4 and len(metrics["split"]["test"]["sha256"]) == 64
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and {"input", "expected", "base", "few_shot", "tuned"} <= set(predictions[0])
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "json_valid" in html and str(escape(predictions[0]["expected"])) in html


def test_saved_adapter_loads_back_and_changes_the_output(tiny_config, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = run(validate_config(tiny_config), config_name="tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    inputs = tokenizer(["081109 203615 148 INFO dfs.DataNode"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, summary.run_dir / "adapter").eval()
        tuned_logits = tuned(**inputs).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)


def test_same_seed_gives_the_same_split_and_losses(tiny_config):
    first = run(validate_config(tiny_config), config_name="tiny")
    tiny_config["output"]["run_name"] = "tiny-again"
    second = run(validate_config(tiny_config), config_name="tiny")
    assert first.metrics["split"] == {**second.metrics["split"]}
    assert first.metrics["train"]["final_loss"] == second.metrics["train"]["final_loss"]


def test_overfitting_warning_needs_rising_validation_and_falling_training_loss():
    rising = [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 1.0}, {"step": 2, "loss": 1.0},
              {"step": 2, "eval_loss": 1.5}]
    assert "possible overfitting" in overfitting_warning(rising)
    healthy = [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 1.5}, {"step": 2, "loss": 1.0},
               {"step": 2, "eval_loss": 1.0}]
    assert overfitting_warning(healthy) is None
