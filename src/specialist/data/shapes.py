"""The shapes fine-tuning data comes in, told apart by their columns and turned into Examples.

- prompt_completion: prompt/completion, or the aliases input/output, instruction/response (an Alpaca-style
  `input` beside `instruction` is appended to it), question/answer.
- messages: OpenAI chat rows, `[{"role": "system"|"user"|"assistant", "content": ...}, ...]`, ending with the
  assistant turn that is learned; earlier turns become the prompt.
- text: plain text for continued pretraining.
- preference: prompt/chosen/rejected (DPO; supervised methods learn `chosen`).
- labelled: text/label, turned into prompt/completion through `data.label_template`.

`data.prompt_template` ("{title}\\n\\n{body}") builds the input of prompt_completion, labelled and preference rows
from any columns of the row instead of one prompt (or text) column.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from specialist.core.labels import render_label
from specialist.data.load import Example, Rejection
from specialist.errors import DataError

SHAPES = ("prompt_completion", "messages", "text", "preference", "labelled")
PROMPT_ALIASES = ("prompt", "instruction", "input", "question")
COMPLETION_ALIASES = ("completion", "output", "response", "answer")
ROLES = ("system", "user", "assistant")

Converter = Callable[[dict[str, Any], int], "tuple[Example | None, str, str]"]


TEMPLATED_SHAPES = ("prompt_completion", "labelled", "preference")


@dataclass(frozen=True)
class Shape:
    name: str
    columns: dict[str, str]  # field -> column in the file
    prompt_fields: tuple[str, ...] = ()  # the columns data.prompt_template reads, when it builds the input

    def describe(self) -> str:
        columns = [f"{f}={c}" for f, c in self.columns.items()]
        if self.prompt_fields:
            columns.insert(0, f"input=prompt_template({', '.join(self.prompt_fields)})")
        return f"{self.name} ({', '.join(columns)})"


@lru_cache(maxsize=8)
def parse_prompt_template(template: str) -> tuple[tuple[str, str | None, str], ...]:
    """(literal text, column or None, format spec) pieces of a prompt template; ValueError saying what is wrong.

    Placeholders name columns only: `{}`/`{0}`, attribute or index access (`{a.b}`, `{a[0]}`) and conversions
    (`!r`) are refused, so a template can read a row's values and nothing else.
    """
    pieces = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if name is not None:
            if not name.strip() or name.isdigit():
                raise ValueError("positional placeholders ({} or {0}) are not allowed: name a column, e.g. {title}")
            if "." in name or "[" in name:
                raise ValueError(f"{{{name}}}: attribute or index access is not allowed; name a column")
            if conversion or "{" in (spec or ""):
                raise ValueError(f"{{{name}...}}: conversions (!r) and nested placeholders are not allowed")
            format("", spec or "")  # an invalid spec fails here, at config time, not on every row
        pieces.append((literal, name, spec or ""))
    if not any(name for _, name, _ in pieces):
        raise ValueError("prompt_template names no column; e.g. '{title}\\n\\n{body}'")
    return tuple(pieces)


def template_fields(template: str) -> list[str]:
    """The columns a prompt template reads, in order of first use."""
    return list(dict.fromkeys(name for _, name, _ in parse_prompt_template(template) if name))


def render_prompt_template(template: str, row: dict[str, Any]) -> tuple[str | None, str]:
    """(the input built from the row's columns, "") or (None, why not) when a column is missing or null."""
    parts, missing, filled = [], [], False
    for literal, name, spec in parse_prompt_template(template):
        parts.append(literal)
        if name is None:
            continue
        if row.get(name) is None:
            missing.append(name)
            continue
        value = as_text(row[name])
        filled = filled or bool(value.strip())
        parts.append(format(value, spec))
    if missing:
        return None, f"missing column(s) {missing} used by data.prompt_template; the row has {sorted(row)}"
    if not filled:
        return None, f"every column of data.prompt_template ({template_fields(template)}) is empty"
    return "".join(parts), ""


def detect_shape(keys: list[str], data, method_kind: str) -> Shape:
    """The shape of rows with `keys`, from data.shape (or the columns when auto) and what the method trains on."""
    _refuse_named_columns_absent(keys, data)
    name = data.shape if data.shape != "auto" else _guess_shape_name(set(keys), data, method_kind)
    _check_method_accepts(name, method_kind)
    prompt_fields = _prompt_template_fields(keys, data, name)
    shape = Shape(name, _columns_for(name, set(keys), data), prompt_fields)
    missing = [column for column in shape.columns.values() if column not in keys]
    if missing:
        raise DataError(
            f"unknown column(s) {missing} for {shape.name} rows; the data has {sorted(keys)}",
            hint="name your columns in the config (data.prompt_column, completion_column, text_column, "
            "label_column, messages_column, chosen_column, rejected_column) or set data.shape",
        )
    return shape


_COLUMN_KEYS = ("prompt_column", "completion_column", "chosen_column", "rejected_column", "text_column",
                "messages_column", "label_column", "split_column")


def _prompt_template_fields(keys: list[str], data, shape_name: str) -> tuple[str, ...]:
    if not data.prompt_template:
        return ()
    if shape_name not in TEMPLATED_SHAPES:
        raise DataError(f"data.prompt_template builds the input of {', '.join(TEMPLATED_SHAPES)} rows, not of "
                        f"{shape_name} rows", hint="remove data.prompt_template, or set data.shape")
    fields = template_fields(data.prompt_template)
    missing = [field for field in fields if field not in keys]
    if missing:
        raise DataError(f"unknown column(s) {missing} in data.prompt_template {data.prompt_template!r}; the data "
                        f"has {sorted(keys)}", hint="name columns of the data in the template's {placeholders}")
    return tuple(fields)


def _refuse_named_columns_absent(keys: list[str], data) -> None:
    """A column the user named in the config must exist: a typo there would otherwise read as a shape mismatch."""
    named = {getattr(data, key): key for key in _COLUMN_KEYS
             if getattr(data, key) != type(data).model_fields[key].default}
    missing = [column for column in named if column not in keys]
    if missing:
        raise DataError(
            f"unknown column(s) {missing} (set in {', '.join('data.' + named[c] for c in missing)}); "
            f"the data has {sorted(keys)}",
            hint="use one of the data's columns, or rename the column in the file",
        )


def _guess_shape_name(keys: set[str], data, method_kind: str) -> str:
    if method_kind == "dpo":
        return "preference"
    if method_kind == "continued_pretraining":
        return "text"
    if data.prompt_template:  # the template is the input: the answer column tells the shape
        if _pick(keys, data.completion_column, COMPLETION_ALIASES):
            return "prompt_completion"
        if data.label_column in keys:
            return "labelled"
        if data.chosen_column in keys:
            return "preference"
    if data.messages_column in keys:
        return "messages"
    if _pick(keys, data.prompt_column, PROMPT_ALIASES) and _pick(keys, data.completion_column, COMPLETION_ALIASES):
        return "prompt_completion"
    if data.text_column in keys and data.label_column in keys:
        return "labelled"
    if _pick(keys, data.prompt_column, PROMPT_ALIASES) and data.chosen_column in keys:
        return "preference"
    if data.text_column in keys:
        return "text"
    raise DataError(
        f"cannot tell the shape of rows with columns {sorted(keys)}",
        hint="expected prompt/completion (or input/output, instruction/response), messages, text, "
        "prompt/chosen/rejected or text/label; name your columns in the config or set data.shape",
    )


def _check_method_accepts(shape: str, method_kind: str) -> None:
    if method_kind == "dpo" and shape != "preference":
        raise DataError(f"method.kind dpo trains on preference rows (prompt/chosen/rejected), not {shape} rows",
                        hint="point data.path at preference data, or pick a supervised method")
    if method_kind == "continued_pretraining" and shape != "text":
        raise DataError(f"method.kind continued_pretraining trains on plain text, not {shape} rows",
                        hint="give a text column (data.text_column), or pick method.kind lora for input/output pairs")
    if method_kind not in ("dpo", "continued_pretraining") and shape == "text":
        raise DataError("plain text rows have no answer to learn for a supervised method",
                        hint="use method.kind continued_pretraining for plain text, or add prompt/completion columns")


def _pick(keys: set[str], configured: str, aliases: tuple[str, ...]) -> str | None:
    if configured in keys:
        return configured
    if configured != aliases[0]:  # the user named a column: no guessing past it
        return None
    return next((alias for alias in aliases if alias in keys), None)


def _columns_for(name: str, keys: set[str], data) -> dict[str, str]:
    columns = _columns_of_shape(name, keys, data)
    if data.prompt_template:  # the template replaces the prompt (or labelled text) column
        columns.pop("prompt" if name != "labelled" else "text", None)
        columns.pop("input", None)
    return columns


def _columns_of_shape(name: str, keys: set[str], data) -> dict[str, str]:
    prompt = _pick(keys, data.prompt_column, PROMPT_ALIASES) or data.prompt_column
    if name == "prompt_completion":
        columns = {"prompt": prompt,
                   "completion": _pick(keys, data.completion_column, COMPLETION_ALIASES) or data.completion_column}
        if prompt == "instruction" and "input" in keys:
            columns["input"] = "input"
        return columns
    if name == "messages":
        return {"messages": data.messages_column}
    if name == "text":
        return {"text": data.text_column}
    if name == "preference":
        chosen = data.chosen_column if data.chosen_column in keys else data.completion_column
        return {"prompt": prompt, "chosen": chosen, "rejected": data.rejected_column}
    return {"text": data.text_column, "label": data.label_column}


def row_to_example(row: dict[str, Any], line: int, shape: Shape, data, keep_rejected: bool) -> Example | Rejection:
    """The row's example, or why it is left out."""
    columns = shape.columns
    missing = [c for c in columns.values() if c not in row and c != columns.get("input")]
    if missing:
        return Rejection("missing_field", line, f"missing column(s) {missing}; the row has {sorted(row)}")
    if shape.name == "messages":
        return _messages_to_example(row[columns["messages"]], line, row, data)
    values = {field: as_text(row[column]) for field, column in columns.items() if column in row}
    required = [f for f in columns if f != "input"]
    empty = [columns[f] for f in required if not values.get(f, "").strip()]
    if empty:
        return Rejection("empty_field", line, f"empty {empty}")
    if shape.prompt_fields:
        prompt, problem = render_prompt_template(data.prompt_template, row)
        if prompt is None:
            return Rejection("missing_field" if problem.startswith("missing") else "empty_field", line, problem)
        values["text" if shape.name == "labelled" else "prompt"] = prompt
    label = _label_of(row, data)
    group = _group_of(row, data)
    if shape.name == "text":
        return Example("", values["text"], line, group=group)
    if shape.name == "labelled":
        label = values["label"].strip()
        if data.labels is not None and label not in data.labels:
            return Rejection("unknown_label", line, f"label {label!r} is not in data.labels", value=label)
        completion = render_label(label, data.label_template)
        return Example(values["text"], completion, line, label=label, group=group)
    if shape.name == "preference":
        rejected = values["rejected"] if keep_rejected else None
        return Example(values["prompt"], values["chosen"], line, rejected=rejected, label=label, group=group)
    prompt = values["prompt"]
    if values.get("input", "").strip():
        prompt = f"{prompt}\n\n{values['input']}"
    return Example(prompt, values["completion"], line, label=label, group=group)


def _label_of(row: dict[str, Any], data) -> str | None:
    value = row.get(data.label_column)
    return as_text(value).strip() or None if value is not None else None


def _group_of(row: dict[str, Any], data) -> str | None:
    if not data.group_column:
        return None
    return as_text(row.get(data.group_column)).strip() or None


def _messages_to_example(messages: Any, line: int, row: dict[str, Any], data) -> Example | Rejection:
    problem = check_role_order(messages)
    if problem:
        return Rejection("role_order", line, problem)
    turns = [(m["role"], as_text(m["content"])) for m in messages]
    if not turns[-1][1].strip():
        return Rejection("empty_field", line, "the last assistant message is empty")
    group = _group_of(row, data)
    return Example(fold_chat(turns[:-1]), turns[-1][1], line, label=_label_of(row, data), group=group)


def fold_chat(turns: list[tuple[str, str]]) -> str:
    """The model input for the (role, content) turns before an answer: the last user turn alone, or earlier turns
    as a transcript before it; a system message goes first. Training data and served chat requests alike."""
    system = [content for role, content in turns if role == "system"]
    dialogue = [(role, content) for role, content in turns if role != "system"]
    if len(dialogue) == 1:
        prompt = dialogue[0][1]
    else:  # earlier turns stay visible to the model as a transcript before the last user turn
        prompt = "\n\n".join(f"{role.capitalize()}: {content}" for role, content in dialogue)
    return f"{system[0]}\n\n{prompt}" if system else prompt


def check_role_order(messages: Any) -> str:
    """'' when `messages` is [system?] user, assistant, user, assistant, ... ending with assistant; else why not."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content}"
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {n} is not a {{role, content}} object"
        if message["role"] not in ROLES:
            return f"message {n} has role {message['role']!r}; roles are {list(ROLES)}"
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if n % 2 == 0 else "assistant" for n in range(len(body))]
    if body != expected or not body:
        return f"wrong role order {roles}; expected [system,] user, assistant, user, assistant, ... "
    if body[-1] != "assistant":
        return f"wrong role order {roles}: the last message must be the assistant's answer"
    return ""


def as_text(value: Any) -> str:
    """A completion given as a JSON object is kept as compact JSON text, the form the model should learn to write."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
