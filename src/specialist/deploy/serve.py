"""`specialist serve`: an OpenAI-compatible API over one or more arms, with A/B routing and on-the-fly batching.

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (both stream over SSE with `stream: true`),
/v1/feedback, /health, /metrics (Prometheus text). The request's input is wrapped in each arm's prompt format,
the same the model was trained and evaluated with; a chat request's last user turn is the input (earlier turns
and a system message are folded in as in `prepare`).

Routing: `model` naming an arm goes to that arm; the router name (`specialist`, the first entry of /v1/models)
splits traffic by `--split`, sticky per `user` (a hash of it picks the arm), random without one.

Every request is checked before it is queued: the body is refused as soon as it passes the byte limit, JSON must
be plain (no NaN, no huge integers, bounded nesting), every field must have its type and range, text must be valid
Unicode, and the prompt must fit `max_prompt_tokens`. Each failure is a 4xx in OpenAI's error shape, counted in
/metrics by kind, and costs the other clients nothing.

OpenAI's request fields are honoured or refused, never silently dropped: `response_format` (json_object, json_schema)
decodes through `specialist.constrain`, `stop`, `seed`, `logprobs`/`top_logprobs` and `stream_options.include_usage`
reach the engine and the response; fields it cannot honour (tools, penalties, logit_bias, n > 1, ...) are a 400
naming the field unless they hold their no-op value (UNSUPPORTED); fields OpenAI does not define are ignored with a
warning in the log, as vLLM does.

Batching: each arm has a bounded queue and one worker that takes up to `max_batch` waiting requests (streamed or
not, waiting at most `max_wait_ms` for company) and answers them together through the shared generation engine
(`specialist.generation`), each row ending on its own. A full queue answers 503 with Retry-After at once. A batch
that fails is retried request by request, so one request cannot fail another; a generation error ends a stream
with an error event; a client that hangs up cancels its own row at the next token. On SIGTERM the server stops
taking requests, lets the ones in flight finish for up to `drain_seconds`, cancels the rest and exits.

Every request is recorded in SQLite (`--db`): arm, latency, tokens in/out, whether the output passed the run's
format check, the user (salted hash), and with `--log-prompts` the prompt and output (with `--scrub-logs` scrubbed
of secrets and personal data first; `--log-max-rows` / `--log-max-age` bound the log).

Shadow arms (`specialist.deploy.shadow`) answer a share of the requests after their live answer, in the background;
their answers go to the log only. `POST /admin/arms/{name}` (bearer `--admin-key`, a key of its own) replaces a live
arm with a run or export folder under an `--admin-root`: the new model loads beside the old one, requests queued
or generating finish on the old arm (each job carries the arm it was encoded for), and later ones go to the new.

Where each part lives: this module holds the server's state, the answering and the handlers; the request bodies and
their checks are serve_requests.py's, the settings serve_settings.py's, the error shape api_errors.py's, and the
router, the arms' queues and batching workers and the /metrics counters dispatch.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from specialist.deploy.api_errors import ApiError
from specialist.deploy.arms import ServedArm
from specialist.deploy.dispatch import ROUTER, ArmWorker, Job, Metrics, Router
from specialist.deploy.records import LoggedRequest, RequestLog
from specialist.deploy.serve_requests import (
    ChatBody,
    CompletionBody,
    FeedbackBody,
    RequestBody,
    Text,
    chat_input,
    check_combinations,
    parse_body,
    read_json_body,
    refuse_unsupported,
)
from specialist.deploy.serve_settings import ServeSettings
from specialist.deploy.shadow import ShadowJob, ShadowRunner
from specialist.generation import Generation, Request as GenerationRequest, Sampling

ADMIN_PREFIX = "/admin/"
OPEN_PATHS = ("/health",)  # liveness probes answer without the key; everything else needs it when one is set


# ---- errors ---------------------------------------------------------------------------------------------------


def error_response(state: ServeState | None, error: ApiError) -> JSONResponse:
    if state is not None:
        state.metrics.count_error(error.status, error.code)
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# ---- the server's state ----------------------------------------------------------------------------------------


class ServeState:
    """Everything the handlers share: arms, router, workers, log, metrics, settings."""

    def __init__(self, arms: dict[str, ServedArm], settings: ServeSettings,
                 shadows: dict[str, ServedArm] | None = None, loader: ArmLoader | None = None) -> None:
        self.arms, self.settings, self.loader = arms, settings, loader
        self.router = Router(arms, settings.split)
        self.log = RequestLog(settings.db, scrub=settings.scrub_logs, max_rows=settings.log_max_rows,
                              max_age_s=settings.log_max_age_s)
        self.shadow = ShadowRunner(shadows, self.log, settings.shadow, self.live_busy,
                                   settings.log_prompts) if shadows else None
        on_submit = self.shadow.preempt if self.shadow else None
        self.workers = {name: ArmWorker(arm, settings, on_submit) for name, arm in arms.items()}
        self.metrics = Metrics()
        self.started = time.time()
        self.swap_lock = asyncio.Lock()
        self.swaps = 0

    def live_busy(self) -> bool:
        """Whether any live arm has a request waiting or generating (shadows wait for a gap)."""
        return any(worker.queue.qsize() or worker.in_flight for worker in self.workers.values())

    def swap(self, name: str, arm: ServedArm) -> ServedArm:
        """Serve `arm` as `name` from the next request on; jobs already queued keep the arm they were encoded for."""
        old = self.arms[name]
        self.arms[name] = arm
        self.workers[name].arm = arm
        self.swaps += 1
        return old


ArmLoader = Callable[[str, str], ServedArm]  # (arm name, source folder) -> a loaded arm, on a worker thread


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve


# ---- answering ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Asked:
    """What a client asked, as the log keeps it: the endpoint (chat or completion), the input text, the caller, and
    when the request was queued (`time.perf_counter()`, what its latency counts from)."""

    kind: str
    text: str
    user: str | None
    started: float


async def answer(request: Request, body: ChatBody | CompletionBody, text: str, kind: str) -> Response:
    state = serve_state(request)
    refuse_unsupported(body)
    check_combinations(body)
    arm_name = state.router.pick(body.model, body.user)
    if arm_name is None:
        raise ApiError(404, f"model {body.model!r} does not exist; see /v1/models", "model_not_found", param="model")
    arm = state.arms[arm_name]
    max_tokens = _answer_limit(body, arm, state.settings)
    # off the event loop: a chat template is code (a hostile one runs until its deadline: bounded.TimedOut), and a
    # response_format's schema compiles into a grammar here, so a schema that cannot is this request's 400
    prompt_ids = await asyncio.to_thread(_encode_within_limit, arm, text, max_tokens, state.settings)
    constraint = await asyncio.to_thread(response_constraint, body, arm)
    row = GenerationRequest(prompt_ids, max_tokens, stop=body.stop or (), constraint=constraint,
                            logprobs=_logprobs_asked(body, arm))
    job = _new_job(row, Sampling.of(body.temperature, body.top_p, body.seed), stream=body.stream)
    job.arm = arm
    asked = Asked(kind, text, body.user, time.perf_counter())
    state.workers[arm_name].submit(job)
    if body.stream:
        return StreamingResponse(_stream_events(state, job, body, arm_name, asked), media_type="text/event-stream")
    result = await _wait_for(job, request)
    request_id = new_request_id(kind)
    await record(state, request_id, job, result, asked)
    return JSONResponse(openai_body(kind, request_id, arm_name, result, choice_logprobs(arm.tokenizer, result)))


def _logprobs_asked(body: RequestBody, arm: ServedArm) -> int | None:
    """How many alternatives each answer token's log-probability comes with (None: no log-probabilities)."""
    if not isinstance(body, ChatBody) or not body.logprobs:
        return None
    if arm.answers_labels:
        raise ApiError(400, f"logprobs: arm {arm.name!r} is a classifier; its answer carries every label's "
                            "probability instead", "unsupported_parameter", param="logprobs")
    return body.top_logprobs or 0


