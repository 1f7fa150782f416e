"""Scorers: each maps one (output, expected) pair to a number; `score_rows` scores every row of an arm.

Built in: json_valid, json_schema, exact_match, field_accuracy, label_accuracy (with macro-F1 and a confusion
matrix, from `label_report`), rouge_l, chrf, refusal_rate (both directions, from `refusal_report`), refusal_match (the right call:
refuses where the expected answer refuses, answers where it answers), length,
tests_pass and mutation_kill (generated test code run in a sandbox: `code_tests`).
A custom scorer is a `package.module:function` path to a function `(output: str, expected: str) -> float`, or
`(output, expected, prompt) -> float` when it needs the input too (as the code scorers do).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specialist.errors import ConfigError

_MISSING = object()

Scorer = Callable[[str, str], float]


def parse_json(text: str) -> Any:
    """The JSON value in `text`, or _MISSING when it does not parse.

    Any string is an answer: nesting past the recursion limit (300 `[` tokens) and integers over Python's
    4300-digit limit are "not JSON" here, never an exception that loses a run's results."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):  # JSONDecodeError is a ValueError, as is the digit limit
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


@functools.cache
def _rouge_l_scorer() -> Any:
    # Imported on first use: rouge_score pulls in nltk, which the CLI should not pay for on every start.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def score_rouge_l(output: str, expected: str) -> float:
    """ROUGE-L F1 as the `rouge-score` package computes it (Google's reference implementation, no stemming), so the
    figure compares with published ones. Its tokenizer lowercases and keeps only [a-z0-9] runs: punctuation is not
    a token, and text with no ASCII letters or digits (or an empty answer) scores 0, even against itself."""
    return float(_rouge_l_scorer().score(expected, output)["rougeL"].fmeasure)


@functools.cache
def _chrf_metric(char_order: int, beta: float) -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF(char_order=char_order, beta=beta)


