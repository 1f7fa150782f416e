"""core.json_prefix: an answer is cut only when no continuation could parse, checked against json.loads itself."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from specialist.core.json_prefix import can_become_json


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["int", "float", "str", "bool", "null", "list", "dict", "special"] if depth < 3
                      else ["int", "float", "str", "bool", "null"])
    if kind == "int":
        return rng.choice([0, -1, 7, 123456789, -0, 10 ** 30])
    if kind == "float":
        return rng.choice([0.5, -2.25e-7, 1e300, 3.0])
    if kind == "str":
        return "".join(rng.choice(['a', '"', '\\', '\n', '\t', 'é', '\u2028', '😀', '<*>', ' ', '/', '\x00'])
                       for _ in range(rng.randint(0, 6)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "special":
        return rng.choice([float("nan"), float("inf"), float("-inf")])
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(_random_value(rng, 3)): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def test_every_prefix_of_json_can_become_json():
    rng = random.Random(0)
    for _ in range(400):
        value = _random_value(rng)
        for text in (json.dumps(value), json.dumps(value, indent=2, ensure_ascii=False),
                     f" \n{json.dumps(value, separators=(',', ':'))}\t "):
            json.loads(text)  # the generator only writes what json.loads reads
            assert all(can_become_json(text[:cut]) for cut in range(len(text) + 1)), text


@pytest.mark.parametrize("text", [
    "", "  ", "{", '{"level": "INFO", "template": "Verification succeeded for blk_<*>"', "[1, 2", '"abc',
    '"\\', '"\\u00', "-", "-I", "-Infin", "tr", "nul", "Na", "1.", "1e", "1e-", "0.5E+", '{"a": [tru',
    '{"a"', '{"a":', "[", "[]", "{}  ", "123 ", '"x"\n',
])
def test_texts_that_can_still_become_json(text):
    assert can_become_json(text)


@pytest.mark.parametrize("text", [
    "081111 044337 13 INFO dfs.DataBlockScanner",  # the base model echoing the log line: "0" then "8"
    "Dec 10 09:07:56 LabSZ sshd", "Sure! Here is the JSON", "```json\n{", "{'level': 'INFO'}", "{level",
    '{"a" 1', '{"a": 1,}', "[1,]", "[1 2", "]", "}", "{]", "[}", '{"a": 1}}', '{"a": 1} extra', "01", "-0.x",
    "1.e", "--1", "+1", "tru e", "nulll", "NaN1", "-NaN", '"a\x01', '"\\x', '"\\u00g', "[,", "{,", '{"a":}',
    '"x" "y"', "1 2",
])
def test_texts_no_continuation_can_make_json(text):
    assert not can_become_json(text)


def test_agrees_with_json_loads_on_every_short_text_over_the_json_alphabet():
    """Exhaustive over 1-3 characters of a JSON alphabet, with every completion of 0-2 characters and a few longer
    closers: a text json.loads reads after some completion is never called dead (the direction that would cut an
    answer short; calling a dead text alive only costs tokens)."""
    alphabet = list('{}[]",:0-1.e ')
    closers = ['"}', '"]', ":0}", '":0}', '0"}', "]}", "}]", "0]", "0}", "00", "e0", "e-0", '""', '":1}']
    completions = ["".join(c) for n in range(3) for c in itertools.product(alphabet, repeat=n)] + closers

    def parses(text: str) -> bool:
        try:
            json.loads(text)
            return True
        except ValueError:
            return False

    dead_but_completable = []
    for n in range(1, 4):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            if not can_become_json(text) and any(parses(text + tail) for tail in completions):
                dead_but_completable.append(text)
    assert dead_but_completable == []


def test_a_hostile_answer_is_read_in_one_pass():
    deep = "[" * 100_000  # nesting json.loads would refuse for recursion is still a prefix of JSON
    assert can_become_json(deep)
    assert not can_become_json(deep + "}")
    assert not can_become_json("x" * 1_000_000)
