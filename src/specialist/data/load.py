"""Read prompt/completion examples from JSONL or CSV, with errors that name the file and line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.errors import DataError

_MAX_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class Example:
    """One training row. Plain text (continued pretraining) has an empty prompt; preference rows a `rejected`."""

    prompt: str
    completion: str
    line: int  # 1-based line (JSONL) or row (CSV, header is line 1) in the source file
    rejected: str | None = None


@dataclass(frozen=True)
class Columns:
    """Which columns of the file feed which fields of an Example; an empty prompt column means plain text."""

    prompt: str = "prompt"
    completion: str = "completion"
    rejected: str | None = None

    @classmethod
    def for_method(cls, data, kind: str) -> Columns:
        if kind == "continued_pretraining":
            return cls(prompt="", completion=data.text_column)
        if kind == "dpo":
            return cls(prompt=data.prompt_column, completion=data.completion_column, rejected=data.rejected_column)
        return cls(prompt=data.prompt_column, completion=data.completion_column)

    def required(self) -> list[str]:
        return [c for c in (self.prompt, self.completion, self.rejected) if c]


def load_examples(path: Path, columns: Columns | None = None, fmt: str = "auto") -> list[Example]:
    """Every row of `path` as an Example; raises DataError listing the bad lines and how to fix them."""
    columns = columns or Columns()
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="set data.path in the config (relative to the config)")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    rows = _read_jsonl(path) if fmt == "jsonl" else _read_csv(path)
    examples, problems = [], []
    for line, row in rows:
        if isinstance(row, str):
            problems.append(f"{path}:{line}: {row}")
            continue
        example, problem = _to_example(row, line, columns)
        if problem:
            problems.append(f"{path}:{line}: {problem}")
        else:
            examples.append(example)
    if problems:
        shown = "\n  ".join(problems[:_MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(problems) - _MAX_ERRORS_SHOWN} more" if len(problems) > _MAX_ERRORS_SHOWN else ""
        raise DataError(
            f"{len(problems)} bad row(s) in {path}:\n  {shown}{more}",
            hint=f"each row needs non-empty text in {columns.required()} "
            "(set data.prompt_column / completion_column / rejected_column / text_column if yours are named otherwise)",
        )
    if not examples:
        raise DataError(f"{path} holds no examples", hint="add prompt/completion rows to the file")
    return examples


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    if suffix in {".csv", ".tsv"}:
        return "csv"
    raise DataError(f"cannot tell the format of {path} from its suffix", hint="set data.format to jsonl or csv")


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    rows: list[tuple[int, dict[str, Any] | str]] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append((number, f"not UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8"))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.append((number, f"malformed JSON ({exc.msg}, column {exc.colno}); each line must be one object"))
                continue
            rows.append((number, row if isinstance(row, dict) else "a line must be a JSON object, not a list or value"))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 ({exc.reason})", hint="re-save the file as UTF-8") from exc


def _to_example(row: dict[str, Any], line: int, columns: Columns) -> tuple[Example | None, str]:
    missing = [column for column in columns.required() if column not in row]
    if missing:
        return None, f"missing column(s) {missing}; the row has {sorted(row)}"
    values = {column: _as_text(row[column]) for column in columns.required()}
    empty = [column for column, value in values.items() if not value.strip()]
    if empty:
        return None, f"empty {empty}"
    return Example(
        prompt=values.get(columns.prompt, ""),
        completion=values[columns.completion],
        line=line,
        rejected=values.get(columns.rejected) if columns.rejected else None,
    ), ""


def _as_text(value: Any) -> str:
    """A completion given as a JSON object is kept as compact JSON text, the form the model should learn to write."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
