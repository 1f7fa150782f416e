"""The row shapes people bring from other tools (TRL conversational rows, ShareGPT, OpenAI chat and preference
fine-tuning files), multi-turn training on every assistant turn, and rows built to break the readers: each bad
row is one rejection with its line and the fix, never a traceback or a JSON dump of the messages learned as text."""

import json
import time

import pytest

from conftest import build_tiny_tokenizer
from specialist.config import DataConfig, validate_config
from specialist.data import PromptTemplate, encode_for_training, prepare, training_pairs
from specialist.data.load import Example
from specialist.data.shapes import check_role_order
from specialist.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_prepare(tmp_path, rows, method="lora", name="d.jsonl", **options):
    path = write_jsonl(tmp_path / name, rows)
    data = DataConfig.model_validate({"path": str(path), "dedupe": {"near": False}, **options})
    return prepare(data, method, tmp_path / "out", 0, show_progress=False)


def all_rows(prepared):
    split = prepared.split
    return sorted(split.train + split.val + split.test, key=lambda e: e.line)


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def chats(n, extra=None):
    """n distinct single-turn chat rows (extra: one more row, appended)."""
    rows = [{"messages": [user(f"question {i} w{i} v{i}"), assistant(f"answer {i} z{i}")]} for i in range(n)]
    return rows + ([extra] if extra is not None else [])


def dropped(prepared, kind):
    return prepared.report["dropped"][kind]["first"][0]


# ---- TRL conversational rows ---------------------------------------------------------------------------------


def test_trl_conversational_prompt_completion_rows_become_text_not_json(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, user(f"sky {i} colour{i}?")],
             "completion": [assistant(f"blue {i}")]} for i in range(20)]
    examples = all_rows(run_prepare(tmp_path, rows))
    assert examples[0].prompt == "Be brief.\n\nsky 0 colour0?" and examples[0].completion == "blue 0"
    assert not any("role" in e.prompt or "role" in e.completion for e in examples)


def test_a_multi_turn_trl_prompt_folds_like_a_chat_request(tmp_path):
    rows = [{"prompt": [user(f"hi {i} a{i}"), assistant(f"hello {i}"), user(f"and {i} b{i}?")],
             "completion": [assistant(f"then {i}")]} for i in range(20)]
    first = all_rows(run_prepare(tmp_path, rows))[0]
    assert first.prompt == "User: hi 0 a0\n\nAssistant: hello 0\n\nUser: and 0 b0?" and first.completion == "then 0"


def test_trl_conversational_preference_rows_train_dpo_on_text(tmp_path):
    rows = [{"prompt": [user(f"sky {i} k{i}?")], "chosen": [assistant(f"blue {i}")],
             "rejected": [assistant(f"green {i}")]} for i in range(20)]
    first = all_rows(run_prepare(tmp_path, rows, method="dpo"))[0]
    assert (first.prompt, first.completion, first.rejected) == ("sky 0 k0?", "blue 0", "green 0")


@pytest.mark.parametrize("bad, problem", [
    ({"prompt": [assistant("a")], "completion": [assistant("b")]}, "prompt: wrong role order ['assistant']"),
    ({"prompt": [user("q"), assistant("a")], "completion": [assistant("b")]},
     "the last message must be the user's question"),
    ({"prompt": [user("q")], "completion": [user("b")]}, "completion must be one assistant message, not ['user']"),
    ({"prompt": [user("q")], "completion": [assistant("b"), assistant("c")]}, "completion must be one assistant"),
    ({"prompt": [user("q")], "completion": [{"role": "assistant"}]}, "completion[0] (assistant) has no 'content'"),
    ({"prompt": [user("q"), {"role": "user", "content": 7}], "completion": [assistant("b")]},
     "prompt[1] (user) content is a int; only text is read"),
    ({"prompt": [{"role": "wizard", "content": "q"}], "completion": [assistant("b")]}, "has role 'wizard'"),
])
def test_bad_trl_conversational_rows_are_rejected_with_the_line_and_the_fix(tmp_path, bad, problem):
    rows = [{"prompt": [user(f"q {i} w{i}")], "completion": [assistant(f"a {i}")]} for i in range(20)]
    prepared = run_prepare(tmp_path, [*rows[:5], bad, *rows[5:]])
    found = prepared.report["dropped"]
    assert sum(v["count"] for v in found.values()) == 1
    entry = next(iter(found.values()))["first"][0]
    assert entry["line"] == 6 and problem in entry["problem"], entry


