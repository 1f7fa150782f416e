"""The production loop: shadow arms answer in the background and never reach a client nor slow one; harvest picks
the requests worth a person's time; extra corrected rows train without touching the test set; a promotion swaps a
live arm while traffic flows, through an admin endpoint that refuses whoever lacks its key."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import wait_until
from specialist.deploy.arms import ServedArm, load_arms
from specialist.deploy.records import LoggedRequest
from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app
from specialist.deploy.shadow import ShadowSettings, answers_agree
from specialist.generation import Generation

GOOD = {"model": "tuned", "max_tokens": 6, "messages": [{"role": "user", "content": "Dec 10 sshd[1]: Invalid user x"}]}
SHADOW_MARK = "SHADOW-ONLY-ANSWER"


@dataclass
class FakeEngine:
    """An engine that answers a fixed text, raises, or hangs: what a broken candidate does."""

    text: str = SHADOW_MARK
    mode: str = "answer"  # answer | raise | hang
    release: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    busy: bool = False
    template: object = None
    tokenizer: object = None

    def encode(self, text: str, shots=(), max_new_tokens=None) -> list[int]:
        return [1, 2, 3]

    def run(self, requests, sampling=None) -> list[Generation]:
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("the candidate is broken")
        if self.mode == "hang":
            self.release.wait(20)  # ignores cancellation, as a stuck kernel would
        return [Generation(self.text, 3, 2, "stop") for _ in requests]


def fake_arm(name: str, mode: str = "answer", text: str = SHADOW_MARK) -> ServedArm:
    return ServedArm(name, FakeEngine(text, mode), "fake", format_check=lambda out: out.startswith("{"))


def settings(tmp_path, **overrides) -> ServeSettings:
    return ServeSettings(**{"split": {"tuned": 1.0}, "db": tmp_path / "log.sqlite", "log_prompts": True,
                            "max_tokens_limit": 64, "max_prompt_tokens": 256, **overrides})


def post(url: str, body, headers=None, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(url, json=body, headers=headers or {}, timeout=timeout)


def shadow_rows(db) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT request_id, arm, agrees, output FROM shadow").fetchall()


def metric(server, name: str) -> str:
    return "\n".join(line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if name in line)


# ---- shadow arms ----------------------------------------------------------------------------------------------


def test_shadow_answers_are_logged_and_never_reach_a_client(tmp_path, arms):
    shadows = {"candidate": fake_arm("candidate")}
    app = create_app({"tuned": arms["tuned"]}, settings(tmp_path), shadows)
    with BackgroundServer(app) as server:
        ids = []
        for _ in range(3):
            response = post(f"{server.url}/v1/chat/completions", GOOD)
            assert response.status_code == 200 and SHADOW_MARK not in response.text
            ids.append(response.json()["id"])
        streamed = httpx.post(f"{server.url}/v1/chat/completions", json={**GOOD, "stream": True}, timeout=60)
        assert SHADOW_MARK not in streamed.text
        assert post(f"{server.url}/v1/chat/completions", {**GOOD, "model": "candidate"}).status_code == 404
        assert "candidate" not in httpx.get(f"{server.url}/v1/models").text
        assert wait_until(lambda: len(shadow_rows(tmp_path / "log.sqlite")) == 4)
        assert 'outcome="answered"} 4' in metric(server, "specialist_shadow_total")
    rows = shadow_rows(tmp_path / "log.sqlite")
    assert {r[0] for r in rows} >= set(ids) and all(r[1] == "candidate" and r[3] == SHADOW_MARK for r in rows)


def test_a_real_shadow_adapter_shares_the_live_base_copy(tmp_path, tiny_run_dir, tiny_model_dir):
    loaded = load_arms([("base", str(tiny_model_dir)), ("candidate", str(tiny_run_dir))])
    for arm in loaded.values():
        arm.max_new_tokens = 6
    app = create_app({"base": loaded["base"]}, settings(tmp_path, split={"base": 1.0}),
                     {"candidate": loaded["candidate"]})
    body = {**GOOD, "model": "base"}
    with BackgroundServer(app) as server:
        live = []
        for n in range(3):
            live.append(post(f"{server.url}/v1/chat/completions", body).json()["choices"][0]["message"]["content"])
            assert wait_until(lambda n=n: len(shadow_rows(tmp_path / "log.sqlite")) == n + 1)
    expected = answer_of(tiny_run_dir, GOOD["messages"][0]["content"])
    assert [row[3] for row in shadow_rows(tmp_path / "log.sqlite")] == [expected] * 3
    assert all(row[2] == int(expected.strip() == answer.strip()) for row, answer in
               zip(shadow_rows(tmp_path / "log.sqlite"), live))


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_broken_shadow_never_delays_a_live_answer(tmp_path, arms, mode):
    shadow = fake_arm("candidate", mode)
    shadow_settings = ShadowSettings(timeout_s=0.5, queue_size=2)
    app = create_app({"tuned": arms["tuned"]}, settings(tmp_path, shadow=shadow_settings), {"candidate": shadow})
    with BackgroundServer(app) as server:
        post(f"{server.url}/v1/chat/completions", GOOD)  # warm-up: the first answer pays for lazy set-up
        alone = time.perf_counter()
        post(f"{server.url}/v1/chat/completions", GOOD)
        alone = time.perf_counter() - alone
        for _ in range(8):
            started = time.perf_counter()
            response = post(f"{server.url}/v1/chat/completions", GOOD)
            assert response.status_code == 200
            assert time.perf_counter() - started < alone + 1.0
        outcome = "error" if mode == "raise" else "timed_out"
        assert wait_until(lambda: f'outcome="{outcome}"' in metric(server, "specialist_shadow_total"))
        shadow.engine.release.set()
    assert shadow_rows(tmp_path / "log.sqlite") == []


def test_a_full_shadow_queue_drops_and_counts(tmp_path, arms):
    shadow = fake_arm("candidate", "hang")
    shadow_settings = ShadowSettings(timeout_s=30, queue_size=1)
    app = create_app({"tuned": arms["tuned"]}, settings(tmp_path, shadow=shadow_settings), {"candidate": shadow})
    with BackgroundServer(app) as server:
        for _ in range(5):
            assert post(f"{server.url}/v1/chat/completions", GOOD).status_code == 200
        assert wait_until(lambda: 'outcome="queue_full"' in metric(server, "specialist_shadow_total"))
        shadow.engine.release.set()


def test_shadow_share_zero_answers_nothing(tmp_path, arms):
    shadow = fake_arm("candidate")
    app = create_app({"tuned": arms["tuned"]}, settings(tmp_path, shadow=ShadowSettings(share=0.0)),
                     {"candidate": shadow})
    with BackgroundServer(app) as server:
        post(f"{server.url}/v1/chat/completions", GOOD)
        time.sleep(0.3)
    assert shadow.engine.calls == 0


def test_answers_agree_reads_json_values():
    assert answers_agree('{"a": 1, "b": 2}', ' {"b":2,"a":1}\n')
    assert not answers_agree('{"a": 1}', '{"a": 2}')
    assert answers_agree("yes ", "yes") and not answers_agree("yes", "no")


def test_ab_report_shows_live_against_shadow(tmp_path, arms):
    from specialist.deploy.ab import ab_report

    shadows = {"candidate": fake_arm("candidate")}
    app = create_app({"tuned": arms["tuned"]}, settings(tmp_path), shadows)
    with BackgroundServer(app) as server:
        ids = [post(f"{server.url}/v1/chat/completions", GOOD).json()["id"] for _ in range(4)]
        assert wait_until(lambda: len(shadow_rows(tmp_path / "log.sqlite")) == 4)
        for request_id, score in zip(ids, (1, 1, -1, 0.0)):
            assert post(f"{server.url}/v1/feedback", {"id": request_id, "score": score}).status_code == 200
    report = ab_report(tmp_path / "log.sqlite")["shadows"]["candidate"]
    assert report["requests"] == 4 and report["agreement"] == 0.0 and report["live_arms"] == ["tuned"]
    assert report["shadow_format_pass_rate"] == 0.0  # the fake's answer is not JSON
    assert report["on_feedback"] == {"rated": 3, "live_right": 2, "live_wrong": 1, "both_right": 0,
                                     "shadow_wrong": 2, "both_wrong": 0, "shadow_maybe_right": 1}


# ---- harvest --------------------------------------------------------------------------------------------------


def fill_log(db, requests: list[dict]) -> None:
    """Requests written straight into a serve log: (id, prompt, output, format_ok, feedback, confidence, shadow)."""
    from specialist.deploy.records import RequestLog

    log = RequestLog(db)
    for r in requests:
        log.add(LoggedRequest(request_id=r["id"], arm="tuned", endpoint="chat", user=None, latency_s=0.1, tokens_in=5,
                tokens_out=5, format_ok=r.get("format_ok", True), finish_reason="stop", prompt=r["prompt"],
                output=r.get("output", '{"level": "INFO"}'), confidence=r.get("confidence")))
        if "feedback" in r:
            log.add_feedback(r["id"], r["feedback"], None)
        if "shadow_agrees" in r:
            log.add_shadow(request_id=r["id"], arm="candidate", latency_s=0.1, tokens_out=5, format_ok=True,
                           agrees=r["shadow_agrees"], output="{}")
        time.sleep(0.002)  # distinct timestamps: ties would make the order depend on the clock
    log.close()


def harvest_log(tmp_path, tiny_run_dir, requests, **options):
    from specialist.deploy.harvest import HarvestOptions, harvest

    fill_log(tmp_path / "log.sqlite", requests)
    return harvest(tmp_path / "log.sqlite", tiny_run_dir, HarvestOptions(**options))


NOVEL = [f"kernel: usb {n}-1: new high-speed USB device number {n} using ehci-pci port {n * 7}" for n in range(6)]


def test_harvest_puts_the_wrong_answers_first(tmp_path, tiny_run_dir):
    requests = [{"id": "fine", "prompt": NOVEL[0] + " fine"},
                {"id": "bad-format", "prompt": "zzz totally unrelated words here", "format_ok": False},
                {"id": "thumbs-down", "prompt": "mysql: access denied for user bob", "feedback": -1.0},
                {"id": "disagree", "prompt": "nginx upstream timed out while reading", "shadow_agrees": False},
                {"id": "unsure", "prompt": "disk quota exceeded on /var", "confidence": 0.3},
                {"id": "liked", "prompt": "cron job finished ok", "feedback": 1.0}]
    rows, report = harvest_log(tmp_path, tiny_run_dir, requests, far_similarity=0.0)
    assert [r["request_id"] for r in rows] == ["thumbs-down", "bad-format", "disagree", "unsure"]
    assert rows[0]["why"] == ["negative_feedback"] and rows[1]["why"] == ["format_failure"]
    assert rows[0]["completion"] == '{"level": "INFO"}'  # the model's answer, a draft to correct
    assert set(rows[0]) >= {"prompt", "completion", "why", "request_id"}


def test_harvest_drops_run_rows_and_collapses_duplicates(tmp_path, tiny_run_dir):
    from specialist.run_folder import RunFolder

    split = RunFolder(tiny_run_dir).split()
    requests = [{"id": "test-row", "prompt": split.test[0].prompt, "feedback": -1.0},
                {"id": "train-row", "prompt": split.train[0].prompt, "format_ok": False},
                {"id": "dup-1", "prompt": "mysql: access denied for user bob", "feedback": -1.0},
                {"id": "dup-2", "prompt": "mysql: access denied for user bob", "feedback": -0.5},
                {"id": "dup-3", "prompt": "mysql:  access denied for user bob ", "format_ok": False}]
    rows, report = harvest_log(tmp_path, tiny_run_dir, requests)
    assert [r["request_id"] for r in rows] == ["dup-1"] and rows[0]["duplicates"] == 2
    assert report["in_run_data"] == 2 and report["duplicates_collapsed"] == 2


def test_harvest_scrubs_personal_data_and_fills_the_mix(tmp_path, tiny_run_dir):
    requests = [{"id": f"bad-{n}", "prompt": f"{NOVEL[n]} from alice{n}@example.com at 10.0.0.{n}",
                 "feedback": -1.0} for n in range(4)]
    requests += [{"id": f"far-{n}", "prompt": f"completely novel text number {n} " + "qx" * (n + 3)}
                 for n in range(4)]
    rows, report = harvest_log(tmp_path, tiny_run_dir, requests, max_rows=4,
                               mix={"negative_feedback": 0.5, "far_from_training": 0.5}, far_similarity=0.9)
    assert sum("negative_feedback" == r["why"][0] for r in rows) == 2
    assert sum("far_from_training" == r["why"][0] for r in rows) == 2
    text = json.dumps(rows)
    assert "@example.com" not in text and "10.0.0." not in text and "<EMAIL>" in text


def test_harvest_refuses_a_log_without_prompts(tmp_path, tiny_run_dir):
    from specialist.deploy.harvest import HarvestOptions, harvest
    from specialist.deploy.records import RequestLog
    from specialist.errors import ConfigError

    log = RequestLog(tmp_path / "log.sqlite")
    log.add(LoggedRequest(request_id="r", arm="tuned", endpoint="chat", user=None, latency_s=0.1, tokens_in=1, tokens_out=1,
            format_ok=False, finish_reason="stop", prompt=None, output=None))
    log.close()
    with pytest.raises(ConfigError, match="--log-prompts"):
        harvest(tmp_path / "log.sqlite", tiny_run_dir, HarvestOptions())
    with pytest.raises(ConfigError, match="mix"):
        HarvestOptions(mix={"vibes": 1.0})


# ---- retrain on what was learnt -------------------------------------------------------------------------------


def prepared(tmp_path, tiny_config, name: str, extra_paths=()):
    from specialist.config import validate_config
    from specialist.data.prepare import prepare

    raw = json.loads(json.dumps(tiny_config))
    raw["data"]["extra_paths"] = [str(p) for p in extra_paths]
    config = validate_config(raw)
    return prepare(config.data, config.method.kind, tmp_path / name, config.training.seed, show_progress=False)


def test_extra_rows_join_training_only_and_the_test_set_stays_fixed(tmp_path, tiny_config):
    before = prepared(tmp_path, tiny_config, "before").split
    extra = tmp_path / "queue.jsonl"
    corrected = [{"prompt": f"kernel: usb {n}-1: new device", "completion": '{"level": null}',  # a harvest row
                  "why": ["format_failure"], "request_id": f"chatcmpl-{n}", "arm": "tuned", "feedback": None,
                  "format_ok": False, "confidence": None, "nearest_similarity": 0.1, "duplicates": 0}
                 for n in range(5)]
    copy_of_test = {"prompt": before.test[0].prompt, "completion": '{"level": "WRONG"}'}
    extra.write_text("".join(json.dumps(r) + "\n" for r in [*corrected, copy_of_test]))
    after = prepared(tmp_path, tiny_config, "after", [extra]).split
    assert [(e.prompt, e.completion) for e in after.test] == [(e.prompt, e.completion) for e in before.test]
    assert [e.prompt for e in after.val] == [e.prompt for e in before.val]
    train = {e.prompt for e in after.train}
    assert train >= {r["prompt"] for r in corrected} and before.test[0].prompt not in train
    assert len(after.train) == len(before.train) + 5


def test_extra_paths_is_a_known_config_key_and_resolves_beside_the_config(tmp_path, tiny_config):
    import yaml

    from specialist.config import load_config

    (tmp_path / "cfg").mkdir()
    config_file = tmp_path / "cfg" / "run.yaml"
    config_file.write_text(yaml.safe_dump({**tiny_config, "data": {**tiny_config["data"],
                                                                     "extra_paths": ["queue.jsonl"]}}))
    assert load_config(config_file).data.extra_paths == [(tmp_path / "cfg" / "queue.jsonl").resolve()]


# ---- promote without dropping a request -----------------------------------------------------------------------

ADMIN_KEY = "admin-" + "k" * 24
PROMPT = "Dec 10 sshd[1]: Invalid user x"


@pytest.fixture(scope="module")
def candidate_run_dir(tiny_run_dir, tmp_path_factory):
    """The tiny run copied with its adapter weights scrambled: a retrained model whose answers differ, on the same
    base, template and test set."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("candidate") / "runs" / "candidate"
    shutil.copytree(tiny_run_dir, folder, ignore=shutil.ignore_patterns("checkpoints"))
    weights = folder / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(7)
    tensors = {name: torch.randn(t.shape, generator=generator) * 2.0 for name, t in load_file(weights).items()}
    save_file(tensors, weights)
    return folder


