"""`training.select_by`: pick the best checkpoint by a scorer on the validation rows instead of by their loss.

At each evaluation the model in training answers the validation rows (generative methods through the generation
engine evaluation uses, the classifier through its head), the scorer's mean goes into the metrics as
`eval_<scorer>`, and the Trainer's best-checkpoint choice and early stopping read it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from specialist.config import EvaluationConfig
from specialist.console import console


@dataclass
class SelectionRows:
    """What `training.select_by` scores at each evaluation: the validation rows, how the model in training answers
    them (`answer(model, prompts) -> texts`), and the scorer's value over all of them (higher is better)."""

    name: str
    prompts: list[str]
    expected: list[str]
    answer: Callable[[Any, list[str]], list[str]]
    score: Callable[[list[str], list[str], list[str]], float]

    @classmethod
    def of(cls, name: str, evaluation: EvaluationConfig, val: list,
           answer: Callable[[Any, list[str]], list[str]]) -> SelectionRows:
        if not val:
            from specialist.errors import ConfigError

            raise ConfigError("training.select_by scores the validation rows, and this run has none",
                              hint="set data.val_fraction above 0 (or data.val_path), or remove training.select_by")
        return cls(name, [ex.prompt for ex in val], [ex.completion for ex in val], answer,
                   selection_score(name, evaluation))


def selection_score(name: str, evaluation) -> Callable[[list[str], list[str], list[str]], float]:
    """The select_by figure over a set of rows: a scorer's mean, or macro_f1 (labels read as label_accuracy does)."""
    from specialist.core.labels import label_rule
    from specialist.core.scorers import label_report, resolve_scorers, score_rows

    rule = label_rule(evaluation)
    if name == "macro_f1":
        return lambda outputs, expected, prompts: float(label_report(outputs, expected, rule)["macro_f1"])
    scorer = resolve_scorers([name], rule, evaluation.json_schema)

    def mean_score(outputs: list[str], expected: list[str], prompts: list[str]) -> float:
        values = score_rows(outputs, expected, scorer, prompts)[name]
        return sum(values) / len(values) if values else 0.0

    return mean_score


def generated_answers(template, tokenizer, train: list, evaluation,
                      shots_of: dict[str, list[tuple[str, str]]] | None = None) -> Callable[[Any, list[str]], list[str]]:
    """select_by's answers for generative methods: greedy generation through the engine evaluation uses; `shots_of`
    gives a prompt its retrieved examples (data.retrieval)."""
    from specialist.generation import GREEDY, Engine, RowRules, default_max_new_tokens

    max_new_tokens = evaluation.max_new_tokens or default_max_new_tokens(tokenizer, train)

    def answer(model, prompts: list[str]) -> list[str]:
        engine = Engine(model, tokenizer, template)
        row_shots = [shots_of.get(p, []) for p in prompts] if shots_of else None
        found = engine.generate(prompts, max_new_tokens, GREEDY, evaluation.batch_size, label="select_by",
                                rows=RowRules(shots=row_shots))
        return [g.text for g in found]

    return answer


class SelectByCallback(TrainerCallback):
    """At each evaluation: the model in training answers the validation rows, and their score goes into the
    metrics as `eval_<scorer>`, where the Trainer's best-checkpoint choice (and early stopping) read it.

    The Trainer logs its evaluation metrics before callbacks see them, so the score is logged here: into the
    training log history (the loss plot draws it) and metrics.jsonl.
    """

    def __init__(self, rows: SelectionRows, record: Callable[[dict[str, Any]], None]) -> None:
        self.rows, self.record = rows, record

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if metrics is None or model is None:
            return
        was_training = model.training
        model.eval()
        try:
            outputs = self.rows.answer(model, self.rows.prompts)
        finally:
            model.train(was_training)
        value = self.rows.score(outputs, self.rows.expected, self.rows.prompts)
        key = f"eval_{self.rows.name}"
        metrics[key] = value
        entry = {"step": state.global_step, "epoch": state.epoch, key: value, "select_by": self.rows.name}
        state.log_history.append(entry)
        if state.is_world_process_zero:
            self.record(entry)
            console.log(f"step {state.global_step}: validation {self.rows.name} {value:.4f}")
