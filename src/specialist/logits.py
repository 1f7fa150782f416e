"""Logits only where there are labels, and never all of them at once.

With completion-only loss most positions carry label -100, yet a plain forward projects every position onto the
vocabulary (262,144 columns for Gemma 3), which is most of the model's compute. Here a forward pre-hook on the
output embedding keeps only the positions whose next token is a label, so the LM head, the softmax and their
backward run on those rows alone. The forward still goes through the (possibly DDP/PEFT-wrapped) model, so
gradient synchronisation and adapters work as usual.

Where the head is a plain linear layer and the model applies nothing after it (no logit soft-capping), the hook
goes one step further: it captures the kept hidden states and hands the head zero rows, and the loss is computed
by `chunked_head_cross_entropy`, which projects `chunk_rows` positions at a time and computes each chunk's
gradient in the same pass (the fused linear cross-entropy of Liger/Apple's Cut Cross-Entropy, in plain torch).
The (positions x vocabulary) logits tensor is never materialised: about 1 MiB per position saved for Gemma 3.

Training (train/fast_loss.py's trainer) and the forgetting measure (evaluate/forgetting.py's perplexity) both
project this way, so it lives outside either stage.

Measured on 2 CPU cores, Gemma 3 270M + LoRA r=16, batch 8 x 130 tokens, 40 completion tokens a row:
4.2 s per forward+backward against 9-16 s for the full-logits forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from specialist.onednn import head_product

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


@contextmanager
def capture_instead(head: torch.nn.Module, keep: torch.Tensor, captured: list[torch.Tensor]) -> Iterator[None]:
    """While active, `head`'s kept hidden states go to `captured` and the head itself projects zero rows."""

    def select(_module, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"hidden states {tuple(hidden.shape)} do not match the label mask {tuple(keep.shape)}")
        kept = hidden[keep]
        captured.append(kept)
        return (kept[:0],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)) computed `chunk` rows at a time.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits exist; backward
    only scales them. Memory: one chunk of logits plus the (rows x hidden) gradient, instead of rows x vocab.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        needs_hidden, needs_weight = hidden.requires_grad, weight.requires_grad
        needs_bias = bias is not None and bias.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, t = hidden[rows], targets[rows]
            logits = head_product(h, weight, bias).float()
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d loss / d logits = softmax - onehot, built in place over the chunk's logits
            probs = logits.sub_(log_z[:, None]).exp_()
            probs[torch.arange(t.numel(), device=t.device), t] -= 1
            probs = probs.to(hidden.dtype)
            if grad_hidden is not None:
                # torch's product: over the vocabulary it was as fast as a packed transpose (a LoRA step of Gemma 3
                # 270M, 7 rows: 2.59 s against 2.62 s, 2 cores) that would hold 640 MiB more
                grad_hidden[rows] = probs @ weight
            if grad_weight is not None:
                grad_weight += (probs.t() @ h).float()
            if grad_bias is not None:
                grad_bias += probs.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.to(torch.float32)
        return (
            grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None,
            (grad_bias * scale).to(ctx.weight_dtype) if grad_bias is not None else None,
            None,
            None,
        )


def chunked_head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                               chunk: int = 256) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets` without the full logits tensor."""
    return _ChunkedHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)


def head_can_be_chunked(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    """A plain Linear head with nothing applied to its logits (Gemma 2's soft-capping would be skipped)."""
    config = getattr(model, "config", None)
    return type(head) is torch.nn.Linear and not getattr(config, "final_logit_softcapping", None)


def completion_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items: torch.Tensor | int | None,
                    chunk_rows: int | None = 256):
    """Summed next-token cross-entropy over labelled positions, divided by `num_items` (or by their count).

    `chunk_rows=None` keeps the (labelled positions x vocabulary) logits whole (the plain, reference-like path).
    """
    labels = inputs["labels"]
    keep, targets = label_positions(labels)
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if chunk_rows is not None and head_can_be_chunked(inner, head):
        captured: list[torch.Tensor] = []
        with capture_instead(head, keep, captured):
            model(**forward_inputs, use_cache=False)
        total = chunked_head_cross_entropy(captured[0], head, targets, chunk_rows)
    else:
        with project_only(head, keep):
            logits = model(**forward_inputs, use_cache=False).logits
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
    denominator = num_items if num_items is not None else targets.numel()
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model
