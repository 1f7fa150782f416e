"""The README's production loop, run as written: every command of its code block, read from README.md, goes
through the `specialist` CLI in order on a tiny model, so a README command that stops working fails here.

What the block leaves to people is done by the test in between: clients' traffic and feedback after `serve`, and
a person's corrections to the queue before the retrain. One substitution is made: `serve` binds a free port instead
of the one it was asked for (8000 could be taken), and the address the block gives `promote --server` is mapped to
it, but only if it is the address `serve` was asked for."""

from __future__ import annotations

import json
import random
import shlex
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import wait_until

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## The production loop"


def loop_block(text: str) -> str:
    """The first fenced block under the production-loop heading (and before the next heading)."""
    section = text[text.index(HEADING):]
    section = section[:section.find("\n## ", 1)]
    assert section.count("```") >= 2, "the production loop section lost its code block"
    return section.split("```")[1]


def loop_commands(block: str) -> list[str]:
    """The block's command lines, `\\` continuations joined, comment-only and blank lines left out."""
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line.rstrip().removesuffix("\\")
        if line.rstrip().endswith("\\"):
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending.strip())
        pending = ""
    return commands


def test_loop_commands_reads_continuations_and_skips_comments():
    block = "\nexport K=$(x)   # a key\n# just a note\nspecialist serve --a 1 \\\n    --b 2\n\n"
    assert loop_commands(block) == ["export K=$(x)   # a key", "specialist serve --a 1     --b 2"]
    assert loop_block(f"intro\n{HEADING}: x\n\n```\nspecialist run c.yaml\n```\n\n## Next\n```\nother\n```") \
        == "\nspecialist run c.yaml\n"


@dataclass
class Served:
    """The server `specialist serve` started (in a thread here), and the address it was asked to bind."""

    asked: str
    server: object
    app: object

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class Loop:
    """The working folder the README's commands run in, and what they left."""

    folder: Path
    served: list[Served] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)


def run_in_background(loop: Loop):
    """Stands in for serve's blocking `run_server`: the same app under uvicorn in a thread, on a free port."""
    from specialist.deploy.serve import BackgroundServer

    def start(app, host: str, port: int, settings) -> None:
        server = BackgroundServer(app).__enter__()
        loop.served.append(Served(f"http://{host}:{port}", server, app))

    return start


def export(line: str, monkeypatch) -> None:
    """`export NAME=...` run by bash as written; its value set in this process's environment."""
    name = line.split()[1].partition("=")[0]
    done = subprocess.run(["bash", "-c", f'{line}\nprintf %s "${name}"'], capture_output=True, text=True, check=True)
    assert len(done.stdout) >= 16, f"{line!r} gave {name} a weak or empty value"
    monkeypatch.setenv(name, done.stdout)


def send_traffic(served: Served) -> list[str]:
    """What clients do between `serve` and `harvest`: requests the data never saw, and feedback on half of them."""
    ids = []
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for n in range(10):
            body = {"model": "tuned", "max_tokens": 6,
                    "messages": [{"role": "user", "content": f"kernel: usb {n}-1: new device number {n * 7} on hub"}]}
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        for request_id in ids[::2]:
            assert http.post("/v1/feedback", json={"id": request_id, "score": -1}).status_code == 200
    return ids


def shadows_settled(served: Served, db: Path) -> bool:
    """The shadow answered some requests and has none left waiting (harvest's disagreement reads them)."""
    with sqlite3.connect(db) as connection:
        answered = connection.execute("SELECT COUNT(*) FROM shadow").fetchone()[0]
    return answered > 0 and "specialist_shadow_queue_depth 0" in httpx.get(f"{served.url}/metrics").text


