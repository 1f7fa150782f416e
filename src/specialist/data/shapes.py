"""The shapes fine-tuning data comes in, told apart by their columns and turned into Examples.

- prompt_completion: prompt/completion, or the aliases input/output, instruction/response (an Alpaca-style
  `input` beside `instruction` is appended to it), question/answer. TRL's conversational form, a `prompt` list of
  messages ending with the user's turn and a `completion` list holding one assistant message, reads the same.
- messages: chat rows, OpenAI's `messages: [{"role": "system"|"user"|"assistant", "content": ..., "weight": 0|1}]`
  or ShareGPT's `conversations: [{"from": "system"|"human"|"gpt", "value": ...}]`, ending with an assistant turn.
  The last learned assistant turn is the answer and the turns before it the prompt; with data.train_on all (the
  default) every assistant turn is learned, each from the turns before it, except those with weight 0 (context).
- text: plain text for continued pretraining.
- preference: prompt/chosen/rejected (DPO; supervised methods learn `chosen`), as text or as TRL's conversational
  message lists; OpenAI's `input: {messages}`, `preferred_output`, `non_preferred_output` too.
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
# OpenAI's preference fine-tuning rows: field -> column
OPENAI_PREFERENCE = {"prompt": "input", "chosen": "preferred_output", "rejected": "non_preferred_output"}


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
    if data.messages_column in keys or _sharegpt_column(keys, data):
        return "messages"
    if set(OPENAI_PREFERENCE.values()) <= keys:
        return "preference"
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


def _sharegpt_column(keys: set[str], data) -> str | None:
    """ShareGPT's `conversations`, when the messages column is left at its default and the data has no `messages`."""
    default = type(data).model_fields["messages_column"].default
    if data.messages_column == default and default not in keys and "conversations" in keys:
        return "conversations"
    return None


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
        return {"messages": _sharegpt_column(keys, data) or data.messages_column}
    if name == "text":
        return {"text": data.text_column}
    if name == "preference":
        if data.chosen_column not in keys and set(OPENAI_PREFERENCE.values()) <= keys:
            return dict(OPENAI_PREFERENCE)
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
    values = {}
    for field, column in columns.items():
        if column in row:
            values[field], problem = field_text(field, row[column])
            if problem:
                return Rejection("bad_message", line, problem)
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
    """A chat row: the last learned assistant turn is the answer, earlier turns its prompt; with data.train_on all
    (the default) every earlier assistant turn without `weight: 0` is learned too, each from the turns before it."""
    turns, problem = read_turns(messages, "messages")
    if problem:
        return Rejection("bad_message", line, problem)
    problem = role_order_problem([turn.role for turn in turns], last="assistant")
    if problem:
        return Rejection("role_order", line, problem)
    learned = [i for i, turn in enumerate(turns) if turn.role == "assistant" and turn.weight != 0]
    if not learned:
        return Rejection("no_answer", line, "every assistant message has weight 0, so the row teaches nothing; set "
                         "weight 1 (or leave weight out) on the answers to learn")
    learned = learned[-1:] if data.train_on == "last" else learned
    if len(learned) > MAX_LEARNED_TURNS:  # each learned turn re-reads the turns before it: bound the square
        return Rejection("too_many_turns", line, f"{len(learned)} assistant turns to learn, over {MAX_LEARNED_TURNS}; "
                         "split the conversation into shorter rows, or set data.train_on: last")
    empty = next((i for i in learned if not turns[i].content.strip()), None)
    if empty is not None:
        return Rejection("empty_field", line, f"assistant message {empty} is empty")
    last, earlier = learned[-1], set(learned[:-1])
    context = tuple((turn.role, turn.content, i in earlier) for i, turn in enumerate(turns[:last])) if earlier else ()
    return Example(fold_chat([(t.role, t.content) for t in turns[:last]]), turns[last].content, line,
                   label=_label_of(row, data), group=_group_of(row, data), turns=context)


def training_pairs(example: Example) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs a supervised method learns from `example`: one per learned assistant turn of a
    chat row, each prompt folded from the turns before it as serving folds a chat request, so a multi-turn row
    trains every answer with its context masked, in the one prompt format training, evaluation and serving share.
    The cost: a conversation's early turns are read once per later answer (tokens grow with the square of turns)."""
    pairs = [(fold_chat([(role, content) for role, content, _ in example.turns[:i]]), content)
             for i, (role, content, learned) in enumerate(example.turns) if learned]
    return [*pairs, (example.prompt, example.completion)]


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


@dataclass(frozen=True)
class Turn:
    role: str  # system, user or assistant
    content: str
    weight: int | None = None  # OpenAI's per-message weight: 0 makes an assistant turn context, not a target


