"""Build the bundled forgetting references from ../shared/datasets (run by developers, never at run time).

- resources/general_text.txt: 300 Wikipedia sentences (seeded sample) for perplexity before/after.
- resources/knowledge_probe.jsonl: one MMLU dev question per subject (57) for a general-knowledge probe.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
OUT = REPO / "src" / "specialist" / "resources"


def main() -> None:
    rng = random.Random(0)
    sentences = [s.strip() for s in (SHARED / "general-text" / "wiki_sentences.txt").read_text().splitlines()]
    sample = rng.sample([s for s in sentences if len(s.split()) >= 8], 300)
    (OUT / "general_text.txt").write_text("\n".join(sample) + "\n", encoding="utf-8")
    questions = []
    for path in sorted((SHARED / "mmlu-dev-val" / "dev").glob("*_dev.csv")):
        with path.open(encoding="utf-8", newline="") as handle:
            question, a, b, c, d, answer = next(csv.reader(handle))
        questions.append({"subject": path.stem.removesuffix("_dev"), "question": question,
                          "choices": [a, b, c, d], "answer": answer})
    (OUT / "knowledge_probe.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    print(f"{len(sample)} sentences, {len(questions)} questions written to {OUT}")


if __name__ == "__main__":
    main()
