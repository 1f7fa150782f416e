"""Reliability, round two (issue 30), away from the server: no answer, label, data row, config value, run name or
file in an export can hang a run, lose its results or reach outside its folder. Each test is one attack of the
issue's table; the server's rows are in test_serve.py."""

from __future__ import annotations

import importlib
import json
import os
import stat
import time

import pytest

# a common e-mail pattern from the web: nested quantifiers, exponential in Python `re` on a near-miss
EMAIL_PATTERN = r"^\w+([\.-]?\w+)*@\w+([\.-]?\w+)*(\.\w{2,3})+$"
NEAR_MISS = "a@a." + "a" * 54 + "!"  # 50 characters took 17 s in `re`, 60 about 12 minutes


@pytest.fixture
def email_schema(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"type": "object", "properties": {"email": {"type": "string", "pattern": EMAIL_PATTERN}},
                                "patternProperties": {EMAIL_PATTERN: {"type": "string"}}}))
    return path


# ---- row 1: a schema pattern that backtracks ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_backtracking_schema_pattern_is_a_failed_check_within_its_deadline(email_schema, tmp_path):
    from specialist import bounded
    from specialist.core.scorers import make_json_schema, score_rows

    scorer = make_json_schema(email_schema)
    assert scorer(json.dumps({"email": "bob.smith@example.com"}), "") == 1.0
    started = time.perf_counter()
    assert scorer(json.dumps({"email": NEAR_MISS}), "") == 0.0  # the regex engine answers this one at once
    assert scorer(json.dumps({NEAR_MISS: 1}), "") == 1.0  # a key patternProperties does not match: unconstrained
    assert time.perf_counter() - started < 1
    # a pattern that backtracks in every engine: stopped at its deadline, a failed row, the run goes on
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"properties": {"code": {"type": "string", "pattern": "^(a|aa)+$"}}}))
    slow_scorer = make_json_schema(slow)
    hostile = json.dumps({"code": "a" * 60 + "!"})
    with pytest.raises(bounded.TimedOut, match="timed out"):
        slow_scorer(hostile, "")
    started = time.perf_counter()
    rows = score_rows([hostile, json.dumps({"code": "aaa"}), hostile], ["", "", ""], {"json_schema": slow_scorer})
    assert rows == {"json_schema": [0.0, 1.0, 0.0]}
    assert time.perf_counter() - started < 2 * bounded.PATTERN_SECONDS + 3


def test_bounded_search_matches_as_re_does_on_ordinary_patterns():
    import re

    from specialist import bounded

    cases = [(r"^[a-z]+\d{2,}$", "abc123"), (r"^[a-z]+\d{2,}$", "abc1"), (r"colou?r", "the color"),
             (r"^\S+@\S+\.\w+$", "x@y.org"), (r"(?i)^ERROR", "error: x"), (r"^$", "")]
    for pattern, text in cases:
        assert bounded.search(pattern, text) == bool(re.search(pattern, text)), pattern


# ---- row 3: answers no JSON parser survives -------------------------------------------------------------------


DEGENERATE = ["[" * 300, "[" * 100_000, "9" * 5000, '{"a": ' + "9" * 5000 + "}", "\x00\x1b[31m\ud800", "-" * 10_000,
              '{"a": [' * 2000]


def test_every_builtin_scorer_survives_any_string(email_schema):
    from specialist.core.scorers import (BUILTIN, LabelRule, label_report, make_json_schema,
                                             make_label_accuracy, per_key_accuracy, score_rows)

    scorers = {**BUILTIN, "json_schema": make_json_schema(email_schema),
               "label_accuracy": make_label_accuracy(LabelRule(json_key="label"))}
    expected = ['{"label": "a", "email": "x@y.org"}'] * len(DEGENERATE)
    rows = score_rows(DEGENERATE, expected, scorers)
    for name in scorers:
        assert len(rows[name]) == len(DEGENERATE), name
        if name in ("json_valid", "json_schema", "exact_match", "field_accuracy", "label_accuracy"):
            assert rows[name] == [0.0] * len(DEGENERATE), name  # not JSON, not a match: a failure, never a crash
    assert label_report(DEGENERATE, expected, LabelRule(json_key="label"))["accuracy"] == 0.0
    assert per_key_accuracy(DEGENERATE, expected) == {"label": 0.0, "email": 0.0}


def test_a_scorer_that_raises_fails_its_row_and_says_so(capsys):
    from specialist.core.scorers import score_rows

    def fragile(output: str, expected: str) -> float:
        return float(int(output) > 0)  # raises on a non-number; a 5000-digit one hits Python's int limit

    rows = score_rows(["1", "nope", "9" * 5000, "2"], ["", "", "", ""], {"fragile": fragile})
    assert rows == {"fragile": [1.0, 0.0, 0.0, 1.0]}
    assert "scorer fragile failed on 2 of 4 rows" in capsys.readouterr().err


