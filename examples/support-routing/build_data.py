"""Build data.jsonl (customer message -> {"route": intent or "escalate"}) from banking77 and clinc150.

Run from the repository root:  python examples/support-routing/build_data.py [--shared ../shared/datasets]

In-scope rows are banking77 messages from eight intents a support team might automate; out-of-scope rows are
clinc150's `oos` queries (requests no intent covers), labelled `escalate`: hand them to a human. The config
reports accuracy on in-scope rows and recall on `escalate` apart, so a router that never escalates looks bad.
A fixed-seed sample of --per-intent messages per intent and --escalate oos queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "pending_transfer", "request_refund",
           "change_pin", "top_up_reverted", "direct_debit_payment_not_recognised")


def build(shared: Path, per_intent: int, escalate: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    with (shared / "banking77" / "train.csv").open(encoding="utf-8", newline="") as handle:
        by_intent: dict[str, list[str]] = {}
        for row in csv.DictReader(handle):
            if row["category"] in INTENTS:
                by_intent.setdefault(row["category"], []).append(row["text"])
    rows = []
    for intent in INTENTS:
        texts = sorted(set(by_intent[intent]))
        rng.shuffle(texts)
        rows += [{"text": t, "label": intent} for t in texts[:per_intent]]
    clinc = json.loads((shared / "clinc150" / "data_full.json").read_text(encoding="utf-8"))
    oos = sorted({text for part in ("oos_train", "oos_val", "oos_test") for text, _ in clinc[part]})
    rng.shuffle(oos)
    rows += [{"text": t, "label": "escalate"} for t in oos[:escalate]]
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=HERE.parents[1].parent / "shared" / "datasets")
    parser.add_argument("--per-intent", type=int, default=70)
    parser.add_argument("--escalate", type=int, default=160)
    parser.add_argument("--out", type=Path, default=HERE / "data.jsonl")
    args = parser.parse_args()
    rows = build(args.shared, args.per_intent, args.escalate)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
