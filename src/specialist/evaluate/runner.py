"""`specialist eval RUN_DIR`: every arm on the same held-out rows with the same decoding, scored with intervals.

Arms: `base` (zero-shot), `few_shot` (the base with k train examples in the prompt), `tuned` (the run's adapter
or model), and any other run, adapter or export folder given by name. They all answer through the generation
engine `serve` uses; a classifier run's tuned arm answers through its head instead (the most probable label,
written through data.label_template), and with `evaluation.label_scoring: likelihood` every generative arm answers
the label whose completion it finds most probable (evaluate.likelihood). Arms with class probabilities also get
a calibration report (ECE, reliability diagram, escalation thresholds). Results go to eval.json, predictions.jsonl,
report.md and report.html in the run folder; gates decide the exit code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from specialist.artifacts import Loaded, ModelPool, load_base_model, load_exported, load_run
from specialist.config import RunConfig
from specialist.console import console
from specialist.constrain import constraint_of
from specialist.core.gates import BEST_BASELINE, TUNED_ARM_NAMES, check_gates, refuse_gates_on_arms_left_out
from specialist.core.labels import label_rule, render_label
from specialist.core.scorers import (
    LabelRule,
    decided_once_not_json,
    label_report,
    length_report,
    per_key_accuracy,
    refusal_report,
    resolve_scorers,
    score_rows,
)
from specialist.core.stats import PairedComparison, paired_comparison, paired_macro_f1, score_interval
from specialist.data import Example
from specialist.errors import ConfigError
from specialist.evaluate.baseline_arms import baseline_index, best_baselines, default_retrieval_k, no_model_baselines
from specialist.evaluate.results import ArmPair, ArmResult, EvalReport, Overfitting
from specialist.generation import Engine, RowRules, Sampling, default_max_new_tokens
from specialist.run_folder import ExportFolder, RunFolder
from specialist.trackers import log_evaluation


@dataclass
class Arm:
    name: str
    engine: Engine | None  # None for a classifier arm
    shots: list[tuple[str, str]] = field(default_factory=list)
    weights_bytes: int | None = None  # known for export folders: what serving it costs on disk
    classifier: Any = None  # a classify.LabelClassifier: answers a label and probabilities, no text
    # a baseline that needs no model: prompts -> (texts, seconds, core.baselines.LabelAnswers or None)
    baseline: Callable[[list[str]], Any] | None = None


@dataclass
class Answers:
    """One arm's answers to a list of rows: the texts, how long they took, and class probabilities where the arm
    has them ([rows, labels], in the order of `labels`)."""

    texts: list[str]
    seconds: float
    probabilities: Any = None
    labels: list[str] | None = None


@dataclass
class LabelScoring:
    """The classes of labelled rows (None where they are not labelled), and whether generative arms answer them by
    likelihood instead of by generation."""

    labels: list[str] | None
    label_template: str
    likelihood: bool = False

    def indices(self, examples: list[Example], labels: list[str]) -> list[int]:
        """Each row's expected index in `labels`: its label, else its completion matched against the rendered
        labels; -1 when it is none of them (a probability-weighted answer can never be right there)."""
        rendered = {render_label(label, self.label_template).strip(): i for i, label in enumerate(labels)}
        return [labels.index(ex.label) if ex.label in labels else rendered.get(ex.completion.strip(), -1)
                for ex in examples]

    def calibration(self, answers: Answers, examples: list[Example], escalation_label: str | None):
        if answers.probabilities is None or not answers.labels:
            return None
        from specialist.evaluate.likelihood import calibration_report

        return calibration_report(answers.probabilities, self.indices(examples, answers.labels), answers.labels,
                                  escalation_label)


@dataclass
class Arms:
    """The arms to score, and the tuned model's engine (None when the run has not trained one yet)."""

    arms: list[Arm]
    base: Engine
    tuned: Engine | None


def sampling_of(evaluation) -> Sampling:
    """The evaluation's decoding as the engine's one sampling type: greedy unless do_sample."""
    return Sampling.of(evaluation.temperature if evaluation.do_sample else None, evaluation.top_p)