def test_an_empty_conversational_prompt_is_an_empty_field(tmp_path):
    rows = [{"prompt": [user(f"q {i} w{i}")], "completion": [assistant(f"a {i}")]} for i in range(20)]
    prepared = run_prepare(tmp_path, [*rows, {"prompt": [], "completion": [assistant("b")]}])
    assert dropped(prepared, "empty_field")["line"] == 21


# ---- ShareGPT ------------------------------------------------------------------------------------------------


def test_sharegpt_conversations_read_as_chat_rows(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"q {i} w{i}"},
                               {"from": "gpt", "value": f"a {i}"}]} for i in range(20)]
    prepared = run_prepare(tmp_path, rows)
    assert prepared.report["source"]["shape"] == "messages"
    assert prepared.report["source"]["columns"] == {"messages": "conversations"}
    first = all_rows(prepared)[0]
    assert (first.prompt, first.completion) == ("Be brief.\n\nq 0 w0", "a 0")


@pytest.mark.parametrize("bad, problem", [
    ([{"from": "bot", "value": "x"}], "conversations[0] is from 'bot'; ShareGPT speakers are"),
    ([{"from": "human", "value": "q"}, {"from": "gpt"}], "conversations[1] (assistant) has no 'value'"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "wrong role order ['assistant', 'user']"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": None}], "value is null; only text"),
    ([], "must be a non-empty list"),
    ("human: hi", "must be a non-empty list of {role, content} messages, not a str"),
])
def test_bad_sharegpt_rows_name_the_message_and_the_fix(tmp_path, bad, problem):
    rows = [{"conversations": [{"from": "human", "value": f"q {i} w{i}"}, {"from": "gpt", "value": f"a {i}"}]}
            for i in range(20)]
    prepared = run_prepare(tmp_path, [*rows, {"conversations": bad}])
    entry = next(iter(prepared.report["dropped"].values()))["first"][0]
    assert entry["line"] == 21 and problem.replace("conversations", "messages") in entry["problem"], entry


# ---- OpenAI chat rows with weight, and multi-turn training -------------------------------------------------


def conversation(i, weights=(None, None, None)):
    turns = [{"role": "system", "content": "Be brief."}]
    for k, weight in enumerate(weights):
        turns.append(user(f"q{k} of {i} w{i}"))
        turns.append(assistant(f"a{k} of {i}", **({} if weight is None else {"weight": weight})))
    return {"messages": turns}


def test_multi_turn_rows_learn_every_assistant_turn_each_from_the_turns_before_it(tmp_path):
    first = all_rows(run_prepare(tmp_path, [conversation(i) for i in range(20)]))[0]
    pairs = training_pairs(first)
    assert [answer for _, answer in pairs] == ["a0 of 0", "a1 of 0", "a2 of 0"]
    assert pairs[0][0] == "Be brief.\n\nq0 of 0 w0"
    assert pairs[1][0] == "Be brief.\n\nUser: q0 of 0 w0\n\nAssistant: a0 of 0\n\nUser: q1 of 0 w0"
    assert (first.prompt, first.completion) == pairs[2]  # evaluation scores the last turn, as before


def test_train_on_last_learns_only_the_final_turn(tmp_path):
    first = all_rows(run_prepare(tmp_path, [conversation(i) for i in range(20)], train_on="last"))[0]
    assert training_pairs(first) == [(first.prompt, first.completion)] and first.completion == "a2 of 0"


def test_weight_zero_turns_are_context_not_targets(tmp_path):
    first = all_rows(run_prepare(tmp_path, [conversation(i, weights=(0, 1, 0)) for i in range(20)]))[0]
    assert [answer for _, answer in training_pairs(first)] == ["a1 of 0"]
    assert "Assistant: a0 of 0" in first.prompt and "a2" not in first.prompt  # context kept; nothing after


def test_every_learned_turn_is_a_target_with_its_context_masked(tmp_path):
    tokenizer = build_tiny_tokenizer()
    template = PromptTemplate.for_tokenizer(tokenizer)
    first = all_rows(run_prepare(tmp_path, [conversation(i, weights=(1, 0, 1)) for i in range(20)]))[0]
    from specialist.train.sft import build_dataset

    dataset = build_dataset([first], template, tokenizer)
    assert len(dataset) == 2
    for row, (prompt, answer) in zip(dataset, training_pairs(first), strict=True):
        expected = encode_for_training(template, tokenizer, prompt, answer)
        assert row["input_ids"] == expected["input_ids"] and row["completion_mask"] == expected["completion_mask"]
        learned = [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m]
        assert tokenizer.decode(learned, skip_special_tokens=True).strip() == answer


def test_learned_turns_survive_the_prepared_files_and_cleaning(tmp_path):
    rows = [conversation(i) for i in range(20)]
    rows[0]["messages"][2]["content"] = "a0 of 0\u200b  "  # a zero-width space and trailing spaces, cleaned away
    prepared = run_prepare(tmp_path, rows)
    first = all_rows(prepared)[0]
    assert training_pairs(first)[0][1] == "a0 of 0"
    assert all(len(training_pairs(e)) == 3 for e in all_rows(prepared))


@pytest.mark.parametrize("bad, kind, problem", [
    (conversation(99, weights=(0, 0, 0)), "no_answer", "every assistant message has weight 0"),
    ({"messages": [user("q"), assistant("a", weight=2)]}, "bad_message", "has weight 2; weight is 0 or 1"),
    ({"messages": [{**user("q"), "weight": 1}, assistant("a")]}, "bad_message", "(user) has weight 1; weight is"),
    ({"messages": [user("q"), assistant("a", weight="1")]}, "bad_message", "has weight '1'"),
    ({"messages": [user("q"), assistant("a", weight=True)]}, "bad_message", "has weight True"),
    ({"messages": [user("q"), assistant("")]}, "empty_field", "assistant message 1 is empty"),
    ({"messages": [user("q"), {"role": "assistant", "content": None, "tool_calls": []}]}, "bad_message",
     "content is null; only text is read"),
    ({"messages": [user("q"), assistant("a"), user("again")]}, "role_order", "must be the assistant's answer"),
    ({"messages": {"role": "user"}}, "bad_message", "not a dict"),
    ({"messages": ["hi", "there"]}, "bad_message", "messages[0] is a str, not a {role, content} object"),
    ({"messages": [{"content": "q"}]}, "bad_message", "messages[0] has no role"),
])
def test_bad_openai_chat_rows_are_rejected_with_the_line_and_the_fix(tmp_path, bad, kind, problem):
    prepared = run_prepare(tmp_path, chats(20, extra=bad))
    assert list(prepared.report["dropped"]) == [kind]
    entry = dropped(prepared, kind)
    assert entry["line"] == 21 and problem in entry["problem"], entry


def test_openai_text_content_parts_are_read(tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one "},
                                                        {"type": "text", "text": "two"}]}, assistant("ok")]}
    last = all_rows(run_prepare(tmp_path, chats(20, extra=parts)))[-1]
    assert (last.prompt, last.completion) == ("part one two", "ok")


