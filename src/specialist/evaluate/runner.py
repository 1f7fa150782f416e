"""`specialist eval RUN_DIR`: every arm on the same held-out rows with the same decoding, scored with intervals.

Arms: `base` (zero-shot), `few_shot` (the base with k train examples in the prompt), `tuned` (the run's adapter
or model), and any other run, adapter or export folder given by name. They all answer through the generation
engine `serve` uses. Results go to eval.json, predictions.jsonl, report.md and report.html in the run folder;
gates decide the exit code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specialist.artifacts import Loaded, ModelPool, constraint_of, load_exported, load_run
from specialist.config import RunConfig
from specialist.console import console
from specialist.data import Example
from specialist.errors import ConfigError
from specialist.evaluate.gates import check_gates
from specialist.evaluate.results import ArmResult, EvalReport, Overfitting
from specialist.evaluate.scorers import (
    LabelRule,
    label_report,
    length_report,
    per_key_accuracy,
    refusal_report,
    resolve_scorers,
    score_rows,
)
from specialist.evaluate.stats import paired_comparison, score_interval
from specialist.generation import GREEDY, Engine, Sampling, default_max_new_tokens
from specialist.run_folder import ExportFolder, RunFolder


@dataclass
class Arm:
    name: str
    engine: Engine
    shots: list[tuple[str, str]] = field(default_factory=list)
    weights_bytes: int | None = None  # known for export folders: what serving it costs on disk


@dataclass
class Arms:
    """The arms to score, and the tuned model's engine (None when the run has not trained one yet)."""

    arms: list[Arm]
    base: Engine
    tuned: Engine | None


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    return RunFolder.open(Path(run_dir)).config(overrides)


def sampling_of(evaluation) -> Sampling:
    if not evaluation.do_sample:
        return GREEDY
    return Sampling(True, evaluation.temperature, evaluation.top_p)


def evaluate_run(run_dir: Path, config: RunConfig | None = None, others: dict[str, Path] | None = None):
    """Score every arm on the run's test split; write eval.json, report.md and report.html; check the gates."""
    run = RunFolder.open(Path(run_dir))
    config = config or run.config()
    if config.method.kind == "continued_pretraining":  # plain text: no prompts to answer, see evaluate.domain
        from specialist.evaluate.domain import evaluate_domain

        return evaluate_domain(run, config, others)
    evaluation = config.evaluation
    split = run.split()
    test = split.test[: evaluation.max_examples] if evaluation.max_examples else split.test
    pool = ModelPool(config.model.dtype)
    arms = build_arms(run, config, pool, split.train, others or {})
    max_new_tokens = evaluation.max_new_tokens or default_max_new_tokens(arms.base.tokenizer, split.train)
    rule = label_rule(evaluation)
    scorers = resolve_scorers(evaluation.scorers, rule, evaluation.json_schema)
    outputs, seconds = generate_arms(arms.arms, test, max_new_tokens, config)
    expected, prompts = [ex.completion for ex in test], [ex.prompt for ex in test]
    rows = {name: score_rows(out, expected, scorers, prompts) for name, out in outputs.items()}
    report = EvalReport(
        run_dir=run.path, n_eval=len(test), max_new_tokens=max_new_tokens,
        decoding=sampling_of(evaluation).generate_kwargs(),
        arms={arm.name: arm_result(arm, rows[arm.name], outputs[arm.name], expected, evaluation, rule,
                                   seconds[arm.name]) for arm in arms.arms},
        comparisons=compare_arms(rows, evaluation.bootstrap_samples))
    if arms.tuned is not None and evaluation.forgetting:
        report.forgetting = forgetting(arms, evaluation)
    if arms.tuned is not None:
        report.overfitting = overfitting(arms.tuned, split, rows["tuned"], outputs["tuned"], scorers,
                                         max_new_tokens, config)
    report.gates = check_gates(evaluation.gates, figures_of(report), evaluation)
    write_eval_outputs(run, config, report, test, outputs)
    return report