def evaluate_run(run_dir: Path, config: RunConfig | None = None, others: dict[str, Path] | None = None):
    """Score every arm on the run's test split; write eval.json, report.md and report.html; check the gates.

    The steps: the arms (`build_arms`), what they are scored under (`Setting`), each arm's answers (`answer`),
    their scores and comparisons (`scored_report`), forgetting and overfitting (`add_side_reports`), the gates,
    and the files (`write_eval_outputs`)."""
    run = RunFolder.open(Path(run_dir))
    config = config or run.config()
    if config.method.kind == "continued_pretraining":  # plain text: no prompts to answer, see evaluate.domain
        from specialist.evaluate.domain import evaluate_domain

        return evaluate_domain(run, config, others)
    split = run.split()
    scoring = label_scoring(run, config, split.train)
    arms = build_arms(run, config, ModelPool(config.model.dtype), split.train, others or {})
    refuse_gates_on_arms_left_out(config.evaluation.gates, [arm.name for arm in arms.arms], list(others or {}))
    setting = Setting.of(config, split, arms.base.tokenizer, scoring)
    answers = {arm.name: answer(arm, setting.test, setting.max_new_tokens, config, scoring,
                                f"evaluating {arm.name}") for arm in arms.arms}
    rows = {name: setting.score(found.texts) for name, found in answers.items()}
    report = scored_report(run.path, arms, answers, rows, setting)
    add_side_reports(report, arms, answers, rows, setting, split)
    report.gates = check_gates(config.evaluation.gates, figures_of(report), config.evaluation)
    outputs = {name: found.texts for name, found in answers.items()}
    write_eval_outputs(run, config, report, setting.test, outputs, probabilities_of(answers))
    return report


@dataclass
class Setting:
    """What every arm is scored under: the held-out rows, the token limit, the scorers and the label rules."""

    config: RunConfig
    test: list[Example]
    max_new_tokens: int
    rule: LabelRule
    scorers: dict[str, Callable]
    scoring: LabelScoring

    @classmethod
    def of(cls, config: RunConfig, split, tokenizer, scoring: LabelScoring) -> Setting:
        evaluation = config.evaluation
        rule = label_rule(evaluation)
        return cls(config, held_out(split, evaluation),
                   evaluation.max_new_tokens or default_max_new_tokens(tokenizer, split.train), rule,
                   resolve_scorers(evaluation.scorers, rule, evaluation.json_schema), scoring)

    def score(self, outputs: list[str]) -> dict[str, list[float]]:
        """Each scorer's value on each held-out row."""
        return score_rows(outputs, [ex.completion for ex in self.test], self.scorers, [ex.prompt for ex in self.test])

    def decoding(self) -> dict[str, Any]:
        """What eval.json's decoding notes: the sampling settings, label scoring and calibration."""
        evaluation = self.config.evaluation
        cut = decided_once_not_json(evaluation.scorers, [ex.completion for ex in self.test]) is not None
        return (sampling_of(evaluation).generate_kwargs() | scoring_of(self.scoring)
                | ({"label_calibration": "batch"} if evaluation.label_calibration == "batch" else {})
                # the stored answers (and their lengths) then end where they stopped
                | ({"answers_end": "once no continuation could parse as JSON"} if cut else {}))


def held_out(split, evaluation) -> list[Example]:
    """The test rows the arms answer (the first evaluation.max_examples of them when set)."""
    return split.test[: evaluation.max_examples] if evaluation.max_examples else split.test


def scored_report(run_dir: Path, arms: Arms, answers: dict[str, Answers], rows: dict[str, dict[str, list[float]]],
                  setting: Setting) -> EvalReport:
    """Every arm's scores (`rows`: per arm, each scorer's value per row) with intervals, the paired comparisons of
    each tuned arm against the other arms, the best baselines."""
    evaluation, test = setting.config.evaluation, setting.test
    expected = [ex.completion for ex in test]
    report = EvalReport(
        run_dir=run_dir, n_eval=len(test), max_new_tokens=setting.max_new_tokens, decoding=setting.decoding(),
        arms={arm.name: arm_result(arm, ArmRows(rows[arm.name], answers[arm.name].texts, expected),
                                   evaluation, setting.rule, answers[arm.name].seconds,
                                   setting.scoring.calibration(answers[arm.name], test, evaluation.escalation_label))
              for arm in arms.arms},
        comparisons=compare_arms(rows, evaluation.bootstrap_samples))
    labelled = {name: answers[name].texts for name in rows if "label_accuracy" in rows[name]}
    for pair, comparison in macro_f1_comparisons(labelled, expected, setting.rule,
                                                 evaluation.bootstrap_samples).items():
        report.comparisons.setdefault(pair, {})["macro_f1"] = comparison
    report.best_baseline = best_baselines(report.arms)
    return report