def test_a_huge_conversation_is_bounded_and_named_briefly(tmp_path):
    huge = {"messages": [user(f"q{k}") if k % 2 == 0 else assistant(f"a{k}") for k in range(20_000)]}
    backwards = {"messages": [assistant("a") if k % 2 == 0 else user("q") for k in range(20_000)]}
    started = time.perf_counter()
    prepared = run_prepare(tmp_path, chats(40, extra=huge) + [backwards])
    assert time.perf_counter() - started < 30
    entry = dropped(prepared, "role_order")
    assert entry["line"] == 42 and "(20000 messages)" in entry["problem"] and len(entry["problem"]) < 200
    too_many = dropped(prepared, "too_many_turns")
    assert too_many["line"] == 41 and "set data.train_on: last" in too_many["problem"]
    (tmp_path / "last").mkdir()
    last_only = all_rows(run_prepare(tmp_path / "last", chats(40, extra=huge), train_on="last"))[-1]
    assert last_only.line == 41 and last_only.completion == "a19999" and len(training_pairs(last_only)) == 1


def test_a_file_of_bad_chat_rows_stops_naming_the_file_the_line_and_the_fix(tmp_path):
    rows = [{"messages": [user(f"q{i}"), assistant(f"a{i}", weight=5)]} for i in range(10)]
    with pytest.raises(DataError) as error:
        run_prepare(tmp_path, rows)
    assert f"{tmp_path / 'd.jsonl'}:1: messages[1] (assistant) has weight 5; weight is 0 or 1" in str(error.value)


