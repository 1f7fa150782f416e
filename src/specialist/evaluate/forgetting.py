"""Forgetting: did the fine-tune cost general ability? Perplexity on general text and a knowledge probe.

The bundled references (see resources/NOTICE): 300 Wikipedia sentences (CC BY 3.0) and one MMLU dev question
per subject (57, MIT). `evaluation.forgetting_corpus` replaces the text with a file of your own (one text a line).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from specialist.train.fast_loss import completion_loss

LETTERS = ("A", "B", "C", "D")


def general_text(path: Path | None = None, limit: int | None = None) -> list[str]:
    source = path if path is not None else files("specialist.resources").joinpath("general_text.txt")
    texts = [line.strip() for line in Path(str(source)).read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts[:limit] if limit else texts


def knowledge_probe() -> list[dict[str, Any]]:
    text = files("specialist.resources").joinpath("knowledge_probe.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 16) -> float:
    """exp of the mean next-token loss over every token of `texts` (token-weighted across texts)."""
    total, count = 0.0, 0
    with padding_side(tokenizer, "right"):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            inputs = {"input_ids": batch["input_ids"].to(model.device),
                      "attention_mask": batch["attention_mask"].to(model.device), "labels": labels.to(model.device)}
            total += float(completion_loss(model, inputs, num_items=1))
            count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / max(count, 1))


@contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def probe_prompt(question: dict[str, Any]) -> str:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, question["choices"]))
    return f"Question: {question['question']}\n{options}\nAnswer:"


@torch.inference_mode()
def knowledge_accuracy(model, tokenizer, questions: list[dict[str, Any]], batch_size: int = 8) -> float:
    """Share of questions whose answer letter gets the highest next-token logit among A-D."""
    letter_ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    # Left padding: the next token follows the last real one in every row.
    with padding_side(tokenizer, "left"):
        correct = 0
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            batch = tokenizer([probe_prompt(q) for q in chunk], return_tensors="pt", padding=True).to(model.device)
            logits = model(**batch, logits_to_keep=1).logits[:, -1, letter_ids]
            picked = logits.argmax(dim=-1).tolist()
            correct += sum(LETTERS[p] == q["answer"] for p, q in zip(picked, chunk))
    return correct / len(questions) if questions else 0.0


def measure(model, tokenizer, texts: list[str], questions: list[dict[str, Any]]) -> dict[str, float]:
    model.eval()
    return {"perplexity": perplexity(model, tokenizer, texts), "knowledge": knowledge_accuracy(model, tokenizer, questions)}


def forgetting_report(before: dict[str, float], after: dict[str, float], n_texts: int, n_questions: int,
                      corpus: str) -> dict[str, Any]:
    return {
        "corpus": corpus,
        "texts": n_texts,
        "questions": n_questions,
        "before": before,
        "after": after,
        "ppl_increase": after["perplexity"] / before["perplexity"] - 1,
        "knowledge_drop": before["knowledge"] - after["knowledge"],
    }
