"""Build data.jsonl (bug report -> {"priority": ...}) from the GitBugs Hadoop reports.

Run from the repository root:  python examples/bug-triage/build_data.py [--source ../shared/datasets/gitbugs-hadoop]

Each row is labelled data for `prepare`: the report's `summary` and `description` as their own columns (spaces
folded; the description kept whole up to --chars characters, a bound on the file's size, not the model's
window: the config joins the two with `data.prompt_template` and `over_length: truncate` shortens a long report's
input to fit, keeping the instruction and the answer), `label` its priority (Blocker, Critical, Major, Minor,
Trivial). The classes are very unbalanced (Major is 69% of the 2,503
reports); the config caps and upsamples the training split and the report shows macro-F1 and the confusion
matrix. A fixed-seed sample of --rows reports keeps every Blocker, Critical and Trivial report first.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRIORITIES = ("Blocker", "Critical", "Major", "Minor", "Trivial")


def clip(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " ..."


def build(source: Path, rows: int, chars: int, seed: int = 0) -> list[dict[str, str]]:
    with (source / "hadoop_bugs.csv").open(encoding="utf-8", newline="") as handle:
        reports = [r for r in csv.DictReader(handle) if r["Priority"] in PRIORITIES and r["Summary"].strip()]
    rng = random.Random(seed)
    rare = [r for r in reports if r["Priority"] in ("Blocker", "Critical", "Trivial")]
    common = [r for r in reports if r["Priority"] in ("Major", "Minor")]
    rng.shuffle(common)
    picked = rare + common[: max(0, rows - len(rare))]
    rng.shuffle(picked)
    return [{"summary": " ".join(r["Summary"].split()), "description": clip(r["Description"], chars),
             "label": r["Priority"], "issue": r["Issue id"]} for r in picked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=HERE.parents[1].parent / "shared" / "datasets" / "gitbugs-hadoop")
    parser.add_argument("--rows", type=int, default=700)
    parser.add_argument("--chars", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=HERE / "data.jsonl")
    args = parser.parse_args()
    rows = build(args.source, args.rows, args.chars)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