MAX_LEARNED_TURNS = 256  # far past any conversation that fits a training context; bounds one row's training pairs
SHAREGPT_SPEAKERS = {"human": "user", "gpt": "assistant", "system": "system"}


def read_turns(messages: Any, where: str) -> tuple[list[Turn], str]:
    """(turns, "") from a list of OpenAI/TRL `{role, content[, weight]}` or ShareGPT `{from, value}` messages, or
    ([], why not) naming the message (`where[n]`) and the fix."""
    if not isinstance(messages, list) or not messages:
        return [], f"{where} must be a non-empty list of {{role, content}} messages, not {_kind(messages)}"
    turns = []
    for n, message in enumerate(messages):
        turn = _read_turn(message, f"{where}[{n}]")
        if isinstance(turn, str):
            return [], turn
        turns.append(turn)
    return turns, ""


def _read_turn(message: Any, where: str) -> Turn | str:
    """One message as a Turn, or why it cannot be read."""
    if not isinstance(message, dict):
        return f"{where} is {_kind(message)}, not a {{role, content}} object"
    if "role" in message:
        role, key = message["role"], "content"
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
    elif "from" in message:
        key = "value"
        role = SHAREGPT_SPEAKERS.get(message["from"]) if isinstance(message["from"], str) else None
        if role is None:
            return f"{where} is from {message['from']!r}; ShareGPT speakers are {list(SHAREGPT_SPEAKERS)}"
    else:
        return f"{where} has no role (OpenAI/TRL {{role, content}}) or from (ShareGPT {{from, value}})"
    if role not in ROLES:
        return f"{where} has role {_short(role)}; roles are {list(ROLES)}"
    if key not in message:
        return f"{where} ({role}) has no {key!r}"
    content = _content_text(message[key])
    if content is None:
        return f"{where} ({role}) {key} is {_kind(message[key])}; only text is read (a string or text parts)"
    weight = message.get("weight")
    if weight is not None and (role != "assistant" or weight not in (0, 1) or isinstance(weight, (bool, float))):
        return f"{where} ({role}) has weight {_short(weight)}; weight is 0 or 1, on assistant messages only"
    return Turn(role, content, weight)


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI content parts that are all text; None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content):
        return "".join(part["text"] for part in content)
    return None


def role_order_problem(roles: list[str], last: str) -> str:
    """'' when `roles` run [system,] user, assistant, user, ... ending with `last`; else why not."""
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user" if n % 2 == 0 else "assistant" for n in range(len(body))]
    ending = "the assistant's answer" if last == "assistant" else "the user's question"
    if body != expected or not body:
        return f"wrong role order {_roles(roles)}; expected [system,] user, assistant, user, ... ending with {ending}"
    if body[-1] != last:
        return f"wrong role order {_roles(roles)}: the last message must be {ending}"
    return ""


def check_role_order(messages: Any) -> str:
    """'' when `messages` is [system?] user, assistant, user, assistant, ... ending with assistant; else why not."""
    turns, problem = read_turns(messages, "messages")
    return problem or role_order_problem([turn.role for turn in turns], last="assistant")


def _roles(roles: list[str]) -> str:
    """The roles for a message; a huge conversation shows its first few and its length."""
    return str(roles) if len(roles) <= 8 else f"[{', '.join(roles[:6])}, ... ({len(roles)} messages)]"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return "null" if value is None else f"a {type(value).__name__}"


def field_text(field: str, value: Any) -> tuple[str | None, str]:
    """A prompt_completion or preference field as text, or (None, why not). A TRL conversational field (a list of
    messages) becomes the text it stands for: a prompt folds like a chat row's earlier turns and must end with the
    user's turn; an answer (completion, chosen, rejected) is one assistant message. An OpenAI preference `input`
    is `{messages: [...]}`. Anything else reads as before (a JSON answer stays compact JSON text)."""
    if field == "prompt" and isinstance(value, dict) and "messages" in value:
        value = value["messages"] if value["messages"] != [] else None
    if isinstance(value, list) and not value:
        return "", ""  # an empty conversation is an empty field
    if not (isinstance(value, list) and isinstance(value[0], dict) and ("role" in value[0] or "from" in value[0])):
        return as_text(value), ""
    turns, problem = read_turns(value, field)
    if problem:
        return None, problem
    roles = [turn.role for turn in turns]
    if field == "prompt":
        problem = role_order_problem(roles, last="user")
        return (None, f"prompt: {problem}") if problem else (fold_chat([(t.role, t.content) for t in turns]), "")
    if roles != ["assistant"]:
        return None, f"{field} must be one assistant message, not {_roles(roles)}"
    return turns[0].content, ""


def as_text(value: Any) -> str:
    """A completion given as a JSON object is kept as compact JSON text, the form the model should learn to write."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
