"""`specialist serve`: an OpenAI-compatible API over one or more arms, with A/B routing and on-the-fly batching.

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (both stream over SSE with `stream: true`),
/v1/feedback, /health, /metrics (Prometheus text). The request's input is wrapped in each arm's prompt format,
the same the model was trained and evaluated with; a chat request's last user turn is the input (earlier turns
and a system message are folded in as in `prepare`).

Routing: `model` naming an arm goes to that arm; the router name (`specialist`, the first entry of /v1/models)
splits traffic by `--split`, sticky per `user` (a hash of it picks the arm), random without one.

Batching: each arm has a bounded queue and one worker that takes up to `max_batch` waiting requests (waiting at
most `max_wait_ms` for company), generates them together with left padding, and answers each. A full queue
answers 503 with Retry-After at once. Streaming requests run one at a time through the same queue slot logic.

Every request is recorded in SQLite (`--db`): arm, latency, tokens in/out, whether the output passed the run's
format check, the user (hashed), and with `--log-prompts` the prompt and output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from specialist.deploy.arms import ServedArm
from specialist.deploy.records import RequestLog

ROUTER = "specialist"


@dataclass
class ServeSettings:
    split: dict[str, float]
    db: Path
    api_key: str | None = None
    log_prompts: bool = False
    max_batch: int = 8
    max_wait_ms: float = 10.0
    queue_size: int = 64
    max_tokens_limit: int = 512
    max_request_bytes: int = 64 * 1024
    retry_after_s: int = 1


@dataclass
class _Pending:
    input_text: str
    max_tokens: int
    sampling: tuple[bool, float, float]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class ArmWorker:
    """One arm's queue and the batching loop that drains it."""

    def __init__(self, arm: ServedArm, settings: ServeSettings) -> None:
        self.arm, self.settings = arm, settings
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=settings.queue_size)
        self.lock = threading.Lock()  # one generation at a time per model (torch threads are shared anyway)
        self.batches = 0
        self.batched_requests = 0

    async def run(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    item = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                batch.append(item)
            groups: dict[tuple, list[_Pending]] = defaultdict(list)
            for item in batch:
                groups[item.sampling].append(item)
            for sampling, items in groups.items():
                await self._generate(items, sampling)

    async def _generate(self, items: list[_Pending], sampling: tuple[bool, float, float]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(None, self.generate_batch, [i.input_text for i in items],
                                                 max(i.max_tokens for i in items), sampling,
                                                 [i.max_tokens for i in items])
        except Exception as exc:  # a failed batch answers every request in it, never leaves one hanging
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.batches += 1
        self.batched_requests += len(items)
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def generate_batch(self, inputs: list[str], max_new_tokens: int, sampling: tuple[bool, float, float],
                       limits: list[int]) -> list[dict[str, Any]]:
        import torch

        from specialist.evaluate.generate import cut_at_stop, left_pad

        arm = self.arm
        encoded = [arm.template.encode_prompt(text, arm.tokenizer) for text in inputs]
        input_ids, attention_mask = left_pad(encoded, arm.tokenizer.pad_token_id)
        do_sample, temperature, top_p = sampling
        options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        with self.lock, torch.inference_mode():
            generated = arm.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           max_new_tokens=max_new_tokens, eos_token_id=arm.stop_ids,
                                           pad_token_id=arm.tokenizer.pad_token_id, **options)
        results = []
        for row, prompt_ids, limit in zip(generated[:, input_ids.shape[1]:].tolist(), encoded, limits, strict=True):
            row = row[:limit]
            ended = next((n for n, t in enumerate(row) if t in arm.stop_ids), None)
            tokens = row[: ended + 1] if ended is not None else row
            text = cut_at_stop(arm.tokenizer.decode(tokens, skip_special_tokens=True), arm.template.stop_strings)
            results.append({"text": text, "prompt_tokens": len(prompt_ids),
                            "completion_tokens": len(tokens), "finish_reason": "stop" if ended is not None else "length"})
        return results


class Router:
    def __init__(self, arms: dict[str, ServedArm], split: dict[str, float]) -> None:
        self.arms, self.split = arms, split

    def pick(self, requested: str | None, user: str | None) -> str | None:
        """The arm for a request: named directly, or drawn from the split (sticky per user)."""
        if requested in self.arms:
            return requested
        if requested not in (None, "", ROUTER):
            return None
        draw = _user_fraction(user) if user else random.random()
        cumulative = 0.0
        for name, weight in self.split.items():
            cumulative += weight
            if draw < cumulative:
                return name
        return next(iter(self.split))


def _user_fraction(user: str) -> float:
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") / 2**64


def new_request_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def user_hash(user: str | None) -> str | None:
    return hashlib.sha256(user.encode()).hexdigest()[:16] if user else None


def chat_input(messages: list[dict[str, Any]]) -> str:
    """The model input for a chat request: the last user turn, with a system message and earlier turns before it."""
    from specialist.data.shapes import as_text, fold_chat

    turns = [(m.get("role", "user"), as_text(m.get("content"))) for m in messages]
    if turns[-1][0] == "assistant":  # a trailing assistant turn is not part of the question
        turns = turns[:-1]
    return fold_chat(turns)


def create_app(arms: dict[str, ServedArm], settings: ServeSettings):
    """The FastAPI application; `specialist serve` runs it under uvicorn, tests under a thread."""
    router = Router(arms, settings.split)
    workers = {name: ArmWorker(arm, settings) for name, arm in arms.items()}
    log = RequestLog(settings.db)
    counters: dict[str, Any] = defaultdict(int)
    latencies: dict[str, list[float]] = defaultdict(list)
    started = time.time()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        tasks = [asyncio.create_task(worker.run()) for worker in workers.values()]
        yield
        for task in tasks:
            task.cancel()
        log.close()

    app = FastAPI(title="specialist", lifespan=lifespan)

    def error(status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None):
        counters[f"errors_{status}"] += 1
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                            status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
                return error(401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_request_error",
                             "invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > settings.max_request_bytes:
                return error(413, f"request body over {settings.max_request_bytes} bytes", "invalid_request_error",
                             "request_too_large")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "arms": list(arms), "uptime_s": round(time.time() - started, 1)}

    @app.get("/v1/models")
    async def models():
        names = [ROUTER, *arms]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": int(started), "owned_by": "specialist"}
                                           for n in names]}

    @app.get("/metrics")
    async def metrics():
        lines = ["# TYPE specialist_requests_total counter"]
        for key, value in sorted(counters.items()):
            if key.startswith("requests_"):
                lines.append(f'specialist_requests_total{{arm="{key[9:]}"}} {value}')
        lines.append("# TYPE specialist_errors_total counter")
        for key, value in sorted(counters.items()):
            if key.startswith("errors_"):
                lines.append(f'specialist_errors_total{{status="{key[7:]}"}} {value}')
        lines.append("# TYPE specialist_latency_seconds summary")
        for arm, values in sorted(latencies.items()):
            ordered = sorted(values[-1000:])
            for q in (0.5, 0.95):
                lines.append(f'specialist_latency_seconds{{arm="{arm}",quantile="{q}"}} '
                             f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.4f}")
        lines.append("# TYPE specialist_queue_depth gauge")
        for name, worker in workers.items():
            lines.append(f'specialist_queue_depth{{arm="{name}"}} {worker.queue.qsize()}')
            lines.append(f'specialist_batches_total{{arm="{name}"}} {worker.batches}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> dict[str, Any] | JSONResponse:
        raw = await request.body()
        if len(raw) > settings.max_request_bytes:
            return error(413, f"request body over {settings.max_request_bytes} bytes", "invalid_request_error",
                         "request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return error(400, "request body must be a JSON object", "invalid_request_error")
        return body

    def request_options(body: dict[str, Any]) -> tuple[int, tuple[bool, float, float]] | JSONResponse:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = None
        elif not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, "max_tokens must be a positive integer", "invalid_request_error")
        elif max_tokens > settings.max_tokens_limit:
            return error(400, f"max_tokens {max_tokens} is over this server's limit {settings.max_tokens_limit}",
                         "invalid_request_error")
        temperature = body.get("temperature", 0.0) or 0.0
        top_p = body.get("top_p", 1.0) or 1.0
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            return error(400, "temperature must be between 0 and 2", "invalid_request_error")
        return max_tokens or -1, (temperature > 0, float(temperature) or 1.0, float(top_p))

    async def answer(body: dict[str, Any], input_text: str, kind: str, request_start: float):
        arm_name = router.pick(body.get("model"), body.get("user"))
        if arm_name is None:
            return error(404, f"model {body.get('model')!r} does not exist; see /v1/models", "invalid_request_error",
                         "model_not_found")
        options = request_options(body)
        if isinstance(options, JSONResponse):
            return options
        max_tokens, sampling = options
        arm = arms[arm_name]
        max_tokens = arm.max_new_tokens if max_tokens < 0 else max_tokens
        worker = workers[arm_name]
        if body.get("stream"):
            return await stream(body, arm_name, input_text, kind, max_tokens, sampling, request_start)
        pending = _Pending(input_text, max_tokens, sampling, asyncio.get_running_loop().create_future())
        try:
            worker.queue.put_nowait(pending)
        except asyncio.QueueFull:
            return error(503, "server busy: the queue is full, retry shortly", "server_error", "queue_full",
                         headers={"Retry-After": str(settings.retry_after_s)})
        try:
            result = await pending.future
        except Exception as exc:  # noqa: BLE001 - reported to the client in OpenAI's shape
            return error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
        latency = time.perf_counter() - request_start
        request_id = new_request_id(kind)
        record(request_id, arm_name, kind, body, input_text, result, latency)
        return JSONResponse(openai_body(kind, request_id, arm_name, result))

    def record(request_id: str, arm_name: str, kind: str, body: dict[str, Any], input_text: str,
               result: dict[str, Any], latency: float) -> None:
        arm = arms[arm_name]
        passed = arm.format_check(result["text"], "") if arm.format_check else None
        log.add(request_id=request_id, arm=arm_name, endpoint=kind, user=user_hash(body.get("user")),
                latency_s=latency, tokens_in=result["prompt_tokens"], tokens_out=result["completion_tokens"],
                format_ok=None if passed is None else bool(passed >= 1.0), finish_reason=result["finish_reason"],
                prompt=input_text if settings.log_prompts else None,
                output=result["text"] if settings.log_prompts else None)
        counters[f"requests_{arm_name}"] += 1
        latencies[arm_name].append(latency)

    async def stream(body, arm_name, input_text, kind, max_tokens, sampling, request_start):
        worker = workers[arm_name]
        if worker.queue.full():
            return error(503, "server busy: the queue is full, retry shortly", "server_error", "queue_full",
                         headers={"Retry-After": str(settings.retry_after_s)})
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request_id = new_request_id(kind)  # the id the client sees in every chunk is the one logged

        def produce() -> None:
            try:
                result = stream_generate(worker, input_text, max_tokens, sampling,
                                         lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece)))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except Exception as exc:  # noqa: BLE001
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        loop.run_in_executor(None, produce)

        async def events():
            while True:
                what, value = await queue.get()
                if what == "piece":
                    yield f"data: {json.dumps(openai_chunk(kind, request_id, arm_name, value, None))}\n\n"
                elif what == "done":
                    # recorded before the last chunk, so feedback sent on [DONE] finds the request
                    record(request_id, arm_name, kind, body, input_text, value, time.perf_counter() - request_start)
                    yield f"data: {json.dumps(openai_chunk(kind, request_id, arm_name, '', value['finish_reason']))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'server_error'}})}\n\n"
                    return

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        start = time.perf_counter()
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), (str, list)) for m in messages)
                or not any(m.get("role") == "user" for m in messages)):
            return error(400, "messages must be a non-empty list of {role, content} with a user message",
                         "invalid_request_error")
        return await answer(body, chat_input(messages), "chat", start)

    @app.post("/v1/completions")
    async def completions(request: Request):
        start = time.perf_counter()
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            return error(400, "prompt must be a non-empty string", "invalid_request_error")
        return await answer(body, prompt, "completion", start)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        request_id, score = body.get("id"), body.get("score")
        if not isinstance(request_id, str) or not isinstance(score, (int, float)) or isinstance(score, bool):
            return error(400, "feedback needs an 'id' (a completion id) and a numeric 'score' (e.g. 1 good, 0 bad)",
                         "invalid_request_error")
        if not log.add_feedback(request_id, float(score), body.get("comment")):
            return error(404, f"no request with id {request_id!r}", "invalid_request_error")
        return {"ok": True}

    app.state.workers = workers
    app.state.log = log
    return app