def answer_of(run_dir, prompt: str = PROMPT, max_tokens: int = 6) -> str:
    """What the run answers to `prompt` offline (greedy): the reference for which adapter served a request."""
    from specialist.generation import Request

    arm = load_arms([("x", str(run_dir))])["x"]
    ids = arm.engine.encode(prompt, max_new_tokens=max_tokens)
    return arm.engine.run([Request(ids, max_tokens)])[0].text


def swap_app(tmp_path, tiny_run_dir, roots, **overrides):
    from specialist.artifacts import ModelPool
    from specialist.deploy.arms import load_replacement

    pool = ModelPool()
    live = load_arms([("tuned", str(tiny_run_dir))], pool)
    live["tuned"].max_new_tokens = 8
    config = settings(tmp_path, admin_key=ADMIN_KEY, admin_roots=tuple(roots), **overrides)
    return create_app(live, config, loader=lambda name, source: load_replacement(name, source, pool))


def test_promote_swaps_the_arm_while_a_client_keeps_sending(tmp_path, tiny_run_dir, candidate_run_dir):
    from specialist.deploy.promote import swap_on_server

    old, new = answer_of(tiny_run_dir), answer_of(candidate_run_dir)
    assert old != new, "the scrambled adapter must answer differently for this test to tell them apart"
    body = {"model": "tuned", "max_tokens": 6, "messages": [{"role": "user", "content": PROMPT}]}
    app = swap_app(tmp_path, tiny_run_dir, [candidate_run_dir.parent])
    statuses, answers, stop = [], [], threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{server.url}/v1/chat/completions", json=body)
                statuses.append(response.status_code)
                answers.append(response.json()["choices"][0]["message"]["content"] if response.is_success else None)

    with BackgroundServer(app) as server:
        sender = threading.Thread(target=client)
        sender.start()
        assert wait_until(lambda: len(answers) >= 3)
        result = swap_on_server(server.url, "tuned", candidate_run_dir, ADMIN_KEY)
        swapped_at = len(answers)
        assert wait_until(lambda: len(answers) >= swapped_at + 3)
        stop.set()
        sender.join(60)
        assert "specialist_arm_swaps_total 1" in httpx.get(f"{server.url}/metrics").text
    assert result["ok"] and result["previous"] == str(tiny_run_dir)
    assert statuses and all(status == 200 for status in statuses)
    assert answers[0] == old and set(answers[swapped_at + 1:]) == {new}


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer wrong-key-wrong-key-wrong"}, 401),
    ({"Authorization": f"Bearer {ADMIN_KEY}x"}, 401),
    ({"Authorization": f"Bearer {ADMIN_KEY[:-1]}"}, 401),
    ({"Authorization": ADMIN_KEY}, 401),
    ({"Authorization": "Bearer api-key-for-every-client"}, 401),  # the API key is not the admin key
])
def test_admin_endpoint_refuses_bad_or_missing_keys(tmp_path, tiny_run_dir, candidate_run_dir, headers, status):
    app = swap_app(tmp_path, tiny_run_dir, [candidate_run_dir.parent], api_key="api-key-for-every-client")
    with BackgroundServer(app) as server:
        response = post(f"{server.url}/admin/arms/tuned", {"source": str(candidate_run_dir)}, headers)
        assert response.status_code == status and response.json()["error"]["code"] == "invalid_admin_key"
        assert "specialist_arm_swaps_total 0" in httpx.get(
            f"{server.url}/metrics", headers={"Authorization": "Bearer api-key-for-every-client"}).text


