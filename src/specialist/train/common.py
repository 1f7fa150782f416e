"""What every method shares: Trainer arguments, callbacks, checkpoint discovery, the training result.

Methods differ in the model they prepare and the trainer class; the loop, logging, checkpoints, early stopping
and resume are the Trainer's own, configured here once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

from specialist.config import TrainingConfig
from specialist.console import console
from specialist.ranks import is_main_process, world_size
from specialist.train.checkpoints import CHECKPOINT_PREFIX, COMPLETE_MARK, latest_complete_checkpoint
from specialist.train.schedule import eval_and_save_steps, planned_steps, resolve_epochs, warmup_steps

__all__ = ["CHECKPOINT_PREFIX", "COMPLETE_MARK", "TrainResult", "latest_complete_checkpoint", "planned_steps"]


@dataclass
class TrainResult:
    model: Any  # the trained model (PEFT-wrapped when an adapter was trained), ready to generate
    output_dir: Path  # adapter/ or model/ in the run folder
    log_history: list[dict[str, Any]] = field(default_factory=list)
    train_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    best_checkpoint: str | None = None
    epochs: float | None = None  # as trained (after `epochs: auto`)
    time_budget: dict[str, Any] | None = None  # what `training.time_budget` chose, and from what rate

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        losses = [e["loss"] for e in self.log_history if "loss" in e]
        val_losses = [e["eval_loss"] for e in self.log_history if "eval_loss" in e]
        summary = {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "train_tokens": self.train_tokens,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "final_val_loss": val_losses[-1] if val_losses else None,
            "best_val_loss": min(val_losses) if val_losses else None,
            "best_checkpoint": self.best_checkpoint,
            "epochs": self.epochs,
            "output": str(self.output_dir),
        }
        if self.time_budget is not None:
            from specialist.train.budget import budget_cut

            summary["time_budget"] = self.time_budget
            summary["cut_by_budget"] = budget_cut(self.time_budget, self.epochs)
        rewards = [e["reward"] for e in self.log_history if isinstance(e.get("reward"), (int, float))]
        val_rewards = [e["eval_reward"] for e in self.log_history if isinstance(e.get("eval_reward"), (int, float))]
        if rewards:  # reward fine-tuning (grpo): the mean reward of the first and the last logged steps
            summary.update(first_reward=rewards[0], final_reward=rewards[-1])
        if val_rewards:
            summary.update(final_val_reward=val_rewards[-1], best_val_reward=max(val_rewards))
        last_eval = next((e for e in reversed(self.log_history) if "eval_loss" in e), {})
        for key in ("eval_rewards/margins", "eval_rewards/accuracies"):  # DPO's preference figures
            if key in last_eval:
                summary[key.removeprefix("eval_").replace("/", "_")] = last_eval[key]
        return summary


# Measured with bench/train_throughput.py on 2 CPU cores (Gemma 3 270M, LoRA, batch 8, 6 steps): one row per
# forward pass is the point where peak memory meets the 0.6x target with tokens/s still above 3x TRL's defaults.
CPU_MICRO_BATCH_TOKENS = 256


def micro_batches(training: TrainingConfig, sequence_length: int) -> tuple[int, int]:
    """(rows per forward pass, gradient accumulation steps) that make up `batch_size` rows per optimizer step.

    Activation memory grows with the tokens in one forward pass (LoRA on every linear layer keeps about 1.3 MiB
    a token for Gemma 3 270M in fp32), so a batch is cut into micro-batches of at most `micro_batch_tokens`
    tokens. The rows per micro-batch divide `batch_size`, so an optimizer step still sees exactly `batch_size`
    rows, and the Trainer normalises the loss by the batch's label count, so the gradient is the same.
    """
    budget = training.micro_batch_tokens
    if budget == "auto":
        import torch

        budget = None if torch.cuda.is_available() else CPU_MICRO_BATCH_TOKENS
    if budget is None:
        return training.batch_size, training.gradient_accumulation_steps
    fits = max(1, budget // sequence_length)
    rows = max(d for d in range(1, training.batch_size + 1) if training.batch_size % d == 0 and d <= fits)
    return rows, training.gradient_accumulation_steps * (training.batch_size // rows)


def common_arguments(
    training: TrainingConfig, output_dir: Path, n_train: int, has_val: bool, bf16: bool,
    sequence_length: int | None = None, tensorboard_dir: Path | None = None,
) -> dict[str, Any]:
    """TrainingArguments fields shared by SFTConfig and DPOConfig (checkpoints in `output_dir`)."""
    import os

    import torch

    # transformers 5 reads the TensorBoard folder from the environment when the Trainer is built.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir or output_dir)

    epochs, why = resolve_epochs(training, n_train)
    if why and training.max_steps <= 0 and is_main_process():
        console.log(why)
    steps = planned_steps(training, n_train, world_size())
    rows, accumulation = micro_batches(training, sequence_length or training.max_length)
    eval_steps, save_steps = eval_and_save_steps(training, steps)
    keep_best = has_val and save_steps % eval_steps == 0
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=rows,
        per_device_eval_batch_size=rows,
        gradient_accumulation_steps=accumulation,
        learning_rate=training.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps(training, steps),
        weight_decay=training.weight_decay,
        seed=training.seed,
        data_seed=training.seed,
        bf16=bf16,
        activation_checkpointing=training.gradient_checkpointing,
        logging_steps=training.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=training.save_total_limit,
        # The best checkpoint is kept out of the rotation and, at the end, is the model that is saved: the lowest
        # validation loss, or the highest training.select_by score (SelectByCallback puts it in the metrics).
        load_best_model_at_end=keep_best,
        metric_for_best_model=(f"eval_{training.select_by}" if training.select_by else "eval_loss") if keep_best
        else None,
        greater_is_better=bool(training.select_by) if keep_best else None,
        prediction_loss_only=True,
        report_to=list(training.report_to),
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
    )


def callbacks(training: TrainingConfig, metrics_log: Path, args, selection: SelectionRows | None = None,
              evaluation_steps: float = 0.0) -> list[TrainerCallback]:
    """`evaluation_steps`: what one evaluation costs in optimizer steps (estimated), which the time budget keeps
    for the evaluation of the last step."""
    from specialist.train.progress import RichProgressCallback

    metrics = MetricsJsonlCallback(metrics_log)
    found: list[TrainerCallback] = [RichProgressCallback(), metrics]
    if selection is not None:  # before early stopping, which reads the score it adds
        if not args.load_best_model_at_end:
            from specialist.errors import ConfigError

            raise ConfigError("training.select_by needs checkpoints at evaluation steps",
                              hint="set training.save_steps to a multiple of training.eval_steps (or leave both "
                              "unset)")
        found.append(SelectByCallback(selection, record=metrics.write))
    if training.early_stopping_patience:
        if not args.load_best_model_at_end:
            from specialist.errors import ConfigError

            raise ConfigError(
                "early stopping needs validation rows and checkpoints at evaluation steps",
                hint="set data.val_fraction > 0 and training.save_steps to a multiple of training.eval_steps",
            )
        found.append(EarlyStoppingCallback(training.early_stopping_patience, training.early_stopping_min_delta))
    if training.time_budget:  # last: an evaluation it times includes select_by's scoring, which runs before it
        from specialist.train.budget import TimeBudgetCallback

        found.append(TimeBudgetCallback(training, record=metrics.write, evaluation_steps=evaluation_steps))
    return found


def budget_choice(trainer) -> dict | None:
    """What training.time_budget chose for this trainer's run (None without a budget)."""
    from specialist.train.budget import TimeBudgetCallback

    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TimeBudgetCallback)]
    return found[0].choice if found else None