def macro_f1_comparisons(outputs: dict[str, list[str]], expected: list[str], rule: LabelRule,
                         samples: int) -> dict[ArmPair, PairedComparison]:
    """Macro-F1 of each pair compare_arms measures, among the arms with label answers (`outputs`): a figure of
    the whole set, so its paired interval resamples rows rather than per-row scores."""
    want = [rule.extract(text) for text in expected]
    labels = {name: [rule.extract(text) for text in texts] for name, texts in outputs.items()}
    return {pair: paired_macro_f1(want, labels[pair.other], labels[pair.arm], samples)
            for pair in compared_pairs(labels)}


def add_side_reports(report: EvalReport, arms: Arms, answers: dict[str, Answers],
                     rows: dict[str, dict[str, list[float]]], setting: Setting, split) -> None:
    """Forgetting (base weights against tuned ones) and overfitting (tuned on train rows against test rows)."""
    config = setting.config
    if arms.tuned is not None and config.evaluation.forgetting:
        report.forgetting = forgetting(arms, config.evaluation)
    tuned = next((arm for arm in arms.arms if arm.name == "tuned"), None)
    if tuned is None:
        return

    def answer_train(examples: list[Example]) -> list[str]:
        return answer(tuned, examples, setting.max_new_tokens, config, setting.scoring,
                      "evaluating tuned on train rows").texts

    report.overfitting = overfitting(answer_train, split, rows["tuned"], answers["tuned"].texts, setting.scorers,
                                     config)


def evaluate_baselines(config: RunConfig, split) -> EvalReport:
    """The baselines that need no model (nearest, majority, linear) on `split`'s test rows, scored like `evaluate_run`
    scores its arms: what a fine-tune has to beat, known in seconds before any training."""
    test = held_out(split, config.evaluation)
    return EvalReport(run_dir=Path("."), n_eval=len(test), max_new_tokens=0, decoding={},
                      arms=no_model_arm_results(config, split.train, test))


def no_model_arm_results(config: RunConfig, train: list[Example], test: list[Example]) -> dict[str, ArmResult]:
    """nearest, majority and linear fitted on `train`, answering and scored on `test`."""
    evaluation = config.evaluation
    found = no_model_baselines(evaluation.model_copy(update={"baselines": ["nearest", "majority", "linear"]}),
                               baseline_index(config, train),
                               lambda label: render_label(label, config.data.label_template))
    rule = label_rule(evaluation)
    scorers = resolve_scorers(evaluation.scorers, rule, evaluation.json_schema)
    expected, prompts = [ex.completion for ex in test], [ex.prompt for ex in test]
    arms = {}
    for name, baseline in found.items():
        texts, seconds, _ = baseline(prompts)
        rows = score_rows(texts, expected, scorers, prompts)
        arms[name] = arm_result(Arm(name, None), ArmRows(rows, texts, expected), evaluation, rule, seconds)
    return arms


def cross_validated_baselines(config: RunConfig, split, folds: int, repeats: int):
    """The no-model baselines over `folds` folds of every distinct prepared row, `repeats` shuffles, the folds
    following data.split_by (evaluate.cross_validation): each figure's mean and spread across splits."""
    from specialist.evaluate.cross_validation import cross_validate, distinct_rows

    def score_fold(fit: list[Example], held: list[Example]) -> dict[str, dict[str, float]]:
        return {name: arm.headline() for name, arm in no_model_arm_results(config, fit, held).items()}

    return cross_validate(distinct_rows(split), config.data.split_by, folds, repeats, score_fold)


