"""Supervised methods through TRL's SFTTrainer: lora (and DoRA/rsLoRA), full, qlora, continued_pretraining.

The dataset is tokenized here with the run's PromptTemplate (so training and evaluation share one format) and
handed to SFTTrainer already processed: it builds the labels from `completion_mask`, which puts -100 on every
prompt position when `completion_only_loss` is on. Continued pretraining has no prompt: every token is a label
and rows are concatenated and cut into `block_size` blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from specialist.config import MethodConfig, TrainingConfig
from specialist.console import console
from specialist.data import Example, PromptTemplate, encode_for_training, training_pairs
from specialist.errors import DataError
from specialist.run_folder import RunFolder
from specialist.ranks import is_main_process
from specialist.train.common import (
    SelectionRows,
    TrainResult,
    budget_choice,
    callbacks,
    common_arguments,
    forward_evaluation_steps,
    generated_answers,
    run_trainer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def build_dataset(examples: list[Example], template: PromptTemplate | None, tokenizer: PreTrainedTokenizerBase):
    """A `datasets.Dataset` of input_ids + completion_mask, ready for SFTTrainer (which skips its own tokenizing).

    `template=None` means plain text: the whole row is the completion, so every token is trained on.
    """
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # SFTTrainer's map/filter passes take milliseconds here; their bars are noise
    if template is None:
        rows = [_encode_text(tokenizer, ex.completion) for ex in examples]
    else:
        # a multi-turn chat row gives one sequence per learned assistant turn (data.train_on: all)
        rows = [encode_for_training(template, tokenizer, prompt, completion, ex.shots)
                for ex in examples for prompt, completion in training_pairs(ex)]
    return Dataset.from_list(rows)


def _encode_text(tokenizer, text: str) -> dict[str, list[int]]:
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=True)["input_ids"]
    return {"input_ids": ids, "completion_mask": [1] * len(ids)}


def lora_config(method: MethodConfig):
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


def sft_config(training: TrainingConfig, output_dir: Path, n_train: int, bf16: bool, has_val: bool,
               plain_text: bool = False, tensorboard_dir: Path | None = None):
    from trl import SFTConfig

    return SFTConfig(
        **common_arguments(training, output_dir, n_train, has_val, bf16,
                           sequence_length=training.block_size if plain_text else training.max_length,
                           tensorboard_dir=tensorboard_dir),
        max_length=training.block_size if plain_text else training.max_length,
        completion_only_loss=False if plain_text else training.completion_only_loss,
        # Plain text is concatenated and cut into full blocks, the classic pretraining layout.
        packing=plain_text,
        packing_strategy="wrapped",
    )


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    train: list[Example],
    val: list[Example],
    method: MethodConfig,
    training: TrainingConfig,
    run: RunFolder,
    resume_from: Path | None = None,
) -> TrainResult:
    """Fine-tune on `train`, validating on `val`; save the adapter (or the full model) into the run folder."""
    from specialist.train.fast_loss import CompletionOnlySFTTrainer

    plain_text = method.kind == "continued_pretraining"
    data_template = None if plain_text else template
    train_ds = build_dataset(train, data_template, tokenizer)
    val_ds = build_dataset(val, data_template, tokenizer) if val else None
    if not plain_text:
        refuse_examples_without_completion(train_ds, training.max_length)
    args = sft_config(training, run.checkpoints, len(train_ds), bf16=use_bf16_autocast(model),
                      has_val=val_ds is not None, plain_text=plain_text, tensorboard_dir=run.tensorboard)
    selection = None
    if training.select_by:  # the best checkpoint by a scorer on generated validation answers (config refuses CPT)
        evaluation = run.config().evaluation
        selection = SelectionRows.of(training.select_by, run, val,
                                     generated_answers(template, tokenizer, train, evaluation,
                                                       {ex.prompt: list(ex.shots) for ex in val if ex.shots}))
    return fit(CompletionOnlySFTTrainer, model, args, train_ds, val_ds, tokenizer, method, training, run,
               resume_from, selection)


def fit(trainer_class, model, args, train_ds, val_ds, tokenizer, method: MethodConfig, training: TrainingConfig,
        run: RunFolder, resume_from: Path | None, selection: SelectionRows | None = None,
        evaluation_steps: float | None = None) -> TrainResult:
    """Build the method's trainer, run it, and save what it trained: `adapter/` (LoRA) or `model/` (all weights).

    `selection` (training.select_by): the validation rows scored at each evaluation to pick the best checkpoint.
    `evaluation_steps`: one evaluation's cost in optimizer steps, for the time budget; None: a forward pass over
    the validation rows.
    """
    if evaluation_steps is None:
        evaluation_steps = forward_evaluation_steps(training, len(val_ds)) if val_ds is not None else 0.0
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=lora_config(method) if method.uses_lora else None,
        callbacks=callbacks(training, run.metrics_log, args, selection, evaluation_steps),
    )
    warn_if_fsdp_was_asked_for_but_is_off(trainer)
    seconds, tokens = run_trainer(trainer, resume_from)
    output_dir = run.trained_output(method.uses_lora)
    save_trained(trainer, output_dir, None if method.uses_lora else tokenizer)
    return TrainResult(
        model=trainer.model,
        output_dir=output_dir,
        log_history=list(trainer.state.log_history),
        train_tokens=tokens,
        seconds=seconds,
        steps=trainer.state.global_step,
        best_checkpoint=trainer.state.best_model_checkpoint,
        epochs=args.num_train_epochs,
        time_budget=budget_choice(trainer),
    )


def save_trained(trainer, output_dir: Path, tokenizer=None) -> None:
    """Save the trained adapter or model (and the tokenizer with a full model) into `output_dir`.

    Called on every rank: under FSDP (or ZeRO-3) the weights are sharded and gathering them is a collective that
    every process must join; the Trainer writes the files on the main process only. A sharded state-dict setting
    (what a checkpoint wants) would make `save_model` write nothing, so the final save asks for the full one.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output_dir))
    if tokenizer is not None and is_main_process():
        tokenizer.save_pretrained(output_dir)


def warn_if_fsdp_was_asked_for_but_is_off(trainer) -> None:
    """accelerate 1.15 runs an FSDP launch on CPU as plain data parallel (it switches to FSDP only on GPUs and
    other accelerators): say so rather than let a user believe the model is sharded."""
    import os

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled and is_main_process():
        console.print("[yellow]warning:[/] FSDP was asked for, but accelerate runs this launch as data parallel "
                      "(no sharding): FSDP needs GPUs (or other accelerators) with accelerate 1.15")


def refuse_examples_without_completion(dataset, max_length: int) -> None:
    """A row whose completion lies wholly past max_length teaches nothing; stop instead of training on nothing."""
    lost = [i for i, mask in enumerate(dataset["completion_mask"]) if sum(mask[:max_length]) == 0]
    if len(lost) == len(dataset):
        raise DataError(
            f"every training example loses its whole completion to truncation at max_length={max_length}",
            hint="raise training.max_length or shorten the prompts",
        )


def use_bf16_autocast(model) -> bool:
    """bf16 autocast where the weights are bf16 or the hardware runs bf16 fast (fp32 weights stay the master copy)."""
    import torch

    from specialist.models import bf16_is_fast

    return next(model.parameters()).dtype == torch.bfloat16 or bf16_is_fast()
