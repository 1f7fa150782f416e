"""`method.kind: classifier`: LoRA with a sequence-classification head, trained with a class-weighted loss.

Why a head: tuned to *generate* a label, a small model on imbalanced (or even balanced) labelled data can learn to
answer the commonest label for nearly every row (one class for 298 of 300 issues, macro-F1 0.17). A head scores
every class at once from the prompt's last token, and a class-weighted cross-entropy makes a rare class cost as
much to miss as a common one.

- The head: transformers' `*ForSequenceClassification` for the base model's architecture, built around the loaded
  causal LM's own decoder (nothing is loaded twice); where transformers has none, `LastTokenClassifier`, a linear
  layer on the last real token's hidden state. Either is trained as LoRA on the decoder plus the whole head (PEFT
  task SEQ_CLS keeps the head in `modules_to_save`, so the adapter folder carries it).
- Input: the run's PromptTemplate prompt (instruction and input), right-padded, so every real token keeps the
  position it has unpadded and the head reads the last non-pad token; target: the label's index in `labels.json`.
- Loss: cross-entropy weighted per class. `balanced` gives class c the weight n / (k * n_c) (scikit-learn's
  'balanced'): the weights average 1 over the training rows, so the loss stays on the scale of the unweighted one.
  Each row's weighted loss is summed and divided by the rows of the whole optimizer step, so cutting a batch into
  micro-batches (or across devices) does not change it.
- Saved: the adapter (with the head) in adapter/, and the label list with the head kind in labels.json.
- Answering: `LabelClassifier` gives each prompt's class probabilities (softmax of the head); evaluation writes the
  most probable label through data.label_template, so label accuracy, macro-F1 and the confusion matrix read it
  as they read a generated answer.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from specialist.config import MethodConfig, TrainingConfig
from specialist.core.labels import render_label
from specialist.data import Example, PromptTemplate
from specialist.errors import ConfigError, DataError
from specialist.ranks import is_main_process
from specialist.run_folder import RunFolder, read_json, write_json
from specialist.train.checkpoints import DurableCheckpoints
from specialist.train.common import (
    TrainResult,
    budget_choice,
    callbacks,
    common_arguments,
    forward_evaluation_steps,
    run_trainer,
)

if TYPE_CHECKING:
    import numpy as np

HEADS = ("transformers", "last_token")


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
class LastTokenClassifier(torch.nn.Module):
    """A linear head on the hidden state of each row's last real token (by the attention mask), for architectures
    transformers has no `*ForSequenceClassification` for. Forward answers like transformers' heads (`.logits`)."""

    def __init__(self, backbone: torch.nn.Module, config, num_labels: int) -> None:
        super().__init__()
        self.model, self.config = backbone, config
        hidden = config.get_text_config().hidden_size
        self.score = torch.nn.Linear(hidden, num_labels, bias=False, dtype=next(backbone.parameters()).dtype)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = hidden if hidden is not None else out.hidden_states[-1]
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask.to(positions.dtype)).argmax(-1)  # the rightmost real token, either padding
        return SequenceClassifierOutput(logits=self.score(hidden[torch.arange(hidden.shape[0]), last]))

    def activation_checkpointing_enable(self, **kwargs) -> None:
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        (enable or self.model.gradient_checkpointing_enable)(**kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()


def sequence_classification_class(config) -> type | None:
    """transformers' `*ForSequenceClassification` class for this architecture, or None where it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        return None


def classifier_from_causal(causal, num_labels: int, pad_token_id: int, head: str = "auto") -> tuple[Any, str]:
    """(classifier, head kind) around `causal`'s decoder (shared, not copied) with a new `num_labels` head.

    `head`: transformers (its class for the architecture), last_token (ours), or auto: transformers' where the
    architecture has one whose decoder is the causal LM's, else ours.
    """
    config = copy.deepcopy(causal.config)
    config.num_labels = num_labels
    config.get_text_config().pad_token_id = config.pad_token_id = pad_token_id
    backbone = causal.base_model
    if head in ("auto", "transformers"):
        model = _transformers_head(config, backbone, num_labels)
        if model is not None:
            return model, "transformers"
        if head == "transformers":
            raise ConfigError(f"transformers has no sequence-classification head for {type(causal).__name__} "
                              "that fits its decoder", hint="let the classifier use its own last-token head")
    model = LastTokenClassifier(backbone, config, num_labels)
    _init_head(model.score, config)
    return model, "last_token"


def _transformers_head(config, backbone, num_labels: int):
    """transformers' classifier built empty (on the meta device), its decoder replaced by `backbone`; None when the
    architecture has no such class or its decoder is not the causal LM's."""
    cls = sequence_classification_class(config)
    if cls is None or backbone is None:
        return None
    with torch.device("meta"):
        model = cls(config)
    prefix = model.base_model_prefix
    if type(getattr(model, prefix, None)) is not type(backbone):
        return None
    setattr(model, prefix, backbone)
    model.score = torch.nn.Linear(config.get_text_config().hidden_size, num_labels, bias=False,
                                  dtype=next(backbone.parameters()).dtype)
    _init_head(model.score, config)
    if any(p.is_meta for p in model.parameters()):
        return None  # a part the causal LM does not have (a vision tower, say): ours reads the decoder alone
    return model


def _init_head(layer: torch.nn.Linear, config) -> None:
    std = getattr(config.get_text_config(), "initializer_range", 0.02)
    torch.nn.init.normal_(layer.weight, mean=0.0, std=std)


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


def encode_input(template: PromptTemplate, tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """The prompt's ids; over max_length, the input is shortened where the run truncates, else its end is kept
    (the prompt format's closing tokens, which the head reads from, sit there)."""
    ids = template.encode_prompt(text, tokenizer, budget=max_length if template.truncates else None)
    return ids[-max_length:] if max_length and len(ids) > max_length else ids


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        input_ids[n, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[n, :len(row)] = 1
    return input_ids, attention_mask


class PadCollator:
    """Right-pads a batch of encoded rows (ids, mask, label)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = right_pad([r["input_ids"] for r in rows], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long)}


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


def train_classifier(model, tokenizer, template: PromptTemplate, train: list[Example], val: list[Example],
                     method: MethodConfig, training: TrainingConfig, run: RunFolder,
                     resume_from: Path | None = None) -> TrainResult:
    """Train the head and a LoRA adapter on `train` (validating on `val`); save adapter/ and labels.json."""
    from transformers import TrainingArguments

    labels = class_labels(run.config().data.labels, [*train, *val])
    weights = class_weights(labels, train, method.class_weights)
    classifier, head = classifier_from_causal(model, len(labels), tokenizer.pad_token_id)
    classifier = with_adapter(classifier, method)
    train_rows = encode_rows(train, template, tokenizer, labels, training.max_length)
    val_rows = encode_rows(val, template, tokenizer, labels, training.max_length) if val else None
    args = TrainingArguments(**common_arguments(training, run.checkpoints, len(train_rows), bool(val_rows),
                                                _bf16(classifier), tensorboard_dir=run.tensorboard),
                             remove_unused_columns=False)
    trainer = ClassifierTrainer(
        model=classifier, args=args, train_dataset=train_rows, eval_dataset=val_rows,
        data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        compute_loss_func=weighted_loss(weights),
        callbacks=callbacks(training, run.metrics_log, args,
                            selection_answers(template, tokenizer, labels, val, training, run),
                            forward_evaluation_steps(training, len(val_rows)) if val_rows else 0.0))
    seconds, tokens = run_trainer(trainer, resume_from)
    save_trained(trainer, run.adapter)  # on every rank: under FSDP the gather is collective
    if is_main_process():
        save_labels(run, labels, head, weights)
    return TrainResult(model=trainer.model, output_dir=run.adapter, log_history=list(trainer.state.log_history),
                       train_tokens=tokens, seconds=seconds, steps=trainer.state.global_step,
                       best_checkpoint=trainer.state.best_model_checkpoint, epochs=args.num_train_epochs,
                       time_budget=budget_choice(trainer))


def _bf16(model) -> bool:
    from specialist.train.sft import use_bf16_autocast

    return use_bf16_autocast(model)


def save_trained(trainer, output_dir: Path) -> None:
    from specialist.train.sft import save_trained as save_as_sft_does

    save_as_sft_does(trainer, output_dir)


def selection_answers(template: PromptTemplate, tokenizer, labels: list[str], val: list[Example],
                      training: TrainingConfig, run: RunFolder):
    """training.select_by's view of the classifier: each validation row's predicted label, rendered."""
    if not training.select_by:
        return None
    from specialist.train.common import SelectionRows

    label_template = run.config().data.label_template

    def answer(model, prompts: list[str]) -> list[str]:
        found = LabelClassifier(model, tokenizer, template, labels, max_length=training.max_length)
        return found.answers(prompts, label_template)

    return SelectionRows.of(training.select_by, run, val, answer)


def save_labels(run: RunFolder, labels: list[str], head: str, weights: list[float]) -> None:
    write_json(run.labels_file, {"labels": labels, "head": head, "class_weights": weights})


def read_labels(run: RunFolder) -> tuple[list[str], str]:
    """(classes in head order, head kind) of a classifier run; ConfigError when labels.json is not usable."""
    try:
        saved = read_json(run.labels_file)
        labels, head = saved["labels"], saved["head"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{run.labels_file} is not a classifier's label file ({type(exc).__name__}: {exc})",
                          hint="train the run again") from exc
    if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels)
            or head not in HEADS):
        raise ConfigError(f"{run.labels_file}: expected at least two string labels and a head in {HEADS}",
                          hint="train the run again")
    return labels, head


# -- answering --------------------------------------------------------------------------------------------------
class LabelClassifier:
    """A trained classifier answering prompts: class probabilities per prompt, or the most probable label."""

    def __init__(self, model, tokenizer, template: PromptTemplate, labels: list[str], max_length: int | None = None,
                 context: Callable = nullcontext) -> None:
        self.model, self.tokenizer, self.template, self.labels = model, tokenizer, template, labels
        self.max_length, self.context = max_length, context

    def probabilities(self, prompts: Sequence[str], batch_size: int = 16, label: str = "classifying") -> np.ndarray:
        """[rows, classes] softmax of the head, rows in input order; batched by length, right-padded."""
        return self.probabilities_of_ids([self.encode(p) for p in prompts], batch_size, label)

    def encode(self, prompt: str) -> list[int]:
        return encode_input(self.template, self.tokenizer, prompt, self.max_length)

    def probabilities_of_ids(self, encoded: list[list[int]], batch_size: int = 16,
                             label: str | None = "classifying") -> np.ndarray:
        """[rows, classes] for prompts already encoded (`encode`); `label` names the progress line (None: none,
        as a server answering request after request wants)."""
        import numpy as np

        from specialist.generation import GenerationProgress

        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        found = np.zeros((len(encoded), len(self.labels)), dtype=np.float64)
        progress = GenerationProgress(label, len(encoded), counted="read") if label else nullcontext()
        with progress, self.context(), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                found[batch] = self._batch([encoded[i] for i in batch])
                if label:
                    progress.advance(len(batch), 0)
        return found

    def _batch(self, rows: list[list[int]]):
        input_ids, attention_mask = right_pad(rows, self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def answers(self, prompts: Sequence[str], label_template: str, batch_size: int = 16) -> list[str]:
        """The most probable label of each prompt, written through `label_template`."""
        probabilities = self.probabilities(prompts, batch_size)
        return [render_label(self.labels[i], label_template) for i in probabilities.argmax(axis=1)]


class ClassifierEngine:
    """A classifier behind the generation engine's interface, for `serve`: each request is answered at once with
    its most probable label written through data.label_template (finish reason "stop"), and every class's
    probability in `Generation.probabilities`. Sampling settings and token limits do not apply: the answer is the
    head's argmax, the same for every caller, as in evaluation. A streaming caller gets the whole label as one
    piece."""

    def __init__(self, classifier: LabelClassifier, label_template: str) -> None:
        from specialist.generation import model_lock

        self.classifier, self.label_template = classifier, label_template
        self.model, self.tokenizer, self.template = classifier.model, classifier.tokenizer, classifier.template
        self.context, self.constraint = nullcontext, None
        self.stop_ids: set[int] = set()
        self.stop_strings: tuple[str, ...] = ()
        self.lock = model_lock(self.model)
        self.busy = False

    def encode(self, text: str, shots: Sequence[tuple[str, str]] = (), max_new_tokens: int | None = None) -> list[int]:
        return self.classifier.encode(text)

    def run(self, requests: list, sampling=None) -> list:
        """Every request's label and probabilities, as one batch."""
        with self.lock:
            self.busy = True
            try:
                found = self.classifier.probabilities_of_ids([r.prompt_ids for r in requests], max(1, len(requests)),
                                                             label=None)
            finally:
                self.busy = False
        return [self._generation(request, row) for request, row in zip(requests, found)]

    def _generation(self, request, row):
        from specialist.generation import Generation

        text = render_label(self.classifier.labels[int(row.argmax())], self.label_template)
        if request.on_text is not None:
            request.on_text(text)
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Generation(text, len(request.prompt_ids), tokens, "stop",
                          probabilities={label: float(p) for label, p in zip(self.classifier.labels, row)})

    def answer(self, text: str, max_new_tokens: int = 0, sampling=None):
        from specialist.generation import Request

        return self.run([Request(self.encode(text), max_new_tokens)])[0]


def load_classifier(run: RunFolder, dtype: str = "auto") -> LabelClassifier:
    """A classifier run's model: its own copy of the base (LoRA is woven into the decoder, so it cannot share the
    copy the base arms answer with), the head and adapter from adapter/, the classes from labels.json."""
    from peft import PeftModel

    from specialist.models import load_model_and_tokenizer

    config = run.config()
    labels, head = read_labels(run)
    if not run.has_adapter:
        raise ConfigError(f"{run.path} holds no trained classifier (no {run.adapter.name}/)", hint="train it first")
    causal, tokenizer = load_model_and_tokenizer(config.model.name, dtype)
    model, _ = classifier_from_causal(causal, len(labels), tokenizer.pad_token_id, head)
    model = PeftModel.from_pretrained(model, run.adapter).eval()
    return LabelClassifier(model, tokenizer, run.template(), labels, max_length=config.training.max_length)


def classifier_engine(run: RunFolder, dtype: str = "auto") -> ClassifierEngine:
    """A classifier run ready to serve: its labels written through the run's data.label_template."""
    return ClassifierEngine(load_classifier(run, dtype), run.config().data.label_template)


__all__ = ["ClassifierEngine", "LabelClassifier", "class_labels", "class_weights", "classifier_engine",
           "classifier_from_causal", "load_classifier", "read_labels", "train_classifier"]
