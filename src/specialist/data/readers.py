"""Stream rows out of every file kind a user brings, one (line, row-or-problem) at a time.

Nothing here holds the whole file: JSONL and CSV are read line by line, Parquet batch by batch, a `datasets`
folder through its memory-mapped Arrow files. A row that cannot be read becomes a problem string naming the fix,
so the caller can count it, report it with its line, and go on. A hostile file (JSON nested past the recursion
limit, a 5000-digit number, NaN, a symlink loop) is a bad row or a DataError naming the file, never a traceback.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import stat
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from specialist.errors import DataError

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "arrow")
HUB = "hub"  # the format of a Hugging Face hub dataset named by data.path (org/name)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet", ".pq": "parquet"}
CSV_MAX_FIELD_LINES = 200


@dataclass(frozen=True)
class RawRow:
    line: int  # 1-based line (JSONL, CSV with the header as line 1), item (JSON array) or row (Parquet, Arrow)
    row: dict[str, Any] | None
    problem: str = ""  # why `row` is None
    kind: str = ""  # short name of the problem, for counting
    span: int = 1  # physical lines the row took (CSV quoted fields may span several); the bad-row share counts them


def is_hub_dataset(path: Path | str) -> bool:
    """Whether `path` names a Hugging Face hub dataset (org/name) rather than a local file: a local path that
    exists always wins, so a folder called org/name next to the config is read as it is."""
    text = Path(path).as_posix()
    return (not Path(path).is_absolute() and _HUB_ID.fullmatch(text) is not None and ".." not in text
            and not os.path.lexists(path))


def load_hub_dataset(name: str, split: str | None, subset: str | None):
    """The `datasets.Dataset` for split `split` (train) of hub dataset `name` (config `subset`), through
    `datasets.load_dataset` and its cache; a DataError naming the cache when it cannot be had."""
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split or "train")
    except ConnectionError as exc:  # datasets' offline mode, or no network at all
        raise DataError(f"the Hugging Face dataset {name} cannot be downloaded ({_first_line(exc)}) and is not in the "
                        f"datasets cache {datasets.config.HF_DATASETS_CACHE}",
                        hint=f"run once with a network (the dataset is then cached for offline runs), or download it "
                        f"elsewhere (`hf download {name} --repo-type dataset --local-dir DIR`) and point data.path "
                        "at DIR's data file") from None
    except Exception as exc:  # not found, gated, an unknown split or subset: datasets says which
        raise DataError(f"the Hugging Face dataset {name} (data.subset {subset}, data.split {split or 'train'}) "
                        f"cannot be loaded: {_first_line(exc)}",
                        hint="check data.path (org/name on huggingface.co/datasets), data.subset and data.split; a "
                        "gated or private dataset needs `hf auth login`") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)


def check_readable(path: Path) -> None:
    """Raise a DataError naming `path` when it is missing, a symlink loop, unreadable, or not a file or folder."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _os_error(path, exc) from None
    if stat.S_ISDIR(info.st_mode):
        return
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path} is not a regular file (a device, pipe or socket)",
                        hint="point data.path at a data file or a `datasets` folder")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _os_error(path, exc) from None


def _os_error(path: Path, exc: OSError) -> DataError:
    reasons = {errno.ENOENT: ("not found", "check the path in the config (relative to the config file)"),
               errno.ELOOP: ("is a symlink loop", "point data.path at the real file"),
               errno.EACCES: ("cannot be read (permission denied)", "make it readable (chmod) or copy it"),
               errno.EISDIR: ("is a folder, not a file", "point data.path at a data file"),
               errno.ENOTDIR: ("not found (a part of the path is not a folder)", "check data.path")}
    reason, hint = reasons.get(exc.errno, (f"cannot be read ({exc.strerror or exc})", "check data.path"))
    if exc.errno == errno.ENOENT:
        return DataError(f"data file not found: {path}", hint=hint)
    return DataError(f"{path} {reason}", hint=hint)


def detect_format(path: Path) -> str:
    check_readable(path)
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


