"""Evaluate stage: batched generation, scorers, statistics, gates, the report (`runner.evaluate_run`)."""

from specialist.evaluate.generate import generate_outputs
from specialist.evaluate.scorers import resolve_scorers, score_outputs

__all__ = ["generate_outputs", "resolve_scorers", "score_outputs"]
