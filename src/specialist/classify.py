"""A classifier run answering: the sequence-classification head around a causal LM, its label file, and the
classifier behind the generation engine's interface, so evaluation, the artifact loader and `serve` answer with
a classifier run as they do with any other model (training it is train/classifier.py's job).

- The head: transformers' `*ForSequenceClassification` for the base model's architecture, built around the loaded
  causal LM's own decoder (nothing is loaded twice); where transformers has none, `LastTokenClassifier`, a linear
  layer on the last real token's hidden state. Training and loading build it the same way (`classifier_from_causal`).
- Input: the run's PromptTemplate prompt (instruction and input), right-padded, so every real token keeps the
  position it has unpadded and the head reads the last non-pad token.
- Saved beside the adapter: the label list with the head kind, in labels.json (`save_labels`, `read_labels`).
- Answering: `LabelClassifier` gives each prompt's class probabilities (softmax of the head); evaluation writes the
  most probable label through data.label_template, so label accuracy, macro-F1 and the confusion matrix read it
  as they read a generated answer. `ClassifierEngine` answers requests as the generation engine does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from specialist.core.labels import render_label
from specialist.data import PromptTemplate
from specialist.errors import ConfigError
from specialist.run_folder import RunFolder, read_json, write_json

if TYPE_CHECKING:
    import numpy as np

HEADS = ("transformers", "last_token", "pooled")
POOLINGS = ("last", "mean")


# -- the head ---------------------------------------------------------------------------------------------------
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
        hidden = self.hidden_states(input_ids, attention_mask)
        return SequenceClassifierOutput(logits=self.score(hidden[torch.arange(hidden.shape[0]),
                                                                 last_real_token(attention_mask)]))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states, [rows, tokens, hidden]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        return hidden if hidden is not None else out.hidden_states[-1]

    def activation_checkpointing_enable(self, **kwargs) -> None:
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        (enable or self.model.gradient_checkpointing_enable)(**kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's rightmost real token (by the mask), whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


class PooledClassifier(LastTokenClassifier):
    """A linear head on each input's pooled hidden states, where an input may be read as several windows.

    Why: a bug report of 2,000 tokens cut to a 256-token window loses most of the words a TF-IDF model reads;
    attention over the whole report costs its length squared. Each window is read on its own (`window_row` says
    which input a window belongs to) and the windows' states are pooled: `mean` averages every real token's state
    over all the input's windows (a window counts by its length), `last` averages the windows' last-token states.
    """

    def __init__(self, backbone: torch.nn.Module, config, num_labels: int, pooling: str = "mean") -> None:
        super().__init__(backbone, config, num_labels)
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.pooling = pooling

    def forward(self, input_ids=None, attention_mask=None, labels=None, window_row=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask)
        sums, weights = self._window_sums(hidden, attention_mask)
        if window_row is None:
            window_row = torch.arange(hidden.shape[0], device=hidden.device)
        inputs = int(window_row.max()) + 1
        pooled = sums.new_zeros((inputs, sums.shape[1])).index_add_(0, window_row, sums)
        counts = weights.new_zeros(inputs).index_add_(0, window_row, weights)
        return SequenceClassifierOutput(logits=self.score(pooled / counts.clamp(min=1)[:, None]))

    def _window_sums(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per window: the summed states to pool and how much the window weighs."""
        if self.pooling == "mean":
            mask = attention_mask.to(hidden.dtype)
            return (hidden * mask[..., None]).sum(1), mask.sum(1)
        last = hidden[torch.arange(hidden.shape[0]), last_real_token(attention_mask)]
        return last, torch.ones(hidden.shape[0], dtype=hidden.dtype, device=hidden.device)


