"""Supervised methods through TRL's SFTTrainer: lora (and DoRA/rsLoRA), full, qlora, continued_pretraining.

The dataset is tokenized here with the run's PromptTemplate (so training and evaluation share one format) and
handed to SFTTrainer already processed: it builds the labels from `completion_mask`, which puts -100 on every
prompt position when `completion_only_loss` is on. Continued pretraining has no prompt: every token is a label
and rows are concatenated and cut into `block_size` blocks.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from specialist.config import TrainingConfig
from specialist.data import Example, PromptTemplate, encode_for_training, training_pairs
from specialist.errors import DataError
from specialist.train.common import TrainResult, common_arguments, lora_config
from specialist.train.job import TrainJob
from specialist.train.loop import fit, use_bf16_autocast
from specialist.train.row_attention import attending_by_rows
from specialist.train.select_by import SelectionRows, generated_answers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def build_dataset(examples: list[Example], template: PromptTemplate | None, tokenizer: PreTrainedTokenizerBase,
                  max_length: int | None = None):
    """A `datasets.Dataset` of input_ids + completion_mask, ready for SFTTrainer (which skips its own tokenizing).

    `template=None` means plain text: the whole row is the completion, so every token is trained on. `max_length`
    cuts each row's end, as SFTTrainer does for padded rows (padding-free rows are cut here, since it does not).
    """
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # SFTTrainer's map/filter passes take milliseconds here; their bars are noise
    if template is None:
        rows = [_encode_text(tokenizer, ex.completion) for ex in examples]
    else:
        # a multi-turn chat row gives one sequence per learned assistant turn (data.train_on: all)
        rows = [encode_for_training(template, tokenizer, prompt, completion, ex.shots)
                for ex in examples for prompt, completion in training_pairs(ex)]
    if max_length is not None:
        rows = [{key: ids[:max_length] for key, ids in row.items()} for row in rows]
    return Dataset.from_list(rows)


def _encode_text(tokenizer, text: str) -> dict[str, list[int]]:
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=True)["input_ids"]
    return {"input_ids": ids, "completion_mask": [1] * len(ids)}


def sft_config(training: TrainingConfig, output_dir: Path, n_train: int, bf16: bool, has_val: bool,
               plain_text: bool = False, tensorboard_dir: Path | None = None):
    from trl import SFTConfig

    free = trains_padding_free(training, plain_text)
    return SFTConfig(
        **common_arguments(training, output_dir, n_train, has_val, bf16,
                           sequence_length=training.block_size if plain_text else training.max_length,
                           tensorboard_dir=tensorboard_dir),
        # padding-free rows are cut to max_length by build_dataset (TRL refuses a max_length it would not enforce)
        max_length=training.block_size if plain_text else None if free else training.max_length,
        completion_only_loss=False if plain_text else training.completion_only_loss,
        # Plain text is concatenated and cut into full blocks, the classic pretraining layout.
        packing=plain_text,
        packing_strategy="wrapped",
        padding_free=free,
    )


def trains_padding_free(training: TrainingConfig, plain_text: bool = False) -> bool:
    """training.padding_free resolved: auto is on where there is no CUDA device; never for packed plain text."""
    if plain_text:
        return False
    if training.padding_free == "auto":
        import torch

        return not torch.cuda.is_available()
    return bool(training.padding_free)


def train_sft(job: TrainJob) -> TrainResult:
    """Fine-tune on the job's train rows, validating on its val rows; save the adapter (or the full model) into the
    run folder."""
    from specialist.train.fast_loss import CompletionOnlySFTTrainer

    training, tokenizer = job.training, job.tokenizer
    plain_text = job.method.kind == "continued_pretraining"
    data_template = None if plain_text else job.template
    cut = training.max_length if trains_padding_free(training, plain_text) else None
    train_ds = build_dataset(job.train, data_template, tokenizer, cut)
    val_ds = build_dataset(job.val, data_template, tokenizer, cut) if job.val else None
    if not plain_text:
        refuse_examples_without_completion(train_ds, training.max_length)
    args = sft_config(training, job.run.checkpoints, len(train_ds), bf16=use_bf16_autocast(job.model, training.bf16),
                      has_val=val_ds is not None, plain_text=plain_text, tensorboard_dir=job.run.tensorboard)
    with attending_by_rows(job.model) if args.padding_free else nullcontext():
        return fit(job, CompletionOnlySFTTrainer, args, train_ds, val_ds, selection_rows(job))


def selection_rows(job: TrainJob) -> SelectionRows | None:
    """training.select_by's rows for a generative method: the best checkpoint by a scorer on generated validation
    answers (the config refuses it for continued pretraining)."""
    if not job.training.select_by:
        return None
    evaluation = job.config.evaluation
    shots_of = {ex.prompt: list(ex.shots) for ex in job.val if ex.shots}
    return SelectionRows.of(job.training.select_by, evaluation, job.val,
                            generated_answers(job.template, job.tokenizer, job.train, evaluation, shots_of))


def refuse_examples_without_completion(dataset, max_length: int) -> None:
    """A row whose completion lies wholly past max_length teaches nothing; stop instead of training on nothing."""
    lost = [i for i, mask in enumerate(dataset["completion_mask"]) if sum(mask[:max_length]) == 0]
    if len(lost) == len(dataset):
        raise DataError(
            f"every training example loses its whole completion to truncation at max_length={max_length}",
            hint="raise training.max_length or shorten the prompts",
        )


__all__ = ["build_dataset", "lora_config", "sft_config", "train_sft", "use_bf16_autocast"]
