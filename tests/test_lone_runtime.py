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
from specialist.errors import ConfigError, ModelError
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


# ---- attacks: orders of prompts, the sliding window, the context's edge, hang-ups, threads, broken files ----------


def lone_tokens(lone: LoneGreedy, prompt_ids: list[int], steps: int = STEPS) -> list[int]:
    """LoneGreedy's greedy tokens after `prompt_ids`, `steps` of them (no stop token ends them)."""
    out: list[int] = []
    lone.decode(prompt_ids, lambda token: (out.append(token), len(out) >= steps)[1])
    return out


def watch_batches(lone: LoneGreedy) -> list[tuple[int, int]]:
    """(first position, tokens) of every batch the runner decodes from now on."""
    computed: list[tuple[int, int]] = []
    runner = lone.runner()
    decode = runner.decode
    runner.decode = lambda entries: (computed.append((entries[0][1], len(entries))), decode(entries))[1]
    return computed


def test_every_order_of_prefixes_repeats_and_continuations_answers_as_a_fresh_cache(engine):
    """A strict prefix of the cached prompt, the same prompt again, the previous prompt with its answer appended
    (all of it, or part of it), a one-token prompt, one answer token: each the answer of an empty cache."""
    lone = engine.lone
    base = engine.encode(PROMPTS[1])
    first = lone_tokens(lone, base)
    cases = [base, base[:-3], base[:-3], base, base + first, base + first[:5], base[:1], base,
             base + first + [7, 8], base + first[:-1]]
    fresh = []
    for prompt in cases:
        lone.close()
        fresh.append(lone_tokens(lone, prompt))
    assert fresh[5][:STEPS - 5] == first[5:]  # greedy: part of the answer appended continues it
    lone.close()
    lone_tokens(lone, base)
    computed = watch_batches(lone)
    cached = base + first[:-1]  # the last answer token was never decoded
    for prompt, want in zip(cases, fresh, strict=True):
        computed.clear()
        assert lone_tokens(lone, prompt) == want
        start = min(common_prefix(cached, prompt), len(prompt) - 1)
        assert computed[0] == (start, len(prompt) - start)  # exactly the tokens the cache lacks
        cached = prompt + want[:-1]
    # one token through the engine: llama.cpp's first token, as torch's
    one = engine.run([Request(base, 1)])[0]
    assert (one.completion_tokens, one.text) == (1, torch_answers_ids(engine, base, 1).text)


def torch_answers_ids(engine, prompt_ids: list[int], steps: int, **request):
    lone, engine.lone = engine.lone, None
    try:
        return engine.run([Request(prompt_ids, steps, **request)])[0]
    finally:
        engine.lone = lone


@pytest.mark.parametrize("full_window_cache", [True, False], ids=["llama.cpp-default", "window-sized-cache"])
def test_a_long_prompt_past_the_sliding_window_reuses_only_what_the_cache_still_holds(
        model_and_file, monkeypatch, full_window_cache):
    """Prompts of 1100 tokens (the Gemma 3's window is 8). llama.cpp's default keeps every position of the
    sliding-window layers; a window-sized cache (swa_full off, as llama.cpp's server runs) drops the old ones, and
    a prefix whose last `window` positions are gone must be computed again, not reused. The check came after
    dropping the tail, which can empty that cache: its lowest position then read -1 and the stale prefix passed."""
    import llama_cpp
    import numpy as np

    default_params = llama_cpp.llama_context_default_params

    def params():
        chosen = default_params()
        chosen.swa_full = full_window_cache
        return chosen

    monkeypatch.setattr(llama_cpp, "llama_context_default_params", params)
    _, tokenizer, path = model_and_file
    lone = LoneGreedy(path, threads=1)
    rng = np.random.default_rng(1)
    long = [tokenizer.bos_token_id] + rng.integers(10, len(tokenizer), 1099).tolist()
    try:
        runner = lone.runner()
        window = runner.lib.llama_model_n_swa(runner.model)
        assert window == 8
        for cut in (50, 300, 1000, len(long)):
            prompt = long[:cut] + rng.integers(10, len(tokenizer), 30).tolist()
            lone.close()
            fresh = lone_tokens(lone, prompt)
            lone.close()
            lone_tokens(lone, long)
            runner = lone.runner()
            held_from = runner.lib.llama_memory_seq_pos_min(runner.lib.llama_get_memory(runner.ctx), 0)
            assert held_from == 0 if full_window_cache else held_from > 300  # the window-sized cache dropped some
            computed = watch_batches(lone)
            assert lone_tokens(lone, prompt) == fresh, cut
            reusable = held_from <= cut - window
            assert computed[0] == ((cut, 30) if reusable else (0, cut + 30)), cut
            assert reusable or not full_window_cache
    finally:
        lone.close()


