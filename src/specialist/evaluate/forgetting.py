"""Forgetting: did the fine-tune cost general ability? Perplexity on general text and a knowledge probe.

The bundled references (see resources/NOTICE): 300 Wikipedia sentences (CC BY 3.0) and the 1,827 MMLU dev and
validation questions (MIT). `evaluation.forgetting_corpus` replaces the text with a file of your own (one text a
line); `evaluation.knowledge_probe` replaces the questions (multiple-choice JSONL).

Why the probe asks 300 questions by default: at 57 questions a 95% interval on accuracy is about +-12 points, so
a 30% -> 28% drop means nothing; at 300 it is about +-5 points, and the paired (McNemar) test, which only counts
the questions whose answer changed, sees smaller drops still. Every question is one forward pass per arm, so the
size is what the demo's time allows; `knowledge_probe_size: 0` asks all 1,827.

`measure` keeps what the report needs to put intervals on the change: each question's right/wrong and each
text's (summed loss, token count), from the same forward passes that give the totals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from specialist.core.stats import (
    CONFIDENCE,
    Interval,
    PairedComparison,
    paired_bootstrap_interval,
    paired_comparison,
    score_interval,
)
from specialist.errors import DataError
from specialist.logits import capture_instead, head_can_be_chunked, label_positions, project_only
from specialist.onednn import packed_linears

if TYPE_CHECKING:
    from specialist.generation import Engine

LETTERS = ("A", "B", "C", "D")
DEFAULT_PROBE_SIZE = 300
_CHUNK_ROWS = 256  # positions projected onto the vocabulary at a time (memory: 256 x vocabulary floats)


def general_text(path: Path | None = None, limit: int | None = None) -> list[str]:
    source = path if path is not None else files("specialist.resources").joinpath("general_text.txt")
    texts = [line.strip() for line in Path(str(source)).read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts[:limit] if limit else texts


def knowledge_probe(path: Path | None = None, size: int | None = DEFAULT_PROBE_SIZE) -> list[dict[str, Any]]:
    """The probe's questions: the bundled MMLU set or `path`, sampled round-robin over subjects to `size`
    (None or 0: all of them)."""
    return stratified_sample(read_probe(path), size)


def read_probe(path: Path | None = None) -> list[dict[str, Any]]:
    """Every question of a multiple-choice JSONL file (the bundled one when `path` is None), checked line by line."""
    if path is None:
        source, text = "knowledge_probe.jsonl", files("specialist.resources").joinpath(
            "knowledge_probe.jsonl").read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read the knowledge probe: {exc}", hint="evaluation.knowledge_probe "
                            "must be a UTF-8 JSONL file; remove the key to use the bundled one") from None
    # split("\n"), not splitlines(): a question may hold U+2028 or U+0085, which splitlines() takes for line ends.
    questions = [_probe_question(line, f"{source}:{number}")
                 for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not questions:
        raise DataError(f"{source}: the knowledge probe has no questions",
                        hint='one JSON object a line: {"question": ..., "choices": [4 strings], "answer": "A"}')
    return questions


def _probe_question(line: str, where: str) -> dict[str, Any]:
    hint = ('each line: {"question": "...", "choices": ["...", "...", "...", "..."], "answer": "A".."D", '
            '"subject": "..." (optional)}')
    try:
        question = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})", hint=hint) from None
    if not isinstance(question, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(question).__name__}", hint=hint)
    choices = question.get("choices")
    problems = []
    if not isinstance(question.get("question"), str) or not question["question"].strip():
        problems.append("'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        problems.append("'choices' must be a list of 4 strings")
    if question.get("answer") not in LETTERS:
        problems.append(f"'answer' must be one of A, B, C, D, got {question.get('answer')!r}")
    if not isinstance(question.get("subject", ""), str):
        problems.append("'subject' must be a string")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems), hint=hint)
    return question


def stratified_sample(questions: list[dict[str, Any]], size: int | None) -> list[dict[str, Any]]:
    """`size` questions taken round-robin over subjects (alphabetical), each subject's shortest questions first:
    every subject is represented, the draw is the same every run, and a subject that runs out drops out of the
    rotation. Shortest first because every question is a forward pass over its text per arm: 300 questions
    this way are about 15,000 tokens of the embedded model's tokenizer, drawn in file order about 30,000,
    which is what keeps the demo's probe (twice: base and tuned) at n >= 300 within its time."""
    if not size or size >= len(questions):
        return list(questions)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for question in questions:
        by_subject.setdefault(str(question.get("subject", "")), []).append(question)
    queues = [sorted(by_subject[name], key=_question_length) for name in sorted(by_subject)]
    sample: list[dict[str, Any]] = []
    for depth in range(max(len(q) for q in queues)):
        for queue in queues:
            if depth < len(queue):
                sample.append(queue[depth])
                if len(sample) == size:
                    return sample
    return sample


