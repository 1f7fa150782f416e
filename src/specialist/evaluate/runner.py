"""`specialist eval RUN_DIR`: every arm on the same held-out rows with the same decoding, scored with intervals.

Arms: `base` (zero-shot), `few_shot` (the base with k train examples in the prompt), `tuned` (the run's adapter
or model), and any other run or adapter folder given by name. Results go to eval.json, report.md and
report.html in the run folder; gates decide the exit code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from specialist.config import RunConfig, validate_config
from specialist.console import console
from specialist.data import Example, PromptTemplate, read_split
from specialist.errors import ConfigError
from specialist.evaluate.gates import GateResult, check_gates
from specialist.evaluate.generate import generate_outputs
from specialist.evaluate.scorers import (
    LabelRule,
    label_report,
    length_report,
    per_key_accuracy,
    refusal_report,
    resolve_scorers,
    score_rows,
)
from specialist.evaluate.stats import bootstrap_ci, paired_comparison


@dataclass
class Arm:
    name: str
    model: Any
    context: Callable[[], AbstractContextManager] = nullcontext  # e.g. the adapter switched off for `base`
    shots: list[tuple[str, str]] = field(default_factory=list)
    weights_bytes: int | None = None  # known for export folders: what serving it costs on disk


@dataclass
class EvalResult:
    run_dir: Path
    report: dict[str, Any]
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    from specialist.config import apply_override

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)",
                          hint="pass a folder written by `specialist run` or `specialist train`")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for override in overrides or []:
        apply_override(raw, override)
    return validate_config(raw, source=str(path))


def evaluate_run(run_dir: Path, config: RunConfig | None = None,
                 others: dict[str, Path] | None = None) -> EvalResult:
    """Score every arm on the run's test split; write eval.json, report.md and report.html; check the gates."""
    from specialist.models import load_model_and_tokenizer

    config = config or load_run_config(run_dir)
    if config.method.kind == "continued_pretraining":  # plain text: no prompts to answer, see evaluate.domain
        from specialist.evaluate.domain import evaluate_domain

        return evaluate_domain(run_dir, config)
    evaluation = config.evaluation
    template = PromptTemplate.load(run_dir / "template.json")
    split = read_split(run_dir / "data")
    test = split.test[: evaluation.max_examples] if evaluation.max_examples else split.test
    model, tokenizer = load_model_and_tokenizer(config.model.name, config.model.dtype)
    if config.method.kind == "dpo" and config.method.from_adapter is not None:
        from specialist.train.dpo import merge_sft_adapter

        # The DPO adapter was trained on top of the merged SFT model, which is also this run's starting point.
        model = merge_sft_adapter(model, config.method.from_adapter)
    arms, tuned = build_arms(model, run_dir, config, split.train, others or {})
    max_new_tokens = evaluation.max_new_tokens or default_max_new_tokens(tokenizer, split.train)
    rule = label_rule(evaluation)
    scorers = resolve_scorers(evaluation.scorers, rule, evaluation.json_schema)
    expected = [ex.completion for ex in test]

    outputs: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for arm in arms:
        started = time.perf_counter()
        with arm.context():
            outputs[arm.name] = generate(arm, tokenizer, template, test, max_new_tokens, config)
        seconds[arm.name] = time.perf_counter() - started
    prompts = [ex.prompt for ex in test]
    rows = {name: score_rows(out, expected, scorers, prompts) for name, out in outputs.items()}

    report: dict[str, Any] = {
        "run": str(run_dir),
        "n_eval": len(test),
        "max_new_tokens": max_new_tokens,
        "decoding": evaluation.sampling() or {"do_sample": False},
        "arms": {name: arm_summary(rows[name], outputs[name], expected, evaluation, rule)
                 for name in outputs},
        "comparisons": compare_arms(rows, evaluation.bootstrap_samples),
        # what an arm costs beside what it scores: generation time on these rows, and the weights' size on disk
        "costs": {arm.name: {"generation_seconds": round(seconds[arm.name], 2), "weights_bytes": arm.weights_bytes}
                  for arm in arms},
    }
    if tuned is not None and evaluation.forgetting:
        report["forgetting"] = forgetting(model, tuned, tokenizer, arms, evaluation)
    if tuned is not None:
        report["overfitting"] = overfitting(tuned, tokenizer, template, split, rows["tuned"], outputs["tuned"],
                                            scorers, max_new_tokens, config)
    gates = check_gates(evaluation.gates, flat_figures(report))
    report["gates"] = [{"gate": g.gate, "value": g.value, "passed": g.passed} for g in gates]
    write_eval_outputs(run_dir, config, report, test, outputs)
    return EvalResult(run_dir, report, gates)


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