def response_constraint(body: RequestBody, arm: ServedArm):
    """The output language `response_format` asks for, compiled for the arm's tokenizer (None: free text)."""
    form = getattr(body, "response_format", None)
    if form is None or form.type == "text":
        return None
    from specialist.constrain import Constraint, grammars_for
    from specialist.errors import ConfigError

    param = "response_format.json_schema.schema" if form.type == "json_schema" else "response_format"
    if arm.answers_labels:
        raise ApiError(400, f"response_format: arm {arm.name!r} is a classifier; it answers one of its labels",
                       "unsupported_parameter", param="response_format")
    try:
        # json_object: any JSON object, as OpenAI's JSON mode promises
        constraint = Constraint.json_schema(form.json_schema.schema_ if form.type == "json_schema" else
                                            {"type": "object"})
        grammars_for(arm.tokenizer).compiled(constraint)  # cached: the batch that answers it does not compile again
    except ConfigError as exc:
        raise ApiError(400, f"{param}: {str(exc).splitlines()[0]}", "invalid_schema", param=param) from None
    return constraint


def _answer_limit(body: RequestBody, arm: ServedArm, settings: ServeSettings) -> int:
    asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if asked is None:
        return min(arm.max_new_tokens, settings.max_tokens_limit)
    if asked > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens {asked} is over this server's limit {settings.max_tokens_limit}",
                       "invalid_value", param="max_tokens")
    return asked