def stream_generate(worker: ArmWorker, input_text: str, max_tokens: int, sampling, emit) -> dict[str, Any]:
    """Generate one answer token by token, calling `emit` with each new piece of text."""
    import torch
    from transformers import TextIteratorStreamer

    arm = worker.arm
    encoded = arm.template.encode_prompt(input_text, arm.tokenizer)
    ids = torch.tensor([encoded])
    streamer = TextIteratorStreamer(arm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    do_sample, temperature, top_p = sampling
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    output: dict[str, Any] = {}

    def run() -> None:
        with worker.lock, torch.inference_mode():
            output["ids"] = arm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=max_tokens, eos_token_id=arm.stop_ids,
                                               pad_token_id=arm.tokenizer.pad_token_id, streamer=streamer, **options)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        candidate = text + piece
        cut = min((candidate.find(stop) for stop in arm.template.stop_strings if stop in candidate), default=-1)
        if cut >= 0:  # the built-in format's next-turn marker: the answer ended; send what came before it
            if cut > len(text):
                emit(candidate[len(text):cut])
            text = candidate[:cut]
            break
        text = candidate
        if piece:
            emit(piece)
    thread.join()
    new = output["ids"][0, len(encoded):].tolist()
    ended = any(t in arm.stop_ids for t in new)
    return {"text": text.strip(), "prompt_tokens": len(encoded), "completion_tokens": len(new),
            "finish_reason": "stop" if ended else "length"}


def openai_body(kind: str, request_id: str, arm: str, result: dict[str, Any]) -> dict[str, Any]:
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                  "finish_reason": result["finish_reason"], "logprobs": None}
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": arm,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": arm,
            "choices": [choice], "usage": usage}


def openai_chunk(kind: str, request_id: str, arm: str, piece: str, finish: str | None) -> dict[str, Any]:
    if kind == "chat":
        delta = {"content": piece} if piece else {}
        return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": arm,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": arm,
            "choices": [{"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}]}


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
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
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
