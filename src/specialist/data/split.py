"""The train/val/test split a run trains and is scored on, read back from the files `prepare` wrote."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from specialist.data.load import Example
from specialist.errors import DataError


class Part(IntEnum):
    """Which split a row belongs to. An int so that `prepare` keeps a row's part in compact int8 arrays (numpy
    compares and assigns these members as the ints they are)."""

    UNSPLIT = -1  # read, not yet placed: `prepare` decides its split
    TRAIN = 0
    VAL = 1
    TEST = 2

    DROPPED = -1  # after splitting: left out (a leak, or past max_examples); the same value as UNSPLIT

    @property
    def file_name(self) -> str:
        """Its name in files and reports: train, val, test."""
        return self.name.lower()

    @classmethod
    def splits(cls) -> tuple[Part, Part, Part]:
        return cls.TRAIN, cls.VAL, cls.TEST

    @classmethod
    def named(cls, name: str) -> Part | None:
        """The split called `name` (train, val, test), else None."""
        return next((part for part in cls.splits() if part.file_name == name), None)


@dataclass(frozen=True)
class Split:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def parts(self) -> dict[str, list[Example]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def read_examples(path: Path, limit: int | None = None) -> list[Example]:
    """The first `limit` rows (all with None) of a split file written by prepare, read line by line."""
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(_example(json.loads(line)))
    return examples


def read_answers(path: Path) -> Iterator[str]:
    """Every row's completion in a split file, one at a time (a big training split is never held whole)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)["completion"]


def _example(row: dict) -> Example:
    return Example(row["prompt"], row["completion"], row.get("source_line", 0), row.get("rejected"),
                   row.get("label"), row.get("group"), turns=tuple(tuple(turn) for turn in row.get("turns", ())))


def read_split(folder: Path) -> Split:
    """The train/val/test files of a run or prepared-data folder, back as a Split."""
    parts = {}
    for name in ("train", "val", "test"):
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} is missing", hint="point at a folder written by `specialist prepare/run/train`")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        parts[name] = [_example(r) for r in rows]
    return Split(**parts)
