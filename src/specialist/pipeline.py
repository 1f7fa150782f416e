"""`specialist run`: data -> base evaluation -> LoRA fine-tune -> tuned evaluation -> run folder and report.

The run folder holds everything needed to audit or reuse the run:

    config.yaml        the resolved config (after flags)
    data/              train/val/test.jsonl as used, with their hashes in metrics.json
    template.json      the prompt format used by training and evaluation (and later serving)
    adapter/           the PEFT LoRA adapter
    predictions.jsonl  every held-out example with each arm's output
    metrics.json       scores per arm, training figures, split hashes
    loss.png           training and validation loss
    report.html        the before/after report
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from specialist.config import RunConfig
from specialist.console import console
from specialist.data import Example, PromptTemplate, load_examples, split_examples, write_split
from specialist.evaluate import generate_outputs, score_outputs
from specialist.evaluate.report import plot_loss_curve, png_data_uri, write_report
from specialist.evaluate.scorers import score_exact_match

HEADLINE_METRICS = ("json_valid", "exact_match", "field_accuracy")


@dataclass
class RunSummary:
    run_dir: Path
    metrics: dict[str, Any]

    @property
    def report(self) -> Path:
        return self.run_dir / "report.html"


def run(config: RunConfig, config_name: str = "run") -> RunSummary:
    """Execute the whole slice for `config`; returns the run folder and its metrics."""
    from specialist.models import load_model_and_tokenizer
    from specialist.train import train_lora

    started = time.perf_counter()
    run_dir = create_run_dir(config, config_name)
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")

    examples = load_examples(
        config.data.path, config.data.prompt_column, config.data.completion_column, config.data.format
    )
    split = split_examples(
        examples, config.data.val_fraction, config.data.test_fraction, config.training.seed, config.data.max_examples
    )
    split_summary = write_split(split, run_dir / "data")
    console.log(f"data: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test rows")

    model, tokenizer = load_model_and_tokenizer(config.model.name, config.model.dtype)
    template = PromptTemplate.for_tokenizer(tokenizer, config.data.instruction)
    template.save(run_dir / "template.json")

    test = split.test[: config.evaluation.max_examples] if config.evaluation.max_examples else split.test
    max_new_tokens = config.evaluation.max_new_tokens or default_max_new_tokens(tokenizer, split.train)
    outputs: dict[str, list[str]] = {}
    if not config.evaluation.skip_base:
        outputs["base"] = evaluate_arm(model, tokenizer, template, test, max_new_tokens, config, "base")

    result = train_lora(
        model, tokenizer, template, split.train, split.val, config.method, config.training, run_dir
    )
    outputs["tuned"] = evaluate_arm(result.model, tokenizer, template, test, max_new_tokens, config, "tuned")

    scores = {arm: score_outputs(out, [ex.completion for ex in test], config.evaluation.scorers)
              for arm, out in outputs.items()}
    write_predictions(run_dir / "predictions.jsonl", test, outputs)
    metrics = {
        "model": config.model.name,
        "scores": scores,
        "n_eval": len(test),
        "max_new_tokens": max_new_tokens,
        "split": split_summary,
        "train": result.summary(),
        "overfitting_warning": overfitting_warning(result.log_history),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    loss_png = plot_loss_curve(result.log_history, run_dir / "loss.png")
    write_report(run_dir / "report.html", report_context(config, run_dir, metrics, test, outputs, loss_png))
    return RunSummary(run_dir=run_dir, metrics=metrics)


def create_run_dir(config: RunConfig, config_name: str) -> Path:
    name = config.output.run_name or f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    run_dir = config.output.dir / name
    run_dir.mkdir(parents=True, exist_ok=config.output.run_name is not None)
    return run_dir


def default_max_new_tokens(tokenizer, train: list[Example]) -> int:
    """Room for the longest training completion plus a margin: enough to be right, short enough to stay fast."""
    longest = max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in train)
    return longest + max(8, longest // 4)


def evaluate_arm(model, tokenizer, template, test: list[Example], max_new_tokens: int, config: RunConfig, arm: str):
    model.eval()
    return generate_outputs(
        model, tokenizer, template, [ex.prompt for ex in test], max_new_tokens,
        batch_size=config.evaluation.batch_size, label=f"evaluating {arm}",
    )


def write_predictions(path: Path, test: list[Example], outputs: dict[str, list[str]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i, ex in enumerate(test):
            row = {"input": ex.prompt, "expected": ex.completion, **{arm: out[i] for arm, out in outputs.items()}}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def overfitting_warning(log_history: list[dict[str, Any]], tolerance: float = 0.02) -> str | None:
    """A sentence when validation loss ended above its best while training loss kept falling, else None."""
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if len(val) < 2 or len(train) < 2:
        return None
    best_step, best = min(val, key=lambda item: item[1])
    last_step, last = val[-1]
    train_at_best = min(train, key=lambda item: abs(item[0] - best_step))[1]
    if last > best + tolerance and train[-1][1] < train_at_best:
        return (f"possible overfitting: validation loss rose from {best:.3f} (step {best_step}) to {last:.3f} "
                f"(step {last_step}) while training loss kept falling")
    return None


def report_context(config, run_dir, metrics, test, outputs, loss_png) -> dict[str, Any]:
    arms = list(outputs)
    score_rows = []
    for metric in [m for m in config.evaluation.scorers]:
        values = [metrics["scores"][arm][metric] for arm in arms]
        delta, css = "", ""
        if len(values) == 2:
            change = values[1] - values[0]
            delta = f"{100 * change:+.1f} pts"
            css = "better" if change > 0 else "worse" if change < 0 else ""
        score_rows.append({"metric": metric, "values": values, "delta": delta, "css": css})
    for key in metrics["scores"][arms[-1]].get("field_accuracy_per_key", {}):
        values = [metrics["scores"][arm]["field_accuracy_per_key"].get(key, 0.0) for arm in arms]
        delta = f"{100 * (values[1] - values[0]):+.1f} pts" if len(values) == 2 else ""
        score_rows.append({"metric": f"  field: {key}", "values": values, "delta": delta, "css": ""})
    samples = [
        {
            "input": ex.prompt,
            "expected": ex.completion,
            "outputs": [{"text": outputs[arm][i], "match": score_exact_match(outputs[arm][i], ex.completion)}
                        for arm in arms],
        }
        for i, ex in enumerate(test[: config.evaluation.samples_in_report])
    ]
    return {
        "run_name": run_dir.name,
        "model_name": config.model.name,
        "method": f"LoRA r={config.method.r} alpha={config.method.alpha} targets={config.method.target_modules}",
        "data_path": config.data.path,
        "split": metrics["split"],
        "n_eval": metrics["n_eval"],
        "train": metrics["train"],
        "max_new_tokens": metrics["max_new_tokens"],
        "arms": arms,
        "score_rows": score_rows,
        "loss_curve": png_data_uri(loss_png),
        "overfit_warning": metrics["overfitting_warning"],
        "samples": samples,
    }
