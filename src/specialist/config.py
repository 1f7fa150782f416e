"""The run config: one pydantic model, read from YAML, overridable by `key.path=value` flags.

Every section forbids unknown keys so a typo (`learning_rte`) fails loudly instead of being ignored.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specialist.errors import ConfigError

DEFAULT_MODEL = "gemma-3-270m"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CleanConfig(_Section):
    """Text clean-up applied to every field before anything else looks at it."""

    normalize: bool = Field(default=True, description="Unicode NFC, control characters out, CRLF to LF, trailing spaces.")
    scrub: bool | list[str] = Field(
        default=False,
        description="Replace secrets and personal data with a placeholder: true for every kind, or a list of "
        "kinds (email, ipv4, ipv6, aws_key, api_key, bearer, private_key).",
    )
    placeholder: str = Field(default="<{kind}>", description="What replaces a scrubbed span; {kind} is its kind.")

    @field_validator("scrub")
    @classmethod
    def _scrub_kinds_are_known(cls, value: bool | list[str]) -> bool | list[str]:
        from specialist.data.clean import SCRUB_KINDS

        if isinstance(value, list):
            unknown = [k for k in value if k not in SCRUB_KINDS]
            if unknown:
                raise ValueError(f"unknown scrub kind(s) {unknown}; known: {list(SCRUB_KINDS)}")
        return value


class DedupeConfig(_Section):
    exact: bool = Field(default=True, description="Drop rows equal to an earlier one after case and space folding.")
    near: bool = Field(default=True, description="Drop near-duplicates (MinHash + LSH on word shingles).")
    leakage: bool = Field(default=True, description="Drop val/test rows that are near-duplicates of a training row.")
    fixed_split_leakage: Literal["drop_from_train", "drop_from_fixed", "keep"] = Field(
        default="drop_from_train",
        description="A fixed val/test set (data.val_path, data.test_path or data.split_column) is never changed "
        "unless asked: drop_from_train removes the training rows that equal or nearly equal one of its rows; "
        "drop_from_fixed removes its leaking rows instead (as a random split does); keep only reports them.",
    )
    threshold: float = Field(default=0.85, gt=0, le=1, description="Estimated Jaccard similarity that counts as near.")
    num_perm: int = Field(default=64, ge=16, le=256, description="MinHash permutations (signature length).")
    shingle_words: int = Field(default=3, ge=1, le=10, description="Words per shingle.")


class BalanceConfig(_Section):
    """Class balance of the training split (labelled data); val and test keep the natural distribution."""

    mode: Literal["none", "report", "cap", "upsample", "cap_and_upsample"] = "report"
    max_per_class: int | None = Field(default=None, gt=0, description="cap: keep at most N training rows per label.")
    min_per_class: int | None = Field(default=None, gt=0, description="upsample: repeat rows up to N per label.")

    @model_validator(mode="after")
    def _limits_given_for_the_mode(self) -> BalanceConfig:
        if "cap" in self.mode and self.max_per_class is None:
            raise ValueError(f"balance mode {self.mode!r} needs max_per_class")
        if "upsample" in self.mode and self.min_per_class is None:
            raise ValueError(f"balance mode {self.mode!r} needs min_per_class")
        return self


class DataConfig(_Section):
    """Where the examples are, their shape, and how `prepare` cleans, dedupes, balances and splits them."""

    path: Path = Field(description="Data file (JSONL, JSON array, CSV/TSV, Parquet), a `datasets` save_to_disk "
                       "folder, or a folder written by `specialist prepare`; relative to the config file.")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "arrow"] = "auto"
    shape: Literal["auto", "prompt_completion", "messages", "text", "preference", "labelled"] = Field(
        default="auto", description="auto: told by the columns present (and the method)."
    )
    prompt_column: str = Field(default="prompt", description="Also found under input / instruction / question.")
    completion_column: str = Field(default="completion", description="Also output / response / answer; dpo: chosen.")
    rejected_column: str = Field(default="rejected", description="method.kind=dpo only: the rejected answer.")
    chosen_column: str = Field(default="chosen", description="Preference rows: the preferred answer.")
    text_column: str = Field(default="text", description="Plain text (continued pretraining) or the labelled text.")
    messages_column: str = Field(default="messages", description="Chat rows: a list of {role, content}.")
    label_column: str = Field(default="label", description="Labelled rows' class; also used to stratify and balance.")
    labels: list[str] | None = Field(default=None, description="The allowed label set; a label outside it is an error.")
    label_template: str = Field(default="{label}", description="Completion written for a label, e.g. "
                                '\'{"priority": "{label}"}\'.')
    instruction: str = Field(
        default="",
        description="Task description put before every input, in training, evaluation and serving alike.",
    )
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Ignored when data.val_path or "
                                "data.split_column gives the validation rows.")
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0, description="Ignored when data.test_path or "
                                 "data.split_column gives the test rows.")
    test_path: Path | None = Field(
        default=None, description="A fixed test set (same formats and shape as data.path), read, validated, cleaned "
        "and deduped like it and used as is; data.path then supplies train and val. Relative to the config file.",
    )
    val_path: Path | None = Field(
        default=None, description="A fixed validation set, like test_path; data.path then supplies no val rows.",
    )
    split_column: str | None = Field(
        default=None, description="A column holding each row's split: exactly train, val or test (any other value "
        "is a bad row); the fractions and split_by are not used then.",
    )
    prompt_template: str | None = Field(
        default=None, description="Build the input from several columns, e.g. '{title}\\n\\n{body}' "
        "(prompt_completion, labelled and preference rows; replaces prompt_column / text_column).",
    )
    csv_max_field_lines: int = Field(
        default=200, ge=1, description="CSV/TSV: a quoted field spanning more lines (or a quote left open at the end "
        "of the file) is a bad row at the line where the quote opened; reading resumes on the next line.",
    )
    max_examples: int | None = Field(default=None, gt=0, description="Use only N rows (after shuffling).")
    split_by: Literal["random", "stratified", "grouped"] = Field(
        default="random", description="stratified: by label; grouped: whole groups of group_column per split."
    )
    group_column: str | None = Field(default=None, description="split_by=grouped: rows sharing it stay together.")
    max_bad_fraction: float = Field(
        default=0.1, ge=0, le=1, description="Stop (writing nothing) when more than this share of rows is malformed."
    )
    over_length: Literal["drop", "truncate"] = Field(
        default="drop", description="Rows longer than training.max_length tokens: drop them, or shorten their input "
        "(never the answer) to fit; a row is dropped only when instruction + answer alone do not fit.",
    )
    truncate_side: Literal["right", "left", "middle"] = Field(
        default="right", description="over_length truncate: cut the input's end, its start, or its middle.",
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9 so that training rows remain")
        if self.split_by == "grouped" and not self.group_column:
            raise ValueError("split_by 'grouped' needs group_column")
        if "{label}" not in self.label_template:
            raise ValueError("label_template must contain {label}")
        if self.split_column and (self.test_path or self.val_path):
            raise ValueError("split_column and test_path/val_path each fix the split: use one of them")
        if self.split_column and self.split_by != "random":
            raise ValueError(f"split_column decides every row's split; remove split_by {self.split_by!r}")
        return self

    @field_validator("prompt_template")
    @classmethod
    def _prompt_template_names_columns(cls, value: str | None) -> str | None:
        from specialist.data.shapes import parse_prompt_template

        if value is not None:
            parse_prompt_template(value)
        return value


class ModelConfig(_Section):
    """The base model: `gemma-3-270m` (embedded), a local HF folder, a local .gguf file, or a hub id."""

    name: str = DEFAULT_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype for training and evaluation; auto picks bfloat16 where the hardware runs it fast.",
    )


MethodKind = Literal["lora", "full", "qlora", "dpo", "continued_pretraining"]


class MethodConfig(_Section):
    """How the weights are adapted.

    - lora: low-rank adapters on a frozen base (DoRA and rsLoRA as switches); the default.
    - full: every parameter trains; best quality per example, most memory, a full model folder per checkpoint.
    - qlora: LoRA on a 4-bit base (bitsandbytes, CUDA only): the least memory, a little slower per step.
    - dpo: preference tuning on prompt/chosen/rejected, from the base or from an SFT run's adapter.
    - continued_pretraining: next-token loss on plain text packed into blocks, for domain adaptation.
    """

    kind: MethodKind = "lora"
    r: int = Field(default=16, gt=0, le=1024)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    adapter: bool | None = Field(
        default=None, description="dpo/continued_pretraining: train a LoRA adapter (default) or all weights (false)."
    )
    from_adapter: Path | None = Field(default=None, description="dpo: start from this SFT run's adapter folder.")
    beta: float = Field(default=0.1, gt=0, description="dpo: strength of the pull towards the reference model.")

    @model_validator(mode="after")
    def _method_specific_keys_match_the_kind(self) -> MethodConfig:
        if self.from_adapter is not None and self.kind != "dpo":
            raise ValueError(f"from_adapter applies to kind 'dpo' only, not {self.kind!r}")
        if self.adapter is not None and self.kind not in ("dpo", "continued_pretraining"):
            raise ValueError(f"adapter applies to kinds 'dpo' and 'continued_pretraining' only, not {self.kind!r} "
                             "(use kind 'full' to train all weights)")
        return self

    @property
    def uses_lora(self) -> bool:
        if self.kind in ("lora", "qlora"):
            return True
        if self.kind == "full":
            return False
        return self.adapter is not False


class TrainingConfig(_Section):
    epochs: float | Literal["auto"] = Field(
        default=1.0, description="Passes over the training rows; auto: OpenAI's rule, 3 raised for small sets "
        "(at least 100 examples seen) and lowered for large ones (at most 25,000), within 1..25.",
    )
    time_budget: str | None = Field(
        default=None, description="Fit training into this long, e.g. '90s', '10m', '1h30m': the optimizer steps "
        "are set from the rate measured over the first steps (never more than epochs/max_steps ask for); "
        "evaluations and checkpoints move with them. None: off.",
    )
    max_steps: int = Field(default=-1, description="Stop after this many optimizer steps; -1 means run all epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    batch_size: int = Field(default=8, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    micro_batch_tokens: int | Literal["auto"] | None = Field(
        default="auto",
        description="Run each batch as micro-batches of at most this many tokens (rows x max_length), "
        "accumulating gradients: the same steps and loss, bounded activation memory and no padding at one row. "
        "auto: 256 on CPU (one row of the default max_length), whole batches on GPU; None: whole batches.",
    )
    max_length: int = Field(default=256, gt=8, description="Longest training sequence in tokens; longer rows are cut.")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 42
    logging_steps: int = Field(default=5, gt=0)
    eval_steps: int | None = Field(default=None, gt=0, description="Validation loss every N steps; None: 4 per run.")
    save_steps: int | None = Field(default=None, gt=0, description="Checkpoint every N steps; None: at each eval.")
    save_total_limit: int = Field(default=2, gt=0, description="Checkpoints kept besides the best one.")
    early_stopping_patience: int | None = Field(
        default=None, gt=0, description="Stop after N evaluations without validation-loss improvement; None: off."
    )
    early_stopping_min_delta: float = Field(default=0.0, ge=0)
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in backward (TRL's default too): less memory, about a "
        "quarter slower; turn off where memory is plentiful."
    )
    completion_only_loss: bool = True
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Loggers besides metrics.jsonl."
    )
    block_size: int = Field(default=256, gt=8, description="continued_pretraining: tokens per packed block.")

    @field_validator("epochs")
    @classmethod
    def _epochs_are_positive(cls, value: float | str) -> float | str:
        if value != "auto" and value <= 0:
            raise ValueError("epochs must be above 0, or 'auto'")
        return value

    @field_validator("time_budget", mode="before")
    @classmethod
    def _time_budget_is_a_duration(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"{value} has no unit; write it like '{value}s' or '10m'")
        if isinstance(value, str):
            parse_duration(value)
        return value


def parse_duration(text: str) -> float:
    """Seconds in a duration written like '90s', '10m', '1h30m' or '1.5h'."""
    import re

    number = r"([0-9]+(?:[.][0-9]+)?)"  # ASCII digits only: \d would also take other scripts' digits
    match = re.fullmatch(rf"\s*(?:{number}h)?\s*(?:{number}m)?\s*(?:{number}s)?\s*", text)
    if not text.strip() or match is None:
        raise ValueError(f"{text!r} is not a duration; write it like '90s', '10m' or '1h30m'")
    hours, minutes, seconds = (float(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"{text!r} is no time at all; give a duration above zero, like '10m'")
    return total


class EvaluationConfig(_Section):
    scorers: list[str] = Field(
        default_factory=lambda: ["json_valid", "exact_match", "field_accuracy"],
        description="Built-in scorer names or custom ones as package.module:function.",
    )
    few_shot_k: int = Field(default=3, ge=0, description="Train examples shown to the base few-shot arm; 0: no arm.")
    label_json_key: str | None = Field(default=None, description="label_accuracy: read the label from this JSON key.")
    label_pattern: str | None = Field(default=None, description="label_accuracy: regex; group 1 is the label.")
    escalation_label: str | None = Field(
        default=None, description="label_accuracy: the 'hand to a human' label; its recall and the accuracy on "
        "the other (in-scope) rows are reported apart, so a router that never escalates cannot hide.",
    )
    json_schema: Path | None = Field(default=None, description="json_schema: a Draft 2020-12 schema file.")
    questions: Path | None = Field(
        default=None, description="continued_pretraining: multiple-choice questions about the documents (JSONL "
        '{"question", "choices", "answer"}), scored by choice log-likelihood before and after.',
    )
    constrained: bool = Field(
        default=False, description="Add the arm tuned+constrained: the tuned model decoding inside the output's "
        "language (evaluation.constraint), so the report shows what constrained decoding gains and costs.",
    )
    constraint: Literal["auto", "json_schema", "labels", "regex", "json"] = Field(
        default="auto", description="The language: json_schema (evaluation.json_schema), labels (data.labels "
        "through data.label_template), regex (evaluation.constraint_regex), json (any JSON value); auto picks the "
        "first the config has, in that order, else json.",
    )
    constraint_regex: str | None = Field(default=None, description="constraint: regex: the pattern answers match.")
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    bootstrap_samples: int = Field(default=1000, ge=100)
    train_sample: int = Field(default=60, ge=0, description="Train rows scored beside the test rows (overfitting).")
    gates: list[str] = Field(default_factory=list, description="e.g. 'json_valid >= 0.95', 'tuned - base >= 0.2 on exact_match'.")
    gates_confidence: Literal["point", "interval"] = Field(
        default="point", description="point: a gate compares the value; interval: every gate is judged as if it "
        "ended in 'confidently' (the interval's far bound must clear the threshold).",
    )
    forgetting: bool = Field(default=True, description="Perplexity on general text and a knowledge probe, before/after.")
    forgetting_corpus: Path | None = Field(default=None, description="Replace the bundled general text: one text a line.")
    forgetting_max_texts: int = Field(default=300, gt=0)
    knowledge_probe: Path | None = Field(
        default=None, description='Replace the bundled MMLU probe: multiple-choice JSONL {"question", "choices" '
        '(4), "answer" (A-D), "subject" (optional)}.',
    )
    knowledge_probe_size: int | None = Field(
        default=300, ge=0, description="Questions asked, sampled round-robin over subjects; 0 or None: all.",
    )
    max_new_tokens: int | None = Field(
        default=None, gt=0, description="None: the longest training completion plus a margin."
    )
    batch_size: int = Field(default=16, gt=0)
    max_examples: int | None = Field(default=None, gt=0, description="Evaluate on at most N test rows.")
    samples_in_report: int = Field(default=12, ge=0)
    skip_base: bool = False

    @field_validator("scorers")
    @classmethod
    def _scorers_are_known_or_importable_paths(cls, names: list[str]) -> list[str]:
        from specialist.evaluate.scorers import KNOWN

        unknown = [n for n in names if n not in KNOWN and ":" not in n]
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; built in: {sorted(KNOWN)}, or package.module:function")
        return names

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, gates: list[str]) -> list[str]:
        from specialist.evaluate.gates import parse_gate

        for gate in gates:
            parse_gate(gate)
        return gates

    def sampling(self) -> dict | None:
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.do_sample else None


class OutputConfig(_Section):
    dir: Path = Field(default=Path("runs"), description="Parent folder of run folders, relative to the working dir.")
    run_name: str | None = Field(default=None, description="None: the config file's stem plus a timestamp.")

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value in {".", ".."}):
            raise ValueError("run_name must be a plain folder name without '/'")
        return value


class RunConfig(_Section):
    """The single source of truth for a run: data, model, method, training, evaluation, output."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML at `path`, apply `key.path=value` overrides, validate; relative data paths resolve from the file.

    Raises ConfigError listing every problem at once, each with its key path and a hint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", hint="pass the path of a YAML run config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...)")
    for override in overrides or []:
        apply_override(raw, override)
    config = validate_config(raw, source=str(path))
    for key in ("path", "test_path", "val_path"):
        value = getattr(config.data, key)
        if value is not None and not value.is_absolute():
            setattr(config.data, key, _resolve(path.parent / value))
    adapter = config.method.from_adapter
    if adapter is not None and not adapter.is_absolute():
        config.method.from_adapter = (path.parent / adapter).resolve()
    for key in ("json_schema", "forgetting_corpus", "questions", "knowledge_probe"):
        value = getattr(config.evaluation, key)
        if value is not None and not value.is_absolute():
            setattr(config.evaluation, key, (path.parent / value).resolve())
    return config


def _resolve(path: Path) -> Path:
    """The absolute path; a symlink loop stays as written, for the data stage to report with its name."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on a symlink loop
        return Path(os.path.abspath(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML so `0.1`, `true`, `[q,v]` get their types."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key.path=value", hint="e.g. training.epochs=2")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the run config:"]
    for error in exc.errors():
        key_path = ".".join(str(part) for part in error["loc"])
        lines.append(f"  - {key_path}: {_describe(error)}")
    return "\n".join(lines)


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown key{_did_you_mean(error['loc'])}"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "literal_error":
        return f"{error['msg'].lower()} (got {error['input']!r})"
    return f"{error['msg']} (got {error['input']!r})"


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    section: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    allowed = ", ".join(section.model_fields)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {allowed}"