def test_admin_endpoint_is_off_without_a_key_and_refuses_weak_ones(tmp_path, arms, candidate_run_dir):
    from specialist.errors import ConfigError

    app = create_app({"tuned": arms["tuned"]}, settings(tmp_path))
    with BackgroundServer(app) as server:
        response = post(f"{server.url}/admin/arms/tuned", {"source": str(candidate_run_dir)},
                        {"Authorization": "Bearer anything-at-all-really"})
        assert response.status_code == 403
    with pytest.raises(ConfigError, match="under 16"):
        settings(tmp_path, admin_key="short")
    with pytest.raises(ConfigError, match="equals --api-key"):
        settings(tmp_path, admin_key=ADMIN_KEY, api_key=ADMIN_KEY)


def test_admin_endpoint_refuses_hostile_names_sources_and_bodies(tmp_path, tiny_run_dir, candidate_run_dir):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    app = swap_app(tmp_path, tiny_run_dir, [candidate_run_dir.parent], max_request_bytes=2048)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    good = {"source": str(candidate_run_dir)}
    with BackgroundServer(app) as server:
        url = f"{server.url}/admin/arms"
        cases = [
            (f"{url}/..%2f..%2fetc", good, {404}), (f"{url}/{'a' * 200}", good, {400}),
            (f"{url}/x%00y", good, {400}), (f"{url}/%E2%80%AEtuned", good, {400}), (f"{url}/base", good, {404}),
            (f"{url}/tuned", {"source": "/etc"}, {400}), (f"{url}/tuned", {"source": str(outside)}, {400}),
            (f"{url}/tuned", {"source": str(candidate_run_dir / ".." / ".." / "..")}, {400}),
            (f"{url}/tuned", {"source": str(candidate_run_dir / "config.yaml")}, {400}),
            (f"{url}/tuned", {"source": "gemma-3-270m"}, {400}),
            (f"{url}/tuned", {"source": "x" * 5000}, {400, 413}),
            (f"{url}/tuned", {"source": str(candidate_run_dir), "extra": 1}, {400}),
            (f"{url}/tuned", {"source": 7}, {400}),
        ]
        for target, body, expected in cases:
            response = httpx.post(target, json=body, headers=auth, timeout=30)
            assert response.status_code in expected, (target, body, response.text)
        huge = httpx.post(f"{url}/tuned", content=b'{"source": "' + b"a" * 100_000 + b'"}', headers=auth, timeout=30)
        assert huge.status_code == 413
        unauthenticated = httpx.post(f"{url}/tuned", content=b"a" * 100_000, timeout=30)
        assert unauthenticated.status_code == 401
        assert "specialist_arm_swaps_total 0" in httpx.get(f"{server.url}/metrics").text


