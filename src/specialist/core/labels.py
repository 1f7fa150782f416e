"""Labels as answers: how a class label is written as a completion (data.label_template), and how an evaluation
reads one back from a text (its LabelRule). Data preparation, the constrained decoder, the classifier, training's
select_by and evaluation all write and read labels through these two, so a label means the same to each."""

from __future__ import annotations

from specialist.core.scorers import LabelRule


def render_label(label: str, label_template: str) -> str:
    """`label` written through `label_template`: a plain replacement of '{label}' (the template's other braces stay
    as they are, so '{"priority": "{label}"}' is a valid template)."""
    return label_template.replace("{label}", label)


def label_rule(evaluation) -> LabelRule:
    """How an evaluation config (its label_json_key and label_pattern) reads a label from a text."""
    return LabelRule(json_key=evaluation.label_json_key, pattern=evaluation.label_pattern)
