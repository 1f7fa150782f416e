"""`specialist ab-report DB`: how each arm did on live traffic, with intervals and a test on format pass rates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from specialist.core.stats import wilson_interval
from specialist.deploy.records import read_requests, read_shadows


def pass_rate_interval(passed: int, total: int) -> tuple[float, float]:
    """(low, high) of the 95% Wilson interval of a pass rate, as evaluation computes it (core.stats: exactly 0 and
    1 at 0/n and n/n); `total` above 0."""
    found = wilson_interval(passed, total)
    return found.low, found.high


def two_proportion_test(passed_a: int, total_a: int, passed_b: int, total_b: int) -> dict[str, float] | None:
    """Two-sided z-test that two pass rates are equal (pooled variance); None when either arm has no rows."""
    if total_a == 0 or total_b == 0:
        return None
    pooled = (passed_a + passed_b) / (total_a + total_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / total_a + 1 / total_b))
    diff = passed_a / total_a - passed_b / total_b
    if spread == 0:
        return {"difference": diff, "z": 0.0, "p_value": 1.0}
    z = diff / spread
    return {"difference": diff, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ab_report(db: Path) -> dict[str, Any]:
    rows = read_requests(db)
    arms: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == name]
        checked = [r for r in mine if r["format_ok"] is not None]
        passed = sum(r["format_ok"] for r in checked)
        # logs written before scores were checked may hold inf/nan: they would make the mean meaningless
        rated = [r["feedback"] for r in mine if r["feedback"] is not None and math.isfinite(r["feedback"])]
        latencies = [r["latency_s"] for r in mine]
        arms[name] = {
            "requests": len(mine),
            "latency_p50_s": _quantile(latencies, 0.5),
            "latency_p95_s": _quantile(latencies, 0.95),
            "tokens_out_mean": sum(r["tokens_out"] for r in mine) / len(mine),
            "format_checked": len(checked),
            "format_pass_rate": passed / len(checked) if checked else None,
            "format_pass_ci95": pass_rate_interval(passed, len(checked)) if checked else None,
            "feedback_count": len(rated),
            "feedback_rate": len(rated) / len(mine),
            "feedback_mean": sum(rated) / len(rated) if rated else None,
            "_passed": passed,
        }
    names = list(arms)
    tests = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            result = two_proportion_test(arms[a]["_passed"], arms[a]["format_checked"],
                                         arms[b]["_passed"], arms[b]["format_checked"])
            if result is not None:
                tests.append({"arms": [a, b], **result})
    for figures in arms.values():
        figures.pop("_passed")
    return {"db": str(db), "requests": len(rows), "arms": arms, "format_pass_tests": tests,
            "shadows": shadow_report(read_shadows(db))}


def shadow_report(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Each shadow arm against the live answers to the same requests: agreement, format pass rates and latency on
    those requests, and on the ones with feedback which answer was right (feedback > 0: the live answer was right,
    < 0: wrong; a shadow agreeing with a right answer is right too, one differing from a wrong answer may be right)."""
    report = {}
    for name in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == name]
        report[name] = {"requests": len(mine), "live_arms": sorted({r["live_arm"] for r in mine}),
                        "agreement": sum(r["agrees"] for r in mine) / len(mine),
                        "shadow_format_pass_rate": _rate([r["format_ok"] for r in mine]),
                        "live_format_pass_rate": _rate([r["live_format_ok"] for r in mine]),
                        "shadow_latency_p50_s": _quantile([r["latency_s"] for r in mine], 0.5),
                        "live_latency_p50_s": _quantile([r["live_latency_s"] for r in mine], 0.5),
                        "on_feedback": _who_was_right(mine)}
    return report


def _rate(verdicts: list[int | None]) -> float | None:
    checked = [v for v in verdicts if v is not None]
    return sum(checked) / len(checked) if checked else None


def _who_was_right(rows: list[dict]) -> dict[str, int]:
    rated = [r for r in rows if r["feedback"] is not None and math.isfinite(r["feedback"]) and r["feedback"] != 0]
    right = [r for r in rated if r["feedback"] > 0]
    wrong = [r for r in rated if r["feedback"] < 0]
    return {"rated": len(rated), "live_right": len(right), "live_wrong": len(wrong),
            "both_right": sum(r["agrees"] for r in right),          # the shadow said the same right thing
            "shadow_wrong": sum(not r["agrees"] for r in right),    # it differed from a right answer
            "both_wrong": sum(r["agrees"] for r in wrong),          # it repeated the wrong answer
            "shadow_maybe_right": sum(not r["agrees"] for r in wrong)}