def sequence_classification_class(config) -> type | None:
    """transformers' `*ForSequenceClassification` class for this architecture, or None where it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        return None


def classifier_from_causal(causal, num_labels: int, pad_token_id: int, head: str = "auto",
                           pooling: str = "mean") -> tuple[Any, str]:
    """(classifier, head kind) around `causal`'s decoder (shared, not copied) with a new `num_labels` head.

    `head`: transformers (its class for the architecture), last_token (ours), pooled (ours, over windows, by
    `pooling`), or auto: transformers' where the architecture has one whose decoder is the causal LM's, else
    last_token.
    """
    config = copy.deepcopy(causal.config)
    config.num_labels = num_labels
    config.get_text_config().pad_token_id = config.pad_token_id = pad_token_id
    backbone = causal.base_model
    if head == "pooled":
        model = PooledClassifier(backbone, config, num_labels, pooling)
        _init_head(model.score, config)
        return model, head
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


# -- the input --------------------------------------------------------------------------------------------------
def encode_input(template: PromptTemplate, tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """The prompt's ids; over max_length, the input is shortened where the run truncates, else its end is kept
    (the prompt format's closing tokens, which the head reads from, sit there)."""
    ids = template.encode_prompt(text, tokenizer, budget=max_length if template.truncates else None)
    return ids[-max_length:] if max_length and len(ids) > max_length else ids


def windows_of(ids: list[int], window: int | None) -> list[list[int]]:
    """`ids` cut into consecutive windows of `window` tokens (the last may be shorter); one window when None."""
    if not window or len(ids) <= window:
        return [ids]
    return [ids[start:start + window] for start in range(0, len(ids), window)]


def windowed_batch(rows: list[list[int]], pad_id: int, window: int | None) -> dict[str, torch.Tensor]:
    """The model inputs for `rows`: every row's windows right-padded, and which row each window belongs to."""
    windows, owner = [], []
    for n, row in enumerate(rows):
        for piece in windows_of(row, window):
            windows.append(piece)
            owner.append(n)
    input_ids, attention_mask = right_pad(windows, pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if len(windows) != len(rows):
        batch["window_row"] = torch.tensor(owner, dtype=torch.long)
    return batch


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        input_ids[n, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[n, :len(row)] = 1
    return input_ids, attention_mask


# -- the label file ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    """What a classifier run's head is: its kind, how it pools, and the window it reads inputs in (None: whole)."""

    head: str
    pooling: str = "last"
    window: int | None = None

    @classmethod
    def for_method(cls, method) -> HeadSpec:
        """The head method.pooling and method.window ask for: ours, pooled, when either departs from the default;
        else whichever `classifier_from_causal` picks."""
        if method.pooling == "last" and method.window is None:
            return cls("auto")
        return cls("pooled", method.pooling, method.window)


def save_labels(run: RunFolder, labels: list[str], spec: HeadSpec, weights: list[float]) -> None:
    write_json(run.labels_file, {"labels": labels, "head": spec.head, "pooling": spec.pooling,
                                 "window": spec.window, "class_weights": weights})


def read_labels(run: RunFolder) -> tuple[list[str], HeadSpec]:
    """(classes in head order, the head) of a classifier run; ConfigError when labels.json is not usable. A file
    written before pooling and windows existed reads as last-token pooling over one window."""
    try:
        saved = read_json(run.labels_file)
        labels, spec = saved["labels"], HeadSpec(saved["head"], saved.get("pooling", "last"), saved.get("window"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{run.labels_file} is not a classifier's label file ({type(exc).__name__}: {exc})",
                          hint="train the run again") from exc
    window_ok = spec.window is None or (type(spec.window) is int and spec.window > 0)
    if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels)
            or spec.head not in HEADS or spec.pooling not in POOLINGS or not window_ok):
        raise ConfigError(f"{run.labels_file}: expected at least two string labels, a head in {HEADS}, a pooling "
                          f"in {POOLINGS} and a positive window or null", hint="train the run again")
    return labels, spec


# -- answering --------------------------------------------------------------------------------------------------
class LabelClassifier:
    """A trained classifier answering prompts: class probabilities per prompt, or the most probable label."""

    def __init__(self, model, tokenizer, template: PromptTemplate, labels: list[str], max_length: int | None = None,
                 context: Callable = nullcontext, window: int | None = None) -> None:
        self.model, self.tokenizer, self.template, self.labels = model, tokenizer, template, labels
        self.max_length, self.context, self.window = max_length, context, window

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
        from specialist.onednn import packed_linears

        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        found = np.zeros((len(encoded), len(self.labels)), dtype=np.float64)
        progress = GenerationProgress(label, len(encoded), counted="read") if label else nullcontext()
        with progress, self.context(), torch.inference_mode(), packed_linears(self.model):
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                found[batch] = self._batch([encoded[i] for i in batch])
                if label:
                    progress.advance(len(batch), 0)
        return found

    def _batch(self, rows: list[list[int]]):
        device = next(self.model.parameters()).device
        batch = windowed_batch(rows, self.tokenizer.pad_token_id, self.window)
        logits = self.model(**{key: value.to(device) for key, value in batch.items()}).logits
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
    labels, spec = read_labels(run)
    if not run.has_adapter:
        raise ConfigError(f"{run.path} holds no trained classifier (no {run.adapter.name}/)", hint="train it first")
    causal, tokenizer = load_model_and_tokenizer(config.model.name, dtype)
    model, _ = classifier_from_causal(causal, len(labels), tokenizer.pad_token_id, spec.head, spec.pooling)
    model = PeftModel.from_pretrained(model, run.adapter).eval()
    return LabelClassifier(model, tokenizer, run.template(), labels, max_length=config.training.max_length,
                           window=spec.window)


def classifier_engine(run: RunFolder, dtype: str = "auto") -> ClassifierEngine:
    """A classifier run ready to serve: its labels written through the run's data.label_template."""
    return ClassifierEngine(load_classifier(run, dtype), run.config().data.label_template)


__all__ = ["ClassifierEngine", "HeadSpec", "LabelClassifier", "PooledClassifier", "classifier_engine", "classifier_from_causal", "load_classifier",
           "read_labels", "save_labels"]
