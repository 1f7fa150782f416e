"""`specialist drift RUN_DIR DB`: is live traffic still what the model was trained on, and is it still healthy?

Four signals, each against a threshold (exit 1 when any is crossed, so it can run on a schedule):

- input length: population stability index (PSI) of prompt token counts, traffic against the training rows,
  over ten bins cut at the training deciles (PSI > 0.2 is the usual "significant shift");
- vocabulary: Jensen-Shannon distance between the word distributions of training and traffic prompts;
- novelty: the share of traffic prompts whose best MinHash similarity (word 3-shingles) to any training prompt
  is below `novel_similarity`, i.e. inputs unlike anything the model saw;
- output health: the format pass rate in equal time windows; drift when the last window falls more than
  `pass_rate_drop` below the first.

The vocabulary and novelty signals need the prompts, which the server stores only with `--log-prompts`; without
them those two are reported as not measured. Writes drift.json and drift.png beside the request log.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon

from specialist.data.dedupe import MinHasher
from specialist.deploy.records import read_requests
from specialist.errors import ConfigError
from specialist.run_folder import RunFolder

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class DriftThresholds:
    psi: float = 0.2
    js_distance: float = 0.3
    novel_share: float = 0.25
    novel_similarity: float = 0.2
    pass_rate_drop: float = 0.1
    windows: int = 4


def population_stability_index(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI over bins cut at the reference's quantiles; a small floor keeps empty bins finite."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1) / len(current)
    ref, cur = np.maximum(ref, 1e-4), np.maximum(cur, 1e-4)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def js_distance(a: Counter, b: Counter) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two word-count distributions, by scipy (the square root
    of the divergence, as scipy and the literature define the distance)."""
    words = sorted(set(a) | set(b))
    p = np.array([a[w] for w in words], dtype=float)
    q = np.array([b[w] for w in words], dtype=float)
    # scipy normalises p and q itself; clamp because rounding can leave 1 + 1e-16 for disjoint vocabularies
    return float(min(1.0, jensenshannon(p, q, base=2)))


def best_similarity(traffic: list[str], training: list[str], num_perm: int = 64) -> np.ndarray:
    """For each traffic text, the highest estimated Jaccard similarity to any training text."""
    hasher = MinHasher(num_perm=num_perm, shingle_words=3)
    reference = hasher.signatures(training)
    probes = hasher.signatures(traffic)
    best = np.zeros(len(traffic))
    for start in range(0, len(traffic), 64):
        chunk = probes[start : start + 64]
        agreement = (chunk[:, None, :] == reference[None, :, :]).mean(axis=2)
        best[start : start + 64] = agreement.max(axis=1)
    return best


def pass_rate_windows(rows: list[dict[str, Any]], windows: int) -> list[dict[str, Any]]:
    checked = [r for r in rows if r["format_ok"] is not None]
    if not checked:
        return []
    parts = np.array_split(np.arange(len(checked)), min(windows, len(checked)))
    return [{"from": checked[int(p[0])]["ts"], "to": checked[int(p[-1])]["ts"], "requests": len(p),
             "pass_rate": sum(checked[int(i)]["format_ok"] for i in p) / len(p)} for p in parts if len(p)]


def detect_drift(run_dir: Path, db: Path, tokenizer, template, thresholds: DriftThresholds = DriftThresholds(),
                 arm: str | None = None) -> dict[str, Any]:
    rows = [r for r in read_requests(db) if arm is None or r["arm"] == arm]
    if not rows:
        raise ConfigError(f"no requests{' for arm ' + repr(arm) if arm else ''} in {db}",
                          hint="serve some traffic first, or name an arm that received it")
    train = [ex.prompt for ex in RunFolder(Path(run_dir)).split().train]
    train_lengths = np.array([len(template.encode_prompt(p, tokenizer)) for p in train])
    traffic_lengths = np.array([r["tokens_in"] for r in rows])
    signals: dict[str, Any] = {}
    psi = population_stability_index(train_lengths, traffic_lengths)
    signals["input_length_psi"] = {"value": psi, "threshold": thresholds.psi, "drift": psi > thresholds.psi,
                                   "train_median": float(np.median(train_lengths)),
                                   "traffic_median": float(np.median(traffic_lengths))}
    prompts = [r["prompt"] for r in rows if r["prompt"]]
    if prompts:
        js = js_distance(_words(train), _words(prompts))
        signals["vocabulary_js_distance"] = {"value": js, "threshold": thresholds.js_distance,
                                             "drift": js > thresholds.js_distance}
        best = best_similarity(prompts, train)
        share = float((best < thresholds.novel_similarity).mean())
        signals["novel_input_share"] = {"value": share, "threshold": thresholds.novel_share,
                                        "drift": share > thresholds.novel_share,
                                        "similarity_below": thresholds.novel_similarity}
    else:
        note = "not measured: the server did not store prompts (start it with --log-prompts)"
        signals["vocabulary_js_distance"] = {"value": None, "drift": False, "note": note}
        signals["novel_input_share"] = {"value": None, "drift": False, "note": note}
    windows = pass_rate_windows(rows, thresholds.windows)
    drop = windows[0]["pass_rate"] - windows[-1]["pass_rate"] if len(windows) > 1 else 0.0
    signals["format_pass_rate_trend"] = {"value": drop, "threshold": thresholds.pass_rate_drop,
                                         "drift": drop > thresholds.pass_rate_drop, "windows": windows}
    return {"run": str(run_dir), "db": str(db), "arm": arm, "requests": len(rows), "signals": signals,
            "drift": any(s["drift"] for s in signals.values()),
            "_lengths": (train_lengths, traffic_lengths)}


def _words(texts: list[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(_WORD.findall(text.casefold()))
    return counts


def write_drift_outputs(result: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_lengths, traffic_lengths = result.pop("_lengths")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.histogram_bin_edges(np.concatenate([train_lengths, traffic_lengths]), bins=30)
    left.hist(train_lengths, bins=bins, alpha=0.6, density=True, label="training prompts")
    left.hist(traffic_lengths, bins=bins, alpha=0.6, density=True, label="traffic")
    psi = result["signals"]["input_length_psi"]["value"]
    left.set(title=f"input length (tokens), PSI {psi:.3f}", xlabel="tokens", ylabel="density")
    left.legend()
    windows = result["signals"]["format_pass_rate_trend"]["windows"]
    if windows:
        right.plot(range(1, len(windows) + 1), [100 * w["pass_rate"] for w in windows], marker="o")
        right.set(ylim=(0, 105), xticks=range(1, len(windows) + 1))
    right.set(title="format pass rate by time window", xlabel="window (oldest first)", ylabel="% passed")
    figure.tight_layout()
    png, summary = folder / "drift.png", folder / "drift.json"
    figure.savefig(png, dpi=100)
    plt.close(figure)
    summary.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return summary, png