def test_promote_gates_record_and_refusal(tmp_path, tiny_run_dir, candidate_run_dir):
    from specialist.deploy.promote import PromoteOptions, promote_gates

    fill_log(tmp_path / "log.sqlite", [{"id": f"r{n}", "prompt": f"{PROMPT} {n}"} for n in range(4)])
    same = promote_gates(tiny_run_dir, tiny_run_dir, PromoteOptions(db=tmp_path / "log.sqlite", replay=4))
    assert same["passed"] and same["replay"]["agreement"] == 1.0 and same["replay"]["requests"] == 4
    names = {g["name"] for g in same["gates"]}
    assert {"paired_test_set", "replay.format", "replay.agreement"} <= names and any(n.startswith("test.") for n in names)
    strict = promote_gates(candidate_run_dir, tiny_run_dir, PromoteOptions(db=tmp_path / "log.sqlite", replay=4,
                                                                           min_agreement=1.0))
    assert not strict["passed"] and not next(g for g in strict["gates"] if g["name"] == "replay.agreement")["passed"]


def test_promote_command_gates_records_and_swaps(tmp_path, tiny_run_dir, candidate_run_dir, monkeypatch):
    from typer.testing import CliRunner

    from specialist.cli import app as cli

    fill_log(tmp_path / "log.sqlite", [{"id": f"r{n}", "prompt": f"{PROMPT} {n}"} for n in range(3)])
    monkeypatch.setenv("SPECIALIST_ADMIN_KEY", ADMIN_KEY)
    args = ["promote", str(candidate_run_dir), "--over", str(tiny_run_dir), "--db", str(tmp_path / "log.sqlite"),
            "--replay", "3", "--arm", "tuned"]
    with BackgroundServer(swap_app(tmp_path / "serve", tiny_run_dir, [candidate_run_dir.parent])) as server:
        refused = CliRunner().invoke(cli, [*args, "--server", server.url, "--min-agreement", "1",
                                           "--record", str(tmp_path / "refused.json")])
        assert refused.exit_code == 1 and json.loads((tmp_path / "refused.json").read_text())["swap"] is None
        assert "specialist_arm_swaps_total 0" in httpx.get(f"{server.url}/metrics").text
        passed = CliRunner().invoke(cli, [*args, "--server", server.url, "--tolerance", "1",
                                          "--record", str(tmp_path / "promoted.json")])
        assert passed.exit_code == 0, passed.output
        assert "specialist_arm_swaps_total 1" in httpx.get(f"{server.url}/metrics").text
    record = json.loads((tmp_path / "promoted.json").read_text())
    assert record["passed"] and record["swap"]["source"] == str(candidate_run_dir.resolve())


