"""Deterministic train/val/test split, written as JSONL with content hashes."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from specialist.data.load import Example
from specialist.errors import DataError


@dataclass(frozen=True)
class Split:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def parts(self) -> dict[str, list[Example]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def split_examples(
    examples: list[Example], val_fraction: float, test_fraction: float, seed: int, max_examples: int | None = None
) -> Split:
    """Shuffle with `seed` (same seed, same data: same split), cap at `max_examples`, then cut test, val, train."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if max_examples is not None:
        order = order[:max_examples]
    n_test = max(1, round(len(order) * test_fraction))
    n_val = round(len(order) * val_fraction)
    if len(order) - n_test - n_val < 1:
        raise DataError(
            f"{len(order)} example(s) are too few to split into train/val/test",
            hint="add examples or lower data.val_fraction / data.test_fraction",
        )
    picked = [examples[i] for i in order]
    return Split(
        test=picked[:n_test],
        val=picked[n_test : n_test + n_val],
        train=picked[n_test + n_val :],
    )


def _as_row(example: Example) -> dict[str, object]:
    row: dict[str, object] = {"prompt": example.prompt, "completion": example.completion}
    if example.rejected is not None:
        row["rejected"] = example.rejected
    row["source_line"] = example.line
    return row


def write_split(split: Split, folder: Path) -> dict[str, dict[str, object]]:
    """Write train/val/test.jsonl into `folder`; return {part: {"rows", "sha256", "file"}}."""
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, object]] = {}
    for name, rows in split.parts().items():
        text = "".join(
            json.dumps(_as_row(r), ensure_ascii=False)
            + "\n"
            for r in rows
        )
        path = folder / f"{name}.jsonl"
        path.write_text(text, encoding="utf-8")
        summary[name] = {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest(), "file": path.name}
    return summary


def read_split(folder: Path) -> Split:
    """The train/val/test files a run wrote, back as a Split (what `specialist eval` scores a run on)."""
    parts = {}
    for name in ("train", "val", "test"):
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} is missing", hint="point at a run folder written by `specialist run/train`")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        parts[name] = [Example(r["prompt"], r["completion"], r.get("source_line", 0), r.get("rejected")) for r in rows]
    return Split(**parts)
