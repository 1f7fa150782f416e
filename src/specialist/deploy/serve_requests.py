"""The requests `specialist serve` accepts, checked before anything is queued: the body read no further than the
byte limit, plain JSON (no NaN, no huge integers, bounded nesting), every field of OpenAI's with its type and range,
valid Unicode, and the fields this server cannot honour refused by name (`UNSUPPORTED`) unless they hold their
no-op value. Each failure is an `ApiError` (a 4xx in OpenAI's shape)."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from specialist.deploy.api_errors import ApiError
from specialist.deploy.serve_settings import ServeSettings


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone surrogate (invalid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Number = Annotated[float, Field(allow_inf_nan=False)]


Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; the length bounds the check every token makes against each


def _stop_strings(value: Any) -> tuple[str, ...] | None:
    """`stop` as a tuple: a string or a list of up to MAX_STOPS non-empty strings (an empty one would end every
    answer before it began), each valid Unicode of at most MAX_STOP_CHARS characters."""
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS:
        raise ValueError(f"must be a string or a list of 1 to {MAX_STOPS} strings")
    for stop in stops:
        if not isinstance(stop, str) or not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise ValueError(f"each stop must be a string of 1 to {MAX_STOP_CHARS} characters")
        _valid_unicode(stop)
    return tuple(stops)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class RequestBody(BaseModel):
    # strict: `true` is not 1 and "0.5" is not 0.5. Fields OpenAI defines that this server cannot honour are
    # declared so `refuse_unsupported` can refuse them by name; fields OpenAI does not define are ignored with a
    # warning in the log, as vLLM does (clients send their own extensions)
    model_config = ConfigDict(strict=True, extra="allow")

    model: Annotated[Text, Field(max_length=256)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: Annotated[Any, AfterValidator(_stop_strings)] = None
    seed: Seed | None = None
    user: Annotated[Text, Field(max_length=256)] | None = None
    # accepted and ignored: they ask nothing of the answer
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    # refused unless they hold their no-op value (UNSUPPORTED)
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: Any = None


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: Text


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[_TextPart], Field(min_length=1)]
    tool_calls: Any = None  # refused: this server runs no tools
    function_call: Any = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class _JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the answer is held to the schema either way


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchemaFormat | None = None


class ChatBody(RequestBody):
    messages: Annotated[list[_Message], Field(min_length=1, max_length=512)]
    response_format: _ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    parallel_tool_calls: Any = None  # without tools (refused) it asks for nothing
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    prompt_cache_retention: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None


class CompletionBody(RequestBody):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    id: Annotated[Text, Field(min_length=1, max_length=128)]
    score: Number
    comment: Text | None = None


# OpenAI fields this server cannot honour, each with the values that ask for nothing (what a client sends by default):
# any other value is a 400 naming the field, never silence
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1),
}
_WHY = {"tools": "this server runs no tools", "tool_choice": "this server runs no tools",
        "functions": "this server runs no functions", "function_call": "this server runs no functions",
        "logprobs": "log-probabilities are served on /v1/chat/completions only"}


def refuse_unsupported(body: RequestBody) -> None:
    """A 400 naming the first field (the request's, then its messages') that asks for what this server does not
    do; fields OpenAI does not define are logged once each and ignored."""
    fields = type(body).model_fields
    for name, allowed in UNSUPPORTED.items():
        value = getattr(body, name, None) if name in fields else None
        if not any(value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in allowed):
            _refuse(name, value)
    if isinstance(body, CompletionBody) and body.logprobs is not None:
        _refuse("logprobs", body.logprobs)
    for n, message in enumerate(getattr(body, "messages", [])):
        for name in ("tool_calls", "function_call"):
            if getattr(message, name) not in (None, []):
                _refuse(f"messages.{n}.{name}", getattr(message, name))
    _warn_ignored(sorted(body.model_extra or {}))


def check_combinations(body: RequestBody) -> None:
    """Fields that only mean something beside another, refused alone as OpenAI refuses them."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed with stream: true", "invalid_value", param="stream_options")
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "invalid_value", param="top_logprobs")
        form = body.response_format
        if form is not None and form.type == "json_schema" and form.json_schema is None:
            raise ApiError(400, "response_format.json_schema: required when type is json_schema", "invalid_value",
                           param="response_format.json_schema")


def _refuse(name: str, value: Any) -> None:
    why = _WHY.get(name.rsplit(".", 1)[-1], "this server does not support it")
    raise ApiError(400, f"{name}: {why}; leave it out (got {json.dumps(value, default=str)[:80]})",
                   "unsupported_parameter", param=name)


_WARNED: set[str] = set()


def _warn_ignored(names: list[str]) -> None:
    new = [name for name in names if name not in _WARNED][:20]
    if new and len(_WARNED) < 1000:  # bounded: a client inventing names cannot grow it or flood the log
        _WARNED.update(new)
        logging.getLogger("specialist.serve").warning("ignored request field(s) this server does not know: %s",
                                                      ", ".join(name[:64] for name in new))


def parse_body(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], "invalid_" + _kind(first),
                       param=param) from None


def _kind(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing_field"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "finite_number"):
        return "value"
    return "type" if kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid") else "value"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json_body(request: Request, settings: ServeSettings) -> Any:
    """The request's JSON, read no further than the byte limit; plain JSON only (no NaN/Infinity)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > settings.max_request_bytes):
        raise _too_large(settings)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_request_bytes:
            raise _too_large(settings)
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ApiError(400, f"request body is not valid JSON: {reason}", "invalid_json") from None


def _too_large(settings: ServeSettings) -> ApiError:
    return ApiError(413, f"request body over {settings.max_request_bytes} bytes", "request_too_large")


def chat_input(messages: list[_Message]) -> str:
    """The model input for a chat request: the last user turn, with a system message and earlier turns before it."""
    from specialist.data.shapes import fold_chat

    turns = [("system" if m.role == "developer" else m.role, m.text()) for m in messages]
    if turns[-1][0] == "assistant":  # a trailing assistant turn is not part of the question
        turns = turns[:-1]
    if not any(role == "user" for role, _ in turns):
        raise ApiError(400, "messages: a chat request needs a user message", "invalid_value", param="messages")
    return fold_chat(turns)