def label_scoring(run: RunFolder, config: RunConfig, train: list[Example]) -> LabelScoring:
    """The classes: a classifier run's own (labels.json), else data.labels or the training rows' labels; under
    `label_scoring: likelihood` they must exist."""
    data, likelihood = config.data, config.evaluation.label_scoring == "likelihood"
    if run.is_classifier:
        from specialist.classify import read_labels

        return LabelScoring(read_labels(run)[0], data.label_template, likelihood)
    if config.evaluation.label_calibration != "none" and not likelihood:
        raise ConfigError("evaluation.label_calibration calibrates per-class probabilities, and this run's arms "
                          "generate their answers", hint="set evaluation.label_scoring: likelihood (labelled data), "
                          "or evaluate a classifier run; or leave label_calibration: none")
    labels = list(data.labels) if data.labels else sorted({ex.label for ex in train if ex.label is not None})
    if likelihood and len(labels) < 2:
        raise ConfigError("evaluation.label_scoring likelihood scores each row against the label set, and this run "
                          f"has {len(labels)} label(s)", hint="use labelled data (data.shape: labelled) or list the "
                          "labels in data.labels; or set evaluation.label_scoring: generate")
    return LabelScoring(labels or None, data.label_template, likelihood)


def scoring_of(scoring: LabelScoring) -> dict[str, Any]:
    """What eval.json's decoding notes of label scoring (nothing when arms generate)."""
    return {"label_scoring": "likelihood", "labels": len(scoring.labels or [])} if scoring.likelihood else {}


def probabilities_of(answers: dict[str, Answers]) -> dict[str, list[dict[str, float]]]:
    """Per arm with probabilities, each row's {label: probability} (predictions.jsonl keeps them)."""
    return {name: [{label: round(float(p), 6) for label, p in zip(found.labels or [], row)}
                   for row in found.probabilities]
            for name, found in answers.items() if found.probabilities is not None}


def check_evaluation_inputs(config: RunConfig) -> None:
    """Fail early, before any training, on an unreadable schema, question set or scorer (training.select_by's
    too)."""
    evaluation = config.evaluation
    if evaluation.questions is not None:
        from specialist.evaluate.domain import read_questions

        read_questions(evaluation.questions)
    if config.method.kind != "continued_pretraining":
        resolve_scorers(evaluation.scorers, label_rule(evaluation), evaluation.json_schema)
    if config.training.select_by not in (None, "macro_f1"):
        resolve_scorers([config.training.select_by], label_rule(evaluation), evaluation.json_schema)
    if config.method.kind != "continued_pretraining":  # a gate on an arm left out failed after an hour's training
        refuse_gates_on_arms_left_out(evaluation.gates, planned_arm_names(config), [])


def has_retrieval_arm(evaluation) -> bool:
    """The retrieval arm is the base model prompted with neighbours: off with skip_base or with no rows to show."""
    return "retrieval" in evaluation.baselines and not evaluation.skip_base and bool(default_retrieval_k(evaluation))


def planned_arm_names(config: RunConfig) -> list[str]:
    """The arms build_arms will score, read from the config alone (before the data is split): majority and linear
    count as planned, since whether the rows carry labels is known only after prepare (evaluate_run checks again)."""
    evaluation = config.evaluation
    base_arms = [] if evaluation.skip_base else ["base"] + (["few_shot"] if evaluation.few_shot_k else [])
    baselines = [name for name in evaluation.baselines if name != "retrieval"]
    if has_retrieval_arm(evaluation):
        baselines.append("retrieval")
    tuned = ["tuned"] + (["tuned+constrained"] if evaluation.constrained and config.method.kind != "classifier" else [])
    return [*base_arms, *baselines, *tuned]


