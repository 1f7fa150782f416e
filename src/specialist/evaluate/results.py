"""What an evaluation returns: typed results the CLI, the reports and the gates read by attribute.

`EvalReport` (base / few-shot / tuned generations scored on held-out rows) and `DomainReport` (continued
pretraining: perplexities and questions) share the small surface every reader needs: `run_dir`, `kind`, `n_eval`,
`gates`, `passed`, `figures()` (what a gate may name) and `to_json()` (eval.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specialist.core.gates import TUNED_ARM_NAMES, GateResult
from specialist.core.stats import Interval, PairedComparison


def _plain(value: Any) -> Any:
    """JSON-ready form of a result field: intervals and comparisons as their dicts, the rest as it is."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ArmPair:
    """Two arms compared on the same rows: `arm` minus `other` (tuned against a baseline, say)."""

    arm: str
    other: str

    @property
    def key(self) -> str:
        """The pair's key in eval.json's "comparisons": `tuned_vs_base`."""
        return f"{self.arm}_vs_{self.other}"


@dataclass(frozen=True)
class VersusBest:
    """A tuned arm against the best baseline on one metric: both values, and `tuned` minus `baseline` on the same
    rows (None for a figure that has no paired test, such as a refusal direction)."""

    tuned: str  # the tuned arm: tuned or tuned+constrained
    metric: str
    baseline: str  # the best baseline arm on this metric
    tuned_value: float
    baseline_value: float
    comparison: PairedComparison | None


@dataclass
class ArmResult:
    """One arm's scores on the held-out rows, with what it costs."""

    name: str
    scores: dict[str, Interval]
    length: dict[str, float]
    field_accuracy_per_key: dict[str, float] | None = None
    labels: dict[str, Any] | None = None  # label_report: accuracy, macro_f1, per_label, confusion, escalation
    refusals: dict[str, Any] | None = None  # refusal_report: both directions
    generation_seconds: float = 0.0
    weights_bytes: int | None = None
    # evaluate.likelihood.calibration_report, for an arm with class probabilities (a classifier, likelihood scoring)
    calibration: dict[str, Any] | None = None

    def headline(self) -> dict[str, float]:
        """Mean scores, with macro-F1, the two refusal directions and the calibration error (ece) where the
        evaluation has them."""
        values = {metric: interval.mean for metric, interval in self.scores.items()}
        if self.labels is not None:
            values["macro_f1"] = self.labels["macro_f1"]
        if self.calibration is not None:
            values["ece"] = self.calibration["ece"]
        for name, value in (self.refusals or {}).items():
            if name.startswith("refused_") and value is not None:
                values[name] = value
        return values

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"scores": _plain(self.scores), "length": self.length,
                                "generation_seconds": round(self.generation_seconds, 2),
                                "weights_bytes": self.weights_bytes}
        for key in ("field_accuracy_per_key", "labels", "refusals", "calibration"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data


@dataclass
class Overfitting:
    train_rows: int
    memorisation_rate: float
    train_scores: dict[str, float] = field(default_factory=dict)
    test_scores: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> dict[str, float]:
        return {m: self.train_scores[m] - self.test_scores[m] for m in self.train_scores if m != "length"}

    def to_json(self) -> dict[str, Any]:
        return {"train_rows": self.train_rows, "memorisation_rate": self.memorisation_rate,
                "train_scores": self.train_scores, "test_scores": self.test_scores, "gap": self.gap}


@dataclass
class EvalReport:
    """Every arm on the same held-out rows with the same decoding; comparisons, forgetting, overfitting, gates."""

    run_dir: Path
    n_eval: int
    max_new_tokens: int
    decoding: dict[str, Any]
    arms: dict[str, ArmResult]
    comparisons: dict[ArmPair, dict[str, PairedComparison]] = field(default_factory=dict)
    forgetting: Any = None  # the forgetting report (evaluate.forgetting), when measured
    overfitting: Overfitting | None = None
    gates: list[GateResult] = field(default_factory=list)
    # {metric: the baseline arm (base, few_shot, nearest, majority, linear, retrieval) scoring highest on it}
    best_baseline: dict[str, str] = field(default_factory=dict)
    kind: str = "generation"

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def comparison(self, arm: str, other: str, metric: str) -> PairedComparison | None:
        return self.comparisons.get(ArmPair(arm, other), {}).get(metric)

    def versus_best_baseline(self) -> list[VersusBest]:
        """Each tuned arm (tuned, then tuned+constrained where scored) against the best baseline, per metric: the
        constrained arm beside tuned on each metric, so a reader sees what the schema adds. A tuned arm without
        the metric has no entry for it."""
        found = []
        for metric, baseline in self.best_baseline.items():
            for tuned in self.tuned_arms():
                value = self.arms[tuned].headline().get(metric)
                if value is not None:
                    found.append(VersusBest(tuned, metric, baseline, value, self.arms[baseline].headline()[metric],
                                            self.comparison(tuned, baseline, metric)))
        return found

    def tuned_arms(self) -> list[str]:
        """The tuned arms this evaluation scored, in TUNED_ARM_NAMES order."""
        return [name for name in TUNED_ARM_NAMES if name in self.arms]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "run": str(self.run_dir), "n_eval": self.n_eval,
                "max_new_tokens": self.max_new_tokens, "decoding": self.decoding,
                "arms": {name: arm.to_json() for name, arm in self.arms.items()},
                "comparisons": {pair.key: _plain(per_metric) for pair, per_metric in self.comparisons.items()},
                "best_baseline": self._best_baseline_json(),
                "forgetting": _plain(self.forgetting),
                "overfitting": _plain(self.overfitting), "gates": _plain(self.gates)}

    def _best_baseline_json(self) -> dict[str, dict[str, Any]]:
        """eval.json's "best_baseline", per metric: `arm` (the baseline), `baseline` (its value), and per tuned arm
        its value under its own name and its comparison under "comparison" for tuned (the key readers had before
        the constrained arm was measured too), "tuned+constrained_comparison" for the constrained arm."""
        found: dict[str, dict[str, Any]] = {}
        for entry in self.versus_best_baseline():
            per_metric = found.setdefault(entry.metric, {"arm": entry.baseline, "baseline": entry.baseline_value})
            per_metric[entry.tuned] = entry.tuned_value
            per_metric[comparison_key(entry.tuned)] = _plain(entry.comparison)
        return found


