"""A GGUF export's lone greedy requests answered by llama.cpp behind the same `Engine` (deploy.llamacpp.LoneGreedy):
the same text as torch on the same file, the engine's stopping and streaming rules, the prompt cache reused only
where it is valid, batches and non-greedy requests left to torch, and the serve option that chooses."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from conftest import build_tiny_tokenizer
from test_gguf import GOLDEN, INSTRUCTION, build_arch_model, sharpen_attention

from specialist.artifacts import LONE_RUNTIMES, ModelPool
from specialist.deploy.arms import load_for_serving
from specialist.data.template import PromptTemplate
from specialist.deploy.export import ExportOptions, export_run
from specialist.deploy.gguf_export import write_gguf
from specialist.deploy.llamacpp import LoneGreedy
from specialist.errors import ConfigError
from specialist.generation import Engine, Request, Sampling

pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra")

STEPS = 12
# a random Gemma 3 (sliding window, q/k norms) with sharpened attention writes varied text, and in float32 its
# greedy answers here are llama.cpp's on all of these prompts
PROMPTS = GOLDEN + [line[::-1] for line in GOLDEN] + [line.upper() for line in GOLDEN]


@pytest.fixture(scope="module")
def model_and_file(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    model = sharpen_attention(build_arch_model("gemma3", tokenizer)).eval()
    path = tmp_path_factory.mktemp("lone") / "gemma3-f32.gguf"
    write_gguf(model, tokenizer, path, "f32")
    yield model, tokenizer, path
    torch.set_num_threads(threads)


@pytest.fixture
def engine(model_and_file):
    model, tokenizer, path = model_and_file
    lone = LoneGreedy(path, threads=1)
    engine = Engine(model, tokenizer, PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION))
    engine.lone = lone
    yield engine
    lone.close()


@pytest.fixture(scope="module")
def gguf_export(tiny_run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lone-export") / "gguf"
    return export_run(tiny_run_dir, "gguf", folder, ExportOptions(golden=2, max_new_tokens=4, quantize="f32")).folder


class CountingLone:
    """The engine's lone runtime, counting the requests it was handed."""

    def __init__(self, lone: LoneGreedy) -> None:
        self.lone, self.calls = lone, 0

    def fits(self, *args) -> bool:
        return self.lone.fits(*args)

    def decode(self, prompt_ids, take) -> None:
        self.calls += 1
        self.lone.decode(prompt_ids, take)


def torch_answers(engine, prompts: list[str], **request) -> list:
    lone, engine.lone = engine.lone, None
    try:
        return [engine.run([Request(engine.encode(p), STEPS, **request)])[0] for p in prompts]
    finally:
        engine.lone = lone


def test_a_lone_greedy_request_is_answered_by_llama_cpp_with_torchs_text(engine):
    prompts = PROMPTS
    counting = engine.lone = CountingLone(engine.lone)
    lone = [engine.run([Request(engine.encode(p), STEPS)])[0] for p in prompts]
    assert counting.calls == len(prompts)
    want = torch_answers(engine, prompts)
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in lone] == \
        [(g.text, g.completion_tokens, g.finish_reason) for g in want]
    assert all(g.prompt_tokens == len(engine.encode(p)) for g, p in zip(lone, prompts))
    assert len({g.text for g in lone}) > len(prompts) // 2 and all(g.text for g in lone)  # varied, non-empty text


def test_batches_sampling_logprobs_and_constraints_stay_in_torch(engine):
    prompts = PROMPTS
    counting = engine.lone = CountingLone(engine.lone)
    batch = engine.run([Request(engine.encode(p), STEPS) for p in prompts[:3]])
    assert len(batch) == 3 and counting.calls == 0
    engine.run([Request(engine.encode(prompts[0]), STEPS)], Sampling.of(temperature=0.7, seed=3))
    engine.run([Request(engine.encode(prompts[0]), STEPS, logprobs=2)])
    engine.fast = False  # the plain path every fast one is checked against
    engine.run([Request(engine.encode(prompts[0]), STEPS)])
    assert counting.calls == 0
    engine.fast = True
    too_long = engine.lone.lone.n_ctx
    engine.run([Request(engine.encode(prompts[0]), too_long)])  # past the llama.cpp context: torch answers
    assert counting.calls == 0
    engine.run([Request(engine.encode(prompts[0]), STEPS)])
    assert counting.calls == 1


def test_the_engines_stop_strings_streaming_and_cancellation_rule_llama_cpps_tokens(engine):
    prompts = PROMPTS
    free = torch_answers(engine, prompts[:1])[0]
    cut = free.text[1:3]
    lone = engine.run([Request(engine.encode(prompts[0]), STEPS, stop=(cut,))])[0]
    assert lone.text == free.text.split(cut, 1)[0].strip() and lone.finish_reason == "stop"
    assert lone.text == torch_answers(engine, prompts[:1], stop=(cut,))[0].text

    pieces: list[str] = []
    streamed = engine.run([Request(engine.encode(prompts[1]), STEPS, on_text=pieces.append)])[0]
    assert "".join(pieces) == streamed.text

    cancelled = threading.Event()
    cancelled.set()
    gone = engine.run([Request(engine.encode(prompts[1]), STEPS, cancelled=cancelled)])[0]
    assert gone.finish_reason == "cancelled" and gone.completion_tokens == 1


