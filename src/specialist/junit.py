"""JUnit XML for CI: every gate and every golden-replay comparison becomes a test case a CI server can show.

The layout is the common denominator of what Jenkins, GitLab, GitHub test reporters and Azure DevOps read:
<testsuites><testsuite name tests failures errors skipped time><testcase name classname time> with a
<failure message type> child when it failed and a <system-out> with the value and what was expected. Text from
outputs and names goes through ElementTree's escaping; characters XML 1.0 cannot hold at all (control
characters, lone surrogates) are removed first, since no escape makes them legal.
"""

from __future__ import annotations

import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Everything outside XML 1.0's Char production: C0 controls but tab/LF/CR, surrogates, U+FFFE/U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class JunitCase:
    name: str  # e.g. the gate's text, or "golden row 12"
    classname: str  # a dotted group, e.g. "specialist.gates" or "specialist.golden"
    passed: bool
    message: str = ""  # one line: why it passed or failed
    value: float | str | None = None  # what was measured
    threshold: float | None = None  # the number it was held to, where there is one
    expected: str | None = None  # in words, e.g. ">= 0.95 (judged on the lower bound)" or the golden answer
    time: float = 0.0  # seconds


def write_junit(path: str | Path, suite: str, cases: Sequence[JunitCase], time: float | None = None) -> Path:
    """Write `cases` as one JUnit test suite at `path` (atomically: a reader never sees half a file).

    `time` is the suite's duration in seconds; None sums the cases' times.
    """
    path = Path(path)
    tree = ET.ElementTree(junit_element(suite, cases, time))
    ET.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            tree.write(out, encoding="utf-8", xml_declaration=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def junit_element(suite: str, cases: Sequence[JunitCase], time: float | None = None) -> ET.Element:
    failures = sum(not case.passed for case in cases)
    total = sum(case.time for case in cases) if time is None else time
    counts = {"name": clean(suite), "tests": str(len(cases)), "failures": str(failures), "errors": "0",
              "skipped": "0", "time": _seconds(total)}
    root = ET.Element("testsuites", counts)
    suite_element = ET.SubElement(root, "testsuite", counts)
    for case in cases:
        suite_element.append(_case_element(case))
    return root


def _case_element(case: JunitCase) -> ET.Element:
    element = ET.Element("testcase", {"name": clean(case.name), "classname": clean(case.classname),
                                      "time": _seconds(case.time)})
    details = [f"value: {format_value(case.value)}"]
    if case.threshold is not None:
        details.append(f"threshold: {format_value(float(case.threshold))}")
    if case.expected is not None:
        details.append(f"expected: {clean(case.expected)}")
    if case.message:
        details.append(f"message: {clean(case.message)}")
    if not case.passed:
        failure = ET.SubElement(element, "failure",
                                {"message": clean(case.message or "failed"), "type": "AssertionError"})
        failure.text = "\n".join(details)
    ET.SubElement(element, "system-out").text = "\n".join(details)
    return element


def clean(text: object) -> str:
    """`text` as a string XML 1.0 can hold: characters it forbids removed (escaping is ElementTree's job)."""
    return _NOT_XML.sub("", str(text))


def format_value(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return clean(value)


def gate_cases(results, classname: str = "specialist.gates") -> list[JunitCase]:
    """One case per gates.GateResult: named by the gate's text, its describe() line as the message."""
    from specialist.core.gates import parse_gate

    cases = []
    for result in results:
        gate = parse_gate(result.gate)
        judged_on = "value" if not result.on_bound else ("lower bound" if gate.op in (">=", ">") else "upper bound")
        cases.append(JunitCase(result.gate, classname, result.passed, message=result.describe(), value=result.value,
                               threshold=gate.threshold,
                               expected=f"{gate.op} {gate.threshold:g} (judged on the {judged_on})"))
    return cases


def _seconds(value: float) -> str:
    return f"{max(0.0, float(value)):.3f}"