def iter_rows(path: Path, fmt: str = "auto", *, csv_max_field_lines: int = CSV_MAX_FIELD_LINES,
              hub_split: str | None = None, hub_subset: str | None = None) -> Iterator[RawRow]:
    if fmt == HUB:
        for number, row in enumerate(load_hub_dataset(Path(path).as_posix(), hub_split, hub_subset), start=1):
            yield RawRow(number, dict(row))
        return
    check_readable(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt != "arrow" and path.is_dir():
        raise _os_error(path, IsADirectoryError(errno.EISDIR, "is a directory"))
    try:
        if fmt in ("csv", "tsv"):
            yield from _csv(path, csv_max_field_lines, "\t" if fmt == "tsv" else ",")
        else:
            readers = {"jsonl": _jsonl, "json": _json_array, "parquet": _parquet, "arrow": _arrow}
            yield from readers[fmt](path)
    except OSError as exc:  # the file vanished or the disk failed mid-read
        raise _os_error(path, exc) from None


def _first_non_space_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


# ---- JSON ----------------------------------------------------------------------------------------------------


class _NotJson(ValueError):
    """NaN or Infinity: Python's json accepts them, JSON (and every other reader of the file) does not."""


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not valid JSON; write null or a string")


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN/Infinity; raises ValueError (JSONDecodeError among them) or RecursionError."""
    return json.loads(text, parse_constant=_reject_constant)


def _json_problem(exc: BaseException) -> tuple[str, str]:
    """(kind, message) for why a JSON text could not be read."""
    if isinstance(exc, json.JSONDecodeError):
        return "malformed_json", f"malformed JSON ({exc.msg}, column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "too_deep", "JSON nested too deeply to read; flatten the row"
    if isinstance(exc, _NotJson):
        return "malformed_json", str(exc)
    return "malformed_json", f"unreadable JSON value ({str(exc).split(';')[0]})"  # e.g. a 5000-digit integer


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
        row = loads_strict(text)
    except (ValueError, RecursionError) as exc:
        kind, message = _json_problem(exc)
        return RawRow(number, None, f"{message}; each line must be one object", kind)
    if isinstance(row, dict):
        return RawRow(number, row)
    return RawRow(number, None, "a line must be a JSON object, not a list or value", "not_an_object")


_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_JSON_BAD_VALUE = re.compile(rf"{_JSON_STRING}|(?<![\w.])(-?Infinity|NaN|-?\d{{{sys.get_int_max_str_digits() + 1},}})")
_JSON_NESTING = re.compile(rf"{_JSON_STRING}|[\[\]{{}}]")
_DEEP = 500  # the decoder gives up somewhat below the recursion limit (1000); the line it reports is a hint


def _line_of_problem(text: str, exc: BaseException) -> int | None:
    """The line of what json.loads refused without saying where: a NaN, a huge number, or deep nesting."""
    if isinstance(exc, RecursionError):
        depth = 0
        for match in _JSON_NESTING.finditer(text):
            token = match.group()
            depth += 1 if token in "[{" else -1 if token in "]}" else 0
            if depth > _DEEP:
                return text.count("\n", 0, match.start()) + 1
        return None
    match = next((m for m in _JSON_BAD_VALUE.finditer(text) if m.group(1)), None)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _json_array(path: Path) -> Iterator[RawRow]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 ({exc.reason} at byte {exc.start})", hint="re-save it as UTF-8") from None
    try:
        data = loads_strict(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})",
                        hint="a .json data file must be one array of objects (or use JSONL, one object a line)") from None
    except (ValueError, RecursionError) as exc:
        line = _line_of_problem(text, exc)
        raise DataError(f"{path}{f':{line}' if line else ''}: {_json_problem(exc)[1]}",
                        hint="fix the value, or write the rows as JSONL so one bad row costs one row") from None
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


# ---- CSV -----------------------------------------------------------------------------------------------------

# Quote states of the csv module's reader (default dialect, not strict), enough to find where a record ends.
_START, _FIELD, _QUOTED, _CLOSED = range(4)


def _scan_quotes(line: str, state: int, delimiter: str) -> tuple[int, int]:
    """(state at the end of `line`, position where the last still-open quote opened or -1), as csv reads it.

    A quote opens a field only at its start; `""` inside quotes is a literal quote; after a closing quote the
    field goes on unquoted (the csv module's non-strict reading), so later quotes in it are literal.
    """
    if '"' not in line:  # the common line: no quote to open or close
        return (_QUOTED if state == _QUOTED else _FIELD), -1
    i, n, opened = 0, len(line), -1
    while i < n:
        if state == _QUOTED:
            j = line.find('"', i)
            if j < 0:
                return _QUOTED, opened
            if line.startswith('"', j + 1):
                i = j + 2
            else:
                state, i = _CLOSED, j + 1
        elif state == _START and line[i] == '"':
            state, opened, i = _QUOTED, i, i + 1
        elif state in (_START, _CLOSED) and line[i] == delimiter:
            state, i = _START, i + 1
        elif state == _START or state == _CLOSED:
            state = _FIELD
        else:  # unquoted field: quotes are literal up to the next delimiter
            j = line.find(delimiter, i)
            if j < 0:
                return _FIELD, -1
            state, i = _START, j + 1
    return state, opened


class _Line(NamedTuple):
    number: int
    start: int  # byte offset of the line in the file
    end: int  # byte offset just past it
    text: str


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # a line ending in a lone \r, as text mode with newline="" splits lines


class _Lines:
    """Numbered physical lines of a binary file, decoded as UTF-8 (a bad byte kept as a surrogate, so one broken
    row is reported instead of the whole file), with the byte offsets needed to read a stretch of lines again."""

    def __init__(self, handle) -> None:
        self._handle, self._next, self._offset, self._pending = handle, 1, 0, deque()

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> _Line:
        if self._pending:
            piece = self._pending.popleft()
        else:
            piece = self._handle.readline()
            if not piece:
                raise StopIteration
            if b"\r" in piece[:-2]:  # rare: old Mac line ends inside what readline took for one line
                self._pending.extend(part for part in _LONE_CR.split(piece) if part)
                piece = self._pending.popleft()
        line = _Line(self._next, self._offset, self._offset + len(piece),
                     piece.decode("utf-8", errors="surrogateescape"))
        self._next, self._offset = self._next + 1, line.end
        return line

    def go_back(self, number: int, offset: int) -> None:
        """Read on from line `number`, which starts at byte `offset`."""
        self._handle.seek(offset)
        self._next, self._offset, self._pending = number, offset, deque()


@dataclass
class _Record:
    first_line: int
    lines: list[str]
    open_at: int = 0  # line where a quote opened and never closed (0: the record is complete)
    span: int = 0  # physical lines of a record whose quote never closed (its text is not kept)


def _csv_records(lines: _Lines, delimiter: str, held_lines: int) -> Iterator[_Record]:
    """Complete records (their physical lines): a quoted field ends where its quote closes, however many lines
    later. A quote that never closes makes one bad record, from its first line to the line where the quote
    opened, and reading goes back to the line after that one, so no other row is lost.

    Up to `held_lines` lines of a record are kept while its end is looked for; a longer record is read again
    from the file once its quote closes, so a stray quote early in a big file does not pull the file into memory.
    """
    for first in lines:
        state, opened = _scan_quotes(first.text, _START, delimiter)
        held, open_line, last = [first.text], first, first
        while state == _QUOTED:
            follow = next(lines, None)
            if follow is None:
                break
            last = follow
            if len(held) < held_lines:
                held.append(follow.text)
            state, opened = _scan_quotes(follow.text, state, delimiter)
            if opened >= 0:
                open_line = follow
        if state == _QUOTED:  # the file ended inside the quote
            lines.go_back(open_line.number + 1, open_line.end)
            yield _Record(first.number, [], open_line.number, open_line.number - first.number + 1)
            continue
        if last.number - first.number + 1 > len(held):
            held = _read_again(lines, first, last)
        yield _Record(first.number, held)


def _read_again(lines: _Lines, first: _Line, last: _Line) -> list[str]:
    """The text of lines first..last, read again from the file; reading then goes on after `last`."""
    lines.go_back(first.number, first.start)
    held = [next(lines).text for _ in range(last.number - first.number + 1)]
    return held


def _csv(path: Path, max_field_lines: int, delimiter: str) -> Iterator[RawRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long completions are normal in fine-tuning data
    with path.open("rb") as handle:  # binary: a record whose quote never closes is read again from its offsets
        records = _csv_records(_Lines(handle), delimiter, max_field_lines)
        header = _csv_header(path, next(records, None), delimiter)
        for record in records:
            raw = _csv_row(record, header, delimiter)
            if raw is not None:
                yield raw


def _csv_header(path: Path, record: _Record | None, delimiter: str) -> list[str]:
    if record is None:
        return []
    fields = _parse_record(record, delimiter) if not record.open_at else None
    if not fields or isinstance(fields, str):
        raise DataError(f"{path}:1: the header line cannot be read"
                        + (f" (a quote opened on line {record.open_at} is not closed)" if record.open_at else ""),
                        hint="the first line of a CSV file must name the columns, e.g. prompt,completion")
    fields[0] = fields[0].removeprefix("\ufeff")  # a byte-order mark that Excel writes
    return fields


def _parse_record(record: _Record, delimiter: str) -> list[str] | str:
    """The fields of one complete record, or why the csv module could not read it."""
    try:
        parsed = list(csv.reader(record.lines, delimiter=delimiter))
    except csv.Error as exc:
        return f"unreadable CSV ({exc})"
    if len(parsed) > 1:  # the quote scan and the csv module disagree: never guess which field went where
        return "unreadable CSV (one record read as several)"
    return parsed[0] if parsed else []


def _csv_row(record: _Record, header: list[str], delimiter: str) -> RawRow | None:
    line, span = record.first_line, len(record.lines)
    if record.open_at:
        return RawRow(record.open_at, None, "a quote opened on this line never closes (the file ends inside it); "
                      f"this row is skipped and reading resumed on line {record.open_at + 1}: close the quote, or "
                      'double a quote inside a quoted field ("")', "unclosed_quote", record.span)
    fields = _parse_record(record, delimiter)
    if isinstance(fields, str):
        return RawRow(line, None, fields, "malformed_row", span)
    if not fields:
        return None  # a blank line, skipped as csv.DictReader skips it
    if len(fields) > len(header):
        return RawRow(line, None, f"{len(fields)} fields where the header has {len(header)}; quote fields that hold "
                      "the delimiter", "malformed_row", span)
    if any(_has_surrogates(value) for value in fields):
        return RawRow(line, None, "not UTF-8; re-save the file as UTF-8", "not_utf8", span)
    row: dict[str, Any] = dict.fromkeys(header)  # missing trailing fields read as None, as csv.DictReader does
    row.update(zip(header, fields))
    return RawRow(line, row, span=span)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---- Parquet, Arrow ------------------------------------------------------------------------------------------


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
