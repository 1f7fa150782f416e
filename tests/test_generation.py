"""The one generation engine: its stopping rules, streaming, cancellation, and that evaluation, the export's golden
replay and `serve` (plain and streamed) answer a prompt with the same text."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from specialist.data import Example, PromptTemplate
from specialist.generation import Engine, Request, RowRules, Sampling, cut_at_stop


@pytest.fixture
def babbler(tiny_model):
    """The tiny model with large random weights: it writes varied text and rarely stops by itself."""
    model, tokenizer = tiny_model
    torch.manual_seed(3)
    for parameter in model.parameters():
        parameter.data.normal_(std=0.5)
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse the log line into JSON.")
    return Engine(model.eval(), tokenizer, template)


PROMPTS = ["Dec 10 sshd[1]: Invalid user x", "081109 INFO dfs.DataNode: a much longer line with more words", "hi"]


def test_a_batch_answers_each_prompt_as_it_would_alone(babbler):
    together = babbler.generate(PROMPTS, 12, batch_size=3)
    alone = [babbler.answer(p, 12) for p in PROMPTS]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(g.completion_tokens <= 12 for g in together) and any(g.text for g in together)


def test_each_row_stops_at_its_own_limit(babbler):
    babbler.stop_ids = set()  # nothing stops early
    ids = [babbler.encode(p) for p in PROMPTS]
    results = babbler.run([Request(ids[0], 3), Request(ids[1], 9), Request(ids[2], 5)])
    assert [r.completion_tokens for r in results] == [3, 9, 5]
    assert {r.finish_reason for r in results} == {"length"}


def test_a_constrained_engine_closes_each_row_within_its_own_limit(babbler):
    """The engine tells the constraint each request's token limit, so a row that would run on inside a string is
    closed in time: valid JSON from every row, whatever its limit (as long as the smallest answer fits)."""
    pytest.importorskip("xgrammar")
    from specialist.constrain import Constraint

    schema = {"type": "object", "properties": {"event": {"type": "string"}, "lines": {"type": "integer"}},
              "required": ["event", "lines"], "additionalProperties": False}
    babbler.constraint = Constraint.json_schema(schema)
    ids = [babbler.encode(p) for p in PROMPTS]
    limits = [40, 56, 72]
    results = babbler.run([Request(i, limit) for i, limit in zip(ids, limits)], Sampling(do_sample=True))
    for result, limit in zip(results, limits):
        assert result.completion_tokens <= limit and result.finish_reason == "stop", result
        assert set(json.loads(result.text)) == {"event", "lines"}


def test_a_stop_string_ends_the_row_and_is_cut(babbler):
    babbler.stop_ids = set()
    first = babbler.answer(PROMPTS[0], 20)
    marker = first.text[3:5]  # two characters from the middle of what the model writes: now they end an answer
    assert len(marker.strip()) == 2, first.text
    babbler.stop_strings = (marker,)
    stopped = babbler.answer(PROMPTS[0], 20)
    assert stopped.finish_reason == "stop" and marker not in stopped.text
    assert stopped.text == cut_at_stop(first.text, (marker,)) and stopped.completion_tokens < 20


def test_streamed_pieces_add_up_to_the_answer(babbler):
    for prompt in PROMPTS:
        pieces: list[str] = []
        streamed = babbler.run([Request(babbler.encode(prompt), 16, on_text=pieces.append)])[0]
        assert "".join(pieces) == streamed.text == babbler.answer(prompt, 16).text


def test_a_cancelled_row_ends_at_once_and_the_others_go_on(babbler):
    babbler.stop_ids = set()
    flag = threading.Event()
    flag.set()
    results = babbler.run([Request(babbler.encode(PROMPTS[0]), 30, cancelled=flag),
                           Request(babbler.encode(PROMPTS[1]), 30)])
    assert results[0].finish_reason == "cancelled" and results[0].completion_tokens == 1
    assert results[1].finish_reason == "length" and results[1].completion_tokens == 30


def test_sampling_is_a_setting_not_a_code_path(babbler):
    """Sampling draws from the model's distribution (seeded: repeatable; over seeds: varied), and its settings reach
    the draw: near-zero temperature or top-p leave only the greedy token."""
    babbler.stop_ids = set()  # every answer runs to its limit, so answers compare token for token
    greedy = babbler.answer(PROMPTS[0], 10).text

    def sampled(seed: int, sampling: Sampling) -> str:
        torch.manual_seed(seed)
        return babbler.answer(PROMPTS[0], 10, sampling).text

    full = Sampling(True, 1.0, 1.0)
    assert sampled(0, full) == sampled(0, full)
    draws = {sampled(seed, full) for seed in range(4)}
    assert len(draws) > 1 and draws != {greedy}
    assert sampled(1, Sampling(True, 1e-4, 1.0)) == greedy == sampled(2, Sampling(True, 1.0, 1e-4))
    assert Sampling().generate_kwargs() == {"do_sample": False}


def test_evaluation_export_replay_and_serve_give_the_same_text(tiny_run_dir, tmp_path):
    from specialist.artifacts import ModelPool, load_run
    from specialist.deploy.arms import load_arms
    from specialist.deploy.export import ExportOptions, export_run
    from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app
    from specialist.evaluate.runner import generate
    from specialist.run_folder import RunFolder

    run = RunFolder(tiny_run_dir)
    config = run.config(["evaluation.batch_size=1"])
    prompt = run.split().test[0].prompt
    tuned = load_run(run, ModelPool(), adapter_name="tuned")
    engine = Engine(tuned.model, tuned.tokenizer, tuned.template, context=tuned.context)
    evaluated = generate(engine, [Example(prompt, "", 1)], 8, config)[0]
    replayed = export_run(run.path, "merged", tmp_path / "merged",
                          ExportOptions(golden=1, max_new_tokens=8)).check["answers"][0]
    assert replayed["run"] == replayed["export"] == evaluated
    arms = load_arms([("tuned", str(run.path))])
    app = create_app(arms, ServeSettings(split={"tuned": 1.0}, db=tmp_path / "log.sqlite"))
    body = {"model": "tuned", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}
    with BackgroundServer(app) as server:
        served = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}) as reply:
            import json

            chunks = [json.loads(line[6:]) for line in reply.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert served == streamed == evaluated


def test_a_constrained_arm_answers_inside_the_language_in_evaluation_and_serving(tiny_run_dir, tmp_path):
    import re

    pytest.importorskip("xgrammar")
    from specialist.deploy.arms import load_arms
    from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app
    from specialist.evaluate.runner import evaluate_run
    from specialist.run_folder import RunFolder

    pattern = r'\{"level": "(INFO|WARN|notice)"\}'
    overrides = ["evaluation.constrained=true", "evaluation.constraint=regex",
                 f"evaluation.constraint_regex='{pattern}'", "evaluation.max_new_tokens=30",
                 "evaluation.forgetting=false", "evaluation.train_sample=0", "evaluation.few_shot_k=0"]
    run = RunFolder(tiny_run_dir)
    report = evaluate_run(run.path, run.config(overrides))
    assert report.arms["tuned+constrained"].scores["json_valid"].mean == 1.0
    predictions = [json.loads(line) for line in run.predictions.read_text().splitlines()]
    assert all(re.fullmatch(pattern, p["tuned+constrained"]) for p in predictions)
    assert any(not re.fullmatch(pattern, p["tuned"]) for p in predictions)  # unconstrained, it wanders off
    # measured against the baselines and against tuned, in eval.json and in the report's best-baseline lines
    written = json.loads(run.eval_json.read_text())
    assert {"tuned+constrained_vs_base", "tuned+constrained_vs_tuned"} <= set(written["comparisons"])
    assert written["best_baseline"]["json_valid"]["tuned+constrained"] == 1.0
    assert "- json_valid: tuned+constrained 100.0% vs " in run.report_md.read_text()

    import shutil

    import yaml

    served = RunFolder(tmp_path / "run")  # the same run, its config asking for the regex: what serve reads
    shutil.copytree(run.path, served.path)
    config = yaml.safe_load(served.config_file.read_text())
    config["evaluation"].update({"constraint": "regex", "constraint_regex": pattern})
    served.config_file.write_text(yaml.safe_dump(config))
    arms = load_arms([("tuned", str(served.path))], constrain=True)
    app = create_app(arms, ServeSettings(split={"tuned": 1.0}, db=tmp_path / "log.sqlite"))
    with BackgroundServer(app) as server:
        body = {"model": "tuned", "max_tokens": 30, "messages": [{"role": "user", "content": "a log line"}]}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        # a limit too small for any whole answer: the valid start, reported as cut, and the server goes on
        cut = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "max_tokens": 1})
        again = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert re.fullmatch(pattern, answer) and again == answer
    assert cut.status_code == 200 and cut.json()["choices"][0]["finish_reason"] == "length"
    assert '{"level": "'.startswith(cut.json()["choices"][0]["message"]["content"])


def test_rows_sharing_a_prefix_answer_as_they_would_alone(babbler):
    """Few-shot prompts share the instruction and the shots: that prefix is computed once for the batch."""
    from specialist.generation import PREFIX_CACHE_MIN_TOKENS, shared_prefix_length

    shots = [("081109 INFO dfs.DataNode: Receiving block", '{"level": "INFO"}'),
             ("Dec 10 sshd[1]: Invalid user admin", '{"level": null}')]
    encoded = [babbler.encode(p, shots) for p in PROMPTS]
    assert shared_prefix_length(encoded) >= PREFIX_CACHE_MIN_TOKENS  # the cached path is the one taken
    calls = []
    hook = babbler.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    together = babbler.generate(PROMPTS, 12, batch_size=3, shots=shots)
    hook.remove()
    assert calls[0] == (1, shared_prefix_length(encoded))  # the prefix once, for one row
    alone = [babbler.run([Request(ids, 12)])[0] for ids in encoded]
    assert [g.text for g in together] == [g.text for g in alone]
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2 and shared_prefix_length([[1, 2], [1, 2, 3]]) == 1


# ---- per-request settings (issue 27): stop strings, a seed, log-probabilities, an output language --------------


def test_a_request_stop_string_ends_only_its_own_row(babbler):
    babbler.stop_ids = set()
    first = babbler.answer(PROMPTS[0], 20)
    marker = first.text[4:6]
    assert len(marker.strip()) == 2, first.text
    ids = babbler.encode(PROMPTS[0])
    stopped, free = babbler.run([Request(ids, 20, stop=(marker, "never-written")), Request(ids, 20)])
    assert stopped.finish_reason == "stop" and stopped.text == cut_at_stop(first.text, (marker,))
    assert free.text == first.text and free.finish_reason == "length"
    never = babbler.run([Request(ids, 20, stop=("\x00never\x00",))])[0]  # a stop that never appears changes nothing
    assert never.text == first.text and never.finish_reason == "length"


def test_a_stop_string_is_held_back_from_the_stream(babbler):
    babbler.stop_ids = set()
    first = babbler.answer(PROMPTS[1], 24)
    marker = first.text[6:9]
    pieces: list[str] = []
    streamed = babbler.run([Request(babbler.encode(PROMPTS[1]), 24, on_text=pieces.append, stop=(marker,))])[0]
    assert "".join(pieces) == streamed.text == cut_at_stop(first.text, (marker,)) and marker not in streamed.text


def test_a_seed_repeats_its_draw_whatever_is_batched_beside_it(babbler):
    """Each seeded row draws from its own generator: the same seed gives the same answer alone, beside other rows
    and after the global generator has moved; other seeds give other answers; the global generator is untouched."""
    babbler.stop_ids = set()
    ids = [babbler.encode(p) for p in PROMPTS]
    seeded = Sampling.of(1.0, 1.0, seed=7)
    alone = babbler.run([Request(ids[0], 12)], seeded)[0].text
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    batched = babbler.run([Request(i, 12) for i in (ids[1], ids[0], ids[2])], seeded)[1].text
    assert torch.equal(torch.random.get_rng_state(), state)
    assert batched == alone
    others = {babbler.run([Request(ids[0], 12)], Sampling.of(1.0, 1.0, seed=s))[0].text for s in range(4)}
    assert len(others) > 1
    cold = babbler.run([Request(ids[0], 12)], Sampling.of(1e-4, 1.0, seed=3))[0].text
    assert cold == babbler.answer(PROMPTS[0], 12).text  # near-zero temperature: the greedy answer
    assert Sampling.of(0, 0.5, seed=3) == Sampling() and Sampling.of(None) == Sampling()


def test_logprobs_are_the_models_own_and_add_up_streamed_or_not(babbler):
    babbler.stop_ids = set()
    ids = babbler.encode(PROMPTS[0])
    whole = babbler.run([Request(ids, 10, logprobs=3)])[0]
    assert len(whole.logprobs) == whole.completion_tokens == 10
    with torch.inference_mode():  # greedy: each token is the likeliest, its logprob the top one
        prefix = list(ids)
        for entry in whole.logprobs:
            expected = torch.log_softmax(babbler.model(torch.tensor([prefix])).logits[0, -1].float(), -1)
            assert entry.token_id == int(expected.argmax()) == entry.top[0][0]
            assert abs(entry.logprob - float(expected[entry.token_id])) < 1e-4 and len(entry.top) == 3
            assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
            prefix.append(entry.token_id)
    pieces: list[tuple[str, tuple]] = []
    streamed = babbler.run([Request(ids, 10, logprobs=0, on_text=lambda text, lps: pieces.append((text, lps)))])[0]
    assert "".join(text for text, _ in pieces) == streamed.text == whole.text
    assert [e.token_id for _, lps in pieces for e in lps] == [e.token_id for e in streamed.logprobs][:sum(
        len(lps) for _, lps in pieces)]
    assert all(e.top == () for e in streamed.logprobs) and babbler.run([Request(ids, 4)])[0].logprobs is None


def test_a_stop_string_leaves_its_tokens_out_of_the_logprobs(babbler):
    babbler.stop_ids = set()
    first = babbler.answer(PROMPTS[0], 20)
    marker = first.text[5:7]
    stopped = babbler.run([Request(babbler.encode(PROMPTS[0]), 20, logprobs=0, stop=(marker,))])[0]
    spelled = babbler.tokenizer.decode([e.token_id for e in stopped.logprobs]).strip()
    assert marker not in spelled and stopped.text.startswith(spelled) and len(stopped.logprobs) < 20


def test_rows_with_their_own_output_language_are_each_kept_inside_it(babbler):
    pytest.importorskip("xgrammar")
    from specialist.constrain import Constraint

    schema = Constraint.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                                     "additionalProperties": False})
    labels = Constraint.labels(["yes", "no"])
    ids = [babbler.encode(p) for p in PROMPTS]
    results = babbler.run([Request(ids[0], 30, constraint=schema), Request(ids[1], 30, constraint=labels),
                           Request(ids[2], 30), Request(ids[0], 30, constraint=schema)], Sampling.of(1.0, seed=1))
    assert set(json.loads(results[0].text)) == {"n"} and results[1].text in ("yes", "no")
    assert results[3].text == results[0].text  # same prompt, same seed: the batch split changes nothing
    assert results[2].text == babbler.run([Request(ids[2], 30)], Sampling.of(1.0, seed=1))[0].text


# ---- the fast greedy path (issue 26): specialist.decode in place of generate, the same tokens ------------------


def test_the_fast_greedy_path_gives_the_plain_paths_tokens(babbler, monkeypatch):
    """Greedy rows with no logits processor decode through specialist.decode (its own loop, rows leaving the batch
    as they end, the output layer in bfloat16 where the CPU has it, candidates re-scored in float32, a lone row
    checking tokens guessed from its context several at a time): every row's tokens are those of transformers'
    generate, batched with different limits, with a shared prefix, and alone (with and without the guesses)."""
    from specialist import generation

    babbler.stop_ids = set()
    shots = [("081109 INFO dfs.DataNode: Receiving block", '{"level": "INFO"}')] * 2
    prompts = [babbler.encode(p) for p in PROMPTS] + [babbler.encode(p, shots) for p in PROMPTS]
    limits = [5, 17, 9, 12, 3, 20]
    seen: dict[int, list[int]] = {}
    add = generation._Row.add

    def spy(row, token, *rest):  # the tokens a row takes (generate goes on offering an ended row padding)
        if row.finish is None:
            seen.setdefault(id(row.request), []).append(token)
        return add(row, token, *rest)

    monkeypatch.setattr(generation._Row, "add", spy)

    def tokens(fast: bool, batches: list[list[int]]) -> list[list[int]]:
        babbler.fast = fast
        requests = [Request(ids, limit) for ids, limit in zip(prompts, limits)]
        for batch in batches:
            babbler.run([requests[n] for n in batch])
        return [seen.pop(id(r)) for r in requests]

    plain = tokens(False, [[0, 1, 2], [3, 4, 5]])
    assert [len(t) for t in plain] == limits
    generate = babbler.model.generate
    monkeypatch.setattr(babbler.model, "generate", lambda *a, **k: pytest.fail("the fast path called generate"))
    assert tokens(True, [[0, 1, 2], [3, 4, 5]]) == plain  # batched: padding; the second batch shares a prefix
    calls = []
    hook = babbler.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    assert tokens(True, [[n] for n in range(6)]) == plain  # one at a time: prompt-lookup drafts checked
    hook.remove()
    assert len(calls) - len(limits) < sum(limits) - len(limits)  # some calls took several tokens at once
    babbler.lookup = 0
    assert tokens(True, [[n] for n in range(6)]) == plain  # one token per call
    monkeypatch.setattr(babbler.model, "generate", generate)
    assert babbler.run([Request(prompts[0], 5)], Sampling(True, 1.0, 1.0, seed=1))  # sampling: the plain path


def test_an_answer_ends_where_its_json_scores_are_decided_and_scores_the_same(babbler):
    """The evaluation's rule (only JSON scorers, JSON answers expected): generation stops once no continuation
    could parse, and every scorer gives the cut answer what it gives the whole one."""
    from specialist.core.scorers import BUILTIN, decided_once_not_json

    babbler.stop_ids = set()
    expected = ['{"level": "INFO", "component": "sshd", "template": "Invalid user <*>"}'] * len(PROMPTS)
    decided = decided_once_not_json(["json_valid", "exact_match", "field_accuracy"], expected)
    whole = babbler.generate(PROMPTS, 24, batch_size=3)
    cut = babbler.generate(PROMPTS, 24, batch_size=3, rows=RowRules(decided=decided))
    assert any(g.finish_reason == "decided" for g in cut)  # random weights do not write JSON
    for short, full, want in zip(cut, whole, expected):
        assert full.text.startswith(short.text)
        if short.finish_reason == "decided":
            assert short.completion_tokens < 24
        for name in ("json_valid", "exact_match", "field_accuracy"):
            assert BUILTIN[name](short.text, want) == BUILTIN[name](full.text, want)


@pytest.mark.parametrize(("scorers", "expected"), [
    (["json_valid", "chrf"], ['{"a": 1}']),  # chrF gives partial credit to any text: nothing is decided
    (["exact_match"], ["plain text answer"]),  # a non-JSON answer could still match it exactly
    (["my_module:score"], ['{"a": 1}']),  # a scorer of the user's: unknown rules
    ([], ['{"a": 1}']),
])
def test_no_early_end_where_a_continuation_could_still_score(scorers, expected):
    from specialist.core.scorers import decided_once_not_json

    assert decided_once_not_json(scorers, expected) is None


class _CharTokenizer:
    """One token per character: a row's text is exactly the characters fed to it."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _fed(text: str, stops: tuple[str, ...]):
    from types import SimpleNamespace

    from specialist.core.scorers import decided_once_not_json
    from specialist.generation import _Row

    engine = SimpleNamespace(stop_strings=stops, stop_ids=set(), tokenizer=_CharTokenizer())
    decided = decided_once_not_json(["json_valid", "exact_match"], ['{"a": 1}'])
    row = _Row(Request([1], max_new_tokens=len(text) + 5, decided=decided), engine)
    for char in text:
        if row.add(ord(char)):
            break
    return row