def test_the_prompt_cache_is_reused_for_a_shared_prefix_and_answers_do_not_change(engine):
    prompts = PROMPTS
    lone = engine.lone
    ids = [engine.encode(p) for p in prompts]
    fresh = []
    for prompt in ids:
        lone.close()  # nothing cached: every prompt computed whole
        fresh.append(engine.run([Request(prompt, STEPS)])[0].text)
    lone.close()
    computed: list[tuple[int, int]] = []  # (first position, tokens) of every llama.cpp batch
    runner = lone.runner()
    decode = runner.decode
    runner.decode = lambda entries: (computed.append((entries[0][1], len(entries))), decode(entries))[1]
    order = [0, 1, 1, 3, 2, 0]
    reused = []
    for before, n in zip([None] + order, order):
        computed.clear()
        reused.append(engine.run([Request(ids[n], STEPS)])[0].text)
        shared = 0 if before is None else common_prefix(ids[before], ids[n])
        # the prompt's own batch starts where the cached prompt parts from it, and always computes its last token
        assert computed[0] == (min(shared, len(ids[n]) - 1), len(ids[n]) - min(shared, len(ids[n]) - 1))
    assert reused == [fresh[n] for n in order]
    assert common_prefix(ids[0], ids[1]) > 10  # the instruction: what reuse saves


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_a_bad_request_leaves_the_runtime_answering_the_next_one_right(engine):
    prompts = PROMPTS
    lone = engine.lone
    want = engine.run([Request(engine.encode(prompts[0]), STEPS)])[0].text
    vocabulary = lone.runner().n_vocab
    for bad in ([], [1, vocabulary + 3], [-1]):
        with pytest.raises(ConfigError):
            lone.decode(bad, lambda token: True)

    def hang_up(token: int) -> bool:
        raise BrokenPipeError("client went away")

    with pytest.raises(BrokenPipeError):
        lone.decode(engine.encode(prompts[0]), hang_up)
    assert lone._cached == []  # the cache is not trusted after a failure
    assert engine.run([Request(engine.encode(prompts[0]), STEPS)])[0].text == want


def test_the_serve_option_chooses_the_runtime(gguf_export, tiny_run_dir, monkeypatch):
    source = str(gguf_export)
    assert load_for_serving(source, ModelPool(lone_runtime="torch")).lone is None
    found = load_for_serving(source, ModelPool(lone_runtime="llama.cpp"))
    assert isinstance(found.lone, LoneGreedy) and found.answering_engine().lone is found.lone
    assert found.lone.gguf.parent == gguf_export
    assert load_for_serving(str(tiny_run_dir), ModelPool()).lone is None  # a run: no GGUF file to run
    with pytest.raises(ConfigError, match="auto"):
        ModelPool(lone_runtime="vllm")
    assert LONE_RUNTIMES == ("auto", "torch", "llama.cpp")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert load_for_serving(source, ModelPool()).lone is None  # auto: torch
    with pytest.raises(ConfigError, match="llama-cpp-python"):
        load_for_serving(source, ModelPool(lone_runtime="llama.cpp"))


def test_serve_cli_refuses_an_unknown_runtime(gguf_export, tmp_path):
    from typer.testing import CliRunner

    from specialist.cli import app

    result = CliRunner().invoke(app, ["serve", "--arm", f"tuned={gguf_export}", "--db", str(tmp_path / "s.db"),
                                      "--lone-runtime", "vllm"])
    assert result.exit_code != 0 and "vllm" in result.output and "auto" in result.output


def test_serve_answers_a_gguf_arm_alone_in_llama_cpp_and_in_batches_in_torch_alike(model_and_file, tmp_path):
    """Concurrent, lone, streamed and hung-up requests to a GGUF export arm: every answer is the same text for
    the same prompt whichever runtime gave it, and a client that hangs up mid-stream ends its llama.cpp row."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from specialist.deploy.arms import served_arm
    from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app

    from specialist.artifacts import Loaded

    model, tokenizer, path = model_and_file
    found = Loaded(model, tokenizer, PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION), kind="export",
                   lone=LoneGreedy(path, threads=1))
    arm = served_arm("tuned", str(path), found)
    counting = arm.engine.lone = CountingLone(found.lone)
    slow_take = arm.engine.lone.decode

    def decode(prompt_ids, take):  # 20 ms a token, so a stream is still running when its client hangs up
        def slowly(token):
            time.sleep(0.02)
            return take(token)
        slow_take(prompt_ids, slowly)

    settings = ServeSettings(split={"tuned": 1.0}, db=tmp_path / "log.sqlite", max_tokens_limit=400,
                             max_wait_ms=50, max_batch=4)
    body = {"model": "tuned", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "Dec 10 sshd[1]: Invalid user x"}]}
    with BackgroundServer(create_app({"tuned": arm}, settings)) as server:
        url = f"{server.url}/v1/chat/completions"
        alone = httpx.post(url, json=body, timeout=30).json()["choices"][0]["message"]["content"]
        assert counting.calls == 1
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda _: httpx.post(url, json=body, timeout=30), range(4)))
        assert [r.status_code for r in together] == [200] * 4
        assert alone  # the random model writes text
        assert {r.json()["choices"][0]["message"]["content"] for r in together} == {alone}
        assert counting.calls < 5  # at least two of the four were batched in torch
        calls = counting.calls
        counting.decode = decode
        arm.engine.stop_ids = set()  # run to max_tokens unless cancelled: 8 s at least
        with httpx.stream("POST", url, timeout=30, json={**body, "max_tokens": 400, "stream": True}) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and '"content": ""' not in line:
                    break  # the first piece arrived: hang up
        deadline = time.perf_counter() + 2.0
        while arm.engine.busy and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert not arm.engine.busy and counting.calls == calls + 1
        assert httpx.post(url, json=body, timeout=30).status_code == 200  # still serving
    found.lone.close()