def check_evaluation_inputs(config: RunConfig) -> None:
    """Fail early, before any training, on an unreadable schema, question set or scorer."""
    evaluation = config.evaluation
    if evaluation.questions is not None:
        from specialist.evaluate.domain import read_questions

        read_questions(evaluation.questions)
    if config.method.kind != "continued_pretraining":
        resolve_scorers(evaluation.scorers, label_rule(evaluation), evaluation.json_schema)


def label_rule(evaluation) -> LabelRule:
    """How this evaluation reads a label from a text (label_accuracy)."""
    return LabelRule(json_key=evaluation.label_json_key, pattern=evaluation.label_pattern)


def build_arms(run: RunFolder, config: RunConfig, pool: ModelPool, train: list[Example],
               others: dict[str, Path]) -> Arms:
    """base and few_shot (the base weights: every adapter off), tuned, and any other arm; one base copy."""
    template = run.template()
    tuned = load_run(run, pool, adapter_name="tuned") if run.is_trained else None
    start = config.method.from_adapter if config.method.kind == "dpo" else None
    base_model, tokenizer = pool.base(config.model.name, start)
    base = Engine(base_model, tokenizer, template, context=pool.base_context(config.model.name, start))
    arms: list[Arm] = []
    if not config.evaluation.skip_base:
        arms.append(Arm("base", base))
        if config.evaluation.few_shot_k:
            shots = [(ex.prompt, ex.completion) for ex in train[: config.evaluation.few_shot_k]]
            arms.append(Arm("few_shot", base, shots))
    tuned_engine = _engine(tuned, template) if tuned is not None else None
    if tuned_engine is not None:
        arms.append(Arm("tuned", tuned_engine))
        if config.evaluation.constrained:
            arms.append(Arm("tuned+constrained", _engine(tuned, template, constraint_of(config))))
    for name, folder in others.items():
        arms.append(other_arm(name, Path(folder), config, pool, template))
    return Arms(arms, base, tuned_engine)


def _engine(found: Loaded, template=None, constraint=None) -> Engine:
    return Engine(found.model, found.tokenizer, found.template or template, context=found.context,
                  constraint=constraint)


def other_arm(name: str, folder: Path, config: RunConfig, pool: ModelPool, template) -> Arm:
    """Another run folder, adapter folder or export folder as an arm of its own (adapters share the base copy)."""
    if ExportFolder.is_export(folder):  # merged, int8, gguf or adapter export: loaded as it would be served
        found = load_exported(folder, pool)
        return Arm(name, _engine(found), weights_bytes=found.weights_bytes)
    if RunFolder.is_run(folder):
        return Arm(name, _engine(load_run(RunFolder(folder), pool, adapter_name=name), template))
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"arm {name!r}: {folder} is not a run, export or adapter folder",
                          hint="give a run folder, a folder written by `specialist export`, or an adapter folder")
    start = config.method.from_adapter if config.method.kind == "dpo" else None
    model, context = pool.with_adapter(config.model.name, start, folder, name)
    return Arm(name, Engine(model, pool.tokenizer(config.model.name), template, context=context))


def generate_arms(arms: list[Arm], test: list[Example], max_new_tokens: int,
                  config: RunConfig) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Every arm's answers on the test rows, and how long each arm took."""
    outputs: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for arm in arms:
        started = time.perf_counter()
        outputs[arm.name] = generate(arm.engine, test, max_new_tokens, config, arm.shots, f"evaluating {arm.name}")
        seconds[arm.name] = time.perf_counter() - started
    return outputs, seconds


def generate(engine: Engine, examples: list[Example], max_new_tokens: int, config: RunConfig,
             shots: Sequence[tuple[str, str]] = (), label: str = "generating") -> list[str]:
    answers = engine.generate([ex.prompt for ex in examples], max_new_tokens, sampling_of(config.evaluation),
                              config.evaluation.batch_size, shots, label)
    return [answer.text for answer in answers]


