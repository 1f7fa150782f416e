"""Supervised fine-tuning with LoRA through TRL's SFTTrainer and PEFT.

The dataset is tokenized here with the run's PromptTemplate (so training and evaluation share one format) and
handed to SFTTrainer already processed: it builds the labels from `completion_mask`, which puts -100 on every
prompt position when `completion_only_loss` is on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specialist.config import MethodConfig, TrainingConfig
from specialist.data import Example, PromptTemplate, encode_for_training
from specialist.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class TrainResult:
    model: Any  # the PEFT-wrapped model, adapter attached, ready to generate
    adapter_dir: Path
    log_history: list[dict[str, Any]] = field(default_factory=list)
    train_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        losses = [e["loss"] for e in self.log_history if "loss" in e]
        val_losses = [e["eval_loss"] for e in self.log_history if "eval_loss" in e]
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "train_tokens": self.train_tokens,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "final_val_loss": val_losses[-1] if val_losses else None,
            "adapter": str(self.adapter_dir),
        }


def build_dataset(examples: list[Example], template: PromptTemplate, tokenizer: PreTrainedTokenizerBase):
    """A `datasets.Dataset` of input_ids + completion_mask, ready for SFTTrainer (which skips its own tokenizing)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # SFTTrainer's map/filter passes take milliseconds here; their bars are noise
    rows = [encode_for_training(template, tokenizer, ex.prompt, ex.completion) for ex in examples]
    return Dataset.from_list(rows)


def lora_config(method: MethodConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        task_type="CAUSAL_LM",
    )


def sft_config(training: TrainingConfig, output_dir: Path, n_train: int, bf16: bool, has_val: bool):
    from trl import SFTConfig

    steps = planned_steps(training, n_train)
    eval_steps = training.eval_steps or max(1, steps // 4)
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(training.warmup_ratio * steps),
        weight_decay=training.weight_decay,
        max_length=training.max_length,
        completion_only_loss=training.completion_only_loss,
        seed=training.seed,
        data_seed=training.seed,
        bf16=bf16,
        # The models this targets fit in memory without it, and recomputing activations costs about a third.
        activation_checkpointing=False,
        logging_steps=training.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps,
        save_strategy="no",
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not _cuda_available(),
    )


def planned_steps(training: TrainingConfig, n_train: int) -> int:
    if training.max_steps > 0:
        return training.max_steps
    per_step = training.batch_size * training.gradient_accumulation_steps
    return max(1, math.ceil(math.ceil(n_train / per_step) * training.epochs))


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    train: list[Example],
    val: list[Example],
    method: MethodConfig,
    training: TrainingConfig,
    run_dir: Path,
) -> TrainResult:
    """Fine-tune a LoRA adapter on `train`, validating on `val`; save the adapter to `run_dir/adapter`."""
    from transformers.trainer_callback import PrinterCallback

    from specialist.train.fast_loss import CompletionOnlySFTTrainer
    from specialist.train.progress import RichProgressCallback

    train_ds = build_dataset(train, template, tokenizer)
    val_ds = build_dataset(val, template, tokenizer) if val else None
    _refuse_examples_without_completion(train_ds, training.max_length)
    bf16 = _param_dtype_is_bf16(model)
    args = sft_config(training, run_dir / "checkpoints", len(train_ds), bf16=bf16, has_val=val_ds is not None)
    trainer = CompletionOnlySFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=lora_config(method),
        callbacks=[RichProgressCallback()],
    )
    # The Rich bar replaces the Trainer's plain-text dict printer.
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    adapter_dir = run_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    tokens = _tokens_seen(trainer, train_ds)
    _remove_if_empty(Path(args.output_dir))
    return TrainResult(
        model=trainer.model,
        adapter_dir=adapter_dir,
        log_history=list(trainer.state.log_history),
        train_tokens=tokens,
        seconds=seconds,
        steps=trainer.state.global_step,
    )


def _refuse_examples_without_completion(dataset, max_length: int) -> None:
    """A row whose completion lies wholly past max_length teaches nothing; stop instead of training on nothing."""
    lost = [i for i, mask in enumerate(dataset["completion_mask"]) if sum(mask[:max_length]) == 0]
    if len(lost) == len(dataset):
        raise DataError(
            f"every training example loses its whole completion to truncation at max_length={max_length}",
            hint="raise training.max_length or shorten the prompts",
        )


def _tokens_seen(trainer, dataset) -> int:
    seen = trainer.state.num_input_tokens_seen
    if seen:
        return int(seen)
    epochs = trainer.state.epoch or 0
    return int(sum(len(ids) for ids in dataset["input_ids"]) * epochs)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _param_dtype_is_bf16(model) -> bool:
    import torch

    return next(model.parameters()).dtype == torch.bfloat16


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