# ---- row 4: scrub patterns in linear time ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", ["a." * 500_000, "-----BEGIN PRIVATE KEY-----\n" * 37_000,
                                    "x@" + "a." * 500_000, "-----BEGIN " + "A " * 500_000, "1.2.3." * 170_000])
def test_scrub_of_a_1_mb_adversarial_row_is_linear(attack):
    from specialist.data.clean import SCRUB_KINDS, Scrubber

    started = time.perf_counter()
    Scrubber(list(SCRUB_KINDS))(attack)
    assert time.perf_counter() - started < 10  # about 0.2 s here; the quadratic patterns took about an hour


def test_scrub_still_finds_what_it_found():
    from specialist.data.clean import Scrubber

    scrub = Scrubber(["email", "private_key"])
    text = ("to ..bob@example.com, -x@y.org and me+tag@mail.example.co.uk; "
            "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY----- -----BEGIN EC PRIVATE KEY-----\nBBB\n"
            "-----END EC PRIVATE KEY----- tail -----BEGIN PRIVATE KEY----- never ended")
    assert scrub(text) == ("to ..<EMAIL>, -<EMAIL> and <EMAIL>; <PRIVATE_KEY> <PRIVATE_KEY> tail "
                           "-----BEGIN PRIVATE KEY----- never ended")
    assert scrub.counts == {"email": 3, "private_key": 2}
    assert Scrubber(["email"], placeholder=r"\1[{kind}]")("a@b.io") == r"\1[EMAIL]"  # the placeholder is literal


# ---- row 6: alias bombs and huge values in configs ------------------------------------------------------------


ALIAS_BOMB = """
data: {path: d.jsonl}
bomb:
  a: &a [x, x, x, x, x, x, x, x, x, x]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
training: {epochs: *i}
"""


@pytest.mark.timeout(60)
def test_a_yaml_alias_bomb_is_refused_by_line(tmp_path):
    from specialist.config import load_config
    from specialist.errors import ConfigError

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match="alias \\*a: run configs may not use YAML aliases") as caught:
        load_config(path)
    assert "line 5" in str(caught.value) and len(str(caught.value)) < 2000
    flow = "[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]]"
    (tmp_path / "ok.yaml").write_text("data: {path: d.jsonl}\n")
    with pytest.raises(ConfigError, match="may not use YAML aliases"):
        load_config(tmp_path / "ok.yaml", [f"training.epochs={flow}"])


@pytest.mark.timeout(60)
def test_a_config_error_never_prints_a_huge_value(tmp_path):
    from specialist.config import load_config
    from specialist.errors import ConfigError

    (tmp_path / "ok.yaml").write_text("data: {path: d.jsonl}\n")
    for value in ["9" * 5000, "[" + ",".join(["[1, 2, 3, 4]"] * 3000) + "]", "x" * 100_000]:
        with pytest.raises(ConfigError, match="training.epochs") as caught:
            load_config(tmp_path / "ok.yaml", [f"training.epochs={value}"])
        assert len(str(caught.value)) < 1000


# ---- row 7: math text in labels and answers -------------------------------------------------------------------


def test_a_math_text_label_still_gives_report_html_and_md(tmp_path):
    from specialist.config import validate_config
    from specialist.data import Example
    from specialist.evaluate.report import write_eval_report
    from specialist.evaluate.results import EvalReport
    from specialist.evaluate.runner import Arm, ArmRows, arm_result
    from specialist.core.scorers import LabelRule, make_label_accuracy, score_rows
    from specialist.run_folder import RunFolder

    expected = ["$\\boxed{42}$", "cat", "$x^", "dog"]
    outputs = {"base": ["$\\boxed{41}$", "$\\frac{1}{", "cat", "dog"], "tuned": expected}
    config = validate_config({"data": {"path": "x.jsonl"}, "evaluation": {"scorers": ["label_accuracy"]},
                              "output": {"run_name": "math"}})
    scorer = {"label_accuracy": make_label_accuracy(LabelRule())}
    arms = {name: arm_result(Arm(name, None), ArmRows(score_rows(out, expected, scorer), out, expected),
                             config.evaluation, LabelRule(), 1.0) for name, out in outputs.items()}
    report = EvalReport(run_dir=tmp_path, n_eval=4, max_new_tokens=8, decoding={"do_sample": False}, arms=arms)
    run = RunFolder(tmp_path)
    write_eval_report(run, config, report, [Example(f"q{i}", e, i + 1) for i, e in enumerate(expected)], outputs)
    assert run.report_html.is_file() and run.report_md.is_file()
    assert (run.figures / "confusion-base.png").is_file()  # drawn, with the labels as plain text


# ---- row 11 (names): run names that are no folder name -------------------------------------------------------


@pytest.mark.parametrize("name", ["a\x00b", "a\nb", "x" * 256, "é" * 128, "invoice\u202etxt.exe", "a\u2066b"])
def test_a_run_name_that_is_no_folder_name_is_a_config_error(name):
    from specialist.config import validate_config
    from specialist.errors import ConfigError

    with pytest.raises(ConfigError, match="output.run_name"):
        validate_config({"data": {"path": "x.jsonl"}, "output": {"run_name": name}})
    validate_config({"data": {"path": "x.jsonl"}, "output": {"run_name": "ok-run_1.v2 é"}})