def test_check_role_order_still_reads_plain_message_lists():
    assert check_role_order([user("q"), assistant("a")]) == ""
    assert "wrong role order" in check_role_order([assistant("a")])


def test_training_pairs_of_a_plain_row_is_the_row():
    example = Example("in", "out", 1)
    assert training_pairs(example) == [("in", "out")]


# ---- OpenAI preference rows ----------------------------------------------------------------------------------


def openai_preference(i):
    return {"input": {"messages": [user(f"weather {i} in city{i}?")], "tools": [], "parallel_tool_calls": True},
            "preferred_output": [assistant(f"mild {i}")], "non_preferred_output": [assistant(f"cold {i}")]}


def test_openai_preference_rows_train_dpo(tmp_path):
    prepared = run_prepare(tmp_path, [openai_preference(i) for i in range(20)], method="dpo")
    assert prepared.report["source"]["columns"] == {"prompt": "input", "chosen": "preferred_output",
                                                    "rejected": "non_preferred_output"}
    first = all_rows(prepared)[0]
    assert (first.prompt, first.completion, first.rejected) == ("weather 0 in city0?", "mild 0", "cold 0")


def test_openai_preference_rows_teach_a_supervised_method_the_preferred_answer(tmp_path):
    prepared = run_prepare(tmp_path, [openai_preference(i) for i in range(20)])
    assert prepared.report["source"]["shape"] == "preference"
    first = all_rows(prepared)[0]
    assert (first.completion, first.rejected) == ("mild 0", None)


@pytest.mark.parametrize("bad, problem", [
    ({"input": {"messages": []}, "preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]},
     "empty"),
    ({"input": {"messages": [assistant("x")]}, "preferred_output": [assistant("a")],
      "non_preferred_output": [assistant("b")]}, "prompt: wrong role order"),
    ({"input": {"messages": [user("q")]}, "preferred_output": [user("a")], "non_preferred_output": [assistant("b")]},
     "chosen must be one assistant message"),
    ({"input": {"messages": [user("q")]}, "preferred_output": [assistant("a")]}, "missing column(s)"),
])
def test_bad_openai_preference_rows_are_rejected_with_the_line(tmp_path, bad, problem):
    prepared = run_prepare(tmp_path, [openai_preference(i) for i in range(20)] + [bad], method="dpo")
    entry = next(iter(prepared.report["dropped"].values()))["first"][0]
    assert entry["line"] == 21 and problem in entry["problem"], entry


# ---- config ---------------------------------------------------------------------------------------------------


def test_train_on_refuses_anything_but_all_or_last():
    with pytest.raises(ConfigError) as error:
        validate_config({"data": {"path": "d.jsonl", "train_on": "every"}})
    assert "data.train_on" in str(error.value)
    assert validate_config({"data": {"path": "d.jsonl"}}).data.train_on == "all"
