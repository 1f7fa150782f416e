"""Batched greedy generation with left padding and the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from specialist.console import progress
from specialist.data import PromptTemplate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    label: str = "generating",
    shots: Sequence[tuple[str, str]] = (),
    sampling: dict | None = None,
) -> list[str]:
    """The model's completion for each prompt (greedy unless `sampling` is given), in input order.

    Prompts are sorted by length before batching so each batch carries little padding. Special tokens are
    stripped and the text is cut at the template's stop strings, the same for every arm.
    """
    import torch

    encoded = [template.encode_prompt(p, tokenizer, shots) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    stop_ids = stop_token_ids(tokenizer)
    with progress() as bar, torch.inference_mode():
        task = bar.add_task(label, total=len(prompts), info="")
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], tokenizer.pad_token_id)
            generated = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                **(sampling or {"do_sample": False}),
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, input_ids.shape[1] :]
            for i, row in zip(batch, new_tokens):
                outputs[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), template.stop_strings)
            bar.advance(task, len(batch))
    return outputs


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip()


def left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        input_ids[n, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[n, width - len(row) :] = 1
    return input_ids, attention_mask


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus a chat model's end-of-turn token, so generation stops where training taught it to."""
    ids = {tokenizer.eos_token_id}
    for token in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
