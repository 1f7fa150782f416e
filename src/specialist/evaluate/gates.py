"""Quality gates: thresholds on evaluation results that decide an exit code, so `specialist eval` can gate CI.

Forms (the arm defaults to `tuned`):
    json_valid >= 0.95                    a metric of the tuned arm
    base.exact_match <= 0.2               a metric of a named arm
    tuned - base >= 0.2 on exact_match    the difference between two arms on a metric
    overfitting.train_test_gap <= 0.1     any other figure the evaluation reports, by its dotted name
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from specialist.errors import ConfigError

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_NAME = r"[A-Za-z_][\w:.-]*"
_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)"
_DIFFERENCE = re.compile(rf"^\s*({_NAME})\s+-\s+({_NAME})\s*(>=|<=|==|>|<)\s*({_NUMBER})\s+on\s+({_NAME})\s*$")
_SINGLE = re.compile(rf"^\s*({_NAME})\s*(>=|<=|==|>|<)\s*({_NUMBER})\s*$")


@dataclass(frozen=True)
class Gate:
    text: str
    left: str  # a dotted figure name, or an arm when `minus` is set
    op: str
    threshold: float
    minus: str | None = None  # the arm subtracted
    metric: str | None = None  # the metric of a difference gate

    def figure(self, figures: dict[str, float]) -> float:
        if self.minus is None:
            return _lookup(figures, self.left, self.text)
        return _lookup(figures, f"{self.left}.{self.metric}", self.text) - _lookup(
            figures, f"{self.minus}.{self.metric}", self.text)

    def check(self, figures: dict[str, float]) -> GateResult:
        value = self.figure(figures)
        return GateResult(self.text, value, OPERATORS[self.op](value, self.threshold))


@dataclass(frozen=True)
class GateResult:
    gate: str
    value: float
    passed: bool


def parse_gate(text: str) -> Gate:
    if match := _DIFFERENCE.match(text):
        left, minus, op, threshold, metric = match.groups()
        return Gate(text, left, op, float(threshold), minus=minus, metric=metric)
    if match := _SINGLE.match(text):
        name, op, threshold = match.groups()
        return Gate(text, name, op, float(threshold))
    raise ValueError(
        f"cannot read gate {text!r}; write 'json_valid >= 0.95', 'base.exact_match <= 0.2' "
        "or 'tuned - base >= 0.2 on exact_match'"
    )


def check_gates(gates: list[str], figures: dict[str, float]) -> list[GateResult]:
    return [parse_gate(text).check(figures) for text in gates]


def _lookup(figures: dict[str, float], name: str, gate: str) -> float:
    for candidate in (name, f"tuned.{name}"):
        if candidate in figures:
            return figures[candidate]
    raise ConfigError(f"gate {gate!r} names {name!r}, which this evaluation did not compute",
                      hint="figures available: " + ", ".join(sorted(figures)))
