"""Build data.jsonl (raw log line -> JSON) from the loghub samples.

Run from the repository root:  python examples/log-to-json/build_data.py [--loghub ../shared/datasets/loghub]

Each example's prompt is one raw log line as the system wrote it (rebuilt from loghub's structured CSV); the
completion is compact JSON with the line's level, component and event template (variables written `<*>`).
Fields a system's format does not carry are null: Apache lines name no component, OpenSSH lines no level.
Lines are sampled round-robin over event templates so rare events are represented, with a fixed seed; each row
names its template (`event`), the group the demo splits by, so that the test set measures parsing of templates
the model never saw rather than recall of seen ones.
preferences.jsonl (for method.kind=dpo) pairs each line's JSON with a rejected answer whose template is the raw
message, variables left in.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMS = ("HDFS", "Apache", "OpenSSH")


def raw_line(system: str, row: dict[str, str]) -> str:
    if system == "HDFS":
        return f"{row['Date'].zfill(6)} {row['Time'].zfill(6)} {row['Pid']} {row['Level']} {row['Component']}: {row['Content']}"
    if system == "Apache":
        return f"[{row['Time']}] [{row['Level']}] {row['Content']}"
    return f"{row['Date']} {row['Day']} {row['Time']} {row['Component']} sshd[{row['Pid']}]: {row['Content']}"


def structured(system: str, row: dict[str, str]) -> dict[str, str | None]:
    level = row.get("Level") if system != "OpenSSH" else None
    component = {"HDFS": row.get("Component"), "Apache": None, "OpenSSH": "sshd"}[system]
    return {"level": level, "component": component, "template": row["EventTemplate"]}


def sample_round_robin(rows: list[dict[str, str]], n: int, rng: random.Random) -> list[dict[str, str]]:
    by_template: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_template[row["EventTemplate"]].append(row)
    for group in by_template.values():
        rng.shuffle(group)
    picked: list[dict[str, str]] = []
    queues = sorted(by_template.values(), key=lambda g: g[0]["EventTemplate"])
    while len(picked) < n and any(queues):
        for group in queues:
            if group and len(picked) < n:
                picked.append(group.pop())
    return picked


def build(loghub: Path, per_system: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    examples = []
    for system in SYSTEMS:
        with (loghub / f"{system}_2k.log_structured.csv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in sample_round_robin(rows, per_system, rng):
            examples.append(
                {
                    "prompt": raw_line(system, row),
                    "completion": json.dumps(structured(system, row), ensure_ascii=False),
                    "system": system,
                    # the event template's id: split_by grouped on it keeps every test template out of training
                    "event": f"{system}-{row['EventId']}",
                }
            )
    rng.shuffle(examples)
    return examples


def preference_rows(examples: list[dict[str, str]]) -> list[dict[str, str]]:
    """prompt/chosen/rejected: the rejected answer copies the raw message instead of abstracting it to a template,
    the mistake a half-trained model makes most."""
    rows = []
    for example in examples:
        chosen = json.loads(example["completion"])
        message = example["prompt"].split(": ", 1)[-1] if example["system"] != "Apache" else example["prompt"].split("] ", 2)[-1]
        if message == chosen["template"]:
            continue  # a line without variables has no wrong template to prefer against
        rejected = {**chosen, "template": message}
        rows.append({"prompt": example["prompt"], "chosen": example["completion"],
                     "rejected": json.dumps(rejected, ensure_ascii=False)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loghub", type=Path, default=HERE.parents[1] / ".." / "shared" / "datasets" / "loghub")
    parser.add_argument("--per-system", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "data.jsonl")
    args = parser.parse_args()
    examples = build(args.loghub, args.per_system, args.seed)
    write_jsonl(args.out, examples)
    write_jsonl(args.out.with_name("preferences.jsonl"), preference_rows(examples))


if __name__ == "__main__":
    main()
