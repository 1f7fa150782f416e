"""Evaluate stage: batched generation, scorers, the before/after report."""

from specialist.evaluate.generate import generate_outputs
from specialist.evaluate.scorers import SCORERS, score_outputs

__all__ = ["SCORERS", "generate_outputs", "score_outputs"]