def test_a_json_answer_followed_by_the_next_turn_is_cut_by_the_stop_string_not_decided():
    """The few-shot arm writes its JSON, then begins the next turn of the built-in format: the characters after
    the JSON are a stop string in the making, and the answer scored is the JSON before it."""
    row = _fed('{"a": 1}\n\n### Input:\nmore', ("\n### ",))
    assert row.finish == "stop" and row.text().strip() == '{"a": 1}'


def test_an_echoed_log_line_is_decided_at_its_second_character_even_with_stop_strings():
    row = _fed("081111 044337 13 INFO dfs.DataBlockScanner", ("\n### ",))
    assert row.finish == "decided" and row.text() == "08"
    row = _fed('{"a": 1} and then some words', ("\n### ",))  # text after the value that no stop string begins
    assert row.finish == "decided" and row.text() == '{"a": 1} a'


def test_a_log_file_hears_from_a_batch_that_outlasts_the_progress_interval(monkeypatch, capsys):
    """In a log (not a terminal) the clock writes a progress line even while one batch is still running."""
    import time

    from specialist.console import console
    from specialist.generation import GenerationProgress

    monkeypatch.setattr(console, "_force_terminal", False)
    monkeypatch.setattr(console, "width", 300)
    # capsys, not console.capture(): Rich buffers a capture per thread, and the heartbeat writes from its own
    with GenerationProgress("evaluating slow arm", 16, every=0.2) as progress:
        time.sleep(0.7)  # one batch, no advance yet
        progress.advance(16, 320)
    lines = [line for line in capsys.readouterr().err.splitlines() if "evaluating slow arm" in line]
    assert len(lines) >= 3  # at least two heartbeats, then the last row's line
    assert "0/16 rows" in lines[0] and "ETA ?" in lines[0] and "16/16 rows" in lines[-1]
    assert not any(t.name == "generation-progress" and t.is_alive() for t in __import__("threading").enumerate())
