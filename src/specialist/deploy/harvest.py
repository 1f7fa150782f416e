"""`specialist harvest DB --run RUN`: the logged requests worth a person's time, each with why, as rows to correct.

Reasons, most telling first: negative feedback, a failed format check, a shadow arm that answered differently,
low confidence (a classifier arm's probability of its answer), far from the training data (the nearest training
row's TF-IDF cosine, `core.retrieval`: the index the run's `nearest` arm reads). Before ranking, prompts and answers
are normalised and scrubbed with `prepare`'s rules (`data.clean`), so what a labeller sees holds no secret and the
comparison with the training rows is made on the same text `prepare` would have kept. Requests whose input is (nearly)
a row of the run's train, val or test set are dropped: the test set must stay untouched, and a training row needs
no label. Near duplicates collapse onto the highest-ranked one (which counts them). The budget is filled by the mix:
each reason gets its share of the rows, and what a reason cannot fill goes to the next-ranked rows of any reason.

Each row is in the run's prompt/completion columns with the model's answer as the completion: a draft to correct,
then fed back through `data.extra_paths`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specialist.deploy.records import read_requests, read_shadows
from specialist.errors import ConfigError

REASONS = ("negative_feedback", "format_failure", "disagreement", "low_confidence", "far_from_training")
DEFAULT_MIX = {"negative_feedback": 0.35, "format_failure": 0.25, "disagreement": 0.2, "low_confidence": 0.1,
               "far_from_training": 0.1}
CHUNK = 256  # queries scored against the training rows at once


@dataclass
class HarvestOptions:
    max_rows: int = 200
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    arm: str | None = None  # only this live arm's requests
    low_confidence: float = 0.6  # a classifier answer below this probability
    far_similarity: float = 0.2  # nearest training row's cosine below this
    duplicate_similarity: float = 0.95  # two requests this alike are one; a request this alike a run row is that row

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mix) - set(REASONS))
        if unknown or any(not (w >= 0 and math.isfinite(w)) for w in self.mix.values()) or not sum(self.mix.values()):
            raise ConfigError(f"--mix {self.mix}: unknown reason(s) {unknown} or weights not finite, >= 0, some > 0",
                              hint=f"reasons: {', '.join(REASONS)}, e.g. negative_feedback=0.5,format_failure=0.5")


@dataclass
class Candidate:
    row: dict[str, Any]
    prompt: str
    draft: str
    why: list[str] = field(default_factory=list)
    nearest_similarity: float | None = None
    duplicates: int = 0

    def rank(self) -> tuple:
        """Sort key: the most telling reason first, then the worst feedback, the farthest input, the newest."""
        first = REASONS.index(self.why[0])
        feedback = self.row["feedback"] if self.row["feedback"] is not None else 0.0
        return first, feedback, self.nearest_similarity or 0.0, -self.row["ts"]


def harvest(db: Path, run_dir: Path, options: HarvestOptions) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(queue rows, report): the requests of `db` worth labelling for the run at `run_dir`, best first."""
    from specialist.run_folder import RunFolder

    run = RunFolder.open(run_dir)
    config, split = run.config(), run.split()
    rows = [r for r in read_requests(db) if options.arm is None or r["arm"] == options.arm]
    logged = [r for r in rows if r["prompt"] is not None and r["output"] is not None]
    if rows and not logged:
        raise ConfigError(f"{db} holds no prompts", hint="serve with --log-prompts so requests can be harvested")
    clean = _cleaner(config.data.clean)
    disagreed = {s["request_id"] for s in read_shadows(db) if not s["agrees"]}
    candidates = [Candidate(r, clean(r["prompt"]), clean(r["output"])) for r in logged]
    in_run = _measure_against_run(candidates, split, options.duplicate_similarity)
    for candidate in candidates:
        candidate.why = _reasons(candidate, disagreed, options)
    flagged = sorted((c for c in candidates if c.why and c not in in_run), key=Candidate.rank)
    kept = collapse_duplicates(flagged, options.duplicate_similarity)
    chosen = fill_budget(kept, options.mix, options.max_rows)
    report = {"requests": len(rows), "with_prompts": len(logged), "in_run_data": len(in_run),
              "flagged": len(flagged), "duplicates_collapsed": len(flagged) - len(kept), "chosen": len(chosen),
              "mix": options.mix, "by_reason": dict(Counter(c.why[0] for c in chosen)),
              "flagged_by_reason": dict(Counter(r for c in flagged for r in c.why))}
    return [queue_row(c, config.data) for c in chosen], report


