"""Label scoring by likelihood (`evaluation.label_scoring: likelihood`) and how well per-class probabilities are
calibrated.

A generative arm answers a labelled row with the label whose completion (data.label_template, then the end of
sequence, as in training) the model finds most probable after the prompt. The score of a label is the *sum* of its
tokens' log-probabilities: that is log P(completion | prompt), so a softmax over the labels is the model's own
distribution restricted to the label set. (The mean per token would favour long labels whose later tokens are
nearly certain once the first is written, and has no probability meaning, so it is not offered.)

A prompt goes through the model once: its last position's logits score each label's first token, and the labels'
other tokens are computed together on the prompt's KV cache repeated per label. Prompts and labels are left-padded
with positions from the attention mask (each row computes as it would alone), and only the positions that are
scored are projected onto the vocabulary (`logits_to_keep`: at a 262k vocabulary those logits are the biggest
tensor by far). The prefix the prompts of a pass share (instruction, few-shot examples) is computed once.

Calibration (any arm with probabilities: a classifier, or likelihood scoring): expected calibration error over
15 equal-width confidence bins (the binning of Guo et al. 2017, "On Calibration of Modern Neural Networks"):
ECE = sum over bins of (rows in bin / rows) * |accuracy in bin - mean confidence in bin|, where a row's
confidence is its top probability and it is right when that label is the expected one. The reliability diagram
plots accuracy against confidence per bin beside the diagonal. With `evaluation.escalation_label`, a threshold
table says, for escalating whenever P(escalation) >= t at t = 0.1 ... 0.9, the share of should-escalate rows
escalated (recall) and the share of the other rows escalated (false escalations).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from specialist.generation import Engine

ECE_BINS = 15
THRESHOLDS = tuple(round(0.1 * t, 1) for t in range(1, 10))


def label_logprobs(engine: Engine, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16,
                   shots: Sequence[tuple[str, str]] = (), label: str = "scoring labels",
                   row_shots: Sequence[Sequence[tuple[str, str]]] | None = None) -> np.ndarray:
    """[rows, labels]: log P(completion + end of sequence | prompt), summed over the completion's tokens, under the
    engine's model, tokenizer and prompt format (its lock and context are the caller's to hold).

    `completions` are the labels as written (data.label_template applied); `batch_size` is the sequences per
    forward pass, always whole prompts (all their labels together, at least one prompt per pass). `row_shots`,
    where given, are each prompt's own examples (retrieval) in place of the shared `shots`.
    """
    import torch

    from specialist.generation import GenerationProgress, encode_prompt
    from specialist.onednn import packed_linears

    model, tokenizer, template = engine.model, engine.tokenizer, engine.template
    if not completions:
        raise ValueError("label_logprobs needs at least one completion")
    endings = [tokenizer(template.render_completion(c), add_special_tokens=False)["input_ids"] for c in completions]
    budget = max(len(e) for e in endings)  # a truncating template leaves the longest label room
    per_pass = max(1, batch_size // len(endings))
    scores = np.zeros((len(prompts), len(endings)), dtype=np.float64)
    with torch.inference_mode(), packed_linears(model, engine.fast), \
            GenerationProgress(label, len(prompts), counted="scored") as progress:
        for start in range(0, len(prompts), per_pass):
            chunk = [encode_prompt(template, tokenizer, p, shots if row_shots is None else row_shots[start + i], budget)
                     for i, p in enumerate(prompts[start:start + per_pass])]
            scores[start:start + len(chunk)] = summed_completion_logprobs(model, chunk, endings, tokenizer.pad_token_id)
            progress.advance(len(chunk), sum(map(len, chunk)) + len(chunk) * sum(map(len, endings)))
    return scores


def summed_completion_logprobs(model, prompts: list[list[int]], endings: list[list[int]], pad_id: int) -> np.ndarray:
    """[prompts, endings]: log P(ending | prompt), summed over the ending's tokens.

    Two passes: the prompts (their shared prefix once, see `_prompt_pass`), whose last logits score each ending's
    first token; then every ending of every prompt at once on the prompts' KV cache repeated per ending. A prompt
    goes through the model once, however many labels it has."""
    import torch

    device = next(model.parameters()).device
    cache, prompt_mask, last_logits = _prompt_pass(model, prompts, pad_id)
    first = torch.log_softmax(last_logits.float(), dim=-1)
    scores = first[:, torch.tensor([e[0] for e in endings], device=device)]  # [prompts, endings]
    if max(len(e) for e in endings) > 1:
        rest = _ending_pass(model, cache, prompt_mask, endings, pad_id, device)
        scores = scores + rest.view(len(prompts), len(endings))
    return scores.double().cpu().numpy()


def _prompt_pass(model, prompts: list[list[int]], pad_id: int):
    """The prompts, left-padded, through the model: (KV cache, attention mask, last position's logits).

    The prefix every prompt starts with (instruction, few-shot examples) is computed once and its cache repeated;
    the prompts follow as [prefix][padding][rest] with positions from the mask (`generation.prefix_cached_batch`,
    as the generation engine lays them out)."""
    from specialist.generation import prefix_cached_batch

    shared, past, input_ids, mask = prefix_cached_batch(model, prompts, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=past,
                use_cache=True, logits_to_keep=1)
    return out.past_key_values, mask, out.logits[:, -1]


def _ending_pass(model, cache, prompt_mask, endings: list[list[int]], pad_id: int, device):
    """[prompts x endings]: the summed log-probability of each ending's tokens after its first, every ending
    left-padded after every prompt (row p * endings + e), on the prompts' cache."""
    import torch

    from specialist.generation import left_pad

    n_prompts, n_endings = prompt_mask.shape[0], len(endings)
    cache.batch_repeat_interleave(n_endings)
    ids, ending_mask = (t.repeat(n_prompts, 1).to(device) for t in left_pad(endings, pad_id))
    mask = torch.cat([prompt_mask.repeat_interleave(n_endings, dim=0), ending_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, prompt_mask.shape[1]:]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                   logits_to_keep=ids.shape[1]).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts the token at t + 1
    chosen = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    # a target counts when it and the token before it are the ending's own (its first is scored by the prompt)
    counted = (ending_mask[:, 1:] * ending_mask[:, :-1]).bool()
    return (chosen * counted).sum(-1)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax (log-probabilities to probabilities over the labels)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


def batch_calibrate(probabilities: np.ndarray) -> np.ndarray:
    """Each label's probability divided by its mean over the rows, renormalised per row (Batch Calibration, Zhou
    et al., ICLR 2024: the mean is the model's bias toward the label whatever the input). Fewer rows than labels
    estimate no bias and are returned as they are."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] < probabilities.shape[1]:
        return probabilities
    adjusted = probabilities / np.maximum(probabilities.mean(axis=0, keepdims=True), 1e-12)
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def calibration_bins(probabilities: np.ndarray, expected: Sequence[int], bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Rows grouped by confidence (top probability) into `bins` equal-width bins of [0, 1], each bin holding
    (low, high]; the first also 0. Per bin: its rows, mean confidence and accuracy (None when empty)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(expected)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    found = []
    for b in range(bins):
        members = index == b
        rows = int(members.sum())
        found.append({"low": b / bins, "high": (b + 1) / bins, "rows": rows,
                      "confidence": float(confidence[members].mean()) if rows else None,
                      "accuracy": float(correct[members].mean()) if rows else None})
    return found


def expected_calibration_error(probabilities: np.ndarray, expected: Sequence[int], bins: int = ECE_BINS) -> float:
    """Sum over confidence bins of (share of rows) * |accuracy - mean confidence|; 0 for no rows."""
    total = len(probabilities)
    if not total:
        return 0.0
    return float(sum(b["rows"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in calibration_bins(probabilities, expected, bins) if b["rows"]))


def threshold_table(probabilities: np.ndarray, expected: Sequence[int], escalation: int,
                    thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, Any]]:
    """Escalating a row whenever P(escalation) >= t, per t: recall of the should-escalate rows, false escalation
    rate of the others (None where a side has no rows), and the share of all rows escalated."""
    expected = np.asarray(expected)
    should = expected == escalation
    rows = []
    for t in thresholds:
        escalated = probabilities[:, escalation] >= t
        rows.append({"threshold": t,
                     "recall": float(escalated[should].mean()) if should.any() else None,
                     "false_escalation_rate": float(escalated[~should].mean()) if (~should).any() else None,
                     "escalated": float(escalated.mean()) if len(escalated) else 0.0})
    return rows


def calibration_report(probabilities: np.ndarray, expected: Sequence[int], labels: Sequence[str],
                       escalation_label: str | None = None) -> dict[str, Any]:
    """ECE, the reliability bins, mean confidence and accuracy; with an escalation label among `labels`, its
    threshold table. `expected[i]` is row i's label index, -1 when its label is none of `labels` (always wrong)."""
    accuracy = float((probabilities.argmax(axis=1) == np.asarray(expected)).mean()) if len(expected) else 0.0
    report: dict[str, Any] = {
        "ece": expected_calibration_error(probabilities, expected), "bins": calibration_bins(probabilities, expected),
        "mean_confidence": float(probabilities.max(axis=1).mean()) if len(probabilities) else 0.0,
        "accuracy": accuracy, "rows": len(expected), "labels": list(labels)}
    index = label_index(labels, escalation_label) if escalation_label else None
    if index is not None:
        report["escalation"] = {"label": labels[index], "thresholds": threshold_table(probabilities, expected, index)}
    return report


def label_index(labels: Sequence[str], label: str | None) -> int | None:
    """Where `label` is among `labels` (exact, else ignoring case, as label accuracy compares), or None."""
    if label is None:
        return None
    if label in labels:
        return list(labels).index(label)
    lowered = [x.lower() for x in labels]
    return lowered.index(label.lower()) if label.lower() in lowered else None


def plot_reliability(calibrations: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Reliability diagram: accuracy against mean confidence per bin, one line per arm, beside the diagonal of
    perfect calibration; the legend gives each arm's ECE. None when no arm has probabilities."""
    if not calibrations:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=110)
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", label="perfectly calibrated")
    for arm, calibration in calibrations.items():
        points = [(b["confidence"], b["accuracy"]) for b in calibration["bins"] if b["rows"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{arm} (ECE {calibration['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
