"""`method.kind: classifier`: LoRA with a sequence-classification head, trained with a class-weighted loss.

Why a head: tuned to *generate* a label, a small model on imbalanced (or even balanced) labelled data can learn to
answer the commonest label for nearly every row (one class for 298 of 300 issues, macro-F1 0.17). A head scores
every class at once from the prompt's last token, and a class-weighted cross-entropy makes a rare class cost as
much to miss as a common one.

- The head: built around the loaded causal LM's own decoder by `classify.classifier_from_causal` (transformers'
  `*ForSequenceClassification` for the architecture, else our `LastTokenClassifier`), trained as LoRA on the
  decoder plus the whole head (PEFT task SEQ_CLS keeps the head in `modules_to_save`, so the adapter folder
  carries it).
- Input: the run's PromptTemplate prompt, encoded and right-padded as `classify` answers it; target: the label's
  index in `labels.json`.
- Loss: cross-entropy weighted per class. `balanced` gives class c the weight n / (k * n_c) (scikit-learn's
  'balanced'): the weights average 1 over the training rows, so the loss stays on the scale of the unweighted one.
  Each row's weighted loss is summed and divided by the rows of the whole optimizer step, so cutting a batch into
  micro-batches (or across devices) does not change it.
- Saved: the adapter (with the head) in adapter/, and the label list with the head kind in labels.json.
- Answering (evaluation, serving) is `specialist.classify`'s: no stage imports another.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Trainer

from specialist.config import MethodConfig
from specialist.classify import (
    HeadSpec,
    LabelClassifier,
    classifier_from_causal,
    encode_input,
    save_labels,
    windowed_batch,
)
from specialist.data import Example, PromptTemplate
from specialist.errors import DataError
from specialist.ranks import is_main_process
from specialist.train.checkpoints import DurableCheckpoints
from specialist.train.common import TrainResult, common_arguments, forward_evaluation_steps
from specialist.train.job import TrainJob
from specialist.train.loop import callbacks, run_trainer, save_trained, trained_result, trains_packed, use_bf16_autocast
from specialist.train.select_by import SelectionRows


# -- the classes ------------------------------------------------------------------------------------------------
def class_labels(declared: Sequence[str] | None, examples: Sequence[Example]) -> list[str]:
    """The classes in head order: data.labels as declared, else the labels the rows carry (training and
    validation), sorted."""
    missing = [ex.line for ex in examples if ex.label is None]
    if missing:
        raise DataError(f"method.kind classifier needs a label on every row; rows at lines {missing[:5]} "
                        "have none", hint="use labelled data (data.shape: labelled, with data.text_column and "
                        "data.label_column)")
    labels = list(declared) if declared else sorted({ex.label for ex in examples})
    if len(labels) < 2:
        raise DataError(f"a classifier needs at least two classes; the training rows have {labels}",
                        hint="add rows of another class, or list the classes in data.labels")
    return labels


def class_weights(labels: Sequence[str], examples: Sequence[Example], mode: str) -> list[float]:
    """Per-class loss weights: 1 each (`none`), or n / (k * n_c) for the k classes present (`balanced`).

    A declared class without training rows gets weight 0: no row carries it, so its weight never enters the loss.
    """
    if mode == "none":
        return [1.0] * len(labels)
    counts = Counter(ex.label for ex in examples)
    present = [label for label in labels if counts[label]]
    n = sum(counts[label] for label in present)
    return [n / (len(present) * counts[label]) if counts[label] else 0.0 for label in labels]


# -- the model --------------------------------------------------------------------------------------------------
def classifier_lora_config(method: MethodConfig):
    """LoRA on the decoder; PEFT's SEQ_CLS task trains and saves the whole head (`score`) beside it."""
    from peft import LoraConfig

    return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                      target_modules=method.target_modules, use_dora=method.use_dora, use_rslora=method.use_rslora,
                      task_type="SEQ_CLS", modules_to_save=["score"])


def with_adapter(model, method: MethodConfig):
    from peft import get_peft_model

    # PEFT's all-linear would also wrap the head in LoRA; the head trains whole, so exclude it by name
    config = classifier_lora_config(method)
    config.exclude_modules = ["score"]
    return get_peft_model(model, config)


