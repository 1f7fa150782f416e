"""Scorers: each maps (output, expected) pairs to a score in [0, 1]; `score_outputs` averages them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_MISSING = object()


def parse_json(text: str) -> Any:
    """The JSON value in `text`, or _MISSING when it does not parse."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return _MISSING


def score_json_valid(output: str, expected: str) -> float:
    """1 when the whole output parses as JSON."""
    return float(parse_json(output) is not _MISSING)


def score_exact_match(output: str, expected: str) -> float:
    """1 when output equals expected: as parsed JSON when both parse (key order and spacing ignored), else as text."""
    got, want = parse_json(output), parse_json(expected)
    if got is not _MISSING and want is not _MISSING:
        return float(got == want)
    return float(output.strip() == expected.strip())


def field_matches(output: str, expected: str) -> dict[str, float]:
    """Per key of the expected JSON object: 1 when the output is an object holding the same value under that key."""
    want = parse_json(expected)
    if not isinstance(want, dict):
        return {}
    got = parse_json(output)
    got = got if isinstance(got, dict) else {}
    return {key: float(key in got and got[key] == value) for key, value in want.items()}


def score_field_accuracy(output: str, expected: str) -> float:
    """Share of the expected object's keys whose value the output reproduces (0 for a non-object output)."""
    matches = field_matches(output, expected)
    return sum(matches.values()) / len(matches) if matches else score_exact_match(output, expected)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "json_valid": score_json_valid,
    "exact_match": score_exact_match,
    "field_accuracy": score_field_accuracy,
}


def score_outputs(outputs: list[str], expected: list[str], scorers: list[str]) -> dict[str, Any]:
    """Mean of each scorer over the examples; `field_accuracy` also reports each key's accuracy."""
    if len(outputs) != len(expected):
        raise ValueError(f"{len(outputs)} outputs for {len(expected)} expected completions")
    result: dict[str, Any] = {}
    for name in scorers:
        values = [SCORERS[name](o, e) for o, e in zip(outputs, expected)]
        result[name] = sum(values) / len(values) if values else 0.0
    if "field_accuracy" in scorers:
        result["field_accuracy_per_key"] = per_key_accuracy(outputs, expected)
    return result


def per_key_accuracy(outputs: list[str], expected: list[str]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for output, want in zip(outputs, expected):
        for key, value in field_matches(output, want).items():
            totals.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in totals.items()}