def test_harvest_command_writes_a_private_queue(tmp_path, tiny_run_dir):
    from typer.testing import CliRunner

    from specialist.cli import app as cli

    fill_log(tmp_path / "log.sqlite", [{"id": "bad", "prompt": "mysql: access denied for bob", "feedback": -1.0}])
    result = CliRunner().invoke(cli, ["harvest", str(tmp_path / "log.sqlite"), "--run", str(tiny_run_dir),
                                      "--out", str(tmp_path / "queue.jsonl"), "--max", "5"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "queue.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in rows] == ["bad"] and (tmp_path / "queue.jsonl").stat().st_mode & 0o077 == 0


# ---- logs fit for production ----------------------------------------------------------------------------------


def test_scrubbed_logs_hold_no_personal_data(tmp_path, arms):
    shadows = {"candidate": fake_arm("candidate", text="reply to carol@example.org")}
    app = create_app({"tuned": arms["tuned"]}, settings(tmp_path, scrub_logs=True), shadows)
    body = {**GOOD, "messages": [{"role": "user", "content": "sshd: bob@example.com from 192.168.1.20 failed"}]}
    with BackgroundServer(app) as server:
        assert post(f"{server.url}/v1/chat/completions", body).status_code == 200
        assert wait_until(lambda: len(shadow_rows(tmp_path / "log.sqlite")) == 1)
    with sqlite3.connect(tmp_path / "log.sqlite") as connection:
        (prompt,) = connection.execute("SELECT prompt FROM requests").fetchone()
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert "bob@example.com" not in prompt and "192.168.1.20" not in prompt and "<EMAIL>" in prompt
    assert shadow_rows(tmp_path / "log.sqlite")[0][3] == "reply to <EMAIL>"


def test_log_keeps_its_row_and_age_limits(tmp_path):
    from specialist.deploy.records import PRUNE_EVERY, RequestLog

    log = RequestLog(tmp_path / "log.sqlite", max_rows=30)
    for n in range(PRUNE_EVERY * 2 + 10):
        log.add(LoggedRequest(request_id=f"r{n}", arm="a", endpoint="chat", user=None, latency_s=0.1, tokens_in=1, tokens_out=1,
                format_ok=True, finish_reason="stop", prompt=None, output=None))
        log.add_feedback(f"r{n}", 1.0, None)
    count = lambda table: log.connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
    assert count("requests") == 40 and count("feedback") == 40  # 30 kept at the last sweep, 10 since
    newest = log.connection.execute("SELECT id FROM requests ORDER BY ts DESC LIMIT 1").fetchone()[0]
    assert newest == f"r{PRUNE_EVERY * 2 + 9}"
    log.max_rows, log.max_age_s = None, 60.0
    assert log.prune(now=time.time() + 3600) == 40 and count("requests") == 0
    log.close()