def build_arms(run: RunFolder, config: RunConfig, pool: ModelPool, train: list[Example],
               others: dict[str, Path]) -> Arms:
    """base and few_shot (the base weights: every adapter off), tuned, and any other arm; one base copy.

    `base` is the base model itself also for a run that started from an SFT adapter (dpo, grpo with
    from_adapter): give the SFT run as an arm (`--arm sft=RUN`) to see base / SFT / tuned side by side."""
    template = run.template()
    tuned = load_run(run, pool, adapter_name="tuned") if run.is_trained and not run.is_classifier else None
    base_weights = load_base_model(config.model.name, pool, template)  # every adapter off while it answers
    base = base_weights.answering_engine()
    arms: list[Arm] = []
    if not config.evaluation.skip_base:
        arms.append(Arm("base", base))
        if config.evaluation.few_shot_k:
            shots = [(ex.prompt, ex.completion) for ex in train[: config.evaluation.few_shot_k]]
            arms.append(Arm("few_shot", base, shots))
    arms += baseline_arms(config, train, base_weights)
    tuned_engine = _engine(tuned, template) if tuned is not None else None
    if tuned_engine is not None:
        arms.append(Arm("tuned", tuned_engine))
        if config.evaluation.constrained:
            arms.append(Arm("tuned+constrained", _engine(tuned, template, constraint_of(config))))
    if run.is_classifier and run.is_trained:  # its answers are labels already: no constrained arm to add
        arms.append(classifier_arm("tuned", run, config))
    for name, folder in others.items():
        arms.append(other_arm(name, Path(folder), config, pool, template))
    return Arms(arms, base, tuned_engine)


def baseline_arms(config: RunConfig, train: list[Example], base: Loaded) -> list[Arm]:
    """The cheapest alternatives (evaluation.baselines), all from one retrieval index over the training rows:
    nearest, majority and linear need no model; retrieval is the base model shown each row's nearest rows (left
    out with skip_base, like the other base arms)."""
    evaluation = config.evaluation
    if not evaluation.baselines or not train:
        return []
    index = baseline_index(config, train, max(1, default_retrieval_k(evaluation)))
    found = [Arm(name, None, baseline=answer) for name, answer in
             no_model_baselines(evaluation, index, lambda label: render_label(label, config.data.label_template))
             .items()]
    if has_retrieval_arm(evaluation):
        # the base weights answering as a retrieval-trained model is served: the engine adds the nearest rows
        found.append(Arm("retrieval", replace(base, retrieval=index).answering_engine()))
    return found


def _engine(found: Loaded, template=None, constraint=None) -> Engine:
    return found.answering_engine(constraint, template)


def other_arm(name: str, folder: Path, config: RunConfig, pool: ModelPool, template) -> Arm:
    """Another run folder, adapter folder or export folder as an arm of its own (adapters share the base copy)."""
    if ExportFolder.is_export(folder):  # merged, int8, gguf or adapter export: loaded as it would be served
        found = load_exported(folder, pool)
        return Arm(name, _engine(found), weights_bytes=found.weights_bytes)
    if RunFolder.is_run(folder) and RunFolder(folder).is_classifier:
        return classifier_arm(name, RunFolder(folder), config)
    if RunFolder.is_run(folder):
        return Arm(name, _engine(load_run(RunFolder(folder), pool, adapter_name=name), template))
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"arm {name!r}: {folder} is not a run, export or adapter folder",
                          hint="give a run folder, a folder written by `specialist export`, or an adapter folder")
    model, context = pool.with_adapter(config.model.name, None, folder, name)
    return Arm(name, _engine(Loaded(model, pool.tokenizer(config.model.name), template, context=context)))


def classifier_arm(name: str, run: RunFolder, config: RunConfig) -> Arm:
    """A classifier run as an arm: its head's most probable label (its own copy of the base model)."""
    from specialist.classify import load_classifier

    return Arm(name, None, classifier=load_classifier(run, config.model.dtype))


def answer(arm: Arm, examples: list[Example], max_new_tokens: int, config: RunConfig, scoring: LabelScoring,
           label: str) -> Answers:
    """An arm's answers: a classifier's head, the likelihood of each label (label_scoring: likelihood; a
    constrained arm keeps decoding, which is what it measures), or generation."""
    started = time.perf_counter()
    prompts, batch_size = [ex.prompt for ex in examples], config.evaluation.batch_size
    if arm.baseline is not None:
        return baseline_answers(arm, prompts)
    if arm.classifier is not None:
        probabilities = arm.classifier.probabilities(prompts, batch_size, label)
    elif scoring.likelihood and scoring.labels and arm.engine.constraint is None:
        probabilities = likelihood_probabilities(arm.engine, prompts, scoring, batch_size, arm.shots, label)
    else:
        texts = generate(arm.engine, examples, max_new_tokens, config, arm.shots, label)
        return Answers(texts, time.perf_counter() - started)
    if config.evaluation.label_calibration == "batch":
        from specialist.evaluate.likelihood import batch_calibrate

        probabilities = batch_calibrate(probabilities)
    labels = arm.classifier.labels if arm.classifier is not None else scoring.labels
    texts = [render_label(labels[i], scoring.label_template) for i in probabilities.argmax(axis=1)]
    return Answers(texts, time.perf_counter() - started, probabilities, labels)