def _encode_within_limit(arm: ServedArm, text: str, max_tokens: int, settings: ServeSettings) -> list[int]:
    from specialist.bounded import TimedOut

    if not text.strip():
        raise ApiError(400, "the input is empty", "invalid_value", param="messages")
    try:
        ids = arm.engine.encode(text, max_new_tokens=max_tokens)
    except TimedOut as exc:
        raise ApiError(400, f"this input cannot be answered: {exc}", "prompt_render_timeout",
                       param="messages") from None
    if len(ids) > settings.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, over this server's limit of "
                            f"{settings.max_prompt_tokens}", "context_length_exceeded", param="messages")
    return ids


def _new_job(request: GenerationRequest, sampling: Sampling, stream: bool) -> Job:
    loop = asyncio.get_running_loop()
    job = Job(request, sampling, loop.create_future(), asyncio.Queue() if stream else None)
    if stream:
        def hand_over(piece: str, logprobs: tuple = ()) -> None:  # called on the generation thread
            job.streamed_any = True
            loop.call_soon_threadsafe(job.events.put_nowait, ("piece", (piece, logprobs)))

        request.on_text = hand_over
    return job


async def _wait_for(job: Job, request: Request) -> Generation:
    """The job's answer; a client that hangs up meanwhile cancels its row."""
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                job.request.cancelled.set()
        return job.future.result()
    except ApiError:
        raise
    except asyncio.CancelledError:
        job.request.cancelled.set()
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the client in OpenAI's shape
        raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "generation_failed",
                       kind="server_error") from None


async def _stream_events(state: ServeState, job: Job, body: RequestBody, arm_name: str, asked: Asked):
    chunks = ChunkWriter(asked.kind, new_request_id(asked.kind), arm_name, job.arm.tokenizer, body)
    try:
        if asked.kind == "chat":  # OpenAI's first chunk names the speaker; clients build the message from it
            yield _sse(chunks.chunk({"role": "assistant", "content": ""}))
        while True:
            what, value = await job.events.get()
            if what == "piece":
                yield _sse(chunks.piece(*value))
            elif what == "done":
                # recorded before the last chunk, so feedback sent on [DONE] finds the request
                await record(state, chunks.request_id, job, value, asked)
                yield _sse(chunks.last(value))
                if chunks.include_usage:
                    yield _sse(chunks.usage(value))
                yield "data: [DONE]\n\n"
                return
            else:
                error = value if isinstance(value, ApiError) else ApiError(
                    500, f"generation failed: {type(value).__name__}: {value}", "generation_failed", kind="server_error")
                state.metrics.count_error(error.status, error.code)
                yield _sse({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})
                return
    finally:  # the stream ended, or its client hung up: nothing more to generate for it
        job.request.cancelled.set()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def record(state: ServeState, request_id: str, job: Job, result: Generation, asked: Asked) -> None:
    """Log the live answer (judged by the arm that gave it, even if swapped out since), then offer the request to
    the shadows: they start only once it is answered. The latency runs from queueing to this call."""
    latency = time.perf_counter() - asked.started
    arm = job.arm
    passed = await format_verdict(state, arm, result.text)
    log_text = state.settings.log_prompts
    # scrubbing runs regexes over the text: off the event loop, like the format check
    await asyncio.to_thread(state.log.add, LoggedRequest(
        request_id=request_id, arm=arm.name, endpoint=asked.kind, user=asked.user, latency_s=latency,
        tokens_in=result.prompt_tokens, tokens_out=result.completion_tokens, format_ok=passed,
        finish_reason=result.finish_reason, prompt=asked.text if log_text else None,
        output=result.text if log_text else None, confidence=confidence_of(result)))
    state.metrics.count_request(arm.name, latency)
    if state.shadow is not None and result.finish_reason != "cancelled":
        state.shadow.offer(ShadowJob(request_id, asked.text, result.text, job.request.max_new_tokens, job.sampling))


