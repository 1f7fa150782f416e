"""Generated test modules that try to get out of the sandbox, in every isolation mode this machine allows.

Each hostile module is a plain pytest module such as a model could write. After the run we look on the host:
no file outside the temporary folder, no process left, and no pass that pytest's own report does not back.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest

from specialist.core import code_tests
from specialist.core.code_tests import ISOLATIONS, available_isolations, junit_counts, run_pytest
from specialist.errors import ConfigError

SOLUTION = "def add(a, b):\n    return a + b\n"
PASSING = "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


@pytest.fixture(params=ISOLATIONS)
def isolation(request) -> str:
    if request.param not in available_isolations():
        pytest.skip(f"{request.param} cannot run on this machine (it has {available_isolations()})")
    return request.param


def sleep_marker() -> str:
    """A `sleep` argument no other process on the machine has: how we find what a module left behind."""
    return f"{random.randint(1000, 9999)}.{random.randint(10 ** 8, 10 ** 9 - 1)}"


def processes_with_argument(argument: str) -> list[int]:
    """Live processes (not zombies, whose command line is empty) with `argument` on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_no_process_left(*arguments: str) -> None:
    deadline = time.monotonic() + 2  # SIGKILL is delivered at once, but the exit takes a moment
    while (left := [p for a in arguments for p in processes_with_argument(a)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:  # clean up before failing, so a broken sandbox does not leave sleepers behind
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"{len(left)} process(es) sleeping on {arguments} outlived the run"


# -- files -----------------------------------------------------------------------------------------------

def test_writes_outside_the_folder_do_not_reach_the_host(tmp_path):
    if "bwrap" not in available_isolations():
        pytest.skip("only bubblewrap guards files; the fallback's warning says so")
    targets = [tmp_path / "escaped.txt", Path.home() / f".specialist-escape-{uuid.uuid4().hex}",
               Path("/tmp") / f"specialist-escape-{uuid.uuid4().hex}"]
    module = ("import pathlib\n\n\ndef test_write_everywhere():\n"
              f"    for target in {[str(t) for t in targets]!r}:\n"
              "        try:\n            pathlib.Path(target).write_text('escaped')\n"
              "        except OSError:\n            pass\n"
              "    pathlib.Path('inside.txt').write_text('fine')\n"
              "    assert pathlib.Path('inside.txt').read_text() == 'fine'\n")
    try:
        result = run_pytest(SOLUTION, module, isolation="bwrap")
        assert result.passed, result.output  # it ran, and writing inside its own folder works
        assert [t for t in targets if t.exists()] == []
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_files_outside_the_folder_cannot_be_read_in_bwrap(tmp_path):
    if code_tests.bwrap_setup() is None or code_tests.bwrap_setup()[0] != "minimal":
        pytest.skip("needs bubblewrap's minimal layout")
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    module = f"import os\n\n\ndef test_read():\n    assert not os.path.exists({str(secret)!r})\n"
    assert run_pytest(SOLUTION, module, isolation="bwrap").passed


def test_kernel_settings_are_read_only_in_bwrap():
    if "bwrap" not in available_isolations():
        pytest.skip("needs bubblewrap")
    # writes back the value it read, so even a broken sandbox changes nothing
    module = ("import pytest\n\n\ndef test_sysctl():\n    path = '/proc/sys/kernel/printk_ratelimit'\n"
              "    value = open(path).read()\n    with pytest.raises(OSError):\n"
              "        with open(path, 'w') as handle:\n            handle.write(value)\n")
    result = run_pytest(SOLUTION, module, isolation="bwrap")
    assert result.passed, result.output


# -- processes -------------------------------------------------------------------------------------------

def test_a_detached_sleeper_and_a_daemon_do_not_outlive_the_run(isolation):
    setsid_marker, daemon_marker = sleep_marker(), sleep_marker()
    module = f"""import os
import shutil
import subprocess


def test_leave_processes_behind():
    sleeper = subprocess.Popen(["setsid", "sleep", "{setsid_marker}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first = os.fork()
    if first == 0:  # the classic double fork: the grandchild belongs to no one
        os.setsid()
        if os.fork() == 0:
            os.closerange(0, 1024)
            os.execv(shutil.which("sleep"), ["sleep", "{daemon_marker}"])
        os._exit(0)
    os.waitpid(first, 0)
    assert sleeper.poll() is None
"""
    result = run_pytest(SOLUTION, module, isolation=isolation)
    assert result.passed and result.isolation == isolation, result.output  # the processes were started
    assert_no_process_left(setsid_marker, daemon_marker)


def test_fifty_forked_children_that_close_their_files_are_gone(isolation):
    marker = sleep_marker()
    module = f"""import os
import shutil


def test_fork_fifty():
    sleep, children = shutil.which("sleep"), []
    for _ in range(50):
        pid = os.fork()
        if pid == 0:
            os.closerange(0, 1024)
            os.execv(sleep, ["sleep", "{marker}"])
        children.append(pid)
    assert all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in children)  # all 50 alive at the end
"""
    result = run_pytest(SOLUTION, module, isolation=isolation)
    assert result.passed, result.output
    assert_no_process_left(marker)


# -- false passes ----------------------------------------------------------------------------------------

EXIT_IN_THE_TEST = """import os


def test_fails_then_exits():
    try:
        assert 1 == 2
    finally:
        os._exit(0)
"""
EXIT_AT_EXIT = """import atexit
import os

atexit.register(os._exit, 0)


def test_fails():
    assert 1 == 2
"""
EXIT_IN_A_HOOK = """import os

import pytest


class Quit:
    def pytest_sessionfinish(self, session, exitstatus):
        os._exit(0)


@pytest.fixture(autouse=True)
def quit_at_the_end(request):
    request.config.pluginmanager.register(Quit(), "quit")


def test_fails():
    assert 1 == 2
"""
EXIT_STATUS_REWRITTEN = """import pytest


class Lie:
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        session.exitstatus = 0


@pytest.fixture(autouse=True)
def lie_at_the_end(request):
    request.config.pluginmanager.register(Lie(), "lie")


def test_fails():
    assert 1 == 2
"""


def assert_not_a_pass(result) -> None:
    assert result.returncode == 0, result.output  # the exit status alone would have said "passed"
    assert not result.passed
    assert not result.report_found or result.tests_failed == 1


@pytest.mark.parametrize("module", [EXIT_IN_THE_TEST, EXIT_AT_EXIT, EXIT_IN_A_HOOK, EXIT_STATUS_REWRITTEN],
                         ids=["in-the-test", "atexit", "sessionfinish-hook", "exitstatus-rewritten"])
def test_exit_status_zero_after_a_failing_assert_is_not_a_pass(module):
    assert_not_a_pass(run_pytest(SOLUTION, module))


def test_exit_status_zero_is_not_a_pass_in_every_mode(isolation):
    # the verdict reads the report, whatever the launcher; the exit status must still come through each one
    assert_not_a_pass(run_pytest(SOLUTION, EXIT_IN_THE_TEST, isolation=isolation))
    assert_not_a_pass(run_pytest(SOLUTION, EXIT_AT_EXIT, isolation=isolation))


def test_a_fake_report_without_real_tests_is_not_a_pass():
    fake = ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0" '
            'skipped="0" tests="3"><testcase classname="test_solution" name="test_a" time="0.1"/>'
            '<testcase classname="test_solution" name="test_b" time="0.1"/></testsuite></testsuites>')
    module = f"""import pathlib
import sys

FAKE = {fake!r}
for name in ["junit.xml", "report.xml", "results.xml", ".report.xml"]:
    pathlib.Path(name).write_text(FAKE)
for argument in sys.argv:  # the real path, read from pytest's own arguments
    if argument.startswith("--junitxml="):
        pathlib.Path(argument.split("=", 1)[1]).write_text(FAKE)
"""
    result = run_pytest(SOLUTION, module)
    assert not result.passed and result.returncode == 5 and result.tests_passed == 0  # pytest: no tests ran


def test_skipped_tests_alone_are_not_a_pass():
    module = "import pytest\n\n\n@pytest.mark.skip(reason='later')\ndef test_later():\n    assert False\n"
    result = run_pytest(SOLUTION, module)
    assert result.returncode == 0 and result.report_found and not result.passed


# -- the ordinary guards, in every mode ------------------------------------------------------------------

def test_pass_and_fail_in_every_mode(isolation):
    good = run_pytest(SOLUTION, PASSING, isolation=isolation)
    assert good.passed and (good.tests_passed, good.tests_failed) == (1, 0) and good.isolation == isolation
    bad = run_pytest(SOLUTION, PASSING.replace("== 5", "== 6"), isolation=isolation)
    assert not bad.passed and bad.returncode == 1 and bad.tests_failed == 1 and "assert 5 == 6" in bad.output


def test_time_and_network_limits_in_every_mode(isolation):
    # (the memory limit is an rlimit every launcher inherits alike: test_code_tests checks it once)
    endless = run_pytest(SOLUTION, "def test_forever():\n    while True:\n        pass\n", timeout=1,
                         isolation=isolation)
    assert endless.timed_out and not endless.passed and endless.returncode is None
    net = "import socket\n\n\ndef test_net():\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
    result = run_pytest(SOLUTION, net, isolation=isolation)
    assert not result.passed and "network access is disabled" in result.output


def test_fallback_modes_warn_once_and_bwrap_does_not(capsys):
    code_tests._warn_not_isolated.cache_clear()
    run_pytest(SOLUTION, PASSING, isolation="process-group")
    run_pytest(SOLUTION, PASSING, isolation="process-group")
    said = capsys.readouterr().err
    assert said.count("NOT isolated") == 1 and "NOT guarded" in said and "read and write" in said
    if "bwrap" in available_isolations():
        run_pytest(SOLUTION, PASSING, isolation="bwrap")
        assert "NOT isolated" not in capsys.readouterr().err


def test_an_unknown_isolation_is_refused():
    with pytest.raises(ConfigError, match="unknown sandbox isolation 'vm'"):
        run_pytest(SOLUTION, PASSING, isolation="vm")


# -- reading pytest's report -----------------------------------------------------------------------------

REPORT = ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">'
          '<testcase name="a"/><testcase name="b"><skipped/></testcase>'
          '<testcase name="c"><failure message="x"/></testcase><testcase name="d"><error/></testcase>'
          '</testsuite></testsuites>')


def test_junit_counts_reads_passes_and_failures(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(REPORT)
    assert junit_counts(report) == (1, 2)
    report.write_text('<testsuite tests="1"><testcase name="a"/></testsuite>')
    assert junit_counts(report) == (1, 0)


@pytest.mark.parametrize("content", ["", "not xml", "<html><body/></html>", REPORT[:-20],
                                     '<!DOCTYPE lolz [<!ENTITY lol "lol">]><testsuites>&lol;</testsuites>'])
def test_a_malformed_report_counts_as_missing(tmp_path, content):
    report = tmp_path / "report.xml"
    report.write_text(content)
    assert junit_counts(report) is None


def test_a_missing_huge_linked_or_piped_report_counts_as_missing(tmp_path):
    assert junit_counts(tmp_path / "absent.xml") is None
    huge = tmp_path / "huge.xml"
    huge.write_text(REPORT.replace("</testsuite>", " " * (code_tests.REPORT_BYTES + 1) + "</testsuite>"))
    assert junit_counts(huge) is None
    real = tmp_path / "real.xml"
    real.write_text(REPORT)
    (tmp_path / "link.xml").symlink_to(real)
    assert junit_counts(tmp_path / "link.xml") is None  # a link could point at /dev/zero or a host file
    os.mkfifo(tmp_path / "pipe.xml")
    assert junit_counts(tmp_path / "pipe.xml") is None  # and a pipe must not block the reader


def test_a_virtualenv_under_tmp_stays_visible_inside_bubblewrap(monkeypatch):
    """A CI clone under /tmp put the virtualenv under the sandbox's own /tmp, which hid it: bubblewrap could not
    start pytest and every run fell back to the weaker isolation. Python's folders are bound after that /tmp."""
    monkeypatch.setattr(code_tests, "_readonly_roots", lambda: ["/tmp/ci-clone/.venv", "/opt/python"])
    argv = code_tests._bwrap_argv("bwrap", ("root", True, True), "/tmp/specialist-sandbox-x", {})
    tmpfs = argv.index("/tmp", argv.index("--tmpfs", argv.index("--proc")))
    for root in ("/tmp/ci-clone/.venv", "/opt/python"):
        bound = [i for i, arg in enumerate(argv) if arg == root and argv[i - 1] == "--ro-bind"]
        assert bound and min(bound) > tmpfs, root