def forward_evaluation_steps(training: TrainingConfig, val_rows: int) -> float:
    """One loss-only evaluation in optimizer steps: a forward pass (about a third of a training step's forward and
    backward) over the validation rows, `batch_size x gradient_accumulation_steps` rows a step."""
    return val_rows / (training.batch_size * training.gradient_accumulation_steps) / 3


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
    def of(cls, name: str, run, val: list, answer: Callable[[Any, list[str]], list[str]]) -> SelectionRows:
        if not val:
            from specialist.errors import ConfigError

            raise ConfigError("training.select_by scores the validation rows, and this run has none",
                              hint="set data.val_fraction above 0 (or data.val_path), or remove training.select_by")
        return cls(name, [ex.prompt for ex in val], [ex.completion for ex in val], answer,
                   selection_score(name, run.config().evaluation))


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
    from specialist.generation import GREEDY, Engine, default_max_new_tokens

    max_new_tokens = evaluation.max_new_tokens or default_max_new_tokens(tokenizer, train)

    def answer(model, prompts: list[str]) -> list[str]:
        engine = Engine(model, tokenizer, template)
        row_shots = [shots_of.get(p, []) for p in prompts] if shots_of else None
        found = engine.generate(prompts, max_new_tokens, GREEDY, evaluation.batch_size, label="select_by",
                                row_shots=row_shots)
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


class MetricsJsonlCallback(TrainerCallback):
    """Every Trainer log (loss, lr, eval loss, ...) as one JSON line with step, epoch and wall time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.write({"step": state.global_step, "epoch": state.epoch,
                    **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}})

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (with the wall time since training began); the caller is rank 0."""
        row = {**row, "time": round(time.time() - self.started, 2)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def run_trainer(trainer, resume_from: Path | None) -> tuple[float, int]:
    """Train (from a checkpoint when given); return (seconds, tokens seen)."""
    from transformers.trainer_callback import PrinterCallback

    # The Rich bar replaces the Trainer's plain-text dict printer.
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return time.perf_counter() - started, int(trainer.state.num_input_tokens_seen or 0)
