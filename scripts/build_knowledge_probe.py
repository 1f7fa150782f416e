"""Build resources/knowledge_probe.jsonl from MMLU's dev and val splits (run by developers, never at run time).

Source: ../shared/datasets/mmlu-dev-val, the dev (285) and val (1,542) CSVs of the 57 MMLU subjects as published
at github.com/hendrycks/test (MIT, Hendrycks et al., ICLR 2021; see resources/NOTICE). Each CSV row is
`question,A,B,C,D,answer` without a header. The test split (14k questions) is left out: it is the one reported
in papers, and a probe of forgetting needs power, not a leaderboard number.

Output: one JSON object a line, {"subject", "question", "choices": [4], "answer": "A".."D"}, subjects in
alphabetical order and, within a subject, dev rows then val rows in file order; non-ASCII characters are
written as JSON escapes, so no line separator hides inside a line. The evaluation samples it
round-robin over subjects (evaluation.knowledge_probe_size), so its first 57 questions are the first dev question
of each subject: the probe shipped before this file grew.

    python scripts/build_knowledge_probe.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "mmlu-dev-val"
OUT = REPO / "src" / "specialist" / "resources" / "knowledge_probe.jsonl"


def read_subject(subject: str) -> list[dict]:
    questions = []
    for split in ("dev", "val"):
        path = SOURCE / split / f"{subject}_{split}.csv"
        with path.open(encoding="utf-8", newline="") as handle:
            for line, row in enumerate(csv.reader(handle), start=1):
                if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                    raise SystemExit(f"{path}:{line}: expected question,A,B,C,D,answer; got {row!r}")
                questions.append({"subject": subject, "question": row[0], "choices": row[1:5], "answer": row[5]})
    return questions


def main() -> None:
    subjects = sorted(p.name.removesuffix("_dev.csv") for p in (SOURCE / "dev").glob("*_dev.csv"))
    questions = [q for subject in subjects for q in read_subject(subject)]
    OUT.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    print(f"{len(questions)} questions from {len(subjects)} subjects written to {OUT}")


if __name__ == "__main__":
    main()
