"""The README's "your own data" quick start, run as written (issue 27): its files and commands are read from the
README text, so an edit there that breaks the walk-through breaks this test. One thing is substituted: the
config's `name: gemma-3-270m` becomes a tiny random Llama (the embedded model would take minutes), and the
server runs on a free port in this process, its URL put where the README's curl names port 8000."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from specialist.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## Quick start: your own data"
DEFAULT_MODEL = "name: gemma-3-270m"
# a file is named on its own line as `name`: and its fenced block follows
FILE_BLOCK = re.compile(r"^`([\w.-]+)`:\n\n```[\w-]*\n(.*?)\n```", re.MULTILINE | re.DOTALL)
SHELL_BLOCK = re.compile(r"^```bash\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, f"the README lost its section {HEADING!r}"
    section = text.split(HEADING, 1)[1]
    return section.split("\n## ", 1)[0]


def readme_files(section: str) -> dict[str, str]:
    return {name: body + "\n" for name, body in FILE_BLOCK.findall(section)}


def readme_commands(section: str) -> list[list[str]]:
    """Every shell command of the section's bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in SHELL_BLOCK.findall(section):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def curl_request(words: list[str]) -> tuple[str, dict[str, str], str]:
    """(url, headers, body) of a curl command; a flag this reader does not know fails the test rather than being
    dropped, so the README cannot show a request the test does not make."""
    assert words[0] == "curl"
    url, headers, body, rest = None, {}, None, iter(words[1:])
    for word in rest:
        if word == "-s":
            continue
        if word == "-H":
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif word in ("-d", "--data"):
            body = next(rest)
        else:
            assert not word.startswith("-"), f"the test does not read curl's {word}"
            url = word
    assert url and body is not None, words
    return url, headers, body


def run_command(words: list[str]):
    assert words[0] == "specialist", words
    return CliRunner().invoke(app, words[1:], terminal_width=200)


def serve_and_ask(monkeypatch, serve: list[str], curl: list[str]) -> httpx.Response:
    """`specialist serve` as written, with uvicorn.run swapped for a background server that answers the README's
    curl request and returns, instead of serving until Ctrl-C."""
    import specialist.deploy.serve as serve_module

    url, headers, body = curl_request(curl)
    answers = []

    def answer_once(app_, host: str, port: int, settings) -> None:
        written = f"http://{host}:{port}"
        assert url.startswith(written + "/"), f"curl asks {url}; serve listens on {written}"
        with serve_module.BackgroundServer(app_) as server:
            answers.append(httpx.post(server.url + url[len(written):], headers=headers, content=body, timeout=60))

    monkeypatch.setattr(serve_module, "run_server", answer_once)
    result = run_command(serve)
    assert result.exit_code == 0, result.output
    assert len(answers) == 1
    return answers[0]


def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch, tiny_model_dir):
    section = quick_start()
    files, commands = readme_files(section), readme_commands(section)
    assert sorted(files) == ["tickets.csv", "tickets.yaml"]
    assert [c[:2] for c in commands] == [["specialist", "baselines"], ["specialist", "run"],
                                        ["specialist", "serve"], ["curl", "-s"]]
    assert files["tickets.yaml"].count(DEFAULT_MODEL) == 1, "the quick start shows the default model"
    for name, body in files.items():
        (tmp_path / name).write_text(body.replace(DEFAULT_MODEL, f"name: {tiny_model_dir}"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(files["tickets.yaml"])
    labels = config["data"]["labels"]

    baselines = run_command(commands[0])
    assert baselines.exit_code == 0, baselines.output
    assert "linear" in baselines.output and "label_accuracy" in baselines.output

    run = run_command(commands[1])
    run_dir = tmp_path / config["output"]["dir"] / config["output"]["run_name"]
    report = json.loads((run_dir / "eval.json").read_text())
    gates = report["gates"]
    assert [g["gate"] for g in gates] == config["evaluation"]["gates"]
    # a tiny random model may well fail a gate: then run exits 1, as the README says, and still writes the run
    assert run.exit_code == (0 if all(g["passed"] for g in gates) else 1), run.output
    assert (run_dir / "labels.json").exists() and (run_dir / "report.html").exists()
    held_out = sum(1 for _ in (run_dir / "data" / "test.jsonl").open())
    assert report["n_eval"] == held_out == report["arms"]["tuned"]["scores"]["label_accuracy"]["n"]

    assert commands[2][commands[2].index("--arm") + 1] == f"tuned={run_dir.relative_to(tmp_path)}"
    reply = serve_and_ask(monkeypatch, commands[2], commands[3])
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["message"]["content"] in labels
    assert sorted(choice["probabilities"]) == sorted(labels)
    assert sum(choice["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