def build_arms(model, run_dir: Path, config: RunConfig, train: list[Example],
               others: dict[str, Path]) -> tuple[list[Arm], Any]:
    """The arms to score, and the tuned model (None when the run has not trained one yet)."""
    from peft import PeftModel

    k = config.evaluation.few_shot_k
    shots = [(ex.prompt, ex.completion) for ex in train[:k]]
    adapter, full = run_dir / "adapter", run_dir / "model"
    peft_model = None
    if (adapter / "adapter_config.json").is_file():
        peft_model = PeftModel.from_pretrained(model, adapter, adapter_name="tuned")
    base_context = peft_model.disable_adapter if peft_model is not None else nullcontext
    arms = [] if config.evaluation.skip_base else [Arm("base", peft_model or model, base_context)]
    if k and not config.evaluation.skip_base:
        arms.append(Arm("few_shot", peft_model or model, base_context, shots))
    tuned = None
    if peft_model is not None:
        tuned = peft_model
        arms.append(Arm("tuned", peft_model, _adapter_context(peft_model, "tuned")))
    elif (full / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(full, dtype=model.dtype).eval()
        arms.append(Arm("tuned", tuned))
    for name, folder in others.items():
        arms.append(other_arm(name, folder, peft_model, model))
    return arms, tuned


def other_arm(name: str, folder: Path, peft_model, model) -> Arm:
    """Another run folder, adapter folder or export folder as an arm of its own."""
    from peft import PeftModel

    if (folder / "export.json").is_file():  # merged, int8, gguf or adapter export: loaded as it would be served
        from specialist.deploy.export import load_exported, weights_bytes

        return Arm(name, load_exported(folder)[0], weights_bytes=weights_bytes(folder))

    adapter = folder / "adapter" if (folder / "adapter").is_dir() else folder
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"arm {name!r}: no PEFT adapter in {folder}", hint="give a run folder or an adapter folder")
    if peft_model is None:
        peft_model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
    else:
        peft_model.load_adapter(adapter, adapter_name=name)
    return Arm(name, peft_model, _adapter_context(peft_model, name))


def _adapter_context(peft_model, name: str):
    class _Active:
        def __enter__(self):
            peft_model.set_adapter(name)

        def __exit__(self, *exc):
            return False

    return _Active


def generate(arm: Arm, tokenizer, template, examples: list[Example], max_new_tokens: int, config: RunConfig):
    arm.model.eval()
    return generate_outputs(arm.model, tokenizer, template, [ex.prompt for ex in examples], max_new_tokens,
                            batch_size=config.evaluation.batch_size, label=f"evaluating {arm.name}",
                            shots=arm.shots, sampling=config.evaluation.sampling())


def default_max_new_tokens(tokenizer, train: list[Example]) -> int:
    """Room for the longest training completion plus a margin: enough to be right, short enough to stay fast."""
    longest = max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in train)
    return longest + max(8, longest // 4)


def arm_summary(rows: dict[str, list[float]], outputs: list[str], expected: list[str], evaluation,
                rule: LabelRule) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "scores": {name: bootstrap_ci(values, evaluation.bootstrap_samples).as_dict() for name, values in rows.items()},
        "length": length_report(outputs),
    }
    if "field_accuracy" in rows:
        summary["field_accuracy_per_key"] = per_key_accuracy(outputs, expected)
    if "label_accuracy" in rows:
        summary["labels"] = label_report(outputs, expected, rule, evaluation.escalation_label)
    if "refusal_rate" in rows:
        summary["refusals"] = refusal_report(outputs, expected)
    return summary


def headline_scores(summary: dict[str, Any]) -> dict[str, float]:
    """An arm's mean scores, with macro-F1 and the two refusal directions where the evaluation has them."""
    scores = {metric: value["mean"] for metric, value in summary["scores"].items()}
    if "labels" in summary:
        scores["macro_f1"] = summary["labels"]["macro_f1"]
    for name, value in summary.get("refusals", {}).items():
        if name.startswith("refused_") and value is not None:
            scores[name] = value
    return scores