def comparison_key(tuned: str) -> str:
    """Where eval.json's best_baseline keeps a tuned arm's paired comparison: "comparison" for tuned (as before),
    "<arm>_comparison" for another tuned arm."""
    return "comparison" if tuned == "tuned" else f"{tuned}_comparison"


@dataclass
class DomainArm:
    doc_perplexity: float
    general_perplexity: float
    question_accuracy: Interval | None = None

    def to_json(self) -> dict[str, Any]:
        return {"doc_perplexity": self.doc_perplexity, "general_perplexity": self.general_perplexity,
                "question_accuracy": _plain(self.question_accuracy)}


@dataclass
class DomainReport:
    """Continued pretraining: perplexity on held-out documents and on general text, questions, base vs tuned."""

    run_dir: Path
    n_eval: int
    general_texts: int
    general_corpus: str
    questions: int
    arms: dict[str, DomainArm]
    doc_ppl_change: float
    general_ppl_change: float
    question_comparison: PairedComparison | None = None
    question_subsets: dict[str, dict[str, Any]] = field(default_factory=dict)  # trained / held_out documents
    gates: list[GateResult] = field(default_factory=list)
    kind: str = "domain_adaptation"

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "run": str(self.run_dir), "n_eval": self.n_eval,
                "general_texts": self.general_texts, "general_corpus": self.general_corpus,
                "questions": self.questions, "arms": {n: a.to_json() for n, a in self.arms.items()},
                "doc_ppl_change": self.doc_ppl_change, "general_ppl_change": self.general_ppl_change,
                "question_comparison": _plain(self.question_comparison),
                "question_subsets": self.question_subsets, "gates": _plain(self.gates)}
