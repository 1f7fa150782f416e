"""The unit every stage passes around: one example, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    # a chat row's turns before the answer as (role, content, learned): set only when some earlier assistant turn
    # is learned too (data.train_on: all); shapes.training_pairs turns them into (prompt, answer) pairs
    turns: tuple[tuple[str, str, bool], ...] = ()


@dataclass(frozen=True)
class Rejection:
    """A row left out of the data, and why: its kind (unknown_label, empty_field, ...), its line and the file it is
    in (set once the row is collected from its source), the message naming the fix, and the offending value where
    there is one (an unknown label as the row wrote it), so nothing has to be read back out of the message."""

    kind: str
    line: int
    message: str
    value: str | None = None
    file: Path | None = None

    def as_report(self) -> dict[str, Any]:
        """What report.json lists under dropped.<kind>.first."""
        return {"line": self.line, "problem": self.message}
