"""Stream rows out of every file kind a user brings, one (line, row-or-problem) at a time.

Nothing here holds the whole file: JSONL and CSV are read line by line, Parquet batch by batch, a `datasets`
folder through its memory-mapped Arrow files. A row that cannot be read becomes a problem string naming the fix,
so the caller can count it, report it with its line, and go on.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.errors import DataError

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "arrow")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class RawRow:
    line: int  # 1-based line (JSONL, CSV with the header as line 1), item (JSON array) or row (Parquet, Arrow)
    row: dict[str, Any] | None
    problem: str = ""  # why `row` is None
    kind: str = ""  # short name of the problem, for counting


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "arrow"
        raise DataError(f"{path} is a folder but not a `datasets` save_to_disk folder",
                        hint="point data.path at a data file, or at a folder written by Dataset.save_to_disk")
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the format of {path} from its suffix {path.suffix!r}",
                        hint=f"set data.format to one of {', '.join(FORMATS)}")
    if fmt == "json" and _first_non_space_byte(path) == b"{":
        return "jsonl"  # one object per line saved as .json, a common export
    return fmt


def iter_rows(path: Path, fmt: str = "auto") -> Iterator[RawRow]:
    if not path.exists():
        raise DataError(f"data file not found: {path}", hint="set data.path in the config (relative to the config)")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {"jsonl": _jsonl, "json": _json_array, "csv": _csv, "tsv": _csv, "parquet": _parquet, "arrow": _arrow}
    yield from readers[fmt](path)


def _first_non_space_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            row = parse_jsonl_line(number, raw)
            if row is not None:
                yield row


def jsonl_line_chunks(path: Path, lines_per_chunk: int) -> Iterator[tuple[int, list[bytes]]]:
    """(first line number, raw lines) blocks of a JSONL file, for parsing in worker processes."""
    with path.open("rb") as handle:
        first, block = 1, []
        for raw in handle:
            block.append(raw)
            if len(block) == lines_per_chunk:
                yield first, block
                first, block = first + len(block), []
        if block:
            yield first, block


def parse_jsonl_line(number: int, raw: bytes) -> RawRow | None:
    """One JSONL line as a row, a problem, or None when it is blank."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(number, None, f"not UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8",
                      "not_utf8")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(number, None, f"malformed JSON ({exc.msg}, column {exc.colno}); each line must be one object",
                      "malformed_json")
    if isinstance(row, dict):
        return RawRow(number, row)
    return RawRow(number, None, "a line must be a JSON object, not a list or value", "not_an_object")


def _json_array(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start})", hint="re-save it as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})",
                        hint="a .json data file must be one array of objects (or use JSONL, one object a line)") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}, as many exports wrap it
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not an array of rows",
                        hint="write the rows as [{...}, {...}] or as JSONL")
    for number, row in enumerate(data, start=1):
        if isinstance(row, dict):
            yield RawRow(number, row)
        else:
            yield RawRow(number, None, "an array item must be a JSON object", "not_an_object")


def _csv(path: Path) -> Iterator[RawRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long completions are normal in fine-tuning data
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # surrogateescape keeps reading past a bad byte, so one broken row is reported instead of the whole file
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            line = reader.line_num
            if None in row:
                yield RawRow(line, None, f"{len(row[None]) + len(row) - 1} fields where the header has "
                             f"{len(reader.fieldnames or [])}; quote fields that hold the delimiter", "malformed_row")
            elif any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                yield RawRow(line, None, "not UTF-8; re-save the file as UTF-8", "not_utf8")
            else:
                yield RawRow(line, row)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise DataError(f"{path} is not a readable Parquet file ({exc})", hint="re-export it, or use JSONL") from exc
    number = 0
    for batch in handle.iter_batches(batch_size=10_000):
        for row in batch.to_pylist():
            number += 1
            yield RawRow(number, row)


def _arrow(path: Path) -> Iterator[RawRow]:
    from datasets import Dataset, DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    parts: list[Dataset] = list(loaded.values()) if isinstance(loaded, DatasetDict) else [loaded]
    number = 0
    for part in parts:
        for row in part:
            number += 1
            yield RawRow(number, dict(row))