def _question_length(question: dict[str, Any]) -> int:
    return len(str(question.get("question", ""))) + sum(len(str(choice)) for choice in question.get("choices", ()))


@torch.inference_mode()
def text_losses(model, tokenizer, texts: list[str], batch_size: int = 16,
                label: str = "forgetting: perplexity") -> list[tuple[float, int]]:
    """(summed next-token loss, token count) of each text, batched with right padding: one forward per batch."""
    from specialist.generation import GenerationProgress

    results: list[tuple[float, int]] = []
    with padding_side(tokenizer, "right"), GenerationProgress(label, len(texts), counted="scored") as progress:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100).to(model.device)
            inputs = {"input_ids": batch["input_ids"].to(model.device),
                      "attention_mask": batch["attention_mask"].to(model.device)}
            sums = _row_loss_sums(model, inputs, labels)
            counts = (labels[:, 1:] != -100).sum(dim=1)
            results += [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]
            progress.advance(len(counts), int(counts.sum()))
    return results


def _row_loss_sums(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per-row summed cross-entropy over labelled positions, projecting only those positions onto the vocabulary
    (as logits.completion_loss does for the batch sum), `_CHUNK_ROWS` positions at a time."""
    keep, targets = label_positions(labels)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    if targets.numel() == 0:
        return torch.zeros(labels.shape[0], dtype=torch.float64)
    if head_can_be_chunked(inner, head):
        captured: list[torch.Tensor] = []
        with capture_instead(head, keep, captured):
            model(**inputs, use_cache=False)
        per_token = torch.cat([
            F.cross_entropy(F.linear(hidden, head.weight, head.bias).float(), target, reduction="none")
            for hidden, target in zip(captured[0].split(_CHUNK_ROWS), targets.split(_CHUNK_ROWS))])
    else:  # e.g. Gemma 2's soft-capped logits: let the model apply it
        with project_only(head, keep):
            logits = model(**inputs, use_cache=False).logits
        per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    rows = keep.nonzero()[:, 0].cpu()
    return torch.zeros(labels.shape[0], dtype=torch.float64).index_add_(0, rows, per_token.double().cpu())


def perplexity_of(losses: Sequence[tuple[float, int]]) -> float:
    """exp of the mean next-token loss over every token (token-weighted across texts)."""
    total = sum(loss for loss, _ in losses)
    count = sum(tokens for _, tokens in losses)
    return math.exp(total / max(count, 1))


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 16) -> float:
    """exp of the mean next-token loss over every token of `texts` (token-weighted across texts)."""
    return perplexity_of(text_losses(model, tokenizer, texts, batch_size))


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
def question_correctness(model, tokenizer, questions: list[dict[str, Any]], batch_size: int = 8,
                         label: str = "forgetting: knowledge probe") -> list[bool]:
    """For each question (in the order given), whether its answer letter gets the highest next-token logit
    among A-D. Batches are formed from prompts of similar length, so a short question is not padded to the
    length of a long reading passage from another subject."""
    letter_ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    prompts = [probe_prompt(q) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: len(prompts[i]))
    correct = [False] * len(questions)
    from specialist.generation import GenerationProgress

    # Left padding: the next token follows the last real one in every row.
    with padding_side(tokenizer, "left"), GenerationProgress(label, len(order), counted="read") as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(model.device)
            picked = model(**batch, logits_to_keep=1).logits[:, -1, letter_ids].argmax(dim=-1).tolist()
            for i, p in zip(chunk, picked):
                correct[i] = LETTERS[p] == questions[i]["answer"]
            progress.advance(len(chunk), int(batch["attention_mask"].sum()))
    return correct


def knowledge_accuracy(model, tokenizer, questions: list[dict[str, Any]], batch_size: int = 8) -> float:
    """Share of questions whose answer letter gets the highest next-token logit among A-D."""
    correct = question_correctness(model, tokenizer, questions, batch_size)
    return sum(correct) / len(correct) if correct else 0.0


def measure(model, tokenizer, texts: list[str], questions: list[dict[str, Any]],
            weights: str = "") -> dict[str, Any]:
    """Perplexity and knowledge accuracy, with the per-text losses and per-question right/wrong behind them;
    `weights` names which ones in the progress lines ("base", "tuned")."""
    model.eval()
    suffix = f" ({weights} weights)" if weights else ""
    losses = text_losses(model, tokenizer, texts, label=f"forgetting: perplexity{suffix}")
    correct = question_correctness(model, tokenizer, questions, label=f"forgetting: knowledge probe{suffix}")
    return {"perplexity": perplexity_of(losses), "knowledge": sum(correct) / len(correct) if correct else 0.0,
            "text_losses": losses, "correct": correct}


def ppl_change_interval(before: Sequence[tuple[float, int]], after: Sequence[tuple[float, int]],
                        samples: int = 1000, confidence: float = CONFIDENCE, seed: int = 0):
    """Interval of perplexity after/before - 1 by a paired bootstrap over texts: resample texts (each keeps its
    loss before and after), recompute both token-weighted perplexities, take the ratio."""
    if len(before) != len(after):
        raise ValueError(f"perplexity before and after must cover the same texts, got {len(before)} and {len(after)}")
    loss_before = np.array([loss for loss, _ in before], dtype=float)
    loss_after = np.array([loss for loss, _ in after], dtype=float)
    tokens = np.array([count for _, count in before], dtype=float)
    observed = perplexity_of(after) / perplexity_of(before) - 1

    def change(lb: np.ndarray, la: np.ndarray, tok: np.ndarray, axis: int = -1) -> np.ndarray:
        count = np.maximum(tok.sum(axis=axis), 1)
        return np.exp((la.sum(axis=axis) - lb.sum(axis=axis)) / count) - 1

    return paired_bootstrap_interval((loss_before, loss_after, tokens), change, observed, samples, confidence, seed)


@dataclass
class Measured:
    """One model's general ability: perplexity on the general texts and accuracy on the knowledge probe."""

    perplexity: float
    knowledge: float


@dataclass
class ForgettingReport:
    """The forgetting section of eval.json: base weights (`before`) against tuned ones (`after`).

    The intervals are there when `measure`'s per-row lists were (absent from eval.json otherwise):
    ppl_increase_interval (paired bootstrap over texts), knowledge_before / knowledge_after (Wilson),
    knowledge_drop_interval (Newcombe paired, before - after) and knowledge_comparison (after vs before: difference
    after - before, exact McNemar p_value)."""

    corpus: str
    texts: int
    questions: int
    before: Measured
    after: Measured
    ppl_increase: float
    knowledge_drop: float
    ppl_increase_interval: Interval | None = None
    knowledge_before: Interval | None = None
    knowledge_after: Interval | None = None
    knowledge_drop_interval: Interval | None = None
    knowledge_comparison: PairedComparison | None = None
    precision: str = "float32"  # of the matmuls both measurements ran in ("bfloat16 autocast" where it is fast)

    def to_json(self) -> dict[str, Any]:
        """eval.json's form: the figures, then each interval that was measured (as its dict)."""
        found: dict[str, Any] = {"corpus": self.corpus, "texts": self.texts, "questions": self.questions,
                                 "precision": self.precision,
                                 "before": asdict(self.before), "after": asdict(self.after),
                                 "ppl_increase": self.ppl_increase, "knowledge_drop": self.knowledge_drop}
        for name in ("ppl_increase_interval", "knowledge_before", "knowledge_after", "knowledge_drop_interval",
                     "knowledge_comparison"):
            if getattr(self, name) is not None:
                found[name] = getattr(self, name).as_dict()
        return found

    def figures(self) -> dict[str, Any]:
        return forgetting_figures(self)

    def table(self) -> list[tuple[str, str, str, str]]:
        """(figure, before, after, change) rows: perplexity, then knowledge accuracy, with intervals."""
        precision = "" if self.precision == "float32" else f", {self.precision}"
        rows = [(f"perplexity on {self.corpus} ({self.texts} texts{precision})", f"{self.before.perplexity:.2f}",
                 f"{self.after.perplexity:.2f}", _with_mean(self.ppl_increase_interval, self.ppl_increase)
                 .format("+.1f", 100, "%", "%"))]
        if self.questions:
            comparison = self.knowledge_comparison
            change = f"{100 * (self.after.knowledge - self.before.knowledge):+.1f} pts"
            if comparison:
                change = (f"{comparison.difference.format('+.1f', 100, ' pts')}, "
                          f"McNemar p = {comparison.p_value:.2g}")
            rows.append((f"knowledge probe accuracy ({self.questions} questions)",
                         _with_mean(self.knowledge_before, self.before.knowledge).format(),
                         _with_mean(self.knowledge_after, self.after.knowledge).format(), change))
        return rows


def _with_mean(interval: Interval | None, value: float) -> Interval:
    """The interval around the figure `value` as the report states it (no bounds where none was measured)."""
    return replace(interval, mean=value) if interval is not None else Interval(value, None, None, "none")


def measure_forgetting(base: Engine, tuned: Engine, evaluation) -> ForgettingReport:
    """Perplexity and the knowledge probe with the base weights, then with the tuned ones, as
    evaluation.forgetting_corpus / forgetting_max_texts / knowledge_probe / knowledge_probe_size say.

    Each engine's lock and context are held while it is measured: arms that share one model switch their
    adapter there (off for the base)."""
    texts = general_text(evaluation.forgetting_corpus, evaluation.forgetting_max_texts)
    questions = knowledge_probe(evaluation.knowledge_probe, evaluation.knowledge_probe_size)
    measured = []
    autocast = bf16_autocast_helps(base.model) and bf16_autocast_helps(tuned.model)
    for engine, weights in ((base, "base"), (tuned, "tuned")):
        # float32 through oneDNN's packed kernels; under autocast (only a torch without them) torch's bfloat16
        with engine.lock, engine.context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                packed_linears(engine.model):
            measured.append(measure(engine.model, engine.tokenizer, texts, questions, weights))
    corpus = str(evaluation.forgetting_corpus) if evaluation.forgetting_corpus else "bundled Wikipedia sentences"
    report = forgetting_report(measured[0], measured[1], len(texts), len(questions), corpus,
                               samples=evaluation.bootstrap_samples)
    report.precision = "bfloat16 autocast" if autocast else "float32"
    return report


def bf16_autocast_helps(model) -> bool:
    """fp32 weights on a CPU that multiplies bf16 and a torch without oneDNN's packed kernels: the forward passes of
    the forgetting stage (perplexity and the probe, base and tuned alike, so the change is measured in one
    precision) run twice as fast under autocast (2 AVX512-BF16 cores: 547 against 271 tokens/s on 8 rows of 80
    tokens). Where the packed kernels exist the stage stays float32 on every CPU, so its figures do not depend on
    the CPU: the demo's tuned half took 19.9 s in packed float32 against 13.7 s under autocast (2 cores,
    2026-12-08), and bfloat16 moved its probe (18.5% against float32's 19.5%). Generation keeps fp32: its answers
    must be generate()'s."""
    from specialist.decode import cpu_multiplies_bf16
    from specialist.onednn import available

    weights = next(model.parameters())
    return (weights.device.type == "cpu" and weights.dtype == torch.float32 and cpu_multiplies_bf16()
            and not available())


def forgetting_report(before: dict[str, Any], after: dict[str, Any], n_texts: int, n_questions: int,
                      corpus: str, *, samples: int = 1000) -> ForgettingReport:
    """The forgetting report from two `measure` results (base weights, tuned weights); the intervals (at the
    default confidence, seed 0) where `measure`'s per-row lists are there."""
    report = ForgettingReport(
        corpus=corpus, texts=n_texts, questions=n_questions,
        before=Measured(before["perplexity"], before["knowledge"]),
        after=Measured(after["perplexity"], after["knowledge"]),
        ppl_increase=after["perplexity"] / before["perplexity"] - 1,
        knowledge_drop=before["knowledge"] - after["knowledge"],
    )
    if "text_losses" in before and "text_losses" in after:
        report.ppl_increase_interval = ppl_change_interval(before["text_losses"], after["text_losses"], samples)
    if "correct" in before and "correct" in after:
        was, now = [float(c) for c in before["correct"]], [float(c) for c in after["correct"]]
        comparison = paired_comparison(was, now, samples)
        report.knowledge_before = score_interval(was, samples)
        report.knowledge_after = score_interval(now, samples)
        report.knowledge_drop_interval = comparison.difference.negated()
        report.knowledge_comparison = comparison
    return report


def forgetting_figures(report: ForgettingReport) -> dict[str, Any]:
    """Gate figures from a forgetting report: forgetting.ppl_increase and forgetting.knowledge_drop, each with
    its interval when the report has one."""
    from specialist.core.gates import Figure

    return {"forgetting.ppl_increase": Figure.of(report.ppl_increase_interval) if report.ppl_increase_interval
            else Figure(report.ppl_increase),
            "forgetting.knowledge_drop": Figure.of(report.knowledge_drop_interval) if report.knowledge_drop_interval
            else Figure(report.knowledge_drop)}
