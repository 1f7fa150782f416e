"""Logits only where there are labels.

With completion-only loss most positions carry label -100, yet a plain forward projects every position onto the
vocabulary (262,144 columns for Gemma 3), which is most of the model's compute. Here a forward pre-hook on the
output embedding keeps only the positions whose next token is a label, so the LM head, the softmax and their
backward run on those rows alone. The forward still goes through the (possibly DDP/PEFT-wrapped) model, so
gradient synchronisation and adapters work as usual.

Measured on 2 CPU cores, Gemma 3 270M + LoRA r=16, batch 8 x 130 tokens, 40 completion tokens a row:
4.2 s per forward+backward against 9-16 s for the full-logits forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from trl import SFTTrainer

IGNORE_INDEX = -100


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions whose logits predict a label, those labels in row-major order)."""
    next_labels = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = next_labels != IGNORE_INDEX
    return keep, next_labels[next_labels != IGNORE_INDEX]


@contextmanager
def project_only(head: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, `head` sees hidden states of the kept positions only: (batch, seq, d) -> (kept, d)."""

    def select(_module, args):
        hidden = args[0]
        # transformers may already have sliced to the last positions (logits_to_keep); only a full sequence matches.
        if hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"hidden states {tuple(hidden.shape)} do not match the label mask {tuple(keep.shape)}")
        return (hidden[keep],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def completion_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items: torch.Tensor | int | None):
    """Summed next-token cross-entropy over labelled positions, divided by `num_items` (or by their count)."""
    labels = inputs["labels"]
    keep, targets = label_positions(labels)
    head = _unwrap(model).get_output_embeddings()
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with project_only(head, keep):
        logits = model(**forward_inputs, use_cache=False).logits
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    denominator = num_items if num_items is not None else targets.numel()
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CompletionOnlySFTTrainer(SFTTrainer):
    """SFTTrainer whose loss projects only labelled positions onto the vocabulary.

    Trade-off: TRL's per-token entropy and accuracy diagnostics (full-vocabulary work on every step) are not
    computed; loss, validation loss and everything else the Trainer does are unchanged.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = completion_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss
