import xml.etree.ElementTree as ET

import pytest

from specialist.core.gates import Figure, check_gates
from specialist.core.stats import score_interval
from specialist.junit import JunitCase, gate_cases, write_junit

HOSTILE = 'a <b> & "c" \'d\' ]]> \x00\x07\x1b\x0b\ud800 é 🙂 \ufffe end'


def _parse(path):
    root = ET.parse(path).getroot()  # raises on malformed XML
    return root, root.find("testsuite")


def test_every_field_comes_back_from_the_xml(tmp_path):
    cases = [
        JunitCase("json_valid >= 0.95", "specialist.gates", True, "value clears 0.95", 0.97, threshold=0.95,
                  expected=">= 0.95", time=0.25),
        JunitCase("golden row 3", "specialist.golden", False, "answer changed after export", "{\"a\": 2}",
                  expected='{"a": 1}', time=1.5),
    ]
    path = write_junit(tmp_path / "reports" / "junit.xml", "specialist eval", cases)
    root, suite = _parse(path)
    assert root.tag == "testsuites"
    assert {k: suite.get(k) for k in ("name", "tests", "failures", "errors", "skipped", "time")} == {
        "name": "specialist eval", "tests": "2", "failures": "1", "errors": "0", "skipped": "0", "time": "1.750"}
    passed, failed = suite.findall("testcase")
    assert (passed.get("name"), passed.get("classname"), passed.get("time")) == ("json_valid >= 0.95",
                                                                                 "specialist.gates", "0.250")
    assert passed.find("failure") is None
    assert passed.find("system-out").text.splitlines() == ["value: 0.97", "threshold: 0.95", "expected: >= 0.95",
                                                           "message: value clears 0.95"]
    failure = failed.find("failure")
    assert failure.get("message") == "answer changed after export" and failure.get("type") == "AssertionError"
    assert failure.text.splitlines() == ['value: {"a": 2}', 'expected: {"a": 1}', "message: answer changed after export"]
    assert [p.name for p in path.parent.iterdir()] == ["junit.xml"]  # no temporary file left behind


def test_hostile_text_is_escaped_and_forbidden_characters_removed(tmp_path):
    case = JunitCase(HOSTILE, HOSTILE, False, HOSTILE + "\nsecond line", HOSTILE, expected=HOSTILE)
    path = write_junit(tmp_path / "junit.xml", HOSTILE, [case])
    root, suite = _parse(path)
    expected = 'a <b> & "c" \'d\' ]]>  é 🙂  end'
    testcase = suite.find("testcase")
    assert suite.get("name") == root.get("name") == expected
    assert testcase.get("name") == testcase.get("classname") == expected
    assert testcase.find("failure").get("message") == expected + "\nsecond line"  # newline kept as &#10;
    assert testcase.find("system-out").text.splitlines()[:2] == [f"value: {expected}", f"expected: {expected}"]
    raw = path.read_bytes()
    assert b"\x00" not in raw and b"\x1b" not in raw and raw.startswith(b"<?xml")


def test_an_empty_suite_is_still_a_valid_report(tmp_path):
    _, suite = _parse(write_junit(tmp_path / "junit.xml", "gates", [], time=3.0))
    assert (suite.get("tests"), suite.get("failures"), suite.get("time")) == ("0", "0", "3.000")
    assert suite.findall("testcase") == []


def test_gate_results_become_cases_that_say_what_they_were_judged_on(tmp_path):
    figures = {"tuned.json_valid": Figure.of(score_interval([1.0] * 19 + [0.0])), "overfitting.gap": 0.02}
    results = check_gates(["json_valid >= 0.9 confidently", "overfitting.gap <= 0.1"], figures)
    cases = gate_cases(results)
    assert [c.passed for c in cases] == [False, True]
    assert cases[0].expected == ">= 0.9 (judged on the lower bound)" and cases[0].message == results[0].describe()
    assert cases[1].expected == "<= 0.1 (judged on the value)" and cases[1].value == pytest.approx(0.02)
    assert [c.threshold for c in cases] == [0.9, 0.1]
    _, suite = _parse(write_junit(tmp_path / "junit.xml", "gates", cases))
    assert suite.get("failures") == "1"
    assert suite.find("testcase/failure").get("message").startswith("FAIL  json_valid >= 0.9 confidently")