# -- the data ---------------------------------------------------------------------------------------------------
def encode_rows(examples: Sequence[Example], template: PromptTemplate, tokenizer, labels: list[str],
                max_length: int) -> list[dict[str, Any]]:
    """input_ids (the prompt, at most max_length tokens) and the label index of every row."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({ex.label for ex in examples} - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the classifier's classes {labels}",
                        hint="add them to data.labels, or remove data.labels to take the labels the rows have")
    return [{"input_ids": encode_input(template, tokenizer, ex.prompt, max_length), "labels": index[ex.label]}
            for ex in examples]


class PadCollator:
    """Right-pads a batch of encoded rows (ids, mask, label); with a window, each row is cut into windows and
    `window_row` says whose each is."""

    def __init__(self, pad_id: int, window: int | None = None) -> None:
        self.pad_id, self.window = pad_id, window

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = windowed_batch([r["input_ids"] for r in rows], self.pad_id, self.window)
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return batch


def weighted_loss(weights: list[float]) -> Callable:
    """The Trainer's compute_loss_func: each row's cross-entropy times its class weight, summed, divided by the
    rows of the optimizer step (`num_items_in_batch`; the batch's own rows in evaluation)."""
    table = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        total = (per_row * table.to(logits.device)[labels]).sum()
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    return loss


# -- training ---------------------------------------------------------------------------------------------------
class ClassifierTrainer(DurableCheckpoints, Trainer):
    """transformers' Trainer with checkpoints that survive a kill at any instant."""


def train_classifier(job: TrainJob) -> TrainResult:
    """Train the head and a LoRA adapter on the job's train rows (validating on its val rows); save adapter/ and
    labels.json."""
    from transformers import TrainingArguments

    method, training, run, tokenizer = job.method, job.training, job.run, job.tokenizer
    labels = class_labels(job.config.data.labels, [*job.train, *job.val])
    weights = class_weights(labels, job.train, method.class_weights)
    asked = HeadSpec.for_method(method)
    classifier, head = classifier_from_causal(job.model, len(labels), tokenizer.pad_token_id, asked.head,
                                              asked.pooling)
    spec = HeadSpec(head, asked.pooling, asked.window)
    classifier = with_adapter(classifier, method)
    train_rows = encode_rows(job.train, job.template, tokenizer, labels, training.max_length)
    val_rows = encode_rows(job.val, job.template, tokenizer, labels, training.max_length) if job.val else None
    args = TrainingArguments(**common_arguments(training, run.checkpoints, len(train_rows), bool(val_rows),
                                                use_bf16_autocast(classifier, training.bf16), tensorboard_dir=run.tensorboard),
                             remove_unused_columns=False)
    trainer = ClassifierTrainer(
        model=classifier, args=args, train_dataset=train_rows, eval_dataset=val_rows,
        data_collator=PadCollator(tokenizer.pad_token_id, spec.window), processing_class=tokenizer,
        compute_loss_func=weighted_loss(weights),
        callbacks=callbacks(training, run, args, selection_answers(job, labels, spec.window),
                            forward_evaluation_steps(training, len(val_rows)) if val_rows else 0.0))
    seconds, tokens = run_trainer(trainer, job.resume_from, trains_packed(training, classifier))
    save_trained(trainer, run.adapter)  # on every rank: under FSDP the gather is collective
    if is_main_process():
        save_labels(run, labels, spec, weights)
    return trained_result(trainer, run.adapter, seconds, tokens)


def selection_answers(job: TrainJob, labels: list[str], window: int | None = None) -> SelectionRows | None:
    """training.select_by's view of the classifier: each validation row's predicted label, rendered."""
    training = job.training
    if not training.select_by:
        return None
    template, tokenizer, label_template = job.template, job.tokenizer, job.config.data.label_template

    def answer(model, prompts: list[str]) -> list[str]:
        found = LabelClassifier(model, tokenizer, template, labels, max_length=training.max_length, window=window)
        return found.answers(prompts, label_template)

    return SelectionRows.of(training.select_by, job.config.evaluation, job.val, answer)


__all__ = ["class_labels", "class_weights", "train_classifier"]
