"""Scorers for generated test code: does the test module pass on the code under test, and does it catch bugs?

`tests_pass`: the output is a pytest module that imports the function from `solution`; the code under test is
the prompt's fenced Python block (or the whole prompt). Both are written into a fresh temporary folder and
pytest runs there in a child process: a time limit (wall and CPU), an address-space limit, a file-size limit,
its own process group (killed whole on timeout), an environment with nothing of ours in it, and no network:
inside a network namespace of its own where `unshare -rn` works, and in every case a conftest.py that makes
socket connections and name lookups raise. Passing means pytest exits 0 having run at least one test.

`mutation_kill`: the same module must also fail on mutants of the solution: single-point changes to the
function it imports (`+`/`-`, `*`/`//`, `<`/`<=`, `>`/`>=`, `==`/`!=`, `in`/`not in`, `and`/`or`,
an integer constant plus one, True/False). Mutants the row's reference test module (the expected output)
does not kill are set aside where there are others, since they may behave exactly like the solution. The
score is the share of mutants killed, 0 when the module does not pass on the solution itself.

This is a guard against accidents in generated code (an endless loop, a memory blow-up, a stray request),
not a security boundary: run untrusted model output inside a container or VM.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from specialist.errors import ConfigError

TIMEOUT_SECONDS = 10.0
MEMORY_BYTES = 1024 * 1024 * 1024
FILE_BYTES = 16 * 1024 * 1024
MAX_MUTANTS = 6
SOLUTION_FILE, TEST_FILE = "solution.py", "test_solution.py"

NETWORK_GUARD = '''"""Written by specialist's test sandbox: no network for the code under test."""
import socket


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the specialist test sandbox")


socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
'''

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass
class SandboxRun:
    passed: bool
    returncode: int | None
    timed_out: bool
    output: str


def fenced_code(text: str) -> str:
    """The first ```python block of `text`, else `text` itself (a bare module)."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """`unshare -rn` where this machine allows an unprivileged network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        ok = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (unshare, "-rn") if ok else ()


def _limit_resources(seconds: float, memory_bytes: int) -> None:
    cpu = int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_pytest(solution: str, tests: str, timeout: float = TIMEOUT_SECONDS,
               memory_bytes: int = MEMORY_BYTES) -> SandboxRun:
    """Run the test module `tests` against `solution` (imported as `solution`) in a fresh sandboxed folder."""
    with tempfile.TemporaryDirectory(prefix="specialist-sandbox-") as folder:
        root = Path(folder)
        (root / SOLUTION_FILE).write_text(solution, encoding="utf-8")
        (root / TEST_FILE).write_text(tests, encoding="utf-8")
        (root / "conftest.py").write_text(NETWORK_GUARD, encoding="utf-8")
        command = [*network_namespace_prefix(), sys.executable, "-m", "pytest", "-q", "-x", "--no-header",
                   "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", folder, TEST_FILE]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=lambda: _limit_resources(timeout, memory_bytes))
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return SandboxRun(False, None, True, output.decode("utf-8", "replace")[-2000:])
    # pytest: 0 all passed, 1 a test failed, 2 interrupted (e.g. an import error), 5 no tests collected
    return SandboxRun(process.returncode == 0, process.returncode, False, output.decode("utf-8", "replace")[-2000:])


def require_pytest() -> None:
    try:
        import pytest  # noqa: F401
    except ImportError as exc:
        raise ConfigError("the tests_pass and mutation_kill scorers run pytest, which is not installed here",
                          hint="pip install pytest") from exc


# -- mutants -------------------------------------------------------------------------------------------------

_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}


def _mutation_points(function: ast.FunctionDef) -> list[tuple[ast.AST, str]]:
    """(node, what to change) for every single-point mutation inside `function`, in source order."""
    points: list[tuple[ast.AST, str]] = []
    for node in ast.walk(function):
        if isinstance(node, (ast.BinOp, ast.BoolOp, ast.AugAssign)) and type(node.op) in _SWAPS:
            points.append((node, "op"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAPS:
            points.append((node, "compare"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            points.append((node, "bool"))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            points.append((node, "int"))
    return sorted(points, key=lambda p: (getattr(p[0], "lineno", 0), getattr(p[0], "col_offset", 0)))


def _apply(node: ast.AST, kind: str) -> None:
    if kind == "op":
        node.op = _SWAPS[type(node.op)]()
    elif kind == "compare":
        node.ops = [_SWAPS[type(node.ops[0])](), *node.ops[1:]]
    elif kind == "bool":
        node.value = not node.value
    else:
        node.value = node.value + 1


def mutants(solution: str, targets: set[str] | None = None, limit: int = MAX_MUTANTS) -> list[str]:
    """Up to `limit` single-point mutants of the functions named in `targets` (all top-level ones when None),
    spread evenly over the mutation points."""
    try:
        tree = ast.parse(solution)
    except SyntaxError:
        return []
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and (not targets or n.name in targets)]
    total = sum(len(_mutation_points(f)) for f in functions)
    if total == 0:
        return []
    if total <= limit:
        chosen = list(range(total))
    else:
        chosen = sorted({round(i * (total - 1) / max(limit - 1, 1)) for i in range(limit)})
    sources = []
    for index in chosen:
        copy = ast.parse(solution)
        copies = [n for n in copy.body if isinstance(n, ast.FunctionDef) and (not targets or n.name in targets)]
        points = [p for f in copies for p in _mutation_points(f)]
        _apply(*points[index])
        sources.append(ast.unparse(copy))
    return sources


def imported_names(tests: str) -> set[str]:
    """Names a test module imports from `solution`."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return set()
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "solution"
            for alias in node.names}


@functools.lru_cache(maxsize=4096)
def _passes(solution: str, tests: str) -> bool:
    """Whether `tests` pass on `solution`; cached, since every arm meets the same solutions and mutants."""
    return run_pytest(solution, tests).passed


@functools.lru_cache(maxsize=1024)
def _telling_mutants(solution: str, reference_tests: str) -> tuple[str, ...]:
    """The mutants worth killing: those the reference tests kill, or all of them when the reference kills none."""
    candidates = mutants(solution, imported_names(reference_tests) or None)
    if not reference_tests.strip():
        return tuple(candidates)
    killed = [m for m in candidates if not _passes(m, reference_tests)]
    return tuple(killed or candidates)


def score_tests_pass(output: str, expected: str, prompt: str) -> float:
    """1 when the generated test module passes on the prompt's code (and runs at least one test)."""
    return float(_passes(fenced_code(prompt), fenced_code(output)))


def score_mutation_kill(output: str, expected: str, prompt: str) -> float:
    """Share of the solution's mutants the generated tests kill (fail on); 0 unless they pass on the solution."""
    solution, tests = fenced_code(prompt), fenced_code(output)
    if not _passes(solution, tests):
        return 0.0
    telling = _telling_mutants(solution, fenced_code(expected))
    if not telling:
        return 0.0
    return sum(not _passes(m, tests) for m in telling) / len(telling)