def confidence_of(result: Generation) -> float | None:
    """A classifier arm's probability of the label it answered (what `harvest` ranks low confidence by)."""
    if not result.probabilities:
        return None
    return max(result.probabilities.values())


async def format_verdict(state: ServeState, arm: ServedArm, output: str) -> bool | None:
    """Whether `output` passed the arm's format check, judged off the event loop (the check parses JSON and runs
    the schema's patterns on the model's text). A check that fails or times out is a failed check, counted in
    /metrics by kind: the request is still answered and logged, so the pass rate keeps the malformed answers."""
    if arm.format_check is None:
        return None
    try:
        return bool(await asyncio.to_thread(arm.format_check, output))
    except Exception as exc:  # noqa: BLE001 - any answer must be recorded; bounded.TimedOut is the usual one
        from specialist.bounded import TimedOut

        state.metrics.count_format_failure("timed_out" if isinstance(exc, TimedOut) else type(exc).__name__)
        return False


def new_request_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _finish_reason(result: Generation) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def usage_of(result: Generation) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def openai_body(kind: str, request_id: str, arm: str, result: Generation,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's response shape; a classifier arm's choice also carries `probabilities` ({label: probability})."""
    head = {"id": request_id, "created": int(time.time()), "model": arm, "usage": usage_of(result)}
    extra = {"probabilities": result.probabilities} if result.probabilities is not None else {}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                  "finish_reason": _finish_reason(result), "logprobs": logprobs, **extra}
        return {**head, "object": "chat.completion", "choices": [choice]}
    choice = {"index": 0, "text": result.text, "finish_reason": _finish_reason(result), "logprobs": None, **extra}
    return {**head, "object": "text_completion", "choices": [choice]}


def choice_logprobs(tokenizer, result: Generation) -> dict[str, Any] | None:
    """A chat choice's `logprobs`: {"content": [one entry per answer token], "refusal": None}, or None unasked."""
    if result.logprobs is None:
        return None
    return {"content": token_logprobs(tokenizer, result.logprobs), "refusal": None}


def token_logprobs(tokenizer, entries) -> list[dict[str, Any]]:
    """OpenAI's ChatCompletionTokenLogprob for each entry: the token's text and UTF-8 bytes, its log-probability
    (-9999.0 for one too small for a float, as OpenAI writes it: JSON has no -Infinity) and its top alternatives."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode("utf-8"))}

    return [{**one(entry.token_id, entry.logprob), "top_logprobs": [one(i, lp) for i, lp in entry.top]}
            for entry in entries]


class ChunkWriter:
    """The chunks of one streamed answer in OpenAI's shape, all with the same id and time: pieces (with their
    tokens' log-probabilities, where asked), the last chunk (finish reason, the log-probabilities not yet sent),
    and with `stream_options.include_usage` the usage chunk after it (no choices), every other chunk carrying
    `usage: null`."""

    def __init__(self, kind: str, request_id: str, arm: str, tokenizer, body: RequestBody) -> None:
        self.kind, self.request_id, self.tokenizer = kind, request_id, tokenizer
        self.head = {"id": request_id, "created": int(time.time()), "model": arm,
                     "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
        self.include_usage = body.stream_options is not None and body.stream_options.include_usage
        self.logprobs = kind == "chat" and bool(getattr(body, "logprobs", None))
        self.sent_logprobs = 0

    def chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs=()) -> dict[str, Any]:
        if self.kind == "chat":
            listed = {"content": token_logprobs(self.tokenizer, logprobs), "refusal": None} if self.logprobs else None
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": listed}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
        return {**self.head, "choices": [choice], **({"usage": None} if self.include_usage else {})}

    def piece(self, text: str, logprobs=()) -> dict[str, Any]:
        self.sent_logprobs += len(logprobs)
        return self.chunk({"content": text}, logprobs=logprobs)

    def last(self, result: Generation) -> dict[str, Any]:
        rest = result.logprobs[self.sent_logprobs:] if result.logprobs else ()
        data = self.chunk({}, _finish_reason(result), rest)
        if result.probabilities is not None:  # a classifier arm: its probabilities ride on the last chunk
            data["choices"][0]["probabilities"] = result.probabilities
        return data

    def usage(self, result: Generation) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage_of(result)}


# ---- handlers -------------------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    body = parse_body(ChatBody, await read_json_body(request, serve_state(request).settings))
    return await answer(request, body, chat_input(body.messages), "chat")


async def completions(request: Request) -> Response:
    body = parse_body(CompletionBody, await read_json_body(request, serve_state(request).settings))
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    return await answer(request, body, prompt, "completion")


async def feedback(request: Request) -> Response:
    state = serve_state(request)
    body = parse_body(FeedbackBody, await read_json_body(request, state.settings))
    low, high = state.settings.feedback_range
    if not low <= body.score <= high:
        raise ApiError(400, f"score must be between {low:g} and {high:g}", "invalid_value", param="score")
    if body.comment is not None and len(body.comment) > state.settings.max_comment_chars:
        raise ApiError(400, f"comment is over {state.settings.max_comment_chars} characters", "invalid_value",
                       param="comment")
    if not state.log.add_feedback(body.id, float(body.score), body.comment):
        raise ApiError(404, f"no request with id {body.id!r}", "not_found", param="id")
    return JSONResponse({"ok": True})


async def list_models(request: Request) -> Response:
    state = serve_state(request)
    data = [{"id": name, "object": "model", "created": int(state.started), "owned_by": "specialist"}
            for name in [ROUTER, *state.arms]]
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> Response:
    state = serve_state(request)
    return JSONResponse({"status": "ok", "arms": list(state.arms), "uptime_s": round(time.time() - state.started, 1)})


async def metrics(request: Request) -> Response:
    state = serve_state(request)
    text = state.metrics.render(state.workers)
    if state.shadow is not None:
        text += "\n".join(state.shadow.render()) + "\n"
    text += f"# TYPE specialist_arm_swaps_total counter\nspecialist_arm_swaps_total {state.swaps}\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SwapBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    source: Annotated[Text, Field(min_length=1, max_length=1024)]


async def swap_arm(request: Request) -> Response:
    """POST /admin/arms/{name} {"source": FOLDER}: serve the run or export FOLDER as live arm `name`. The key is
    checked before the body is read; the name must be a served arm; the folder must lie under an --admin-root.
    One swap at a time (a second answers 409); the model loads on a thread while the old arm keeps answering."""
    state = serve_state(request)
    check_admin(request, state.settings)
    name = request.path_params["name"]
    if not ARM_NAME.fullmatch(name):
        raise ApiError(400, "arm name: letters, digits, '.', '_' or '-', at most 64", "invalid_value", param="name")
    if name not in state.arms:
        raise ApiError(404, f"no live arm {name!r}; arms: {sorted(state.arms)}", "not_found", param="name")
    body = parse_body(SwapBody, await read_json_body(request, state.settings))
    source = admin_source(body.source, state.settings.admin_roots)
    if state.loader is None:
        raise ApiError(503, "this server was started without a loader for swaps", "swap_unavailable",
                       kind="server_error")
    if state.swap_lock.locked():
        raise ApiError(409, "another swap is loading; retry when it is done", "swap_in_progress")
    async with state.swap_lock:
        new_arm = await _load_for_swap(state, name, source)
        old = state.swap(name, new_arm)
    logging.getLogger("specialist.serve").warning("arm %s now served from %s (was %s)", name, source, old.source)
    return JSONResponse({"ok": True, "arm": name, "source": str(source), "previous": old.source})


async def _load_for_swap(state: ServeState, name: str, source: Path) -> ServedArm:
    from specialist.errors import SpecialistError

    try:
        return await asyncio.to_thread(state.loader, name, str(source))
    except SpecialistError as exc:
        raise ApiError(400, f"source: cannot serve it: {str(exc).splitlines()[0][:300]}", "invalid_source",
                       param="source") from None
    except Exception as exc:  # noqa: BLE001 - the old arm keeps serving; the admin gets the reason
        raise ApiError(500, f"loading the new arm failed: {type(exc).__name__}: {str(exc)[:300]}",
                       "swap_failed", kind="server_error") from None


def check_admin(request: Request, settings: ServeSettings) -> None:
    """403 when the server has no admin key (the endpoint is off), 401 for a missing or wrong one."""
    if settings.admin_key is None:
        raise ApiError(403, "the admin endpoint is off: start the server with --admin-key (SPECIALIST_ADMIN_KEY)",
                       "admin_disabled", kind="permission_error")
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {settings.admin_key}".encode()):
        raise ApiError(401, "invalid or missing admin key (Authorization: Bearer ...)", "invalid_admin_key",
                       headers={"WWW-Authenticate": "Bearer"})


def admin_source(text: str, roots: tuple[Path, ...]) -> Path:
    """The folder a swap may load: resolved (links followed), inside one of `roots`, and a run or export folder;
    a 400 naming the reason otherwise, so a leaked admin key cannot make the server read arbitrary paths."""
    from specialist.run_folder import ExportFolder, RunFolder

    if "\x00" in text:
        raise ApiError(400, "source: holds a NUL character", "invalid_source", param="source")
    path = Path(text).expanduser().resolve()
    if not any(path == root.resolve() or root.resolve() in path.parents for root in roots):
        raise ApiError(400, "source: not under an --admin-root of this server", "invalid_source", param="source")
    if not (RunFolder.is_run(path) or ExportFolder.is_export(path)):
        raise ApiError(400, "source: not a run or export folder", "invalid_source", param="source")
    return path


async def require_key(request: Request, call_next):
    """Every path but /health needs the key when one is set (the API, /metrics, /docs, /openapi.json)."""
    state = serve_state(request)
    key = state.settings.api_key
    # the admin endpoint checks its own key (the API key would let every client swap the models)
    if key and request.url.path not in OPEN_PATHS and not request.url.path.startswith(ADMIN_PREFIX):
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {key}".encode()):
            return error_response(state, ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                  "invalid_api_key"))
    return await call_next(request)


async def on_api_error(request: Request, error: ApiError) -> Response:
    return error_response(serve_state(request), error)


async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_response(serve_state(request), ApiError(error.status_code, str(error.detail), code))


async def on_unexpected(request: Request, error: Exception) -> Response:
    return error_response(serve_state(request), ApiError(500, f"internal error: {type(error).__name__}",
                                                         "internal_error", kind="server_error"))


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: ServeState = app.state.serve
    tasks = [asyncio.create_task(worker.run()) for worker in state.workers.values()]
    if state.shadow is not None:
        tasks.append(asyncio.create_task(state.shadow.run()))
    try:
        yield
    finally:
        for worker in state.workers.values():
            worker.cancel_all()
        if state.shadow is not None:
            state.shadow.close()
        for task in tasks:
            task.cancel()
        state.log.close()


def create_app(arms: dict[str, ServedArm], settings: ServeSettings, shadows: dict[str, ServedArm] | None = None,
               loader: ArmLoader | None = None) -> FastAPI:
    """The FastAPI application; `specialist serve` runs it under uvicorn, tests and notebooks in a thread.
    `shadows` answer in the background only; `loader` loads the arm an admin swap asks for."""
    overlap = set(arms) & set(shadows or {})
    if overlap:
        from specialist.errors import ConfigError

        raise ConfigError(f"arm name(s) {sorted(overlap)} are both live and shadow", hint="give each its own NAME")
    app = FastAPI(title="specialist", lifespan=lifespan)
    app.state.serve = ServeState(arms, settings, shadows, loader)
    app.state.workers = app.state.serve.workers
    app.middleware("http")(require_key)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/feedback", feedback, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route(ADMIN_PREFIX + "arms/{name}", swap_arm, methods=["POST"])
    return app


def run_server(app: FastAPI, host: str, port: int, settings: ServeSettings) -> None:
    """Serve until SIGTERM/SIGINT, then drain for at most `drain_seconds` and exit."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=max(1, math.ceil(settings.drain_seconds)))


class BackgroundServer:
    """The app under uvicorn in a thread on a free loopback port: for notebooks, tests and benchmarks.

        with BackgroundServer(create_app(arms, settings)) as server:
            OpenAI(base_url=f"{server.url}/v1", api_key="-")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