def test_a_request_that_fills_the_context_exactly_runs_in_llama_cpp_and_one_more_token_in_torch(model_and_file):
    model, tokenizer, path = model_and_file
    engine = Engine(model, tokenizer, PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION))
    engine.stop_ids = set()  # every answer runs to its limit
    prompt = engine.encode(PROMPTS[2])
    lone = LoneGreedy(path, n_ctx=len(prompt) + 20, threads=1)
    counting = engine.lone = CountingLone(lone)
    try:
        full = engine.run([Request(prompt, 20)])[0]
        assert counting.calls == 1 and full.completion_tokens == 20 and full.finish_reason == "length"
        assert full.text == torch_answers_ids(engine, prompt, 20).text
        assert engine.run([Request(prompt, 21)])[0].completion_tokens == 21  # past the context: torch
        assert counting.calls == 1
        assert engine.run([Request(prompt, 20)])[0].text == full.text  # the whole cache reused
        runner = lone.runner()
        held = runner.lib.llama_n_ctx(runner.ctx)  # llama.cpp rounds the context up: fits() is on the safe side
        assert held >= lone.n_ctx
        with pytest.raises(ModelError, match="decode"):  # past llama.cpp's context outside the engine: no crash
            lone_tokens(lone, prompt, held - len(prompt) + 2)
        assert lone._cached == [] and engine.run([Request(prompt, 20)])[0].text == full.text
    finally:
        lone.close()


def test_a_client_hanging_up_mid_answer_leaves_the_cache_consistent(engine):
    lone = engine.lone
    prompt = engine.encode(PROMPTS[4])
    other = engine.encode(PROMPTS[5])
    lone.close()
    want = lone_tokens(lone, prompt)
    lone.close()
    want_other = lone_tokens(lone, other)
    seen: list[int] = []

    def hang_up_at_the_fourth(token: int) -> bool:
        seen.append(token)
        if len(seen) == 4:
            raise ConnectionResetError("client went away")
        return False

    with pytest.raises(ConnectionResetError):
        lone.decode(prompt, hang_up_at_the_fourth)
    assert seen == want[:4] and lone._cached == []
    computed = watch_batches(lone)
    assert lone_tokens(lone, prompt) == want and computed[0] == (0, len(prompt))  # computed afresh
    assert lone_tokens(lone, other) == want_other

    # the engine's own row: a streaming callback that fails ends the request, the next is answered right
    def broken_stream(piece: str) -> None:
        raise BrokenPipeError("stream closed")

    with pytest.raises(BrokenPipeError):
        engine.run([Request(prompt, STEPS, on_text=broken_stream)])
    assert not engine.busy and lone._cached == []
    assert engine.run([Request(prompt, STEPS)])[0].text == torch_answers_ids(engine, prompt, STEPS).text


def test_concurrent_lone_requests_to_one_engine_take_turns_and_answer_alike(engine):
    from concurrent.futures import ThreadPoolExecutor

    prompts = PROMPTS[:6]
    want = {p: torch_answers_ids(engine, engine.encode(p), STEPS).text for p in prompts}
    lone = engine.lone
    running, most = [0], [0]
    guard = threading.Lock()

    class Watching:
        def fits(self, *args) -> bool:
            return lone.fits(*args)

        def decode(self, prompt_ids, take) -> None:
            with guard:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.005)  # widen the window two decodes would overlap in
                lone.decode(prompt_ids, take)
            finally:
                with guard:
                    running[0] -= 1

    engine.lone = Watching()
    jobs = [prompts[n % len(prompts)] for n in range(24)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: engine.run([Request(engine.encode(p), STEPS)])[0].text, jobs))
    assert answers == [want[p] for p in jobs]
    assert most[0] == 1  # engine.lock: one request in llama.cpp's context at a time


