"""The unit every stage passes around: one example, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training row. Plain text (continued pretraining) has an empty prompt; preference rows a `rejected`."""

    prompt: str
    completion: str
    line: int  # 1-based line (JSONL), row (CSV, header is line 1) or item in the source file
    rejected: str | None = None
    label: str | None = None  # the class, for stratified splits, balancing and the report
    group: str | None = None  # rows sharing a group stay in one split (split_by=grouped)
    # (input, answer) examples shown before the prompt: data.retrieval's nearest training rows (never stored)
    shots: tuple[tuple[str, str], ...] = ()
