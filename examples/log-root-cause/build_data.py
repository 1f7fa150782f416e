"""Build data.jsonl (a window of consecutive log lines -> root-cause JSON) from the loghub samples.

Run from the repository root:  python examples/log-root-cause/build_data.py [--loghub ../shared/datasets/loghub]

Each prompt is WINDOW consecutive raw lines of one system, as the system wrote them (rebuilt from loghub's
structured CSV the same way as examples/log-to-json). The completion is compact JSON:

    {"component": ..., "event": ..., "severity": "info" | "warning" | "error", "summary": ...}

The key line is the window's most severe line (ties: the event seen most often in the window, then the
first). `event` is its loghub event template, `component` the part of the system that wrote it, `severity`
its level on one scale for the three systems, and `summary` says how many lines show that event and what it
means, in the words of EVENT_MEANINGS below (written for this recipe). Windows are sampled round-robin over
key events with a fixed seed so rare incidents are represented.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "log-to-json"))
from build_data import SYSTEMS, raw_line, write_jsonl  # noqa: E402  (one way to rebuild a raw line)

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
HDFS_SEVERITY = {"INFO": "info", "WARN": "warning", "ERROR": "error", "FATAL": "error"}
APACHE_SEVERITY = {"notice": "info", "error": "error"}
APACHE_COMPONENT = {"E1": "jk2_init", "E2": "workerEnv", "E3": "mod_jk", "E4": "core", "E5": "jk2_init",
                    "E6": "mod_jk"}
OPENSSH_ERRORS = {"E6", "E7", "E11"}
OPENSSH_INFO = {"E1", "E2", "E22", "E23", "E24", "E25", "E26"}

EVENT_MEANINGS = {
    "HDFS": {
        "E1": "a datanode served a block to a client", "E2": "a datanode started a block transfer",
        "E3": "a datanode failed while serving a block", "E4": "the namenode asked a datanode to delete a block",
        "E5": "the namenode asked for a block to be replicated", "E6": "the block map recorded a stored block",
        "E7": "the namenode allocated a new block", "E8": "a deleted block was queued for invalidation",
        "E9": "a datanode deleted a block file", "E10": "a packet responder finished a block",
        "E11": "a datanode received a whole block", "E12": "a datanode received a block from a peer",
        "E13": "a datanode began receiving a block", "E14": "the block scanner verified a block",
    },
    "Apache": {
        "E1": "a worker child was found in the scoreboard", "E2": "the worker environment initialised",
        "E3": "a mod_jk child is in an error state", "E4": "a directory listing was refused to a client",
        "E5": "a worker child is missing from the scoreboard", "E6": "a mod_jk child initialised",
    },
    "OpenSSH": {
        "E1": "a password login succeeded", "E2": "a client closed the connection before login",
        "E3": "a client connected without identifying itself", "E4": "too many failed logins as admin",
        "E5": "too many failed logins as root", "E6": "a client gave up after failed authentication",
        "E7": "a client ran out of authentication methods", "E8": "a login was tried for an unknown user",
        "E9": "a password login failed", "E10": "a password login failed for an unknown user",
        "E11": "a write failed because the peer reset the connection",
        "E12": "a login request named an unknown user", "E13": "a login was tried for an unknown user",
        "E14": "repeated failed root password logins", "E15": "an authentication failure was counted",
        "E16": "several authentication failures were counted", "E17": "several root authentication failures",
        "E18": "the retry limit was exceeded", "E19": "an authentication failure from a remote host",
        "E20": "an authentication failure for a named user", "E21": "a password check named an unknown user",
        "E22": "a session closed", "E23": "a session opened", "E24": "a client disconnected",
        "E25": "a client disconnected at the user's request", "E26": "a client disconnected",
        "E27": "a host's reverse DNS did not match: a possible break-in attempt",
    },
}


def line_facts(system: str, row: dict[str, str]) -> tuple[str, str]:
    """(component, severity) of one structured line."""
    if system == "HDFS":
        return row["Component"], HDFS_SEVERITY[row["Level"]]
    if system == "Apache":
        return APACHE_COMPONENT[row["EventId"]], APACHE_SEVERITY[row["Level"]]
    event = row["EventId"]
    severity = "error" if event in OPENSSH_ERRORS else "info" if event in OPENSSH_INFO else "warning"
    return "sshd", severity


def root_cause(system: str, window: list[dict[str, str]]) -> dict[str, str]:
    facts = [line_facts(system, row) for row in window]
    worst = max(SEVERITY_RANK[severity] for _, severity in facts)
    counts = Counter(row["EventId"] for row in window)
    candidates = [i for i, (_, severity) in enumerate(facts) if SEVERITY_RANK[severity] == worst]
    key = max(candidates, key=lambda i: (counts[window[i]["EventId"]], -i))
    event_id = window[key]["EventId"]
    count = counts[event_id]
    meaning = EVENT_MEANINGS[system][event_id]
    return {"component": facts[key][0], "event": window[key]["EventTemplate"], "severity": facts[key][1],
            "summary": f"{count} of {len(window)} lines: {meaning}"}


def windows_of(system: str, rows: list[dict[str, str]], size: int) -> list[dict[str, str]]:
    examples = []
    for start in range(0, len(rows) - size + 1, size):
        window = rows[start : start + size]
        answer = root_cause(system, window)
        examples.append({"prompt": "\n".join(raw_line(system, row) for row in window),
                         "completion": json.dumps(answer, ensure_ascii=False), "system": system,
                         "key": f"{system}:{answer['event']}"})
    return examples


def sample_round_robin(examples: list[dict[str, str]], n: int, rng: random.Random) -> list[dict[str, str]]:
    by_key: dict[str, list[dict[str, str]]] = defaultdict(list)
    for example in examples:
        by_key[example["key"]].append(example)
    queues = [by_key[k] for k in sorted(by_key)]
    for queue in queues:
        rng.shuffle(queue)
    picked: list[dict[str, str]] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked


def build(loghub: Path, window: int, per_system: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    examples = []
    for system in SYSTEMS:
        with (loghub / f"{system}_2k.log_structured.csv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        examples += [{k: v for k, v in ex.items() if k != "key"}
                     for ex in sample_round_robin(windows_of(system, rows, window), per_system, rng)]
    rng.shuffle(examples)
    return examples


def catalog_schema(loghub: Path, schema: dict, window: int) -> dict:
    """`schema` with `event` held to the templates loghub catalogues for the three systems and `summary` to a count
    and one of EVENT_MEANINGS: the contract of a team that keeps a template catalogue (what a log parser such as
    Drain writes). A window whose key event is not in the catalogue cannot be answered right under it."""
    templates: set[str] = set()
    for system in SYSTEMS:
        with (loghub / f"{system}_2k.log_templates.csv").open(encoding="utf-8", newline="") as handle:
            templates |= {row["EventTemplate"] for row in csv.DictReader(handle)}
    meanings = sorted({meaning for by_event in EVENT_MEANINGS.values() for meaning in by_event.values()})
    catalog = json.loads(json.dumps(schema))
    catalog["title"] = schema.get("title", "") + ", events and meanings from the catalogue"
    catalog["properties"]["event"] = {"enum": sorted(templates)}
    catalog["properties"]["summary"] = {
        "type": "string",
        "pattern": f"^[1-{window}] of {window} lines: ({'|'.join(re.escape(m) for m in meanings)})$"}
    return catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loghub", type=Path, default=HERE.parents[1] / ".." / "shared" / "datasets" / "loghub")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--per-system", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "data.jsonl")
    parser.add_argument("--catalog-out", type=Path, help="default: schema-catalog.json beside --out")
    args = parser.parse_args()
    args.catalog_out = args.catalog_out or args.out.parent / "schema-catalog.json"
    write_jsonl(args.out, build(args.loghub, args.window, args.per_system, args.seed))
    schema = json.loads((HERE / "schema.json").read_text(encoding="utf-8"))
    args.catalog_out.write_text(json.dumps(catalog_schema(args.loghub, schema, args.window), indent=2,
                                           ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.catalog_out}")


if __name__ == "__main__":
    main()