def test_log_blocks_from_two_threads_restore_llama_cpps_own_log_callback(model_and_file):
    """Two arms load (or free) their files at once from their own threads. llama.cpp has one log callback: a
    block that restored the callback of another block that had already ended left a freed ctypes thunk
    installed, and llama.cpp's next log line crashed the process (SIGTRAP). The blocks now take turns."""
    import ctypes

    from specialist.deploy import llamacpp

    lib = llamacpp.require_llama_cpp()

    def installed() -> int | None:
        callback, data = lib.llama_log_callback(), ctypes.c_void_p()
        lib.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
        return ctypes.cast(callback, ctypes.c_void_p).value

    original = installed()
    first_in, second_in = threading.Event(), threading.Event()
    overlapped = []

    def first() -> None:
        with llamacpp._llama_log():
            first_in.set()
            overlapped.append(second_in.wait(0.3))  # the second block must not start while this one runs

    def second() -> None:
        first_in.wait(5)
        with llamacpp._llama_log():
            second_in.set()
            time.sleep(0.05)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert overlapped == [False] and second_in.is_set()
        assert installed() == original
        # and real loads and frees at once, from four threads
        _, _, path = model_and_file
        runtimes = [LoneGreedy(path, threads=1) for _ in range(4)]
        workers = [threading.Thread(target=lambda lone=lone: (lone.runner(), lone.close())) for lone in runtimes]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert installed() == original
    finally:
        if installed() != original:  # leave no freed callback behind for the rest of the session
            previous = lib.llama_log_callback()
            lib.llama_log_get(ctypes.byref(previous), ctypes.byref(ctypes.c_void_p()))
            lib.llama_log_set(ctypes.cast(original, type(previous)), ctypes.c_void_p(0))


def test_a_missing_or_corrupt_file_fails_lone_requests_clearly_and_batches_still_run(model_and_file, tmp_path):
    model, tokenizer, path = model_and_file
    engine = Engine(model, tokenizer, PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION))
    prompt = engine.encode(PROMPTS[0])
    want = torch_answers_ids(engine, prompt, STEPS).text
    target = tmp_path / "arm.gguf"
    engine.lone = LoneGreedy(target, threads=1)
    with pytest.raises(ModelError, match="no such GGUF file"):
        engine.run([Request(prompt, STEPS)])
    assert not engine.busy
    assert [g.text for g in engine.run([Request(prompt, STEPS)] * 2)] == [want, want]  # batches: torch
    target.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelError, match="could not load"):
        engine.run([Request(prompt, STEPS)])
    assert engine.lone._runner is None and not engine.busy
    target.write_bytes(path.read_bytes())  # the file is back: the next lone request loads it
    assert engine.run([Request(prompt, STEPS)])[0].text == want
    engine.lone.close()


def test_close_twice_reload_after_close_and_garbage_collection_free_llama_cpp(model_and_file):
    import gc

    _, _, path = model_and_file
    lone = LoneGreedy(path, threads=1)
    lone.close()  # never loaded: nothing to free
    runner = lone.runner()
    want = lone_tokens(lone, [2, 40, 41, 42])
    lone.close()
    lone.close()
    assert runner.ctx is None and runner.model is None and lone._cached == []
    assert lone_tokens(lone, [2, 40, 41, 42]) == want  # loads again
    runner = lone.runner()
    del lone
    gc.collect()
    assert runner.ctx is None and runner.model is None  # __del__ freed llama.cpp's memory
    runner.close()  # and closing the freed runner again is harmless


def test_a_gguf_file_llama_cpp_cannot_run_fails_the_arms_load_not_its_requests(gguf_export, monkeypatch):
    from specialist.errors import ModelError

    def cannot_load(self):
        raise ModelError(f"{self.gguf}: llama.cpp could not load this GGUF file: planted")

    monkeypatch.setattr(LoneGreedy, "runner", cannot_load)
    with pytest.raises(ModelError, match="planted"):
        load_for_serving(str(gguf_export), ModelPool())
    assert load_for_serving(str(gguf_export), ModelPool(lone_runtime="torch")).lone is None  # the way out
