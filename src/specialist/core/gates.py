"""Quality gates: thresholds on evaluation results that decide an exit code, so `specialist eval` can gate CI.

Forms (the arm defaults to `tuned`):
    json_valid >= 0.95                               a metric of the tuned arm, judged on its value
    json_valid >= 0.95 confidently                   judged on the interval: its lower bound must clear 0.95
    base.exact_match <= 0.2                          a metric of a named arm
    tuned - base >= 0.2 on exact_match               the difference between two arms on a metric
    tuned - base > 0 on exact_match confidently      the paired interval of that difference excludes 0
    tuned - best_baseline >= 0 on exact_match        against the best of the baseline arms on that metric (base,
                                                     few_shot, nearest, majority, linear, retrieval); the same
                                                     for tuned+constrained - best_baseline
    overfitting.train_test_gap <= 0.1                any other figure the evaluation reports, by its dotted name

`confidently` judges the bound on the far side of the threshold: the lower bound for >= and >, the upper bound
for <= and <. A gate on 20 rows then passes only if 20 rows can show it, where the value alone would pass on
luck: 60 valid rows of 60 do not show `json_valid >= 0.95 confidently` (Wilson's lower bound is 0.940); 73 of 73
do. `evaluation.gates_confidence: interval` judges every gate that way; gates on figures without an interval
(a train-test gap, say) are then judged on their value and say so. `==` gates are always judged on the value.

A gate reads a `Figures`: figures by dotted name and paired differences by (arm_a, arm_b, metric). A difference
gate uses the paired interval (Newcombe's for 0/1 scores) where the evaluation computed one; with `confidently`
it must have one.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from specialist.core.stats import Interval
from specialist.errors import ConfigError

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
CONFIDENCE_MODES = ("point", "interval")
_NAME = r"[A-Za-z_][\w:.+-]*"  # + for the tuned+constrained arm
_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)"
_CONFIDENTLY = r"(?:\s+(confidently))?"
_DIFFERENCE = re.compile(
    rf"^\s*({_NAME})\s+-\s+({_NAME})\s*(>=|<=|==|>|<)\s*({_NUMBER})\s+on\s+({_NAME}){_CONFIDENTLY}\s*$")
_SINGLE = re.compile(rf"^\s*({_NAME})\s*(>=|<=|==|>|<)\s*({_NUMBER}){_CONFIDENTLY}\s*$")


@dataclass(frozen=True)
class Figure:
    """A number a gate can read, with its interval where it has one (`Figure(value, low, high)`).

    `missing` says why a statistic that normally has an interval has none here (one row of a mean): a
    `confidently` gate on it then fails instead of being refused as a usage error. Build figures of intervals
    with `Figure.of(interval)`, which sets it."""

    value: float
    low: float | None = None
    high: float | None = None
    confidence: float = 0.95
    missing: str | None = None

    @classmethod
    def of(cls, interval: Interval | Mapping[str, object]) -> Figure:
        """From a stats.Interval or its as_dict() (eval.json): mean, low, high, confidence, n."""
        if not isinstance(interval, Interval):
            data: Mapping[str, Any] = interval
            interval = Interval(float(data["mean"]), _maybe_float(data.get("low")), _maybe_float(data.get("high")),
                                str(data.get("method", "")), int(data.get("n", 0)),
                                float(data.get("confidence", 0.95)))
        missing = None if interval.bounded else f"no interval from {interval.n} row(s)"
        return cls(interval.mean, interval.low, interval.high, interval.confidence, missing)

    @property
    def has_interval(self) -> bool:
        return (self.low is not None and self.high is not None) or self.missing is not None

    def negated(self) -> Figure:
        return Figure(-self.value, None if self.high is None else -self.high,
                      None if self.low is None else -self.low, self.confidence, self.missing)


@dataclass(frozen=True)
class Figures:
    """What gates may read: figures by dotted name ("tuned.json_valid", "forgetting.ppl_increase") and paired
    differences keyed (arm_a, arm_b, metric), each holding arm_a minus arm_b on the same rows (a Figure or the
    stats.Interval of a PairedComparison's difference; the reverse order is found too)."""

    named: Mapping[str, Figure | float] = field(default_factory=dict)
    differences: Mapping[tuple[str, str, str], Figure | Interval] = field(default_factory=dict)


@dataclass(frozen=True)
class GateResult:
    gate: str
    value: float
    passed: bool
    low: float | None = None
    high: float | None = None
    on_bound: bool = False  # judged on the interval's far bound rather than the value
    confidence: float | None = None
    reason: str = ""  # why it passed or failed, in words

    def describe(self) -> str:
        """e.g. `pass  json_valid >= 0.95 confidently  (value 1.000, 95% interval [0.940, 1.000]: lower bound
        clears 0.95)`."""
        parts = [f"value {self.value:.3f}"]
        if self.confidence is not None:
            parts.append(f"{_percent(self.confidence)} interval {Interval(self.value, self.low, self.high).format_bounds()}")
        return f"{'pass' if self.passed else 'FAIL'}  {self.gate}  ({', '.join(parts)}: {self.reason})"

    def as_dict(self) -> dict[str, object]:
        return {"gate": self.gate, "value": self.value, "passed": self.passed, "low": self.low, "high": self.high,
                "on_bound": self.on_bound, "confidence": self.confidence, "reason": self.reason}


@dataclass(frozen=True)
class Gate:
    text: str
    left: str  # a dotted figure name, or an arm when `minus` is set
    op: str
    threshold: float
    minus: str | None = None  # the arm subtracted
    metric: str | None = None  # the metric of a difference gate
    confidently: bool = False

    def figure(self, figures: Figures) -> Figure:
        """The figure this gate reads; a difference is the paired one when the evaluation computed it."""
        if self.minus is None:
            return _lookup(figures.named, self.left, self.text)
        paired = _paired(figures.differences, self.left, self.minus, self.metric)
        if paired is not None:
            return paired
        if self.confidently:
            raise ConfigError(
                f"gate {self.text!r} asks for 'confidently', but this evaluation computed no paired interval for "
                f"{self.left} - {self.minus} on {self.metric}",
                hint="paired intervals available: " + (", ".join(
                    f"{a} - {b} on {m}" for a, b, m in sorted(figures.differences)) or "none"))
        left = _lookup(figures.named, f"{self.left}.{self.metric}", self.text)
        right = _lookup(figures.named, f"{self.minus}.{self.metric}", self.text)
        return Figure(left.value - right.value)

    def check(self, figures: Figures, mode: str = "point") -> GateResult:
        """Judge this gate; `mode` "interval" judges it as if it ended in `confidently`."""
        if mode not in CONFIDENCE_MODES:
            raise ConfigError(f"gates_confidence must be one of {CONFIDENCE_MODES}, got {mode!r}")
        figure = self.figure(figures)
        if self.confidently and not figure.has_interval:
            raise ConfigError(
                f"gate {self.text!r} asks for 'confidently', but {self._subject()} has no interval",
                hint="figures with intervals: " + (", ".join(_with_intervals(figures)) or "none")
                + "; drop 'confidently' to judge this one on its value")
        on_bound = figure.has_interval and self.op != "==" and (self.confidently or mode == "interval")
        passed, reason = self._judge_bound(figure) if on_bound else self._judge_value(figure, mode)
        return GateResult(self.text, figure.value, passed, figure.low, figure.high, on_bound,
                          figure.confidence if figure.has_interval else None, reason)

    def _judge_value(self, figure: Figure, mode: str) -> tuple[bool, str]:
        passed = OPERATORS[self.op](figure.value, self.threshold)
        verdict = f"value {'clears' if passed else 'does not clear'} {self.threshold:g}"
        if mode == "interval" and not figure.has_interval:
            verdict += " (no interval for this figure: judged on its value)"
        return passed, verdict

    def _judge_bound(self, figure: Figure) -> tuple[bool, str]:
        side, bound = ("lower", figure.low) if self.op in (">=", ">") else ("upper", figure.high)
        if bound is None:
            return False, f"{figure.missing or 'no interval'}, so no {side} bound can clear {self.threshold:g}"
        if OPERATORS[self.op](bound, self.threshold):
            return True, f"{side} bound clears {self.threshold:g}"
        return False, f"{side} bound {bound:.3f} does not clear {self.threshold:g}"

    def _subject(self) -> str:
        return self.left if self.minus is None else f"{self.left} - {self.minus} on {self.metric}"


def parse_gate(text: str) -> Gate:
    """Read one gate; ValueError (the config validator turns it into a ConfigError) when it cannot."""
    if not isinstance(text, str):
        raise ValueError(f"a gate is a string such as 'json_valid >= 0.95', got {type(text).__name__}")
    if match := _DIFFERENCE.match(text):
        left, minus, op, threshold, metric, confidently = match.groups()
        return _checked(Gate(text, left, op, float(threshold), minus=minus, metric=metric,
                             confidently=bool(confidently)))
    if match := _SINGLE.match(text):
        name, op, threshold, confidently = match.groups()
        return _checked(Gate(text, name, op, float(threshold), confidently=bool(confidently)))
    raise ValueError(
        f"cannot read gate {text!r}; write 'json_valid >= 0.95', 'base.exact_match <= 0.2', "
        "'tuned - base >= 0.2 on exact_match', optionally ending in 'confidently' to judge the interval's bound"
    )


def check_gates(gates: list[str], figures: Figures | Mapping[str, Figure | float],
                confidence: str | object = "point") -> list[GateResult]:
    """Judge every gate against `figures` (a Figures, or a plain {dotted name: Figure or number} mapping).

    `confidence` is "point" or "interval", or the EvaluationConfig itself (its `gates_confidence` is read)."""
    if not isinstance(figures, Figures):
        figures = Figures(figures)
    mode = confidence if isinstance(confidence, str) else getattr(confidence, "gates_confidence", "point")
    return [parse_gate(text).check(figures, mode) for text in gates]


# every arm that is an alternative to fine-tuning (base and few_shot too: the base model needs no training), and the
# name a gate gives the best of them on its metric
BASELINE_ARM_NAMES = ("base", "few_shot", "nearest", "majority", "linear", "retrieval")
BEST_BASELINE = "best_baseline"
# the arms that are the fine-tune: each is compared with every other arm and measured against the best baseline
# (tuned+constrained is the same weights decoding inside the output's language, so it is the fine-tune too)
TUNED_ARM_NAMES = ("tuned", "tuned+constrained")
STANDARD_ARMS = (*BASELINE_ARM_NAMES, *TUNED_ARM_NAMES)


def refuse_gates_on_arms_left_out(gates: list[str], scored: list[str], others: list[str]) -> None:
    """Before any answer is generated: a gate reading an arm this evaluation leaves out (skip_base, few_shot_k 0,
    no constrained arm) would otherwise fail only after every arm was scored."""
    possible = set(STANDARD_ARMS) | set(others) | {BEST_BASELINE}
    if any(name in scored for name in BASELINE_ARM_NAMES):
        scored = [*scored, BEST_BASELINE]
    for text in gates:
        gate = parse_gate(text)
        named = {gate.left, gate.minus} if gate.minus else {gate.left.split(".", 1)[0]}
        missing = sorted(name for name in named if name in possible and name not in scored)
        if missing:
            raise ConfigError(
                f"gate {text!r} reads {', '.join(missing)}, which this evaluation does not score (arms: "
                f"{', '.join(scored)})",
                hint="evaluation.skip_base leaves out base, few_shot and retrieval, few_shot_k: 0 leaves out "
                "few_shot, evaluation.baselines lists the baseline arms (majority and linear need labelled rows), "
                "best_baseline needs at least one of them, constrained: false leaves out tuned+constrained; keep "
                "the arm, or set evaluation.gates without this gate (e.g. --set 'evaluation.gates=[]')")


def _checked(gate: Gate) -> Gate:
    if gate.confidently and gate.op == "==":
        raise ValueError(f"gate {gate.text!r}: 'confidently' needs >=, >, <= or <; an interval never equals a number")
    return gate


def _lookup(named: Mapping[str, Figure | float], name: str, gate: str) -> Figure:
    for candidate in (name, f"tuned.{name}"):
        if candidate in named:
            return _as_figure(named[candidate])
    raise ConfigError(f"gate {gate!r} names {name!r}, which this evaluation did not compute",
                      hint="figures available: " + ", ".join(sorted(named)))


def _paired(differences: Mapping[tuple[str, str, str], Figure | Interval], left: str, minus: str,
            metric: str | None) -> Figure | None:
    if (left, minus, metric) in differences:
        return _as_figure(differences[(left, minus, metric)])
    if (minus, left, metric) in differences:
        return _as_figure(differences[(minus, left, metric)]).negated()
    return None


def _as_figure(found: Figure | Interval | float) -> Figure:
    if isinstance(found, Figure):
        return found
    if isinstance(found, Interval):
        return Figure.of(found)
    return Figure(float(found))


def _with_intervals(figures: Figures) -> list[str]:
    named = [name for name, f in sorted(figures.named.items()) if _as_figure(f).has_interval]
    paired = [f"{a} - {b} on {m}" for (a, b, m), f in sorted(figures.differences.items())
              if _as_figure(f).has_interval]
    return named + paired


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _percent(confidence: float) -> str:
    return f"{100 * confidence:g}%"
