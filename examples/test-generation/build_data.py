"""Build data.jsonl (function with docstring and solution -> pytest module in house style) from HumanEval.

Run from the repository root:  python examples/test-generation/build_data.py [--humaneval ../shared/datasets/humaneval]

The prompt is the task's code: imports, helpers, signature, docstring and the reference solution. The
completion is the task's published tests rewritten in the house style (README.md):

    import pytest

    from solution import NAME

    CASES = [
        ((ARG, ...), EXPECTED),
        ...
    ]


    @pytest.mark.parametrize(("args", "expected"), CASES)
    def test_NAME(args, expected):
        assert NAME(*args) == expected

Only the published asserts of the form `assert candidate(...) == VALUE` (also `VALUE == candidate(...)`,
`candidate(...) is True`, bare `candidate(...)`, `not candidate(...)`, and `abs(candidate(...) - VALUE) < TOL`,
which becomes `pytest.approx`) with literal arguments are kept, at most MAX_CASES a task, each written in
at most MAX_CASE_CHARS characters; a task with fewer than MIN_CASES such asserts is left out. Loops and
random tests are not converted. A task whose function offers no point to mutate (see
specialist.core.code_tests.mutants) is left out too: the mutation_kill score would mean nothing there.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
from pathlib import Path

from specialist.core.code_tests import mutants

HERE = Path(__file__).resolve().parent
MAX_CASES, MIN_CASES, MAX_CASE_CHARS = 5, 3, 100


def _literal(node: ast.expr) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _candidate_call(node: ast.expr) -> ast.Call | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "candidate" \
            and not node.keywords:
        return node
    return None


def case_of(test: ast.expr) -> tuple[ast.Call, ast.expr | bool, bool] | None:
    """(the candidate call, the expected value node or a bool, approximate?) for one assert's test, or None."""
    if call := _candidate_call(test):
        return call, True, False
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and (call := _candidate_call(test.operand)):
        return call, False, False
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if isinstance(op, (ast.Eq, ast.Is)):
            if call := _candidate_call(left):
                return call, right, False
            if call := _candidate_call(right):
                return call, left, False
        # abs(candidate(x) - y) < tol
        if isinstance(op, (ast.Lt, ast.LtE)) and isinstance(left, ast.Call) and isinstance(left.func, ast.Name) \
                and left.func.id == "abs" and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp) \
                and isinstance(left.args[0].op, ast.Sub) and (call := _candidate_call(left.args[0].left)):
            return call, left.args[0].right, True
    return None


def house_cases(check_source: str) -> tuple[list[tuple[tuple, object]], bool]:
    """The convertible (args, expected) cases of a `check(candidate)` function, and whether any is approximate."""
    cases, approximate = [], False
    for node in ast.walk(ast.parse(check_source)):
        if not isinstance(node, ast.Assert) or (found := case_of(node.test)) is None:
            continue
        call, expected_node, approx = found
        literal_args = [_literal(a) for a in call.args]
        ok, expected = (True, expected_node) if isinstance(expected_node, bool) else _literal(expected_node)
        if not ok or not all(good for good, _ in literal_args):
            continue
        case = (tuple(value for _, value in literal_args), expected)
        if len(repr(case)) > MAX_CASE_CHARS or case in cases:
            continue
        cases.append(case)
        approximate = approximate or approx or isinstance(expected, float)
    return cases[:MAX_CASES], approximate


def house_module(name: str, cases: list[tuple[tuple, object]], approximate: bool) -> str:
    rows = "".join(f"    ({args!r}, {expected!r}),\n" for args, expected in cases)
    check = "pytest.approx(expected)" if approximate else "expected"
    return (f"import pytest\n\nfrom solution import {name}\n\nCASES = [\n{rows}]\n\n\n"
            f"@pytest.mark.parametrize((\"args\", \"expected\"), CASES)\n"
            f"def test_{name}(args, expected):\n    assert {name}(*args) == {check}\n")


def build(humaneval: Path) -> list[dict[str, str]]:
    with gzip.open(humaneval / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as handle:
        tasks = [json.loads(line) for line in handle]
    rows = []
    for task in tasks:
        cases, approximate = house_cases(task["test"])
        if len(cases) < MIN_CASES:
            continue
        code = (task["prompt"] + task["canonical_solution"]).strip() + "\n"
        if not mutants(code, {task["entry_point"]}, limit=1):
            continue
        rows.append({"prompt": f"```python\n{code}```", "completion": house_module(task["entry_point"], cases, approximate),
                     "task_id": task["task_id"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--humaneval", type=Path, default=HERE.parents[1] / ".." / "shared" / "datasets" / "humaneval")
    parser.add_argument("--out", type=Path, default=HERE / "data.jsonl")
    args = parser.parse_args()
    rows = build(args.humaneval)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