def compare_arms(rows: dict[str, dict[str, list[float]]], samples: int) -> dict[str, Any]:
    """Paired tests of `tuned` against each base arm, per scorer."""
    if "tuned" not in rows:
        return {}
    comparisons = {}
    for other in [name for name in rows if name != "tuned"]:
        comparisons[f"tuned_vs_{other}"] = {
            metric: paired_comparison(rows[other][metric], rows["tuned"][metric], samples).as_dict()
            for metric in rows["tuned"] if metric != "length"
        }
    return comparisons


def forgetting(base_model, tuned, tokenizer, arms: list[Arm], evaluation) -> dict[str, Any]:
    """Perplexity and knowledge probe with the base weights, then with the tuned ones."""
    from specialist.evaluate.forgetting import forgetting_report, general_text, knowledge_probe, measure

    texts = general_text(evaluation.forgetting_corpus, evaluation.forgetting_max_texts)
    questions = knowledge_probe()
    is_adapter = hasattr(tuned, "disable_adapter")
    # With an adapter, the base weights are the same object with the adapter switched off.
    with (tuned.disable_adapter() if is_adapter else nullcontext()):
        before = measure(tuned if is_adapter else base_model, tokenizer, texts, questions)
    tuned_arm = next(arm for arm in arms if arm.name == "tuned")
    with tuned_arm.context():
        after = measure(tuned, tokenizer, texts, questions)
    corpus = str(evaluation.forgetting_corpus) if evaluation.forgetting_corpus else "bundled Wikipedia sentences"
    return forgetting_report(before, after, len(texts), len(questions), corpus)


def overfitting(tuned, tokenizer, template, split, test_rows, test_outputs, scorers, max_new_tokens,
                config: RunConfig) -> dict[str, Any]:
    """Tuned scores on train rows beside test rows, and how often it recites a training answer that is wrong."""
    sample = split.train[: config.evaluation.train_sample]
    result: dict[str, Any] = {"train_rows": len(sample)}
    if sample:
        train_outputs = generate(Arm("tuned", tuned), tokenizer, template, sample, max_new_tokens, config)
        train_rows = score_rows(train_outputs, [ex.completion for ex in sample], scorers,
                                [ex.prompt for ex in sample])
        result["train_scores"] = {m: _mean(v) for m, v in train_rows.items()}
        result["test_scores"] = {m: _mean(v) for m, v in test_rows.items()}
        result["gap"] = {m: result["train_scores"][m] - result["test_scores"][m] for m in train_rows if m != "length"}
    train_answers = {ex.completion.strip() for ex in split.train}
    test = split.test[: len(test_outputs)]
    recited = [out.strip() in train_answers and out.strip() != ex.completion.strip()
               for out, ex in zip(test_outputs, test)]
    result["memorisation_rate"] = _mean([float(r) for r in recited])
    return result


def flat_figures(report: dict[str, Any]) -> dict[str, float]:
    """Every number a gate may name: `arm.metric` (with `arm.macro_f1`, `arm.refused_when_should[_not]`),
    `forgetting.*`, `overfitting.gap.metric`, `overfitting.memorisation_rate`."""
    figures = {f"{arm}.{metric}": value
               for arm, summary in report["arms"].items() for metric, value in headline_scores(summary).items()}
    for name in ("ppl_increase", "knowledge_drop"):
        if name in report.get("forgetting", {}):
            figures[f"forgetting.{name}"] = report["forgetting"][name]
    over = report.get("overfitting", {})
    figures.update({f"overfitting.gap.{m}": v for m, v in over.get("gap", {}).items()})
    if "memorisation_rate" in over:
        figures["overfitting.memorisation_rate"] = over["memorisation_rate"]
    return figures


def write_eval_outputs(run_dir: Path, config: RunConfig, report: dict[str, Any], test: list[Example],
                       outputs: dict[str, list[str]]) -> None:
    from specialist.evaluate.report import write_eval_report

    (run_dir / "eval.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    with (run_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for i, ex in enumerate(test):
            row = {"input": ex.prompt, "expected": ex.completion, **{arm: out[i] for arm, out in outputs.items()}}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_eval_report(run_dir, config, report, test, outputs)
    console.log(f"evaluation written to {run_dir / 'eval.json'}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
