"""The models a server answers with: each arm is an engine (model, tokenizer, prompt format), its token limit and
its format check. Arms that share a base model share one copy of it (see `specialist.artifacts.ModelPool`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from specialist.artifacts import Loaded, ModelPool, load_source
from specialist.constrain import constraint_of
from specialist.core.scorers import format_check
from specialist.errors import ConfigError
from specialist.generation import Engine, default_max_new_tokens

if TYPE_CHECKING:
    from specialist.run_folder import RunFolder

BASE_MAX_NEW_TOKENS = 128


@dataclass
class ServedArm:
    name: str
    engine: Engine
    source: str
    format_check: Callable[[str], bool] | None = None  # output -> passed the run's format scorer
    max_new_tokens: int = BASE_MAX_NEW_TOKENS  # the answer length a request gets when it names none

    @property
    def template(self):
        return self.engine.template

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def answers_labels(self) -> bool:
        """A classifier run's arm: it answers a label from its head, so output formats and log-probabilities of
        generated tokens do not apply."""
        return hasattr(self.engine, "classifier")


def load_arms(specs: list[tuple[str, str]], pool: ModelPool | None = None,
              constrain: bool = False) -> dict[str, ServedArm]:
    """Every arm of `specs` (NAME, SOURCE), in order; run and export arms first, so a bare base model can answer
    in the first run's prompt format. With `constrain`, every arm that comes from a run decodes inside the run's
    output language (evaluation.constraint); a bare base model has no run to take one from."""
    pool = pool or ModelPool()
    loaded: dict[str, Loaded] = {}
    for name, source in sorted(specs, key=lambda spec: _is_bare_model(spec[1])):
        fallback = next((found.template for found in loaded.values() if found.template is not None), None)
        loaded[name] = load_for_serving(source, pool, fallback)
    return {name: served_arm(name, source, loaded[name], constrain) for name, source in specs}


def served_arm(name: str, source: str, found: Loaded, constrain: bool = False) -> ServedArm:
    """`found` as an arm; a classifier run brings its own engine (it answers labels, so needs no constraint)."""
    if found.engine is not None:
        return ServedArm(name, found.engine, source, format_check_of_run(found.run), _answer_length(found))
    constraint = constraint_of(found.run.config()) if constrain and found.run is not None else None
    engine = found.answering_engine(constraint)
    probe_template(name, source, engine)
    return ServedArm(name, engine, source, format_check_of_run(found.run), _answer_length(found))


def format_check_of_run(run: RunFolder | None) -> Callable[[str], bool] | None:
    """What 'the output passed' means for a run's traffic (core.scorers.format_check on its evaluation.scorers);
    None for a bare model or an export without its run's config."""
    if run is None or not run.config_file.is_file():
        return None
    evaluation = run.config().evaluation
    return format_check(evaluation.scorers, evaluation.json_schema)


PROBE_INPUT = "Hello! Can you summarise this line: user alice logged in at 10:02?"


def probe_template(name: str, source: str, engine: Engine) -> None:
    """Refuse at start-up an arm whose prompt format cannot render an ordinary request: a chat template that
    raises or runs past its deadline on this probe would fail (or stall) every request."""
    try:
        engine.encode(PROBE_INPUT)
    except Exception as exc:  # noqa: BLE001 - a template is code: whatever it raises, the arm cannot serve
        raise ConfigError(f"arm {name!r} ({source}): its prompt template fails on a probe request: "
                          f"{type(exc).__name__}: {str(exc)[:300]}",
                          hint="fix or replace the chat template (tokenizer_config.json, chat_template.jinja, "
                               "or an export's template.json)") from None


def _answer_length(found: Loaded) -> int:
    """What the run's evaluation generates: its evaluation.max_new_tokens, else its longest answer plus a margin."""
    if found.run is None:
        return BASE_MAX_NEW_TOKENS
    configured = found.run.config().evaluation.max_new_tokens
    return configured or default_max_new_tokens(found.tokenizer, found.run.split().train)


def _is_bare_model(source: str) -> bool:
    from specialist.run_folder import ExportFolder, RunFolder

    return not (ExportFolder.is_export(source) or RunFolder.is_run(source))


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
    if not all(w >= 0 and w == w and w != float("inf") for w in weights.values()) or total <= 0:
        raise ConfigError("--split weights must be finite, non-negative and not all zero")
    return {name: w / total for name, w in weights.items()}


def load_replacement(name: str, source: str, pool: ModelPool, constrain: bool = False) -> ServedArm:
    """The arm a running server swaps in as `name`: a run or export folder (never a bare model name, which could
    fetch from a hub), its adapter attached to the pooled base copy the old arm shares, probed like at start-up."""
    if _is_bare_model(source):
        raise ConfigError(f"{source} is not a run or export folder", hint="promote a run folder or an export")
    return served_arm(name, source, load_for_serving(source, pool), constrain)


def load_for_serving(source: str, pool: ModelPool, template=None) -> Loaded:
    """`load_source`, and for a GGUF export the runtime its lone greedy requests are answered by (the pool's
    `lone_runtime`: llama.cpp on the export's own file, faster than torch at batch 1), its file loaded."""
    from pathlib import Path

    from specialist.run_folder import ExportFolder

    found = load_source(source, pool, template)
    export = ExportFolder(Path(source))
    if export.is_export(export.path) and export.meta()["format"] == "gguf":
        from specialist.deploy.llamacpp import lone_runtime

        found.lone = lone_runtime(export, pool.lone_runtime)
        if found.lone is not None:  # loaded now: a file llama.cpp cannot run fails the start or the swap, not
            found.lone.runner()     # every lone request after it
    return found