# ---- row 12 (report): HTML in report.md ----------------------------------------------------------------------


def test_report_md_escapes_a_hostile_run_name(tmp_path):
    from specialist.config import validate_config
    from specialist.evaluate.report import render_markdown, report_context
    from specialist.evaluate.results import EvalReport
    from specialist.run_folder import RunFolder

    hostile = tmp_path / "<img src=x onerror=alert(1)>"
    hostile.mkdir()
    config = validate_config({"data": {"path": "x.jsonl"}, "model": {"name": "<script>x</script>"}})
    report = EvalReport(run_dir=hostile, n_eval=0, max_new_tokens=8, decoding={"do_sample": False}, arms={})
    markdown = render_markdown(report_context(RunFolder(hostile), config, report, [], {}))
    assert "<img" not in markdown and "<script>" not in markdown
    assert "&lt;img src=x onerror=alert(1)&gt;" in markdown


# ---- row 12 (log): the request log is private ----------------------------------------------------------------


def test_the_request_log_and_its_wal_are_private(tmp_path):
    from specialist.deploy.records import LoggedRequest, RequestLog

    old = os.umask(0o022)
    try:
        log = RequestLog(tmp_path / "serve.sqlite")
        log.add(LoggedRequest(request_id="r1", arm="a", endpoint="chat", user="u", latency_s=0.1, tokens_in=1,
                              tokens_out=1, format_ok=True, finish_reason="stop", prompt="secret prompt",
                              output="secret answer"))
        files = sorted(p.name for p in tmp_path.iterdir())
        assert {"serve.sqlite", "serve.sqlite-wal"} <= set(files)
        for name in files:
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) & 0o077 == 0, name
        log.close()
    finally:
        os.umask(old)


# ---- row 5 (start-up): keys no client can send ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "clé-secrète", "key with space", " padded", "tab\tkey", "new\nline"])
def test_an_api_key_no_client_can_send_is_refused_at_start_up(tmp_path, key):
    from specialist.deploy.serve import ServeSettings
    from specialist.errors import ConfigError

    with pytest.raises(ConfigError, match="--api-key"):
        ServeSettings(split={"a": 1.0}, db=tmp_path / "log.sqlite", api_key=key)
    ServeSettings(split={"a": 1.0}, db=tmp_path / "log.sqlite", api_key="sk-Ok_0123456789.~+/=")
    ServeSettings(split={"a": 1.0}, db=tmp_path / "log.sqlite", api_key=None)


# ---- row 11 (files): a full disk or a read-only folder --------------------------------------------------------


@pytest.mark.parametrize("code, said", [("ENOSPC", "no space left on the device"),
                                        ("EROFS", "the file system is read-only")])
def test_a_full_disk_or_read_only_folder_during_prepare_names_the_path_and_free_space(tiny_config, tmp_path,
                                                                                       monkeypatch, code, said):
    import errno

    import yaml
    from typer.testing import CliRunner

    from specialist.cli import app

    prepare_module = importlib.import_module("specialist.data.prepare")  # the package exports a `prepare` function

    def full(spool, rows, order, folder):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(folder / "train.jsonl"))

    monkeypatch.setattr(prepare_module, "_write_outputs", full)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["prepare", str(path), "--out", str(tmp_path / "prepared"), "--no-lengths"],
                                terminal_width=400)
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert f"cannot write {tmp_path}" in output and "train.jsonl" in output and said in output
    assert "MiB free in" in output and "Traceback" not in output


# ---- row 10: schemas too large to compile ---------------------------------------------------------------------


def test_a_schema_too_wide_or_deep_to_compile_is_refused_at_start_up():
    from specialist.constrain import Constraint
    from specialist.errors import ConfigError

    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20_000)}}
    deep = node = {"type": "array"}
    for _ in range(200):
        node["items"] = {"type": "array"}
        node = node["items"]
    for schema, said in [(wide, "has over 5000 values"), (deep, "nests over 64 levels")]:
        with pytest.raises(ConfigError, match=f"the JSON schema constraint {said}"):
            Constraint.json_schema(schema)
    Constraint.json_schema({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}})


@pytest.mark.timeout(60)
def test_a_constraint_check_survives_any_answer():
    from specialist.constrain import Constraint

    schema = Constraint.json_schema({"type": "object", "properties": {"email": {"type": "string",
                                                                                "pattern": EMAIL_PATTERN}}})
    assert schema.check(json.dumps({"email": "bob@example.com"}))
    for answer in [json.dumps({"email": NEAR_MISS}), "9" * 5000, "[" * 100_000]:
        assert schema.check(answer) is False
    regex = Constraint.regex(r"(a|aa)+")
    assert regex.check("aaaa") and not regex.check("a" * 60 + "!")  # exponential in `re`: a failed check here
