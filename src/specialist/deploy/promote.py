"""`specialist promote CANDIDATE --over CURRENT`: gate a retrained run against the one serving, record why, and
swap it in on a running server.

Gates, each recorded with its figures:
- paired_test_set: both runs hold the same test rows (a retrain with data.extra_paths keeps them), so the scores
  below compare the two models on the same questions;
- test.<scorer>: on that test set, with greedy decoding, the candidate scores at least the current run's mean
  minus `tolerance` on every scorer the candidate's evaluation uses;
- own_gates: the candidate's own evaluation gates passed (when it has an eval.json);
- replay.format / replay.agreement: on a sample of logged requests (the traffic the model will get), the
  candidate's format pass rate is at least the current's minus `tolerance`, and its answers agree with the current
  one's at least `min_agreement` of the time (0 by default: reported, not required).
Only a candidate that passes every gate is swapped in, through the server's authenticated admin endpoint.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.deploy.arms import ServedArm
from specialist.errors import ConfigError

BATCH = 8


@dataclass
class PromoteOptions:
    db: Path | None = None  # the request log whose traffic is replayed
    replay: int = 50  # logged requests replayed at most
    test_max: int | None = None  # test rows scored at most (None: all)
    tolerance: float = 0.0
    min_agreement: float = 0.0
    seed: int = 0


def promote_gates(candidate: Path, current: Path, options: PromoteOptions) -> dict[str, Any]:
    """The promotion record: both runs, the figures and every gate; `passed` when all of them passed."""
    from specialist.artifacts import ModelPool
    from specialist.deploy.arms import load_arms
    from specialist.run_folder import RunFolder

    runs = {"candidate": RunFolder.open(candidate), "current": RunFolder.open(current)}
    arms = load_arms([(name, str(run.path)) for name, run in runs.items()], ModelPool())
    test = runs["current"].split().test[:options.test_max]
    paired = _rows(runs["candidate"].split().test[:options.test_max]) == _rows(test)
    gates = [_gate("paired_test_set", paired, "same test rows" if paired else "the test sets differ")]
    scores = _test_scores(arms, test, runs["candidate"].config().evaluation) if paired else {}
    for scorer, by_arm in scores.items():
        gates.append(_gate(f"test.{scorer}", by_arm["candidate"] >= by_arm["current"] - options.tolerance,
                           f"{by_arm['candidate']:.4f} vs {by_arm['current']:.4f}"))
    gates += _own_gates(runs["candidate"])
    replay = _replay(arms, options) if options.db is not None else None
    if replay is not None and replay["requests"]:
        gates.append(_gate("replay.format", _rate_at_least(replay, options.tolerance),
                           f"{replay['format_pass_rate']} vs {replay['current_format_pass_rate']}"))
        gates.append(_gate("replay.agreement", replay["agreement"] >= options.min_agreement,
                           f"{replay['agreement']:.4f} >= {options.min_agreement}"))
    return {"candidate": str(runs["candidate"].path), "current": str(runs["current"].path), "time": time.time(),
            "test_rows": len(test), "test_scores": scores, "replay": replay, "gates": gates,
            "passed": all(g["passed"] for g in gates)}


def _gate(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _rows(examples) -> list[tuple[str, str]]:
    return [(ex.prompt, ex.completion) for ex in examples]


def _rate_at_least(replay: dict[str, Any], tolerance: float) -> bool:
    mine, theirs = replay["format_pass_rate"], replay["current_format_pass_rate"]
    return mine is None or theirs is None or mine >= theirs - tolerance


def answer_all(arm: ServedArm, prompts: list[str]) -> list[str]:
    """Greedy answers of `arm` to `prompts`, in batches, through the engine the server answers with."""
    from specialist.generation import GREEDY, Request

    answers: list[str] = []
    for start in range(0, len(prompts), BATCH):
        requests = [Request(arm.engine.encode(p, max_new_tokens=arm.max_new_tokens), arm.max_new_tokens)
                    for p in prompts[start:start + BATCH]]
        answers += [result.text for result in arm.engine.run(requests, GREEDY)]
    return answers


def _test_scores(arms: dict[str, ServedArm], test, evaluation) -> dict[str, dict[str, float]]:
    """{scorer: {arm: mean score on the test rows}} for the candidate's scorers that judge an answer alone."""
    from specialist.core.scorers import LabelRule, resolve_scorers

    rule = LabelRule(json_key=evaluation.label_json_key, pattern=evaluation.label_pattern)
    try:
        scorers = resolve_scorers(list(evaluation.scorers), rule, evaluation.json_schema)
    except ConfigError as exc:
        raise ConfigError(f"the candidate's scorers cannot be used here: {exc}") from None
    prompts, references = [ex.prompt for ex in test], [ex.completion for ex in test]
    answers = {name: answer_all(arm, prompts) for name, arm in arms.items()}
    return {scorer: {name: sum(fn(a, r) for a, r in zip(answers[name], references)) / max(1, len(test))
                     for name in arms} for scorer, fn in scorers.items()}


def _own_gates(run) -> list[dict[str, Any]]:
    if not run.eval_json.is_file():
        return []
    gates = json.loads(run.eval_json.read_text(encoding="utf-8")).get("gates") or []
    failed = [g.get("gate", g.get("name", "?")) for g in gates if isinstance(g, dict) and not g.get("passed", True)]
    return [_gate("own_gates", not failed, f"failed: {failed}" if failed else f"{len(gates)} passed")]


def _replay(arms: dict[str, ServedArm], options: PromoteOptions) -> dict[str, Any]:
    """Both arms on a seeded sample of the logged prompts: format pass rates and agreement."""
    from specialist.deploy.records import read_requests
    from specialist.deploy.shadow import answers_agree

    logged = [r["prompt"] for r in read_requests(options.db) if r["prompt"]]
    sample = random.Random(options.seed).sample(logged, min(options.replay, len(logged)))
    answers = {name: answer_all(arm, sample) for name, arm in arms.items()}
    agree = [answers_agree(a, b) for a, b in zip(answers["candidate"], answers["current"])]
    return {"requests": len(sample), "agreement": sum(agree) / len(agree) if agree else 1.0,
            "format_pass_rate": _format_rate(arms["candidate"], answers["candidate"]),
            "current_format_pass_rate": _format_rate(arms["current"], answers["current"])}


def _format_rate(arm: ServedArm, answers: list[str]) -> float | None:
    if arm.format_check is None or not answers:
        return None
    return sum(bool(arm.format_check(a)) for a in answers) / len(answers)


def swap_on_server(server: str, arm: str, source: Path, admin_key: str | None, timeout: float = 600.0) -> dict:
    """Ask the server at `server` to serve `source` as `arm` (POST /admin/arms/{arm}); its JSON answer."""
    import httpx

    if not admin_key:
        raise ConfigError("--server needs the admin key", hint="set SPECIALIST_ADMIN_KEY (or --admin-key) to the "
                                                              "key the server was started with")
    response = httpx.post(f"{server.rstrip('/')}/admin/arms/{arm}", json={"source": str(Path(source).resolve())},
                          headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout)
    if response.status_code != 200:
        raise ConfigError(f"the server refused the swap ({response.status_code}): {response.text[:300]}")
    return response.json()
