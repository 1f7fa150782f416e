"""The models a server answers with: each arm is a model, its tokenizer, its prompt format and its format check."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from specialist.data import PromptTemplate
from specialist.errors import ConfigError


@dataclass
class ServedArm:
    name: str
    model: Any
    tokenizer: Any
    template: PromptTemplate
    source: str
    format_check: Callable[[str, str], float] | None = None  # (output, expected="") -> 1.0 pass / 0.0 fail
    max_new_tokens: int = 128
    stop_ids: list[int] = field(default_factory=list)


def load_arm(name: str, source: str, fallback_template: PromptTemplate | None = None) -> ServedArm:
    """An arm from a run folder, an export folder, or a base model name/folder (served in a run's format)."""
    from specialist.evaluate.generate import stop_token_ids

    path = Path(source)
    if (path / "export.json").is_file():
        from specialist.deploy.export import load_exported

        model, tokenizer, template = load_exported(path)
        check = _format_check_of_run(Path(_export_run(path)))
    elif (path / "config.yaml").is_file() and (path / "template.json").is_file():
        model, tokenizer, template = _load_run(path)
        check = _format_check_of_run(path)
    else:
        from specialist.models import load_model_and_tokenizer

        try:
            model, tokenizer = load_model_and_tokenizer(source, "float32")
        except ConfigError:
            raise
        template = fallback_template or PromptTemplate.for_tokenizer(tokenizer)
        check = None
    return ServedArm(name, model.eval(), tokenizer, template, source, check, stop_ids=stop_token_ids(tokenizer))


def _load_run(run_dir: Path):
    from specialist.deploy.export import _run_model
    from specialist.evaluate.runner import load_run_config
    from specialist.models import load_model_and_tokenizer

    config = load_run_config(run_dir)
    base, tokenizer = load_model_and_tokenizer(config.model.name, "float32")
    model = _run_model(base, run_dir / "adapter", run_dir / "model")
    return model, tokenizer, PromptTemplate.load(run_dir / "template.json")


def _export_run(folder: Path) -> str:
    import json

    return json.loads((folder / "export.json").read_text(encoding="utf-8"))["run"]


def _format_check_of_run(run_dir: Path) -> Callable[[str, str], float] | None:
    """The run's first format scorer (json_schema or json_valid): what 'the output passed' means for this run."""
    if not (run_dir / "config.yaml").is_file():
        return None
    from specialist.evaluate.runner import load_run_config
    from specialist.evaluate.scorers import LabelRule, resolve_scorers

    evaluation = load_run_config(run_dir).evaluation
    for name in ("json_schema", "json_valid"):
        if name in evaluation.scorers:
            scorer = resolve_scorers([name], LabelRule(), evaluation.json_schema)[name]
            return lambda output, expected="", scorer=scorer: scorer(output, expected)
    return None


def parse_arms(specs: list[str]) -> list[tuple[str, str]]:
    arms = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ConfigError(f"--arm {spec!r} is not NAME=SOURCE", hint="e.g. --arm tuned=runs/my-run --arm base=gemma-3-270m")
        arms.append((name.strip(), source.strip()))
    if len({name for name, _ in arms}) != len(arms):
        raise ConfigError("two arms share a name", hint="give every --arm its own NAME")
    return arms


def parse_split(spec: str | None, arm_names: list[str]) -> dict[str, float]:
    """'tuned=0.9,base=0.1' -> weights summing to 1; None: all traffic to the first arm."""
    if not spec:
        return {arm_names[0]: 1.0}
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--split part {part!r} is not NAME=WEIGHT", hint="e.g. --split tuned=0.9,base=0.1") from None
    unknown = [n for n in weights if n not in arm_names]
    if unknown or not sep:
        raise ConfigError(f"--split names unknown arm(s) {unknown}", hint=f"arms: {arm_names}")
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ConfigError("--split weights must be non-negative and not all zero")
    return {name: w / total for name, w in weights.items()}
