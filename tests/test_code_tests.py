"""The code scorers: generated test modules run in the sandbox against the solution and against mutants."""

import pytest

from specialist.core.code_tests import (
    available_isolations,
    fenced_code,
    imported_names,
    mutants,
    run_pytest,
    score_mutation_kill,
    score_tests_pass,
)
from specialist.core.scorers import resolve_scorers, score_rows, takes_prompt

SOLUTION = ("def count_above(values, limit):\n    total = 0\n    for v in values:\n        if v > limit:\n"
            "            total += 1\n    return total\n")
PROMPT = f"```python\n{SOLUTION}```"
STRONG = """import pytest

from solution import count_above

CASES = [
    (([1, 2, 3], 5), 0),
    (([1, 5, 6, 7], 5), 2),
    (([], 0), 0),
]


@pytest.mark.parametrize(("args", "expected"), CASES)
def test_count_above(args, expected):
    assert count_above(*args) == expected
"""
WEAK = STRONG.replace("    (([1, 5, 6, 7], 5), 2),\n    (([], 0), 0),\n", "")
WRONG = STRONG.replace("(([1, 2, 3], 5), 0)", "(([1, 2, 3], 5), 1)")


def test_a_passing_module_passes_and_a_wrong_one_fails():
    passed = run_pytest(SOLUTION, STRONG)
    assert passed.passed and (passed.tests_passed, passed.tests_failed) == (3, 0)  # from pytest's own report
    assert passed.isolation == available_isolations()[0]  # the strongest this machine allows
    failed = run_pytest(SOLUTION, WRONG)
    assert not failed.passed and failed.returncode == 1 and "assert 0 == 1" in failed.output
    assert failed.report_found and failed.tests_failed == 1


def test_nothing_to_run_does_not_pass():
    empty = run_pytest(SOLUTION, "from solution import count_above\n")
    assert not empty.passed and empty.returncode == 5 and empty.tests_passed == 0  # pytest exit 5: no tests
    broken = run_pytest(SOLUTION, "this is not python")
    assert not broken.passed and broken.returncode == 2 and broken.tests_failed == 1  # a collection error


def test_an_endless_test_is_killed_at_the_time_limit():
    result = run_pytest(SOLUTION, "def test_forever():\n    while True:\n        pass\n", timeout=2)
    assert result.timed_out and not result.passed and result.returncode is None


def test_memory_and_network_are_limited():
    big = "def test_big():\n    block = bytearray(4 * 1024 ** 3)\n    assert block\n"
    assert not run_pytest(SOLUTION, big).passed
    net = ("import socket\n\ndef test_net():\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    result = run_pytest(SOLUTION, net)
    assert not result.passed and ("network access is disabled" in result.output or "unreachable" in result.output)


def test_the_sandbox_does_not_see_our_environment(monkeypatch):
    monkeypatch.setenv("SPECIALIST_SECRET", "do-not-leak")
    leak = "import os\n\ndef test_env():\n    assert 'SPECIALIST_SECRET' not in os.environ\n"
    assert run_pytest(SOLUTION, leak).passed


def test_mutants_change_one_point_of_the_imported_function():
    found = mutants(SOLUTION, {"count_above"})
    assert len(found) == 4  # 0 -> 1, > -> >=, += -> -=, 1 -> 2
    assert "total = 1" in found[0] and "v >= limit" in found[1] and "total -= 1" in found[2] and "+= 2" in found[3]
    assert mutants(SOLUTION, {"other"}) == []
    assert mutants("def f():\n    return 'text'\n") == []
    assert imported_names(STRONG) == {"count_above"}


def test_tests_pass_and_mutation_kill_scores():
    assert score_tests_pass(STRONG, STRONG, PROMPT) == 1.0
    assert score_tests_pass(WRONG, STRONG, PROMPT) == 0.0
    assert score_tests_pass(f"```python\n{STRONG}```", STRONG, PROMPT) == 1.0  # fenced output is read too
    assert score_mutation_kill(STRONG, STRONG, PROMPT) == 1.0  # the reference kills every mutant it is scored on
    # one case with nothing above the limit: only the 0 -> 1 mutant is caught
    assert score_mutation_kill(WEAK, STRONG, PROMPT) == 0.25
    assert score_mutation_kill(WRONG, STRONG, PROMPT) == 0.0  # failing on the solution kills nothing


def test_code_scorers_read_the_prompt_through_score_rows():
    scorers = resolve_scorers(["tests_pass", "exact_match", "chrf"])
    assert takes_prompt(scorers["tests_pass"]) and not takes_prompt(scorers["exact_match"])
    assert not takes_prompt(scorers["chrf"])  # its extra parameters have defaults: settings, not the prompt
    rows = score_rows([STRONG, WRONG], [STRONG, STRONG], scorers, [PROMPT, PROMPT])
    assert rows["tests_pass"] == [1.0, 0.0] and rows["exact_match"] == [1.0, 0.0] and rows["chrf"][0] == 1.0
    with pytest.raises(ValueError, match="prompt"):
        score_rows([STRONG], [STRONG], scorers)


def test_fenced_code_takes_the_python_block():
    assert fenced_code("intro\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert fenced_code("x = 1\n") == "x = 1\n"


def test_every_built_in_scorer_runs_through_score_rows_with_prompts(tmp_path):
    from specialist.core.scorers import KNOWN, LabelRule

    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    scorers = resolve_scorers(sorted(KNOWN), LabelRule(json_key="k"), schema)
    rows = score_rows(['{"k": "a"}', STRONG], ['{"k": "a"}', STRONG], scorers, [PROMPT, PROMPT])
    assert set(rows) == set(KNOWN) and all(len(v) == 2 for v in rows.values())
