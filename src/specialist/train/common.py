"""What every method shares: the Trainer arguments, the LoRA settings, checkpoint discovery, the training result.

Methods differ in the model they prepare and the trainer class; the loop (`loop.py`), logging, checkpoints, early
stopping and resume are the Trainer's own, configured here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specialist.config import MethodConfig, TrainingConfig
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


def forward_evaluation_steps(training: TrainingConfig, val_rows: int) -> float:
    """One loss-only evaluation in optimizer steps: a forward pass (about a third of a training step's forward and
    backward) over the validation rows, `batch_size x gradient_accumulation_steps` rows a step."""
    return val_rows / (training.batch_size * training.gradient_accumulation_steps) / 3


def lora_config(method: MethodConfig):
    """The adapter a LoRA method trains on a causal LM (r, alpha, dropout, target modules, DoRA, rsLoRA)."""
    from peft import LoraConfig

    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        task_type="CAUSAL_LM",
    )