def correct_queue(queue: Path) -> int:
    """What the person does: each drafted completion replaced by a right answer."""
    rows = [json.loads(line) for line in queue.read_text().splitlines()]
    for row in rows:
        row["completion"] = json.dumps({"level": None, "component": "kernel", "template": "usb <*>-1: new device"})
    queue.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def cli_args(command: str, loop: Loop) -> list[str]:
    """The command's arguments after `specialist`, with promote's --server mapped to the port serve really got."""
    args = shlex.split(command, comments=True)[1:]
    if args[0] == "promote" and "--server" in args:
        where = args.index("--server") + 1
        served = next((s for s in loop.served if s.asked == args[where]), None)
        assert served is not None, f"promote --server {args[where]} is not the server the block started"
        args[where] = served.url
    return args


def run_command(command: str, loop: Loop, monkeypatch) -> None:
    from typer.testing import CliRunner

    from specialist.cli import app as cli

    if command.startswith("export "):
        return export(command, monkeypatch)
    assert command.startswith("specialist "), f"the README's loop runs {command!r}, which this test cannot run"
    args = cli_args(command, loop)
    if args[0] == "run" and any("data.extra_paths" in a for a in args):
        loop.outputs["corrected"] = str(correct_queue(loop.folder / "queue.jsonl"))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
    loop.outputs[args[0] if args[0] != "run" else f"run {len(loop.ran)}"] = result.output
    loop.ran.append(args[0])
    if args[0] == "serve":
        send_traffic(loop.served[-1])
        assert wait_until(lambda: shadows_settled(loop.served[-1], loop.folder / "serve.sqlite"), 60.0, 0.1)


def write_config(folder: Path, tiny_config: dict) -> None:
    """The user's config.yaml: the tiny run's settings, its runs under ./runs (output.dir's default)."""
    config = {key: value for key, value in tiny_config.items() if key != "output"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def loop(tmp_path, tiny_config, monkeypatch):
    from specialist.deploy import serve

    folder = tmp_path / "work"
    folder.mkdir()
    write_config(folder, tiny_config)
    monkeypatch.chdir(folder)
    state = Loop(folder)
    monkeypatch.setattr(serve, "run_server", run_in_background(state))
    yield state
    for served in state.served:
        served.server.__exit__(None, None, None)


def test_the_readme_loop_runs_as_written(loop, monkeypatch):
    random.seed(0)  # the shadow's --shadow-share draws from `random`: the same requests shadowed every time
    for command in loop_commands(loop_block(README.read_text(encoding="utf-8"))):
        run_command(command, loop, monkeypatch)
    assert loop.ran == ["run", "run", "serve", "ab-report", "harvest", "run", "promote"]
    assert "shadow arms" in loop.outputs["ab-report"] and "next" in loop.outputs["ab-report"]
    runs = loop.folder / "runs"
    queue = [json.loads(line) for line in (loop.folder / "queue.jsonl").read_text().splitlines()]
    assert queue and int(loop.outputs["corrected"]) == len(queue)
    assert "negative_feedback" in {why for row in queue for why in row["why"]}  # the ones the clients marked
    v2_train = {json.loads(line)["prompt"] for line in (runs / "v2" / "data" / "train.jsonl").read_text().splitlines()}
    assert {row["prompt"] for row in queue} <= v2_train
    assert (runs / "v2" / "data" / "test.jsonl").read_text() == (runs / "v1" / "data" / "test.jsonl").read_text()
    record = json.loads((runs / "v2" / "promotion.json").read_text())
    assert record["passed"] and record["swap"]["ok"]
    served = loop.served[0]
    assert served.app.state.serve.arms["tuned"].source == str((runs / "v2").resolve())
    assert "specialist_arm_swaps_total 1" in httpx.get(f"{served.url}/metrics").text
    after = httpx.post(f"{served.url}/v1/chat/completions", timeout=60, json={
        "model": "tuned", "max_tokens": 4, "messages": [{"role": "user", "content": "kernel: usb 1-1: new device"}]})
    assert after.status_code == 200 and after.json()["model"] == "tuned"