def baseline_answers(arm: Arm, prompts: list[str]) -> Answers:
    """A no-model baseline's answers; a label baseline with probabilities (linear) gets a calibration report."""
    texts, seconds, labelled = arm.baseline(prompts)
    if labelled is None or labelled.probabilities is None:
        return Answers(texts, seconds)
    return Answers(texts, seconds, labelled.probabilities, labelled.classes)


def likelihood_probabilities(engine: Engine, prompts: list[str], scoring: LabelScoring, batch_size: int,
                             shots: Sequence[tuple[str, str]] = (), label: str = "scoring labels"):
    """[rows, labels] probabilities: softmax over the labels of each label completion's summed log-probability."""
    from specialist.evaluate.likelihood import label_logprobs, softmax

    completions = [render_label(label, scoring.label_template) for label in scoring.labels or []]
    # an engine with a retrieval index (a retrieval-trained model, the retrieval arm) shows each prompt its rows
    row_shots = engine.retrieval.prompt_shots(prompts) if engine.retrieval is not None and not shots else None
    with engine.lock, engine.context():
        return softmax(label_logprobs(engine, prompts, completions, batch_size, shots, label, row_shots))


def generate(engine: Engine, examples: list[Example], max_new_tokens: int, config: RunConfig,
             shots: Sequence[tuple[str, str]] = (), label: str = "generating") -> list[str]:
    # an answer whose scores no continuation can change ends there (the base model echoing its input, say)
    decided = decided_once_not_json(config.evaluation.scorers, [ex.completion for ex in examples])
    answers = engine.generate([ex.prompt for ex in examples], max_new_tokens, sampling_of(config.evaluation),
                              config.evaluation.batch_size, shots, label, RowRules(decided=decided))
    return [answer.text for answer in answers]


@dataclass
class ArmRows:
    """One arm on the held-out rows: each scorer's value per row, the arm's answers, the expected answers."""

    scores: dict[str, list[float]]
    outputs: list[str]
    expected: list[str]


def arm_result(arm: Arm, found: ArmRows, evaluation, rule: LabelRule, seconds: float,
               calibration: dict[str, Any] | None = None) -> ArmResult:
    """The arm's scores with intervals, lengths and cost, and the label, refusal and per-key reports its scorers
    ask for."""
    rows, outputs, expected = found.scores, found.outputs, found.expected
    result = ArmResult(arm.name, {name: score_interval(values, evaluation.bootstrap_samples)
                                  for name, values in rows.items()},
                       length_report(outputs), generation_seconds=seconds, weights_bytes=arm.weights_bytes,
                       calibration=calibration)
    if "field_accuracy" in rows:
        result.field_accuracy_per_key = per_key_accuracy(outputs, expected)
    if "label_accuracy" in rows:
        result.labels = label_report(outputs, expected, rule, evaluation.escalation_label)
    if "refusal_rate" in rows:
        result.refusals = refusal_report(outputs, expected)
    return result


def compare_arms(rows: dict[str, dict[str, list[float]]], samples: int) -> dict[ArmPair, dict[str, PairedComparison]]:
    """Paired comparisons, per scorer, on the same rows: each tuned arm (tuned, tuned+constrained) against every
    arm that is not one, then tuned+constrained against tuned (what the schema adds to the same weights)."""
    return {pair: _paired_scores(rows[pair.arm], rows[pair.other], samples) for pair in compared_pairs(rows)}


