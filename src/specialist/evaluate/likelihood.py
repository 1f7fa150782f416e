"""Label scoring by likelihood (`evaluation.label_scoring: likelihood`) and how well per-class probabilities are
calibrated.

A generative arm answers a labelled row with the label whose completion (data.label_template, then the end of
sequence, as in training) the model finds most probable after the prompt. The score of a label is the *sum* of its
tokens' log-probabilities: that is log P(completion | prompt), so a softmax over the labels is the model's own
distribution restricted to the label set. (The mean per token would favour long labels whose later tokens are
nearly certain once the first is written, and has no probability meaning, so it is not offered.)

Every label of a prompt is scored in the same forward pass. Rows are prompt + completion, left-padded with explicit
position ids (each row computes as it would alone), so every completion ends at the last position and the model
projects only the last (longest completion + 1) positions onto the vocabulary (`logits_to_keep`): at a 262k
vocabulary those logits are the biggest tensor by far. The prefix the rows of a pass share (instruction and
few-shot examples) is computed once per pass and its KV cache shared.

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
from typing import Any

import numpy as np

ECE_BINS = 15
THRESHOLDS = tuple(round(0.1 * t, 1) for t in range(1, 10))


def label_logprobs(model, tokenizer, template, prompts: Sequence[str], completions: Sequence[str],
                   batch_size: int = 16, shots: Sequence[tuple[str, str]] = (),
                   label: str = "scoring labels") -> np.ndarray:
    """[rows, labels]: log P(completion + end of sequence | prompt), summed over the completion's tokens.

    `completions` are the labels as written (data.label_template applied); `batch_size` is the sequences per
    forward pass, always whole prompts (all their labels together, at least one prompt per pass).
    """
    import torch

    from specialist.generation import GenerationProgress, encode_prompt

    if not completions:
        raise ValueError("label_logprobs needs at least one completion")
    endings = [tokenizer(template.render_completion(c), add_special_tokens=False)["input_ids"] for c in completions]
    budget = max(len(e) for e in endings)  # a truncating template leaves the longest label room
    per_pass = max(1, batch_size // len(endings))
    scores = np.zeros((len(prompts), len(endings)), dtype=np.float64)
    with torch.inference_mode(), GenerationProgress(label, len(prompts), counted="scored") as progress:
        for start in range(0, len(prompts), per_pass):
            chunk = [encode_prompt(template, tokenizer, p, shots, budget) for p in prompts[start:start + per_pass]]
            rows = [prompt + ending for prompt in chunk for ending in endings]
            summed = summed_completion_logprobs(model, rows, [len(e) for e in endings] * len(chunk),
                                                tokenizer.pad_token_id)
            scores[start:start + len(chunk)] = summed.reshape(len(chunk), len(endings))
            progress.advance(len(chunk), sum(map(len, rows)))
    return scores


def summed_completion_logprobs(model, rows: list[list[int]], completion_lengths: list[int], pad_id: int) -> np.ndarray:
    """For each row (prompt ids + completion ids), the summed log-probability of its last `completion_lengths`
    tokens given everything before them; one forward pass over the rows, after one over the prefix they share.

    The prefix every row starts with (the instruction, and the few-shot examples, which are most of a few-shot
    prompt) goes through the model once; its KV cache is repeated for the rows, which follow it as
    [prefix][padding][rest of the row] with positions from the attention mask, as `generation.Engine` lays them
    out. Without it, a few-shot prompt was computed once per row and label."""
    import torch

    from specialist.generation import PREFIX_CACHE_MIN_TOKENS, left_pad, shared_prefix_length

    device = next(model.parameters()).device
    # each row keeps its last prompt token (whose logit predicts the completion's first) and its completion
    shared = min(shared_prefix_length(rows), *(len(r) - n - 1 for r, n in zip(rows, completion_lengths)))
    past = None
    if len(rows) < 2 or shared < PREFIX_CACHE_MIN_TOKENS:
        shared = 0
    else:
        past = model(input_ids=torch.tensor([rows[0][:shared]], device=device), use_cache=True,
                     logits_to_keep=1).past_key_values
        past.batch_repeat_interleave(len(rows))
    input_ids, attention_mask = left_pad([row[shared:] for row in rows], pad_id)
    full_mask = torch.cat([torch.ones((len(rows), shared), dtype=attention_mask.dtype), attention_mask], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    keep = max(completion_lengths) + 1
    logits = model(input_ids=input_ids.to(device), attention_mask=full_mask.to(device),
                   position_ids=position_ids.to(device), cache=past, use_cache=past is not None,
                   logits_to_keep=keep).logits[:, -keep:].float()
    # the kept logit at window position t predicts the token at window position t + 1
    targets = input_ids[:, -(keep - 1):].to(device)
    chosen = logits[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logprobs = chosen - torch.logsumexp(logits[:, :-1], dim=-1)
    window = torch.arange(keep - 1, device=device)
    lengths = torch.tensor(completion_lengths, device=device).unsqueeze(1)
    in_completion = window >= (keep - 1) - lengths  # each row's completion is the end of the window
    return (token_logprobs * in_completion).sum(-1).double().cpu().numpy()


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax (log-probabilities to probabilities over the labels)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


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
