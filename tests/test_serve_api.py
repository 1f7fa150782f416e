"""`specialist serve` speaks the API its clients use (issue 27): response_format through constrained decoding, stop,
seed, logprobs, stream_options and delta.role, each under careless and hostile values; every OpenAI field it cannot
honour is a 400 naming the field; and the official `openai` client and LangChain's `ChatOpenAI` work against a live
server (structured output from a tiny random model parses because the decoding is constrained)."""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import require
from specialist.deploy.arms import load_arms
from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app

# response_format compiles through constrain.py; the test extra installs xgrammar (make, without triton), so under
# CI a missing one fails here rather than skipping the openai and LangChain tests below with it
require("xgrammar", "pip install 'specialist[constrain]' to run the serve API tests")

MESSAGES = [{"role": "user", "content": "Dec 10 sshd[1]: Invalid user x"}]
SCHEMA = {"type": "object", "properties": {"level": {"type": "string", "maxLength": 8},
                                           "count": {"type": "integer"}},
          "required": ["level", "count"], "additionalProperties": False}


def chat(**fields):
    return {"model": "tuned", "max_tokens": 12, "messages": MESSAGES, **fields}


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.fixture(scope="module")
def arms(tiny_run_dir, tiny_model_dir):
    loaded = load_arms([("tuned", str(tiny_run_dir)), ("base", str(tiny_model_dir))])
    for arm in loaded.values():
        arm.max_new_tokens = 12
    return loaded


@pytest.fixture
def server(arms, tmp_path):
    settings = ServeSettings(split={"tuned": 1.0}, db=tmp_path / "log.sqlite", max_tokens_limit=64,
                             max_request_bytes=64 * 1024)
    with BackgroundServer(create_app(arms, settings)) as running:
        yield running


def post(server, body, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def events(server, body) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as reply:
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def marker_in(text: str) -> str:
    """Two letters or digits from inside `text`, past its start: a stop string the answer is known to reach."""
    found = re.search(r"[A-Za-z0-9]{2}", text[3:])
    assert found, text
    return found.group()


def streamed_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# (name, body, the field the 400 must name)
REFUSED = [
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    ("tool_choice auto", chat(tool_choice="auto"), "tool_choice"),
    ("functions", chat(functions=[{"name": "f"}]), "functions"),
    ("function_call", chat(function_call="auto"), "function_call"),
    ("presence_penalty", chat(presence_penalty=0.5), "presence_penalty"),
    ("frequency_penalty", chat(frequency_penalty=-1), "frequency_penalty"),
    ("logit_bias", chat(logit_bias={"42": 100}), "logit_bias"),
    ("audio", chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    ("modalities audio", chat(modalities=["text", "audio"]), "modalities"),
    ("prediction", chat(prediction={"type": "content", "content": "x"}), "prediction"),
    ("web_search_options", chat(web_search_options={}), "web_search_options"),
    ("reasoning_effort", chat(reasoning_effort="high"), "reasoning_effort"),
    ("n of 3", chat(n=3), "n"),
    ("assistant tool_calls", chat(messages=[*MESSAGES, {"role": "assistant", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, *MESSAGES]),
     "messages.1.tool_calls"),
    ("tool role", chat(messages=[*MESSAGES, {"role": "tool", "content": "42", "tool_call_id": "1"}]), "messages.1.role"),
    ("completion echo", {"model": "tuned", "prompt": "x", "echo": True}, "echo"),
    ("completion best_of", {"model": "tuned", "prompt": "x", "best_of": 3}, "best_of"),
    ("completion logprobs", {"model": "tuned", "prompt": "x", "logprobs": 2}, "logprobs"),
    ("empty stop", chat(stop=""), "stop"),
    ("five stops", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("a stop of 300 characters", chat(stop="x" * 300), "stop"),
    ("stop an int", chat(stop=5), "stop"),
    ("stop list holding an int", chat(stop=["a", 5]), "stop"),
    ("stop with a lone surrogate", None, "stop"),
    ("seed a string", chat(seed="42"), "seed"),
    ("seed a float", chat(seed=4.5), "seed"),
    ("seed beyond int64", chat(seed=2**70), "seed"),
    ("seed a bool", chat(seed=True), "seed"),
    ("logprobs a string", chat(logprobs="yes"), "logprobs"),
    ("top_logprobs 21", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top_logprobs negative", chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), "top_logprobs"),
    ("stream_options without stream", chat(stream_options={"include_usage": True}), "stream_options"),
    ("include_usage a string", chat(stream=True, stream_options={"include_usage": "yes"}),
     "stream_options.include_usage"),
    ("response_format xml", chat(response_format={"type": "xml"}), "response_format.type"),
    ("response_format a string", chat(response_format="json"), "response_format"),
    ("json_schema missing", chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    ("json_schema without a name", chat(response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}),
     "response_format.json_schema.name"),
    ("json_schema name with spaces", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "my schema", "schema": SCHEMA}}), "response_format.json_schema.name"),
    ("schema a list", chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}}),
     "response_format.json_schema.schema"),
    ("schema with a bad type", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "nonsense"}}}), "response_format.json_schema.schema"),
    ("schema 100 levels deep", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": nested_schema(100)}}), "response_format.json_schema.schema"),
    ("schema with a bad pattern", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "string", "pattern": "(unclosed"}}}), "response_format.json_schema.schema"),
]