def arm_result(arm: Arm, rows: dict[str, list[float]], outputs: list[str], expected: list[str], evaluation,
               rule: LabelRule, seconds: float) -> ArmResult:
    result = ArmResult(arm.name, {name: score_interval(values, evaluation.bootstrap_samples)
                                  for name, values in rows.items()},
                       length_report(outputs), generation_seconds=seconds, weights_bytes=arm.weights_bytes)
    if "field_accuracy" in rows:
        result.field_accuracy_per_key = per_key_accuracy(outputs, expected)
    if "label_accuracy" in rows:
        result.labels = label_report(outputs, expected, rule, evaluation.escalation_label)
    if "refusal_rate" in rows:
        result.refusals = refusal_report(outputs, expected)
    return result


def compare_arms(rows: dict[str, dict[str, list[float]]], samples: int) -> dict[str, Any]:
    """Paired comparisons of `tuned` against each other arm, per scorer, on the same rows."""
    if "tuned" not in rows:
        return {}
    return {f"tuned_vs_{other}": {metric: paired_comparison(rows[other][metric], rows["tuned"][metric], samples)
                                  for metric in rows["tuned"] if metric != "length"}
            for other in rows if other != "tuned"}


def forgetting(arms: Arms, evaluation):
    """Perplexity and knowledge probe with the base weights, then with the tuned ones."""
    from specialist.evaluate.forgetting import measure_forgetting

    return measure_forgetting(arms.base, arms.tuned, evaluation)


def overfitting(tuned: Engine, split, test_rows: dict[str, list[float]], test_outputs: list[str], scorers,
                max_new_tokens: int, config: RunConfig) -> Overfitting:
    """Tuned scores on train rows beside test rows, and how often it recites a training answer that is wrong."""
    sample = split.train[: config.evaluation.train_sample]
    train_answers = {ex.completion.strip() for ex in split.train}
    recited = [out.strip() in train_answers and out.strip() != ex.completion.strip()
               for out, ex in zip(test_outputs, split.test)]
    result = Overfitting(train_rows=len(sample), memorisation_rate=_mean([float(r) for r in recited]))
    if sample:
        outputs = generate(tuned, sample, max_new_tokens, config, label="evaluating tuned on train rows")
        train_rows = score_rows(outputs, [ex.completion for ex in sample], scorers, [ex.prompt for ex in sample])
        result.train_scores = {m: _mean(v) for m, v in train_rows.items()}
        result.test_scores = {m: _mean(v) for m, v in test_rows.items()}
    return result


def figures_of(report: EvalReport):
    """Every figure a gate may name: `arm.metric` (with `arm.macro_f1`, `arm.refused_when_should[_not]`),
    `forgetting.*`, `overfitting.gap.metric`, `overfitting.memorisation_rate`; with intervals where known, and the
    paired differences of tuned against each arm."""
    from specialist.evaluate.gates import Figure, Figures

    values: dict[str, Figure] = {}
    for name, arm in report.arms.items():
        for metric, value in arm.headline().items():
            interval = arm.scores.get(metric)
            values[f"{name}.{metric}"] = Figure.of(interval) if interval is not None else Figure(value)
    if report.forgetting is not None:
        values.update(report.forgetting.figures())
    if report.overfitting is not None:
        values.update({f"overfitting.gap.{m}": Figure(v) for m, v in report.overfitting.gap.items()})
        values["overfitting.memorisation_rate"] = Figure(report.overfitting.memorisation_rate)
    differences = {(a, b, metric): comparison.difference
                   for key, per_metric in report.comparisons.items() for metric, comparison in per_metric.items()
                   for a, b in [key.split("_vs_", 1)]}
    return Figures(values, differences)


def write_eval_outputs(run: RunFolder, config: RunConfig, report: EvalReport, test: list[Example],
                       outputs: dict[str, list[str]]) -> None:
    from specialist.evaluate.report import write_eval_report

    run.eval_json.write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    with run.predictions.open("w", encoding="utf-8") as handle:
        for i, ex in enumerate(test):
            row = {"input": ex.prompt, "expected": ex.completion, **{arm: out[i] for arm, out in outputs.items()}}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_eval_report(run, config, report, test, outputs)
    console.log(f"evaluation written to {run.eval_json}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
