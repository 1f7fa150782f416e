"""Scorers for generated test code: does the test module pass on the code under test, and does it catch bugs?

`tests_pass`: the output is a pytest module that imports the function from `solution`; the code under test is
the prompt's fenced Python block (or the whole prompt). Both are written into a fresh temporary folder and
pytest runs there in a child process, in the strongest of three isolation modes this machine allows
(`SandboxRun.isolation` says which one a run got):

- `bwrap` (bubblewrap installed and able to run; `make sandbox` installs it on Debian): a read-only view of
  only what pytest needs (/usr, the Python install, the virtualenv, a few files of /etc), the temporary
  folder as the one writable place (at /tmp/sandbox inside, with a small private /tmp around it), its own
  user, PID, network, IPC and UTS namespaces, every capability dropped, /proc/sys read-only (run by root, the
  sandbox's uid is still the host's root, which kernel settings trust), a new session, an environment of a
  few variables, and it dies with us. When pytest ends the PID namespace ends, and with it every process
  the tests started, daemons included; writes anywhere else fail or land in memory that vanishes.
- `pid-namespace` (no usable bubblewrap, but `unshare` may make user, network and PID namespaces): no network,
  and every process dies with pytest; files are NOT guarded: the tests can read and write anything we can.
- `process-group` (neither): the limits below only, plus a socket guard; processes that leave the group and
  scrub their environment can outlive the run, and files are not guarded.

In every mode: a wall-clock and CPU time limit, an address-space limit, a file-size limit, a process-count
limit (not for root, whom the kernel exempts), no core files, a conftest.py that makes socket connections
and name lookups raise, and after every run (not only on timeout) the process group and every process that
still carries the run's marker in its environment are killed. The fallback modes print a warning once.

Passing needs pytest's own word: it writes a JUnit XML report (a random name in the folder) and the run
passes only when that report is there, well-formed, counts at least one passed test and no failure or
error, AND pytest exits 0. A module that exits early (`os._exit(0)` in a test, an atexit handler or a hook)
leaves no report or a report with its failure, so it fails. The report is written by the same process that
runs the tests, so a module that sets out to find it and forge it can still pass: this is a guard against
accidents and shallow tricks in generated code, not a VM (even bubblewrap shares the host's kernel): score
untrusted model output inside a container or VM.

`mutation_kill`: the same module must also fail on mutants of the solution: single-point changes to the
function it imports (`+`/`-`, `*`/`//`, `<`/`<=`, `>`/`>=`, `==`/`!=`, `in`/`not in`, `and`/`or`,
an integer constant plus one, True/False). Mutants the row's reference test module (the expected output)
does not kill are set aside where there are others, since they may behave exactly like the solution. The
score is the share of mutants killed, 0 when the module does not pass on the solution itself.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from specialist.errors import ConfigError

TIMEOUT_SECONDS = 10.0
MEMORY_BYTES = 1024 * 1024 * 1024
FILE_BYTES = 16 * 1024 * 1024
TMPFS_BYTES = 64 * 1024 * 1024  # the private /tmp inside bubblewrap lives in memory
SPARE_PROCESSES = 512  # RLIMIT_NPROC counts all of the user's processes, so the limit is theirs plus this
REPORT_BYTES = 4 * 1024 * 1024
MAX_MUTANTS = 6
SOLUTION_FILE, TEST_FILE = "solution.py", "test_solution.py"
ISOLATIONS = ("bwrap", "pid-namespace", "process-group")
INNER_FOLDER = "/tmp/sandbox"  # where bubblewrap shows the temporary folder
MARKER = "SPECIALIST_SANDBOX_RUN"
# Writable by uid 0 without any capability (sysctls check the uid only): read-only inside bubblewrap.
PROC_COVERED = ("sys", "sysrq-trigger", "irq", "bus")
# Only what Python needs from /etc: the loader's cache, names for uids, the time zone.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf",
             "hosts", "alternatives")

NETWORK_GUARD = '''"""Written by specialist's test sandbox: no network for the code under test."""
import socket


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the specialist test sandbox")


socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
'''
# An ini file in the folder stops pytest from reading one planted in a folder above it.
PYTEST_INI = "[pytest]\n"

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass
class SandboxRun:
    passed: bool
    returncode: int | None
    timed_out: bool
    output: str
    isolation: str = "process-group"
    tests_passed: int = 0
    tests_failed: int = 0  # failures and errors in pytest's report
    report_found: bool = False


def fenced_code(text: str) -> str:
    """The first ```python block of `text`, else `text` itself (a bare module)."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


# -- what this machine allows ----------------------------------------------------------------------------

def _probe(command: list[str], folder: Path, sealed: bool = False) -> bool:
    """Whether `command` (a launcher around our Python) can import pytest and write into `folder`; when
    `sealed`, also that it cannot write into the virtualenv."""
    probe = "import pytest, pathlib; pathlib.Path('probe').write_text('ok')"
    if sealed:
        probe += ("\nimport sys\ntry:\n    open(sys.prefix + '/.specialist-probe', 'w')\nexcept OSError:\n    pass\n"
                  "else:\n    raise SystemExit('the virtualenv is writable inside the sandbox')")
    try:
        done = subprocess.run([*command, sys.executable, "-c", probe], cwd=folder, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and (folder / "probe").is_file()


def _readonly_roots() -> list[str]:
    """The folders pytest needs to run: the Python install, the virtualenv, wherever pytest and pluggy live."""
    import pluggy
    import pytest

    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  str(Path(sys.executable).parent), str(Path(os.path.realpath(sys.executable)).parent.parent),
                  str(Path(pytest.__file__).parent.parent), str(Path(pluggy.__file__).parent.parent)}
    roots = sorted({os.path.realpath(c) for c in candidates} | candidates, key=len)
    kept: list[str] = []
    for root in roots:  # a folder inside one already bound, or inside /usr, adds nothing
        if os.path.isdir(root) and not any(root == k or root.startswith(k.rstrip("/") + "/")
                                           for k in [*kept, "/usr"]):
            kept.append(root)
    return kept


def _bwrap_binds(layout: str) -> list[str]:
    """bubblewrap's file-system arguments: `minimal` (only what pytest needs) or `root` (all of / read-only)."""
    if layout == "root":  # sockets stay reachable on a read-only mount: hide /run's (a Docker socket is root)
        own_var_run = os.path.isdir("/var/run") and not os.path.islink("/var/run")
        return ["--ro-bind", "/", "/", "--tmpfs", "/run", *(["--tmpfs", "/var/run"] if own_var_run else [])]
    binds = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            binds += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            binds += ["--ro-bind", top, top]
    for name in ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            binds += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    return binds


def _python_binds() -> list[str]:
    """Python, the virtualenv and pytest, read-only. Bound after the sandbox's own /tmp: a checkout or virtualenv
    under /tmp (a CI clone, say) would otherwise be hidden by it, and bubblewrap would not run pytest at all."""
    binds: list[str] = []
    for root in _readonly_roots():
        binds += ["--ro-bind", root, root]
    return binds


def _bwrap_argv(bwrap: str, setup: tuple[str, bool, bool], folder: str, env: dict[str, str]) -> list[str]:
    """The bubblewrap command line that runs a program inside the sandbox, `folder` shown at INNER_FOLDER."""
    layout, user_namespace, sized_tmpfs = setup
    argv = [bwrap, *(["--unshare-user"] if user_namespace else []), "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += _bwrap_binds(layout)
    argv += ["--dev", "/dev", "--proc", "/proc"]
    for part in PROC_COVERED:  # run by root, the sandbox's uid is the host's root: kernel settings obey it
        argv += ["--ro-bind-try", f"/proc/{part}", f"/proc/{part}"]
    argv += [*(["--size", str(TMPFS_BYTES)] if sized_tmpfs else []), "--tmpfs", "/tmp", *_python_binds(),
             "--bind", folder, INNER_FOLDER, "--remount-ro", "/", "--chdir", INNER_FOLDER]
    return argv


@functools.cache
def bwrap_setup() -> tuple[str, bool, bool] | None:
    """(layout, own user namespace, sized /tmp) of the first bubblewrap setup that runs pytest here; None
    when bubblewrap is missing or cannot run (no user namespaces, a seccomp filter, an old version)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    try:
        sized = "--size" in subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # As root, bubblewrap keeps every capability unless told otherwise: the user namespace and --cap-drop
    # take them away; a setuid bubblewrap without user namespaces drops them itself.
    for setup in (("minimal", True, sized), ("minimal", False, sized), ("root", True, sized),
                  ("root", False, sized)):
        with tempfile.TemporaryDirectory(prefix="specialist-probe-") as folder:
            if _probe(_bwrap_argv(bwrap, setup, folder, {"PATH": "/usr/bin:/bin"}), Path(folder), sealed=True):
                return setup
    return None


@functools.cache
def unshare_prefixes() -> dict[str, tuple[str, ...]]:
    """`unshare` command lines that work here: "pid-namespace" (user, network and PID namespaces; everything
    dies with pytest) and "network" (user and network namespaces only)."""
    unshare = shutil.which("unshare")
    found: dict[str, tuple[str, ...]] = {}
    if unshare is None:
        return found
    candidates = {"pid-namespace": (unshare, "--user", "--map-root-user", "--net", "--pid", "--fork",
                                    "--kill-child", "--mount-proc"),
                  "network": (unshare, "--user", "--map-root-user", "--net")}
    for name, prefix in candidates.items():
        with tempfile.TemporaryDirectory(prefix="specialist-probe-") as folder:
            if _probe(list(prefix), Path(folder)):
                found[name] = prefix
    return found


def network_namespace_prefix() -> tuple[str, ...]:
    """`unshare -rn` (or the like) where this machine allows an unprivileged network namespace, else nothing."""
    return unshare_prefixes().get("network", ())


def available_isolations() -> tuple[str, ...]:
    """The isolation modes this machine allows, strongest first; "process-group" always."""
    modes = ["bwrap"] if bwrap_setup() else []
    if "pid-namespace" in unshare_prefixes():
        modes.append("pid-namespace")
    return (*modes, "process-group")


def _choose_isolation(isolation: str | None) -> str:
    if isolation is None:  # bubblewrap first, so the unshare probes run only where it cannot
        return "bwrap" if bwrap_setup() else available_isolations()[0]
    if isolation not in ISOLATIONS:
        raise ConfigError(f"unknown sandbox isolation {isolation!r}", hint=f"use one of {', '.join(ISOLATIONS)}")
    if isolation not in available_isolations():
        raise ConfigError(f"sandbox isolation {isolation!r} cannot run on this machine",
                          hint=f"this machine allows {', '.join(available_isolations())}")
    return isolation


@functools.cache
def _warn_not_isolated(isolation: str) -> None:
    """Say once per process and mode, plainly, what a fallback run does and does not guard."""
    from specialist.console import console

    why = "chosen by the caller" if bwrap_setup() else "bubblewrap is missing or cannot run here"
    processes = ("every process dies with pytest (PID namespace)" if isolation == "pid-namespace" else
                 "its process group and the processes carrying its marker are killed after each run, but one "
                 "that leaves the group and scrubs its environment can outlive it")
    network = ("no network (network namespace)" if isolation == "pid-namespace" or network_namespace_prefix()
               else "sockets blocked inside Python only")
    count = "" if _process_limit() is None else "process count, "
    who = "this user (root: the whole machine)" if os.geteuid() == 0 else "this user"
    console.print(f"[yellow]warning:[/] generated tests are NOT isolated ({isolation}: {why}). Guarded: time, "
                  f"memory, file size, {count}{network}; {processes}. NOT guarded: the tests can read and write "
                  f"every file {who} can. Install bubblewrap (`make sandbox`, or apt-get install bubblewrap) "
                  "or score untrusted output in a container.")


# -- one run ---------------------------------------------------------------------------------------------

def _process_limit() -> int | None:
    """RLIMIT_NPROC for the child: our user's processes plus SPARE_PROCESSES; None for root (the kernel
    exempts root) or where /proc cannot be read."""
    if os.geteuid() == 0 or not os.path.isdir("/proc"):
        return None
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            continue
    return count + SPARE_PROCESSES


def _limit_resources(seconds: float, memory_bytes: int, processes: int | None) -> None:
    cpu = int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if processes is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _marked_processes(marker: str) -> list[int]:
    """Processes whose environment still holds `marker` (those that left the process group included)."""
    needle, found = marker.encode(), []
    if not os.path.isdir("/proc"):
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _end_everything(group: int, marker: str) -> None:
    """Kill the run's process group and every process that carries its marker, whatever the run did."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(5):  # a forking loop may start new ones while we kill
        leftovers = _marked_processes(marker)
        if not leftovers:
            return
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        time.sleep(0.01)


def _read_report(path: Path) -> bytes | None:
    """The report's bytes: None unless a regular file (no link, no pipe) of at most REPORT_BYTES."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        data = handle.read(REPORT_BYTES + 1)
    return data if len(data) <= REPORT_BYTES else None


def junit_counts(path: Path) -> tuple[int, int] | None:
    """(passed, failed or errored) test cases in pytest's JUnit XML report at `path`; None when the report is
    missing, too big, not a regular file or not a JUnit report."""
    data = _read_report(path)
    if data is None or b"<!DOCTYPE" in data or b"<!ENTITY" in data:  # pytest writes neither; expat bombs need them
        return None
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite") if root.tag == "testsuites" else []
    if not suites:
        return None
    passed = failed = 0
    for case in root.iter("testcase"):
        outcomes = {child.tag for child in case}
        if outcomes & {"failure", "error"}:
            failed += 1
        elif "skipped" not in outcomes:
            passed += 1
    return passed, failed


def _pytest_args(folder: str, report: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider", "-o", "addopts=",
            "--rootdir", folder, f"--junitxml={folder}/{report}", TEST_FILE]


def _launch_command(isolation: str, folder: str, report: str, env: dict[str, str]) -> tuple[list[str], dict]:
    """(command, environment for Popen) that runs pytest on `folder` under `isolation`."""
    bwrap, setup = shutil.which("bwrap"), bwrap_setup()
    if isolation == "bwrap" and bwrap and setup:
        inner = {**env, "HOME": INNER_FOLDER, "TMPDIR": "/tmp"}
        command = [*_bwrap_argv(bwrap, setup, folder, inner), *_pytest_args(INNER_FOLDER, report)]
        return command, {"PATH": env["PATH"]}  # bubblewrap starts the tests with `inner` only
    prefix = unshare_prefixes()["pid-namespace"] if isolation == "pid-namespace" else network_namespace_prefix()
    return [*prefix, *_pytest_args(folder, report)], {**env, "HOME": folder}


def _write_folder(root: Path, solution: str, tests: str) -> None:
    (root / SOLUTION_FILE).write_text(solution, encoding="utf-8")
    (root / TEST_FILE).write_text(tests, encoding="utf-8")
    (root / "conftest.py").write_text(NETWORK_GUARD, encoding="utf-8")
    (root / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")


def _tail(handle: BinaryIO) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - 8000))
    return handle.read().decode("utf-8", "replace")[-2000:]


def run_pytest(solution: str, tests: str, timeout: float = TIMEOUT_SECONDS,
               memory_bytes: int = MEMORY_BYTES, *, isolation: str | None = None) -> SandboxRun:
    """Run the test module `tests` against `solution` (imported as `solution`) in a fresh sandboxed folder,
    under `isolation` (one of ISOLATIONS; None: the strongest this machine allows)."""
    isolation = _choose_isolation(isolation)
    if isolation != "bwrap":
        _warn_not_isolated(isolation)
    token, report = secrets.token_hex(16), f".report-{secrets.token_hex(16)}.xml"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONHASHSEED": "0", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", MARKER: token}
    processes = _process_limit()
    with tempfile.TemporaryDirectory(prefix="specialist-sandbox-", ignore_cleanup_errors=True) as folder, \
            tempfile.TemporaryFile() as output:
        _write_folder(Path(folder), solution, tests)
        command, popen_env = _launch_command(isolation, folder, report, env)
        process = subprocess.Popen(command, cwd=folder, env=popen_env, stdout=output,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=lambda: _limit_resources(timeout, memory_bytes, processes))
        try:
            returncode, timed_out = process.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        finally:
            _end_everything(process.pid, f"{MARKER}={token}")
            process.wait()
        counts = None if timed_out else junit_counts(Path(folder) / report)
        text = _tail(output)
    passed_tests, failed_tests = counts or (0, 0)
    passed = returncode == 0 and counts is not None and passed_tests > 0 and failed_tests == 0
    if returncode == 0 and counts is None:
        text += "\n[specialist sandbox] pytest exited 0 but wrote no readable report: not a pass"
    return SandboxRun(passed, returncode, timed_out, text, isolation, passed_tests, failed_tests, counts is not None)


def require_pytest() -> None:
    try:
        import pytest  # noqa: F401
    except ImportError as exc:
        raise ConfigError("the tests_pass and mutation_kill scorers run pytest, which is not installed here",
                          hint="pip install 'specialist[code]'") from exc


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