def score_chrf(output: str, expected: str, max_n: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF as sacrebleu computes it (Popović 2015: character n-grams 1..6, beta 2, all whitespace
    removed, punctuation and non-ASCII characters kept), on a 0-1 scale instead of sacrebleu's 0-100. An empty
    output or reference scores 0, as in sacrebleu."""
    return float(_chrf_metric(max_n, beta).sentence_score(output, [expected]).score) / 100


REFUSAL_PATTERN = re.compile(
    r"\b(I can(?:'|no)t|I cannot|I won't|I will not|I'm not able to|I am not able to|I'm unable to|"
    r"I am unable to|I must decline|I refuse|can't help with|cannot help with|not able to help with)\b",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    return bool(REFUSAL_PATTERN.search(text))


def score_refusal_rate(output: str, expected: str) -> float:
    """1 when the output refuses. Its mean over all rows mixes both directions; `refusal_report` separates them."""
    return float(is_refusal(output))


def score_refusal_match(output: str, expected: str) -> float:
    """1 when the output makes the expected call: refuses where the expected answer refuses, answers where it
    answers. The 0-1 score to reward or gate on for a refusal task (refusal_rate only counts refusals)."""
    return float(is_refusal(output) == is_refusal(expected))


def score_length(output: str, expected: str) -> float:
    """Words in the output (a statistic, not a 0-1 score)."""
    return float(len(output.split()))


@dataclass
class LabelRule:
    """How a label is read from a text: a JSON key, or the first group of a regex, else the stripped text."""

    json_key: str | None = None
    pattern: str | None = None
    lowercase: bool = True
    _regex: re.Pattern | None = field(default=None, init=False, repr=False)

    def extract(self, text: str) -> str:
        label: Any = text.strip()
        if self.json_key is not None:
            value = parse_json(text)
            label = value.get(self.json_key, "") if isinstance(value, dict) else ""
        elif self.pattern is not None:
            self._regex = self._regex or re.compile(self.pattern)
            match = self._regex.search(text)
            label = (match.group(1) if match.groups() else match.group(0)) if match else ""
        label = "" if label is None else str(label).strip()
        return label.lower() if self.lowercase else label


def make_label_accuracy(rule: LabelRule) -> Scorer:
    def score_label_accuracy(output: str, expected: str) -> float:
        return float(rule.extract(output) == rule.extract(expected))

    return score_label_accuracy


def make_json_schema(schema_path: Path) -> Scorer:
    import jsonschema

    from specialist import bounded

    bounded.bound_jsonschema_patterns()
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
        validator = jsonschema.Draft202012Validator(schema)
    except (OSError, json.JSONDecodeError, jsonschema.SchemaError) as exc:
        raise ConfigError(f"evaluation.json_schema: {schema_path} is not a usable JSON schema: {exc}") from exc

    def score_json_schema(output: str, expected: str) -> float:
        """1 when the output parses and validates; the schema's patterns share one deadline (bounded.TimedOut)."""
        value = parse_json(output)
        if value is _MISSING:
            return 0.0
        with bounded.time_limit(bounded.PATTERN_SECONDS):
            return float(validator.is_valid(value))

    return score_json_schema


BUILTIN: dict[str, Scorer] = {
    "json_valid": score_json_valid,
    "exact_match": score_exact_match,
    "field_accuracy": score_field_accuracy,
    "rouge_l": score_rouge_l,
    "chrf": score_chrf,
    "refusal_rate": score_refusal_rate,
    "refusal_match": score_refusal_match,
    "length": score_length,
}
NEEDS_SETTINGS = {"label_accuracy", "json_schema"}
CODE_SCORERS = {"tests_pass", "mutation_kill"}
KNOWN = set(BUILTIN) | NEEDS_SETTINGS | CODE_SCORERS


# scorers that give 0 to every answer json.loads cannot read, when the expected answers are JSON
SCORE_ONLY_JSON = frozenset({"json_valid", "json_schema", "exact_match", "field_accuracy"})


def decided_once_not_json(scorer_names: Sequence[str], expected: Sequence[str]) -> Callable[[str], bool] | None:
    """The rule that ends an answer once its scores are decided, or None where no such rule holds.

    With only JSON scorers and JSON expected answers, an answer that no continuation could make parse scores 0
    on every scorer however it goes on: generation may stop there (the base model echoing a log line is decided
    at its second character). The stored answer is then the text up to that point."""
    if not scorer_names or not set(scorer_names) <= SCORE_ONLY_JSON:
        return None
    if any(parse_json(text) is _MISSING for text in expected):
        return None
    from specialist.core.json_prefix import can_become_json

    return lambda text: not can_become_json(text)


def resolve_scorers(names: list[str], label_rule: LabelRule | None = None,
                    json_schema: Path | None = None) -> dict[str, Scorer]:
    """Scorer functions by name; `module:function` names are imported. Unknown names raise ConfigError."""
    resolved: dict[str, Scorer] = {}
    for name in names:
        if name in BUILTIN:
            resolved[name] = BUILTIN[name]
        elif name == "label_accuracy":
            resolved[name] = make_label_accuracy(label_rule or LabelRule())
        elif name in CODE_SCORERS:
            from specialist.core import code_tests

            code_tests.require_pytest()
            resolved[name] = getattr(code_tests, f"score_{name}")
        elif name == "json_schema":
            if json_schema is None:
                raise ConfigError("the json_schema scorer needs evaluation.json_schema (a schema file)")
            resolved[name] = make_json_schema(json_schema)
        else:
            resolved[name] = import_scorer(name)
    return resolved


def format_check(scorers: list[str], json_schema: Path | None = None) -> Callable[[str], bool] | None:
    """What "the output passed" means for answers judged by `scorers` (evaluation.scorers): the first format scorer
    among them, json_schema before json_valid, giving full marks; None where they name neither (free text)."""
    for name in ("json_schema", "json_valid"):
        if name in scorers:
            scorer = resolve_scorers([name], LabelRule(), json_schema)[name]
            return lambda output, scorer=scorer: scorer(output, "") >= 1.0
    return None


def import_scorer(path: str) -> Scorer:
    module_name, sep, function_name = path.partition(":")
    if not sep:
        raise ConfigError(f"unknown scorer {path!r}", hint=f"built in: {', '.join(sorted(KNOWN))}; "
                          "or a custom one as package.module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"custom scorer {path!r} cannot be imported: {exc}",
                          hint="the module must be importable (on PYTHONPATH) and define that function") from exc
    if not callable(function):
        raise ConfigError(f"custom scorer {path!r} is not a function")
    return function


def takes_prompt(scorer: Scorer) -> bool:
    """Whether a scorer reads the row's input: a third positional parameter without a default (settings with
    defaults, like chrf's `max_n`, do not count), or one named `prompt`."""
    try:
        parameters = inspect.signature(scorer).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 3 or any(p.name == "prompt" for p in parameters)


def score_rows(outputs: list[str], expected: list[str], scorers: dict[str, Scorer],
               prompts: list[str] | None = None, strict: bool = False) -> dict[str, list[float]]:
    """Each scorer's value on every row, in row order (what bootstrap intervals and paired tests need). `strict`:
    a scorer that raises stops the caller (a reward in training: a broken scorer must not train on zeros)."""
    if len(outputs) != len(expected):
        raise ValueError(f"{len(outputs)} outputs for {len(expected)} expected completions")
    rows = {}
    for name, fn in scorers.items():
        if takes_prompt(fn):
            if prompts is None or len(prompts) != len(outputs):
                raise ValueError(f"scorer {name!r} reads each row's prompt; give one prompt per output")
            arguments = list(zip(outputs, expected, prompts))
        else:
            arguments = list(zip(outputs, expected))
        rows[name] = score_each(name, fn, arguments, strict)
    return rows


def score_each(name: str, fn: Callable[..., float], arguments: list[tuple[str, ...]],
               strict: bool = False) -> list[float]:
    """`fn` on every row; a row it fails on (an exception, a timed-out check, a non-number) scores 0, a failure,
    and one warning names the scorer, how many rows and the first error, so one odd answer never loses a run.
    With `strict` the first failure is raised instead."""
    values, failures = [], []
    for n, row in enumerate(arguments):
        try:
            values.append(float(fn(*row)))
        except Exception as exc:  # noqa: BLE001 - any answer is a row to score, a custom scorer may raise anything
            if strict:
                raise
            values.append(0.0)
            failures.append((n, exc))
    if failures:
        from specialist.console import console

        first, exc = failures[0]
        console.print(f"[yellow]warning:[/] scorer {name} failed on {len(failures)} of {len(arguments)} rows, "
                      f"scored as failures (row {first}: {type(exc).__name__}: {str(exc)[:200]})")
    return values


def per_key_accuracy(outputs: list[str], expected: list[str]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for output, want in zip(outputs, expected):
        for key, value in field_matches(output, want).items():
            totals.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in totals.items()}


def label_report(outputs: list[str], expected: list[str], rule: LabelRule,
                 escalation: str | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 over the expected labels, per-label precision/recall/F1 and the confusion matrix.

    With `escalation` (e.g. "escalate"), also: its recall, the accuracy on the other rows (in scope), and how
    often an in-scope row was escalated.
    """
    got = [rule.extract(o) for o in outputs]
    want = [rule.extract(e) for e in expected]
    labels = sorted(set(want))
    predicted_labels = labels + sorted(set(got) - set(labels))  # columns: known labels, then anything invented
    matrix = [[sum(1 for g, w in zip(got, want) if w == true and g == pred) for pred in predicted_labels]
              for true in labels]
    per_label = {}
    for label in labels:
        tp = sum(1 for g, w in zip(got, want) if g == w == label)
        fp = sum(1 for g, w in zip(got, want) if g == label and w != label)
        fn = sum(1 for g, w in zip(got, want) if w == label and g != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    report = {
        "accuracy": sum(g == w for g, w in zip(got, want)) / len(want) if want else 0.0,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(per_label) if per_label else 0.0,
        "per_label": per_label,
        "labels": labels,
        "predicted_labels": predicted_labels,
        "confusion": matrix,
    }
    if escalation is not None:
        key = escalation.lower() if rule.lowercase else escalation
        out_of_scope = [(g, w) for g, w in zip(got, want) if w == key]
        in_scope = [(g, w) for g, w in zip(got, want) if w != key]
        report["escalation"] = {
            "label": escalation,
            "recall": sum(g == key for g, _ in out_of_scope) / len(out_of_scope) if out_of_scope else None,
            "in_scope_accuracy": sum(g == w for g, w in in_scope) / len(in_scope) if in_scope else None,
            "false_escalation_rate": sum(g == key for g, _ in in_scope) / len(in_scope) if in_scope else None,
            "should_escalate": len(out_of_scope),
            "in_scope": len(in_scope),
        }
    return report


def refusal_report(outputs: list[str], expected: list[str]) -> dict[str, Any]:
    """Refusals split by what the expected answer does: should-refuse rows (want a refusal) and should-answer rows.

    `refused_when_should` is the share of should-refuse rows refused (higher is better); `refused_when_should_not`
    the share of should-answer rows refused (over-refusal, lower is better).
    """
    should = [is_refusal(o) for o, e in zip(outputs, expected) if is_refusal(e)]
    should_not = [is_refusal(o) for o, e in zip(outputs, expected) if not is_refusal(e)]
    return {
        "should_refuse": len(should),
        "should_answer": len(should_not),
        "refused_when_should": sum(should) / len(should) if should else None,
        "refused_when_should_not": sum(should_not) / len(should_not) if should_not else None,
    }


def length_report(outputs: list[str]) -> dict[str, float]:
    words = sorted(len(o.split()) for o in outputs)
    if not words:
        return {}
    return {"mean": sum(words) / len(words), "p50": words[len(words) // 2],
            "p95": words[min(len(words) - 1, int(0.95 * len(words)))], "max": words[-1]}
