"""Build the bundled forgetting references from ../shared/datasets (run by developers, never at run time).

- resources/general_text.txt: 300 Wikipedia sentences (seeded sample) for perplexity before/after.
- resources/knowledge_probe.jsonl is built by scripts/build_knowledge_probe.py (all MMLU dev and val questions).
"""

from __future__ import annotations

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
    print(f"{len(sample)} sentences written to {OUT}")


if __name__ == "__main__":
    main()