def _send(server, name, body):
    if body is None:  # JSON that the client library would not write: an escaped lone surrogate
        raw = b'{"model": "tuned", "messages": [{"role": "user", "content": "x"}], "stop": "\\ud800"}'
        return httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=60)
    return post(server, body, "/v1/completions" if "prompt" in body else "/v1/chat/completions")


def test_every_unsupported_or_bad_field_is_a_400_naming_it_while_others_are_served(server):
    names = [name for name, *_ in REFUSED]
    assert len(set(names)) == len(names)
    alone = post(server, chat()).json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(post, server, chat()) for _ in range(6)]
        refused = list(pool.map(lambda case: (case, _send(server, case[0], case[1])), REFUSED))
        served = [f.result() for f in good]
    for (name, _, param), response in refused:
        assert response.status_code == 400, (name, response.text[:300])
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(param), (name, error)
    assert [r.status_code for r in served] == [200] * 6
    assert {r.json()["choices"][0]["message"]["content"] for r in served} == {alone}


def test_no_op_values_of_unsupported_fields_and_harmless_ones_are_accepted(server):
    body = chat(tools=[], tool_choice="none", presence_penalty=0, frequency_penalty=0.0, logit_bias={}, n=1,
                modalities=["text"], parallel_tool_calls=False, metadata={"k": "v"}, store=False,
                service_tier="auto", response_format={"type": "text"})
    assert post(server, body).status_code == 200


def test_unknown_fields_are_ignored_with_one_warning_as_vllm_does(server, caplog):
    with caplog.at_level(logging.WARNING, logger="specialist.serve"):
        for _ in range(3):
            assert post(server, chat(top_k=5, repetition_penalty=1.1)).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "ignored request field" in r.getMessage()]
    assert len(warnings) <= 1 and all("top_k" in w for w in warnings)  # once per name for the process


