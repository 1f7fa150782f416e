"""The train/val/test split a run trains and is scored on, read back from the files `prepare` wrote."""

from __future__ import annotations

import json
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


def read_split(folder: Path) -> Split:
    """The train/val/test files of a run or prepared-data folder, back as a Split."""
    parts = {}
    for name in ("train", "val", "test"):
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} is missing", hint="point at a folder written by `specialist prepare/run/train`")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        parts[name] = [Example(r["prompt"], r["completion"], r.get("source_line", 0), r.get("rejected"),
                               r.get("label"), r.get("group")) for r in rows]
    return Split(**parts)
