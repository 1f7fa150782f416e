"""`specialist serve` under careless and hostile traffic: every bad request is a 4xx in OpenAI's shape within a
second and costs the good requests sent beside it nothing; streams share the bounded queue; hang-ups cancel;
one failing request cannot fail its batch; SIGTERM drains and exits."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from specialist.deploy.serve import ROUTER, BackgroundServer, ServeSettings, create_app

GOOD = {"model": "tuned", "max_tokens": 6, "messages": [{"role": "user", "content": "Dec 10 sshd[1]: Invalid user x"}]}
MESSAGES = [{"role": "user", "content": "x"}]
DEEP = b'{"model": "tuned", "messages": ' + b"[" * 20000 + b"]" * 20000 + b"}"


def chat(**fields):
    return {"model": "tuned", "max_tokens": 4, "messages": MESSAGES, **fields}


# (name, path, body: dict or raw bytes, expected status)
BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b"{not json", 400),
    ("empty body", "/v1/chat/completions", b"", 400),
    ("body is a list", "/v1/chat/completions", b"[1, 2]", 400),
    ("body is a string", "/v1/chat/completions", b'"hello"', 400),
    ("no messages", "/v1/chat/completions", {"model": "tuned"}, 400),
    ("empty messages", "/v1/chat/completions", chat(messages=[]), 400),
    ("messages a string", "/v1/chat/completions", chat(messages="hi"), 400),
    ("message without role", "/v1/chat/completions", chat(messages=[{"content": "x"}]), 400),
    ("role an int", "/v1/chat/completions", chat(messages=[{"role": 3, "content": "x"}]), 400),
    ("unknown role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    ("content an int", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 7}]), 400),
    ("content an object", "/v1/chat/completions", chat(messages=[{"role": "user", "content": {"a": 1}}]), 400),
    ("image content part", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
    ("only an assistant turn", "/v1/chat/completions", chat(messages=[{"role": "assistant", "content": "x"}]), 400),
    ("whitespace input", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "   \n "}]), 400),
    ("model a list", "/v1/chat/completions", chat(model=["tuned"]), 400),
    ("model an object", "/v1/chat/completions", chat(model={"name": "tuned"}), 400),
    ("model an int", "/v1/chat/completions", chat(model=1), 400),
    ("user a list", "/v1/chat/completions", chat(user=["u"]), 400),
    ("user an int", "/v1/chat/completions", chat(user=42), 400),
    ("max_tokens true", "/v1/chat/completions", chat(max_tokens=True), 400),
    ("max_tokens a string", "/v1/chat/completions", chat(max_tokens="5"), 400),
    ("max_tokens zero", "/v1/chat/completions", chat(max_tokens=0), 400),
    ("max_tokens negative", "/v1/chat/completions", chat(max_tokens=-1), 400),
    ("max_tokens a float", "/v1/chat/completions", chat(max_tokens=2.5), 400),
    ("max_tokens over the limit", "/v1/chat/completions", chat(max_tokens=999), 400),
    ("max_tokens 5000 digits", "/v1/chat/completions",
     b'{"model": "tuned", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}", 400),
    ("temperature a string", "/v1/chat/completions", chat(temperature="hot"), 400),
    ("temperature NaN", "/v1/chat/completions",
     b'{"model": "tuned", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400),
    ("temperature Infinity", "/v1/chat/completions",
     b'{"model": "tuned", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', 400),
    ("temperature negative", "/v1/chat/completions", chat(temperature=-1), 400),
    ("temperature too high", "/v1/chat/completions", chat(temperature=3), 400),
    ("top_p negative, streamed", "/v1/chat/completions", chat(temperature=1, top_p=-3, stream=True), 400),
    ("top_p a string", "/v1/chat/completions", chat(top_p="abc"), 400),
    ("top_p zero", "/v1/chat/completions", chat(top_p=0), 400),
    ("top_p over one", "/v1/chat/completions", chat(top_p=1.5), 400),
    ("stream a string", "/v1/chat/completions", chat(stream="yes"), 400),
    ("n of two", "/v1/chat/completions", chat(n=2), 400),
    ("json nested 20,000 deep", "/v1/chat/completions", DEEP, 400),
    ("lone surrogate in content", "/v1/chat/completions",
     b'{"model": "tuned", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
    ("lone surrogate in user", "/v1/chat/completions",
     b'{"model": "tuned", "user": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', 400),
    ("unknown model", "/v1/chat/completions", chat(model="gpt-9"), 404),
    ("prompt list of two", "/v1/completions", {"model": "tuned", "prompt": ["a", "b"]}, 400),
    ("prompt an int", "/v1/completions", {"model": "tuned", "prompt": 5}, 400),
    ("prompt empty", "/v1/completions", {"model": "tuned", "prompt": ""}, 400),
    ("feedback score Infinity", "/v1/feedback", b'{"id": "r", "score": Infinity}', 400),
    ("feedback score a string", "/v1/feedback", {"id": "r", "score": "good"}, 400),
    ("feedback score a bool", "/v1/feedback", {"id": "r", "score": True}, 400),
    ("feedback score out of range", "/v1/feedback", {"id": "r", "score": 5}, 400),
    ("feedback comment an object", "/v1/feedback", {"id": "r", "score": 1, "comment": {"a": 1}}, 400),
    ("feedback id a list", "/v1/feedback", {"id": ["r"], "score": 1}, 400),
    ("feedback on an unknown id", "/v1/feedback", {"id": "chatcmpl-none", "score": 1}, 404),
    ("unknown path", "/v1/nothing-here", {"a": 1}, 404),
]


def settings(tmp_path, **overrides) -> ServeSettings:
    return ServeSettings(**{"split": {"tuned": 0.5, "base": 0.5}, "db": tmp_path / "log.sqlite",
                            "log_prompts": True, "max_request_bytes": 4096, "max_tokens_limit": 64,
                            "max_prompt_tokens": 256, **overrides})


def post(url: str, body, timeout: float = 30.0) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=timeout)
    return httpx.post(url, json=body, timeout=timeout)


def is_openai_error(response: httpx.Response) -> bool:
    error = response.json().get("error", {})
    return {"message", "type", "param", "code"} <= set(error) and isinstance(error["message"], str)


def test_every_bad_request_is_a_quick_openai_shaped_4xx_while_good_ones_answer_as_alone(arms, tmp_path):
    names = [name for name, *_ in BAD_REQUESTS]  # each case named once, so a failure below says which
    assert len(set(names)) == len(names) >= 40 and all(400 <= status < 500 for *_, status in BAD_REQUESTS)
    app = create_app(arms, settings(tmp_path, max_request_bytes=256 * 1024))
    with BackgroundServer(app) as server:
        alone = post(f"{server.url}/v1/chat/completions", GOOD).json()["choices"][0]["message"]["content"]

        def bad(case):
            name, path, body, status = case
            started = time.perf_counter()
            response = post(server.url + path, body)
            return name, status, response, time.perf_counter() - started

        with ThreadPoolExecutor(8) as pool:
            good = [pool.submit(post, f"{server.url}/v1/chat/completions", GOOD) for _ in range(6)]
            results = list(pool.map(bad, BAD_REQUESTS))
            good_responses = [f.result() for f in good]
        for name, status, response, seconds in results:
            assert response.status_code == status, (name, response.text[:300])
            assert is_openai_error(response), name
            assert seconds < 1.0, (name, seconds)
        assert [r.status_code for r in good_responses] == [200] * 6
        assert {r.json()["choices"][0]["message"]["content"] for r in good_responses} == {alone}
        metrics = httpx.get(f"{server.url}/metrics").text
    counted = sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("specialist_errors_total"))
    assert counted == len(BAD_REQUESTS)
    assert 'kind="invalid_json"' in metrics and 'kind="invalid_type"' in metrics and 'status="404"' in metrics


def test_a_long_prompt_is_refused_in_tokens_and_does_not_delay_others(arms, tmp_path):
    app = create_app(arms, settings(tmp_path, max_request_bytes=128 * 1024, max_prompt_tokens=200))
    with BackgroundServer(app) as server:
        long = post(f"{server.url}/v1/chat/completions",
                    chat(messages=[{"role": "user", "content": "block " * 10000}]))
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        started = time.perf_counter()
        assert post(f"{server.url}/v1/chat/completions", GOOD).status_code == 200
        assert time.perf_counter() - started < 5


def test_a_missing_max_tokens_is_capped_at_the_server_limit(arms, tmp_path):
    arms["tuned"].max_new_tokens = 500  # what the run would ask for
    try:
        app = create_app(arms, settings(tmp_path, max_tokens_limit=3))
        with BackgroundServer(app) as server:
            response = post(f"{server.url}/v1/chat/completions", {"model": "tuned", "messages": MESSAGES})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3
    finally:
        arms["tuned"].max_new_tokens = 8


def test_a_body_over_the_limit_is_refused_before_it_is_all_read(arms, tmp_path):
    """50 MB chunked (no Content-Length): the 413 must come while the client is still sending, not after."""
    app = create_app(arms, settings(tmp_path, max_request_bytes=64 * 1024))
    chunk, total = b"a" * (1 << 20), 50
    sent = [0]

    def send_all(sock):
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(total):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent[0] += 1
        except OSError:  # the server answered and closed: it stopped reading
            pass

    with BackgroundServer(app) as server, socket.create_connection((server.host, server.port), timeout=10) as sock:
        sender = threading.Thread(target=send_all, args=(sock,), daemon=True)
        started = time.perf_counter()
        sender.start()
        reply = sock.recv(65536)
        answered_after, megabytes_sent = time.perf_counter() - started, sent[0]
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert answered_after < 3 and megabytes_sent < total // 2  # kernel buffers hold a few MB, not 25


def test_auth_covers_the_api_metrics_and_docs_but_not_health(arms, tmp_path):
    app = create_app(arms, settings(tmp_path, api_key="s3cret"))
    with BackgroundServer(app) as server:
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
            assert httpx.get(server.url + path).status_code == 401, path
            assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(server.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
        odd = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer s3cr\u00e9t".encode()})
        assert odd.status_code == 401


def test_openai_client_chat_completion_streaming_feedback_and_routing(arms, tmp_path):
    from openai import NotFoundError, OpenAI

    app = create_app(arms, settings(tmp_path))
    with BackgroundServer(app) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list().data] == [ROUTER, "tuned", "base"]
        whole = client.chat.completions.create(model="tuned", max_tokens=6, messages=[{"role": "user", "content": "a log"}])
        chunks = list(client.chat.completions.create(model="tuned", max_tokens=6, stream=True,
                                                     messages=[{"role": "user", "content": "a log"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        completion = client.completions.create(model="base", prompt="Dec 10 sshd[1]: Invalid user x", max_tokens=4)
        assert completion.model == "base" and completion.usage.prompt_tokens > 0
        routed = client.chat.completions.create(model=ROUTER, user="alice", max_tokens=2, messages=MESSAGES)
        assert routed.model in ("tuned", "base")
        with pytest.raises(NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=MESSAGES)
        for request_id in (whole.id, chunks[-1].id):  # a streamed answer's id is the logged one too
            for score in (0.0, 1.0):  # a second feedback replaces the first
                assert httpx.post(f"{server.url}/v1/feedback", json={"id": request_id, "score": score}).status_code == 200
    db = sqlite3.connect(tmp_path / "log.sqlite")
    assert db.execute("SELECT COUNT(*), MIN(score) FROM feedback").fetchone() == (2, 1.0)
    users = [u for (u,) in db.execute("SELECT user_hash FROM requests WHERE user_hash IS NOT NULL")]
    import hashlib

    assert users and users[0] != hashlib.sha256(b"alice").hexdigest()[:16]  # salted
    assert (tmp_path / "log.sqlite.salt").stat().st_mode & 0o077 == 0


def test_one_failing_request_does_not_fail_its_batch(arms, tmp_path, monkeypatch):
    engine = arms["tuned"].engine
    original = engine.run

    def run_unless_poisoned(requests, sampling):
        if any("POISON" in engine.tokenizer.decode(r.prompt_ids) for r in requests):
            raise RuntimeError("poisoned row")
        return original(requests, sampling)

    monkeypatch.setattr(engine, "run", run_unless_poisoned)
    app = create_app(arms, settings(tmp_path, max_batch=8, max_wait_ms=200))
    bodies = [GOOD, GOOD, GOOD, chat(messages=[{"role": "user", "content": "POISON"}])]
    with BackgroundServer(app) as server, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: post(f"{server.url}/v1/chat/completions", b), bodies))
    assert [r.status_code for r in responses] == [200, 200, 200, 500]
    assert responses[3].json()["error"]["code"] == "generation_failed"


def test_a_generation_error_ends_its_stream_with_an_error_event(arms, tmp_path, monkeypatch):
    engine = arms["tuned"].engine

    def broken(requests, sampling):
        for request in requests:
            if request.on_text:
                request.on_text("partial")
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(engine, "run", broken)
    app = create_app(arms, settings(tmp_path))
    with BackgroundServer(app) as server:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat(stream=True), timeout=10) as reply:
            events = [line for line in reply.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert json.loads(events[1][6:])["choices"][0]["delta"]["content"] == "partial"
        assert "the model fell over" in json.loads(events[-1][6:])["error"]["message"]
        monkeypatch.undo()
        assert post(f"{server.url}/v1/chat/completions", GOOD).status_code == 200  # still serving


def test_streams_share_the_bounded_queue_and_get_503_when_it_is_full(arms, tmp_path):
    slow = _slow_forward(arms["tuned"].engine.model, 0.02)
    app = create_app(arms, settings(tmp_path, queue_size=4, max_batch=2, max_tokens_limit=64))
    try:
        with BackgroundServer(app) as server:
            async def one(session):
                async with session.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=20)) as r:
                    await r.aread()
                    return r.status_code, r.headers.get("retry-after")

            async def flood():
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as session:
                    return await asyncio.gather(*(one(session) for _ in range(32)))

            results = asyncio.run(flood())
    finally:
        slow.remove()
    statuses = [status for status, _ in results]
    assert statuses.count(503) >= 20 and statuses.count(200) >= 4 and set(statuses) == {200, 503}
    assert {retry for status, retry in results if status == 503} == {"1"}


def _slow_forward(model, seconds: float):
    """Make every forward pass of `model` take at least `seconds` (a slow model, deterministically)."""
    return model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_a_client_that_hangs_up_cancels_its_generation(arms, tmp_path):
    engine = arms["tuned"].engine
    slow = _slow_forward(engine.model, 0.02)
    stops, engine.stop_ids = engine.stop_ids, set()  # it would otherwise run to 400 tokens: 8 s at least
    app = create_app(arms, settings(tmp_path, max_tokens_limit=400))
    try:
        with BackgroundServer(app) as server:
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30,
                              json=chat(stream=True, max_tokens=400)) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        break  # the first piece arrived: hang up
            deadline = time.perf_counter() + 1.0
            while engine.busy and time.perf_counter() < deadline:
                time.sleep(0.02)
            assert not engine.busy
    finally:
        slow.remove()
        engine.stop_ids = stops


SERVE_SCRIPT = """
import sys, time
from specialist.cli import app
from specialist.generation import Engine