def test_json_object_and_json_schema_answers_parse_although_the_model_is_random(server):
    free = post(server, chat(max_tokens=30, temperature=1.0, seed=1)).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)  # unconstrained, the tiny random model writes no JSON
    as_object = post(server, chat(max_tokens=30, response_format={"type": "json_object"})).json()
    assert isinstance(json.loads(as_object["choices"][0]["message"]["content"]), dict)
    form = {"type": "json_schema", "json_schema": {"name": "line", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2):  # sampled as well as greedy
        answer = post(server, chat(max_tokens=40, temperature=1.0, seed=seed, response_format=form)).json()
        parsed = json.loads(answer["choices"][0]["message"]["content"])
        assert set(parsed) == {"level", "count"} and isinstance(parsed["count"], int)
        assert answer["choices"][0]["finish_reason"] == "stop"
    streamed = events(server, chat(max_tokens=40, stream=True, response_format=form))
    assert set(json.loads(streamed_text(streamed))) == {"level", "count"}


def test_a_stop_string_ends_the_answer_and_is_left_out_streamed_or_not(server):
    body = chat(max_tokens=30, temperature=1.0, seed=1)  # greedy, the tiny model writes only blanks
    free = post(server, body).json()["choices"][0]
    marker = marker_in(free["message"]["content"])
    for stop in (marker, [marker, "never-written"]):
        stopped = post(server, {**body, "stop": stop}).json()["choices"][0]
        assert stopped["finish_reason"] == "stop" and marker not in stopped["message"]["content"]
        assert free["message"]["content"].startswith(stopped["message"]["content"])
        chunks = events(server, {**body, "stop": stop, "stream": True})
        assert streamed_text(chunks) == stopped["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    never = post(server, {**body, "stop": ["\u2603never\u2603"]}).json()["choices"][0]
    assert never["message"] == free["message"] and never["finish_reason"] == free["finish_reason"]
    completion = post(server, {"model": "tuned", "prompt": "Dec 10", "max_tokens": 30, "stop": marker,
                               "temperature": 1.0, "seed": 1}, "/v1/completions").json()["choices"][0]
    assert marker not in completion["text"]


def test_the_same_seed_gives_the_same_sampled_answer(server):
    body = chat(max_tokens=16, temperature=1.0)
    first = [post(server, {**body, "seed": 11}).json()["choices"][0]["message"]["content"] for _ in range(2)]
    assert first[0] == first[1]
    others = {post(server, {**body, "seed": seed}).json()["choices"][0]["message"]["content"] for seed in range(5)}
    assert len(others) > 1
    with ThreadPoolExecutor(4) as pool:  # batched beside other seeds and greedy requests: still the same draw
        crowd = list(pool.map(lambda b: post(server, b), [{**body, "seed": 11}, {**body, "seed": 3}, chat(),
                                                          {**body, "seed": 11}]))
    assert {crowd[0].json()["choices"][0]["message"]["content"],
            crowd[3].json()["choices"][0]["message"]["content"]} == {first[0]}


def test_logprobs_come_in_openais_shape_and_streamed_ones_add_up(server):
    body = chat(max_tokens=10, logprobs=True, top_logprobs=3)
    whole = post(server, body).json()
    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    assert content and choice["logprobs"]["refusal"] is None
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode("utf-8")) and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6  # greedy: the token is the top one
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert choice["finish_reason"] == "length" and len(content) == whole["usage"]["completion_tokens"]
    chunks = events(server, {**body, "stream": True})
    streamed = [e for c in chunks for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == content
    plain = post(server, chat(max_tokens=4)).json()["choices"][0]
    assert plain["logprobs"] is None
    no_top = post(server, chat(max_tokens=4, logprobs=True)).json()["choices"][0]["logprobs"]["content"]
    assert all(e["top_logprobs"] == [] for e in no_top)


def test_streams_name_the_speaker_first_and_end_with_usage_when_asked(server):
    chunks = events(server, chat(stream=True, stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1]) and len({c["id"] for c in chunks}) == 1
    whole = post(server, chat()).json()
    assert chunks[-1]["usage"] == whole["usage"]
    plain = events(server, chat(stream=True))
    assert all("usage" not in c for c in plain) and plain[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ---- real clients against a live server ----------------------------------------------------------------------


def test_the_openai_client_uses_every_supported_field(server):
    require("openai", "pip install 'specialist[test-tools]' for the openai client")
    from openai import BadRequestError, OpenAI
    from pydantic import BaseModel

    class Line(BaseModel):
        level: str
        count: int

    client = OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
    parsed = client.chat.completions.parse(model="tuned", messages=MESSAGES, max_tokens=40, response_format=Line)
    assert isinstance(parsed.choices[0].message.parsed, Line)
    as_object = client.chat.completions.create(model="tuned", messages=MESSAGES, max_tokens=30,
                                               response_format={"type": "json_object"})
    assert isinstance(json.loads(as_object.choices[0].message.content), dict)
    seeded = [client.chat.completions.create(model="tuned", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                             seed=5).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    scored = client.chat.completions.create(model="tuned", messages=MESSAGES, max_tokens=6, logprobs=True,
                                            top_logprobs=2)
    assert len(scored.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = list(client.chat.completions.create(model="tuned", messages=MESSAGES, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, stop=["\n"]))
    assert stream[0].choices[0].delta.role == "assistant" and stream[-1].usage.total_tokens > 0
    with pytest.raises(BadRequestError, match="tools"):
        client.chat.completions.create(model="tuned", messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])


def test_langchain_structured_output_stop_and_streamed_usage(server):
    require("langchain_openai", "pip install 'specialist[test-tools]' for LangChain's ChatOpenAI")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Line(BaseModel):
        level: str
        count: int

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="-", model="tuned", max_tokens=40, max_retries=0,
                     temperature=0)
    structured = llm.with_structured_output(Line, method="json_schema").invoke("Dec 10 sshd[1]: Invalid user x")
    assert isinstance(structured, Line)
    sampled = llm.bind(temperature=1.0, seed=1, max_tokens=30)  # greedy, the tiny model writes only blanks
    free = sampled.invoke("Dec 10 sshd[1]: Invalid user x").content
    marker = marker_in(free)
    stopped = sampled.invoke("Dec 10 sshd[1]: Invalid user x", stop=[marker])
    assert marker not in stopped.content and free.startswith(stopped.content)
    assert stopped.response_metadata["finish_reason"] == "stop"
    streaming = ChatOpenAI(base_url=f"{server.url}/v1", api_key="-", model="tuned", max_tokens=12, max_retries=0,
                           temperature=0, stream_usage=True)
    total = None
    for chunk in streaming.stream("Dec 10 sshd[1]: Invalid user x"):
        total = chunk if total is None else total + chunk
    assert total.usage_metadata["output_tokens"] > 0 and total.usage_metadata["input_tokens"] > 0
    assert total.content == llm.with_config({}).bind(max_tokens=12).invoke("Dec 10 sshd[1]: Invalid user x").content
