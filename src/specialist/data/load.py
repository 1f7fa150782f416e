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
    prompt: str
    completion: str
    line: int  # 1-based line (JSONL) or row (CSV, header is line 1) in the source file


def load_examples(
    path: Path, prompt_column: str = "prompt", completion_column: str = "completion", fmt: str = "auto"
) -> list[Example]:
    """Every row of `path` as an Example; raises DataError listing the bad lines and how to fix them."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="set data.path in the config (relative to the config)")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    rows = _read_jsonl(path) if fmt == "jsonl" else _read_csv(path)
    examples, problems = [], []
    for line, row in rows:
        if isinstance(row, str):
            problems.append(f"{path}:{line}: {row}")
            continue
        example, problem = _to_example(row, line, prompt_column, completion_column)
        if problem:
            problems.append(f"{path}:{line}: {problem}")
        else:
            examples.append(example)
    if problems:
        shown = "\n  ".join(problems[:_MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(problems) - _MAX_ERRORS_SHOWN} more" if len(problems) > _MAX_ERRORS_SHOWN else ""
        raise DataError(
            f"{len(problems)} bad row(s) in {path}:\n  {shown}{more}",
            hint=f"each row needs non-empty text in '{prompt_column}' and '{completion_column}' "
            "(set data.prompt_column / data.completion_column if your columns are named otherwise)",
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


def _to_example(row: dict[str, Any], line: int, prompt_column: str, completion_column: str) -> tuple[Example, str]:
    missing = [column for column in (prompt_column, completion_column) if column not in row]
    if missing:
        return None, f"missing column(s) {missing}; the row has {sorted(row)}"  # type: ignore[return-value]
    prompt, completion = _as_text(row[prompt_column]), _as_text(row[completion_column])
    empty = [name for name, value in ((prompt_column, prompt), (completion_column, completion)) if not value.strip()]
    if empty:
        return None, f"empty {empty}"  # type: ignore[return-value]
    return Example(prompt=prompt, completion=completion, line=line), ""


def _as_text(value: Any) -> str:
    """A completion given as a JSON object is kept as compact JSON text, the form the model should learn to write."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