engine_init = Engine.__init__

def slow_engine(self, *args, **kwargs):  # every answer runs to max_tokens, 20 ms a token at least
    engine_init(self, *args, **kwargs)
    self.stop_ids = set()
    self.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))

Engine.__init__ = slow_engine
sys.argv = ["specialist", "serve", "--arm", f"tuned={sys.argv[1]}", "--port", sys.argv[2], "--db", sys.argv[3],
            "--drain-seconds", "5", "--max-tokens", "400"]
app()
"""
DRAINED_TOKENS = 60  # 1.2 s of generation at least: the streams are still in flight when SIGTERM comes


def test_sigterm_lets_the_streams_in_flight_finish_then_exits_within_the_drain(tiny_run_dir, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(tiny_run_dir), str(port),
                               str(tmp_path / "log.sqlite")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, server)
        streams = [_Stream(url) for _ in range(4)]
        assert all(stream.accepted.wait(30) for stream in streams), "a stream was not accepted"
        _wait_until_generating(url)
        sigterm = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=15)
        exited = time.perf_counter()
        for stream in streams:
            stream.thread.join(5)
    finally:
        if server.poll() is None:
            server.kill()
            pytest.fail("the server did not exit on SIGTERM")
    # uvicorn re-raises the SIGTERM it caught once its shutdown is done: the status of a process ended by SIGTERM
    assert exit_code == -signal.SIGTERM and exited - sigterm < 5 + 2, (exit_code, exited - sigterm)
    for stream in streams:  # each was mid-answer at SIGTERM and still got all of it
        assert stream.lines[-1:] == ["data: [DONE]"], stream.lines[-3:]
        assert json.loads(stream.lines[-2][6:])["choices"][0]["finish_reason"] == "length", stream.lines[-2]
        assert stream.ended > sigterm


def _wait_until_generating(url: str) -> None:
    deadline = time.time() + 30
    while 'specialist_generating{arm="tuned"} 1' not in httpx.get(f"{url}/metrics", timeout=5).text:
        assert time.time() < deadline, "the streams never reached the model"
        time.sleep(0.02)


def _wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited: {server.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    pytest.fail("the server did not start")


class _Stream:
    """One streamed chat completion read on a thread of its own: its `data:` lines, an event set once the server
    has accepted it (the response headers came) and when its last line arrived."""

    def __init__(self, url: str) -> None:
        self.url, self.lines, self.accepted, self.ended = url, [], threading.Event(), 0.0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", timeout=30,
                              json=chat(stream=True, max_tokens=DRAINED_TOKENS)) as reply:
                self.accepted.set()
                self.lines += [line for line in reply.iter_lines() if line.startswith("data: ")]
        except httpx.HTTPError as error:
            self.lines.append(f"error: {error!r}")
        self.ended = time.perf_counter()


def test_load_32_concurrent_clients_zero_errors_every_request_recorded(arms, tmp_path):
    app = create_app(arms, settings(tmp_path, max_batch=8, max_wait_ms=20, queue_size=256))
    n = 128

    async def run_load(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=32), timeout=60) as session:
            semaphore = asyncio.Semaphore(32)

            async def one(i):
                async with semaphore:
                    body = {"model": ROUTER, "user": f"u{i % 40}", "max_tokens": 3,
                            "messages": [{"role": "user", "content": f"line {i}"}]}
                    return (await session.post("/v1/chat/completions", json=body)).status_code

            return await asyncio.gather(*(one(i) for i in range(n)))

    with BackgroundServer(app) as server:
        statuses = asyncio.run(run_load(server.url))
    assert statuses == [200] * n
    assert sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT COUNT(*) FROM requests").fetchone()[0] == n
    workers = app.state.workers.values()
    assert sum(w.batched_requests for w in workers) == n and sum(w.batches for w in workers) < n


# ---- reliability, round two (issue 30): hostile answers and templates cost the other clients nothing ----------


def _answer_marked(engine, monkeypatch, marker: str, text: str) -> None:
    """The engine answers `text` to every prompt holding `marker` (as a model could), and generates the rest."""
    from specialist.generation import Generation

    original = engine.run

    def run(requests, sampling):
        results = []
        for request in requests:
            if marker in engine.tokenizer.decode(request.prompt_ids):
                if request.on_text:
                    request.on_text(text)
                results.append(Generation(text, len(request.prompt_ids), 300, "length"))
            else:
                results += original([request], sampling)
        return results

    monkeypatch.setattr(engine, "run", run)


def _ordinary_client_while(server, attack, rounds: int = 6) -> tuple[httpx.Response, list[float], float]:
    """Run `attack()` (it sends the hostile request) in a thread while a second client sends ordinary requests
    to the other arm and polls /health. Returns the attack's response, the ordinary latencies during the attack,
    and the ordinary latency before it (the worst of three, alone)."""
    good = {**GOOD, "model": "base"}

    def timed() -> float:
        started = time.perf_counter()
        assert post(f"{server.url}/v1/chat/completions", good, timeout=20).status_code == 200
        return time.perf_counter() - started

    usual = max(timed() for _ in range(3))
    with ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(attack)
        time.sleep(0.2)  # the hostile request is in
        during = []
        for _ in range(rounds):
            during.append(timed())
            assert httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200
        return hostile.result(timeout=60), during, usual


@pytest.mark.timeout(120)
def test_a_backtracking_format_check_is_a_recorded_failure_and_freezes_nobody(arms, tmp_path, monkeypatch):
    from specialist.core.scorers import make_json_schema

    schema = tmp_path / "schema.json"
    # backtracks in every engine (Python re: exponential; the bounded check: stopped at its deadline)
    schema.write_text(json.dumps({"properties": {"code": {"type": "string", "pattern": "^(a|aa)+$"}}}))
    scorer = make_json_schema(schema)
    monkeypatch.setattr(arms["tuned"], "format_check", lambda output: scorer(output, "") >= 1.0)
    _answer_marked(arms["tuned"].engine, monkeypatch, "HOSTILE", json.dumps({"code": "a" * 60 + "!"}))
    app = create_app(arms, settings(tmp_path))
    with BackgroundServer(app) as server:
        hostile = chat(messages=[{"role": "user", "content": "HOSTILE"}])
        reply, during, usual = _ordinary_client_while(
            server, lambda: post(f"{server.url}/v1/chat/completions", hostile, timeout=60))
        assert reply.status_code == 200
        assert max(during) < usual + 1.0, (during, usual)
        metrics = httpx.get(f"{server.url}/metrics").text
    assert 'specialist_format_check_failures_total{kind="timed_out"} 1' in metrics
    logged = sqlite3.connect(tmp_path / "log.sqlite").execute(
        "SELECT format_ok FROM requests WHERE prompt LIKE '%HOSTILE%'").fetchall()
    assert logged == [(0,)]  # recorded, as a failed format check


@pytest.mark.parametrize("answer", ["[[[[" * 300, "9" * 5000])
def test_an_answer_no_json_parser_survives_is_logged_and_its_stream_ends_with_done(arms, tmp_path, monkeypatch,
                                                                                    answer):
    from specialist.core.scorers import score_json_valid

    # the run's format check, as format_check_of_run builds it for a run scored with json_valid
    monkeypatch.setattr(arms["tuned"], "format_check", lambda output: score_json_valid(output, "") >= 1.0)
    _answer_marked(arms["tuned"].engine, monkeypatch, "DEGENERATE", answer)
    app = create_app(arms, settings(tmp_path))
    body = chat(messages=[{"role": "user", "content": "DEGENERATE"}])
    with BackgroundServer(app) as server:
        assert post(f"{server.url}/v1/chat/completions", body).status_code == 200
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as reply:
            events = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    logged = sqlite3.connect(tmp_path / "log.sqlite").execute(
        "SELECT format_ok FROM requests WHERE prompt LIKE '%DEGENERATE%'").fetchall()
    assert logged == [(0,), (0,)]


NESTED_LOOPS = ("{% for m in messages %}{% if 'TRIGGER' in m['content'] %}{% for i in range(99999) %}"
                "{% for j in range(99999) %}{% endfor %}{% endfor %}{% endif %}{{ m['content'] }}{% endfor %}")


@pytest.mark.timeout(120)
def test_a_chat_template_that_loops_on_a_trigger_word_answers_400_and_freezes_nobody(arms, tmp_path, monkeypatch):
    import dataclasses

    engine = arms["tuned"].engine
    monkeypatch.setattr(engine, "template", dataclasses.replace(engine.template, kind="chat",
                                                                chat_template=NESTED_LOOPS))
    app = create_app(arms, settings(tmp_path))
    with BackgroundServer(app) as server:
        hostile = chat(messages=[{"role": "user", "content": "TRIGGER"}])
        reply, during, usual = _ordinary_client_while(
            server, lambda: post(f"{server.url}/v1/chat/completions", hostile, timeout=60))
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "prompt_render_timeout"
        assert max(during) < usual + 1.0, (during, usual)
        assert post(f"{server.url}/v1/chat/completions", chat()).status_code == 200  # the arm still answers


@pytest.mark.timeout(60)
def test_a_chat_template_that_fails_on_a_probe_is_refused_at_load(arms):
    import dataclasses

    from specialist.deploy.arms import probe_template
    from specialist.errors import ConfigError
    from specialist.generation import Engine

    base = arms["base"].engine
    for template, why in [("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                           "took over"), ("{{ raise_exception('no system role') }}", "no system role")]:
        engine = Engine(base.model, base.tokenizer, dataclasses.replace(base.template, kind="chat",
                                                                        chat_template=template))
        with pytest.raises(ConfigError, match=f"arm 'x' \\(somewhere\\): its prompt template fails.*{why}"):
            probe_template("x", "somewhere", engine)
