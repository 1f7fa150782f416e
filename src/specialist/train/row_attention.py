"""Attention over padding-free rows at the cost of the rows alone.

Padding-free training (TRL's `padding_free`) lays a micro-batch's rows end to end as one sequence, so no pad token
goes through the model's matmuls. transformers then attends with one mask over the whole sequence (rows kept apart
by their restarting position ids), and torch's CPU attention kernel computes every entry of that mask: four rows of
150 tokens cost the attention of one 600-token row, 4x the attention of the rows themselves. Measured on 2 cores
(Gemma 3 270M + LoRA, four demo rows a micro-batch; bench/padding_free.py): padding-free cut the matmuls' time by
18% but doubled attention's, and a step ran at 0.98x-1.07x the padded one's speed over three measures; attending
row by row, at 1.12x-1.15x.

`rows_attention` is the varlen attention flash-attention gives GPUs, in plain torch: given the row boundaries the
padding-free collator already sends (`cu_seq_lens_q`), it runs sdpa once per row, causal, so each row costs what it
would cost alone. Every other call (generation, padded batches, a cache) goes to transformers' own sdpa unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "specialist_rows"


def rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs):
    """sdpa per row of a padding-free sequence (batch 1, no cache, causal); anything else goes to sdpa as is.
    `kwargs` are what the model passes every attention function (dropout, scaling, sliding_window, the collator's
    cu_seq_lens_q, ...). Returns (batch, tokens, heads, head_dim) like every transformers attention function."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if (bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or not kwargs.get("is_causal", getattr(module, "is_causal", True)) or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dropout, scaling = kwargs.get("dropout", 0.0), kwargs.get("scaling")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    window = kwargs.get("sliding_window")
    edges = bounds.tolist()
    outputs = []
    for start, end in zip(edges[:-1], edges[1:]):
        if end == start:
            continue
        mask = sliding_mask(end - start, window, query.device)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=mask,
            dropout_p=dropout, scale=scaling, is_causal=mask is None))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def sliding_mask(length: int, window: int | None, device) -> torch.Tensor | None:
    """A row longer than the layer's sliding window: each token sees itself and the window-1 before it (the rule
    of transformers' sliding-window masks); None where plain causal attention is the same."""
    if window is None or length <= window:
        return None
    at = torch.arange(length, device=device)
    distance = at[:, None] - at[None, :]
    return (distance >= 0) & (distance < window)


def register() -> None:
    """Make NAME an attention implementation transformers can run (its masks are sdpa's, for the calls it passes
    on to sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, rows_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def attending_by_rows(model: torch.nn.Module) -> Iterator[bool]:
    """While active, a model that attends with sdpa attends padding-free rows one row at a time; yields whether it
    does (another implementation, e.g. flash attention on a GPU or eager, is left as it is)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    register()
    inner.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        inner.set_attn_implementation("sdpa")