def compared_pairs(rows: Mapping[str, Any]) -> list[ArmPair]:
    """The pairs compare_arms measures, tuned's first, so eval.json keeps the order it had before the constrained
    arm was compared too."""
    tuned = [name for name in TUNED_ARM_NAMES if name in rows]
    pairs = [ArmPair(arm, other) for arm in tuned for other in rows if other not in TUNED_ARM_NAMES]
    if tuned == list(TUNED_ARM_NAMES):
        pairs.append(ArmPair("tuned+constrained", "tuned"))
    return pairs


def _paired_scores(arm: dict[str, list[float]], other: dict[str, list[float]],
                   samples: int) -> dict[str, PairedComparison]:
    """`arm` minus `other` on each scorer both have; length is no "higher is better" figure, so not compared."""
    return {metric: paired_comparison(other[metric], values, samples)
            for metric, values in arm.items() if metric != "length" and metric in other}


def forgetting(arms: Arms, evaluation):
    """Perplexity and knowledge probe with the base weights, then with the tuned ones."""
    from specialist.evaluate.forgetting import measure_forgetting

    return measure_forgetting(arms.base, arms.tuned, evaluation)


def overfitting(answer_train: Callable[[list[Example]], list[str]], split, test_rows: dict[str, list[float]],
                test_outputs: list[str], scorers, config: RunConfig) -> Overfitting:
    """Tuned scores on train rows beside test rows, and how often it recites a training answer that is wrong;
    `answer_train` answers rows as the tuned arm does."""
    sample = split.train[: config.evaluation.train_sample]
    train_answers = {ex.completion.strip() for ex in split.train}
    recited = [out.strip() in train_answers and out.strip() != ex.completion.strip()
               for out, ex in zip(test_outputs, split.test)]
    result = Overfitting(train_rows=len(sample), memorisation_rate=_mean([float(r) for r in recited]))
    if sample:
        outputs = answer_train(sample)
        train_rows = score_rows(outputs, [ex.completion for ex in sample], scorers, [ex.prompt for ex in sample])
        result.train_scores = {m: _mean(v) for m, v in train_rows.items()}
        result.test_scores = {m: _mean(v) for m, v in test_rows.items()}
    return result


def figures_of(report: EvalReport):
    """Every figure a gate may name: `arm.metric` (with `arm.macro_f1`, `arm.refused_when_should[_not]`),
    `forgetting.*`, `overfitting.gap.metric`, `overfitting.memorisation_rate`; with intervals where known, and the
    paired differences compare_arms measured (each tuned arm against each arm and against best_baseline)."""
    from specialist.core.gates import Figure, Figures

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
    differences = {(pair.arm, pair.other, metric): comparison.difference
                   for pair, per_metric in report.comparisons.items() for metric, comparison in per_metric.items()}
    for metric, arm in report.best_baseline.items():
        if f"{arm}.{metric}" in values:
            values[f"{BEST_BASELINE}.{metric}"] = values[f"{arm}.{metric}"]
        for tuned in TUNED_ARM_NAMES:  # `tuned+constrained - best_baseline ... confidently` needs its pair too
            if (tuned, arm, metric) in differences:
                differences[(tuned, BEST_BASELINE, metric)] = differences[(tuned, arm, metric)]
    return Figures(values, differences)


def write_eval_outputs(run: RunFolder, config: RunConfig, report: EvalReport, test: list[Example],
                       outputs: dict[str, list[str]], probabilities: dict[str, list[dict[str, float]]] | None = None,
                       ) -> None:
    """eval.json, predictions.jsonl (each row with every arm's answer and, where arms have them, their class
    probabilities under "probabilities"), report.md and report.html; then the figures to training's trackers."""
    from specialist.evaluate.report import write_eval_report

    run.eval_json.write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    with run.predictions.open("w", encoding="utf-8") as handle:
        for i, ex in enumerate(test):
            row = {"input": ex.prompt, "expected": ex.completion, **{arm: out[i] for arm, out in outputs.items()}}
            if probabilities:
                row["probabilities"] = {arm: rows[i] for arm, rows in probabilities.items()}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_eval_report(run, config, report, test, outputs)
    console.log(f"evaluation written to {run.eval_json}")
    log_evaluation(run, config.training.report_to, report.to_json())  # the trackers training reported to


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