def _cleaner(clean_config):
    """prepare's normalisation and scrubbing; a labelling queue is always scrubbed (every kind, when the run's own
    data was not), since people outside the model's team read it."""
    from specialist.data.clean import SCRUB_KINDS, Scrubber, normalize_text, scrub_kinds

    scrubber = Scrubber(scrub_kinds(clean_config.scrub) or list(SCRUB_KINDS), clean_config.placeholder)

    def clean(text: str) -> str:
        return scrubber(normalize_text(text) if clean_config.normalize else text)

    return clean


def _reasons(candidate: Candidate, disagreed: set[str], options: HarvestOptions) -> list[str]:
    row, why = candidate.row, []
    if row["feedback"] is not None and math.isfinite(row["feedback"]) and row["feedback"] < 0:
        why.append("negative_feedback")
    if row["format_ok"] == 0:
        why.append("format_failure")
    if row["id"] in disagreed:
        why.append("disagreement")
    if row["confidence"] is not None and row["confidence"] < options.low_confidence:
        why.append("low_confidence")
    if candidate.nearest_similarity is not None and candidate.nearest_similarity < options.far_similarity:
        why.append("far_from_training")
    return why


def _measure_against_run(candidates: list[Candidate], split, threshold: float) -> list[Candidate]:
    """Set each candidate's nearest training row similarity; the candidates whose input is (nearly) a row of the
    run's train, val or test set."""
    from specialist.core.retrieval import RetrievalIndex

    examples = split.train + split.val + split.test
    if not candidates or not examples:
        return []
    index = RetrievalIndex.of_examples(examples)
    exact = {ex.prompt for ex in examples}
    train_rows, found = len(split.train), []
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start:start + CHUNK]
        similarities = index.similarities([c.prompt for c in chunk])
        for candidate, row in zip(chunk, similarities):
            candidate.nearest_similarity = float(row[:train_rows].max()) if train_rows else 0.0
            if candidate.prompt in exact or float(row.max()) >= threshold:
                found.append(candidate)
    return found


def collapse_duplicates(ranked: list[Candidate], threshold: float) -> list[Candidate]:
    """The ranked candidates without near duplicates of a higher-ranked one (each kept row counts its copies)."""
    from specialist.core.retrieval import _transform, fit_vectorizers

    if not ranked:
        return []
    vectors = _transform(fit_vectorizers([c.prompt for c in ranked]), [c.prompt for c in ranked])
    kept: list[int] = []
    for i, candidate in enumerate(ranked):
        if kept:
            similarities = (vectors[kept] @ vectors[i].T).toarray().ravel()
            best = int(similarities.argmax())
            if similarities[best] >= threshold - 1e-9:
                ranked[kept[best]].duplicates += 1
                continue
        kept.append(i)
    return [ranked[i] for i in kept]


def fill_budget(ranked: list[Candidate], mix: dict[str, float], budget: int) -> list[Candidate]:
    """Up to `budget` candidates: each reason's share of the mix (by its first reason), then the best-ranked of the
    rest; returned in rank order."""
    total = sum(mix.values())
    quotas = {reason: math.floor(budget * mix.get(reason, 0.0) / total) for reason in REASONS}
    chosen: set[int] = set()
    for n, candidate in enumerate(ranked):
        reason = candidate.why[0]
        if quotas[reason] > 0:
            quotas[reason] -= 1
            chosen.add(n)
    for n in range(len(ranked)):
        if len(chosen) >= budget:
            break
        chosen.add(n)
    return [ranked[n] for n in sorted(chosen)[:budget]]


def queue_row(candidate: Candidate, data_config) -> dict[str, Any]:
    """A row `prepare` reads in the run's prompt/completion columns; the extra keys say why and where it came from
    (prepare ignores them)."""
    row = candidate.row
    return {data_config.prompt_column: candidate.prompt, data_config.completion_column: candidate.draft,
            "why": candidate.why, "request_id": row["id"], "arm": row["arm"], "feedback": row["feedback"],
            "format_ok": None if row["format_ok"] is None else bool(row["format_ok"]),
            "confidence": row["confidence"], "nearest_similarity": candidate.nearest_similarity,
            "duplicates": candidate.duplicates}


def write_queue(rows: list[dict[str, Any]], out: Path) -> Path:
    """JSONL, owner-readable only (it holds users' requests), written beside `out` and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(partial, out)
    return out
