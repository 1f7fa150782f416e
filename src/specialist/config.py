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
# The trackers transformers' TrainingArguments.report_to knows (transformers.integrations.INTEGRATION_TO_CALLBACK,
# written out so validating a config does not import transformers; a test keeps the two equal), plus its "all"
# (every one installed) and "none".
TRACKERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow",
            "neptune", "swanlab", "tensorboard", "trackio", "wandb")


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


class RetrievalConfig(_Section):
    """Retrieval-augmented fine-tuning: every prompt carries its k most similar training rows with their answers."""

    k: int = Field(default=3, ge=1, le=32, description="Training rows shown before each input (most similar last).")
    near_duplicate: float = Field(
        default=0.95, gt=0, le=1, description="A training row whose input is at least this similar (TF-IDF cosine) "
        "to the query's is never shown: in training a row never sees itself or its copy, so neither may a test row.",
    )


class DataConfig(_Section):
    """Where the examples are, their shape, and how `prepare` cleans, dedupes, balances and splits them."""

    path: Path = Field(description="Data file (JSONL, JSON array, CSV/TSV, Parquet), a `datasets` save_to_disk "
                       "folder, or a folder written by `specialist prepare`; relative to the config file. Or a "
                       "Hugging Face hub dataset as org/name, loaded through `datasets` (a local path that exists "
                       "always wins).")
    split: str | None = Field(default=None, min_length=1, description="Hub dataset only: the split to read (train), "
                              "in `datasets` syntax (e.g. train[:1000]); prepare still splits it train/val/test.")
    subset: str | None = Field(default=None, min_length=1, description="Hub dataset only: the subset (config name).")
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
    extra_paths: list[Path] = Field(
        default_factory=list, description="Files of corrected rows (e.g. a `specialist harvest` queue, reviewed) "
        "added to training only: never to val or test, so a retrained model is compared on the same test set. "
        "Rows copying a val/test row are dropped from them; relative to the config file.",
    )
    split_column: str | None = Field(
        default=None, description="A column holding each row's split: exactly train, val or test (any other value "
        "is a bad row); the fractions and split_by are not used then.",
    )
    prompt_template: str | None = Field(
        default=None, description="Build the input from several columns, e.g. '{title}\\n\\n{body}' "
        "(prompt_completion, labelled and preference rows; replaces prompt_column / text_column).",
    )
    train_on: Literal["all", "last"] = Field(
        default="all", description="Chat rows (messages, ShareGPT): all learns every assistant turn (except those "
        "with weight 0), each from the turns before it, as TRL and OpenAI fine-tuning do; last learns only the final "
        "assistant turn. Single-turn rows are the same either way.",
    )
    csv_max_field_lines: int = Field(
        default=200, ge=1, description="CSV/TSV: lines of a record held in memory while its closing quote is looked "
        "for. A quoted field that closes is one field however many lines it spans (a longer one is read again from "
        "the file); a quote that never closes is a bad row at the line where it opened, and reading resumes on the "
        "line after it.",
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
    retrieval: RetrievalConfig | None = Field(
        default=None, description="Retrieval-augmented fine-tuning (k, near_duplicate): training, evaluation and "
        "serving all put the k nearest training rows before the input; the index is stored with the run.",
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


MethodKind = Literal["lora", "full", "qlora", "dpo", "continued_pretraining", "classifier", "grpo"]
DPO_BETA = 0.1  # TRL's DPOConfig default
# The KL weight of the GRPO paper (Shao et al. 2024, DeepSeekMath) and TRL's default before 0.17. TRL now defaults
# to 0 (no reference pass); we keep a small pull so a few hundred CPU steps on a small set stay near the starting
# model, and so the KL is measured and shown. Under LoRA the reference is the same weights with the adapter switched
# off: one extra no-grad forward per micro-batch, no second model copy.
GRPO_BETA = 0.04
GRPO_KEYS = ("rewards", "format_reward", "num_generations", "eval_generations", "generations_per_step",
             "max_completion_length", "temperature")


class RewardConfig(_Section):
    """One term of grpo's reward: a scorer (the evaluation's signature, prompt included) and its weight."""

    scorer: str = Field(description="A built-in scorer name or a custom one as package.module:function.")
    weight: float = Field(default=1.0, allow_inf_nan=False, description="Its weight in the summed reward; "
                          "negative to penalise (e.g. length), never 0.")

    @field_validator("scorer")
    @classmethod
    def _scorer_is_known_or_an_importable_path(cls, name: str) -> str:
        from specialist.core.scorers import KNOWN

        if name not in KNOWN and not _is_import_path(name):
            raise ValueError(f"unknown scorer {name!r}; built in: {sorted(KNOWN)}, or package.module:function")
        return name

    @field_validator("weight")
    @classmethod
    def _weight_counts(cls, weight: float) -> float:
        if weight == 0:
            raise ValueError("a weight of 0 adds nothing; remove the reward instead")
        return weight


def _is_import_path(name: str) -> bool:
    module, sep, function = name.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and function.isidentifier()


class MethodConfig(_Section):
    """How the weights are adapted.

    - lora: low-rank adapters on a frozen base (DoRA and rsLoRA as switches); the default.
    - full: every parameter trains; best quality per example, most memory, a full model folder per checkpoint.
    - qlora: LoRA on a 4-bit base (bitsandbytes, CUDA only): the least memory, a little slower per step.
    - dpo: preference tuning on prompt/chosen/rejected, from the base or from an SFT run's adapter.
    - continued_pretraining: next-token loss on plain text packed into blocks, for domain adaptation.
    - classifier: LoRA with a sequence-classification head on labelled rows and a class-weighted loss; it answers
      a label (through data.label_template) with its probabilities instead of generating text.
    - grpo: reward fine-tuning (TRL's GRPOTrainer): a group of sampled answers per prompt, scored by
      method.rewards (evaluation scorers) and the format reward, each pushed by how it beat its group's mean;
      LoRA by default, from the base or from an SFT run's adapter.
    """

    kind: MethodKind = "lora"
    r: int = Field(default=16, gt=0, le=1024)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    adapter: bool | None = Field(
        default=None,
        description="dpo/continued_pretraining/grpo: train a LoRA adapter (default) or all weights (false).",
    )
    from_adapter: Path | None = Field(default=None, description="dpo/grpo: start from this SFT run's adapter "
                                      "folder (merged into the base; a new adapter trains on top).")
    beta: float = Field(default=DPO_BETA, ge=0, description="Strength of the pull towards the reference model. "
                        f"dpo: above 0, default {DPO_BETA}; grpo: the KL weight, default {GRPO_BETA}; 0 turns the "
                        "reference pass (and the KL figure) off.")
    rewards: list[RewardConfig] | None = Field(
        default=None, description="grpo: the scorers summed into the reward, [{scorer, weight}]; None: "
        "evaluation.scorers at weight 1, less the statistics (length, refusal_rate) and, where the run has a "
        "format reward, the format scorers it stands for (json_valid, json_schema).",
    )
    format_reward: bool = Field(
        default=True, description="grpo: add a reward of 1 for an answer in the run's format: evaluation.json_schema, "
        "else data.labels through data.label_template, else evaluation.constraint_regex, else JSON where every "
        "training answer is JSON (an explicit evaluation.constraint decides instead); none for free text.",
    )
    num_generations: int = Field(
        default=4, ge=2, le=256, description="grpo: answers sampled per prompt (the group whose spread is the "
        "signal). 4: the smallest group whose spread is usable, and two prompts a step fit 2 CPU cores.",
    )
    eval_generations: int | None = Field(
        default=None, ge=1, le=256, description="grpo: answers sampled per validation prompt at each evaluation "
        "(eval_reward); None: num_generations. Sampling is most of an evaluation's cost: 1 gives the mean reward "
        "at a quarter of the default's time, without the within-group spread.",
    )
    generations_per_step: int | None = Field(
        default=None, gt=0, description="grpo: answers per optimizer step, a multiple of num_generations (prompts "
        "per step = this / num_generations); None: training.batch_size x training.gradient_accumulation_steps "
        "(8 by default: 2 prompts x 4 answers).",
    )
    max_completion_length: int | None = Field(
        default=None, gt=0, le=32768, description="grpo: token limit of a sampled answer; None: "
        "evaluation.max_new_tokens, else the longest training answer plus a margin (the evaluation's own limit).",
    )
    temperature: float = Field(
        default=1.0, gt=0, le=10, description="grpo: sampling temperature. 1.0 (TRL's default) samples the model "
        "as it is; lower makes a group's answers alike, and a group without spread teaches nothing.",
    )
    class_weights: Literal["balanced", "none"] = Field(
        default="balanced", description="classifier: balanced weighs each class by n / (classes x its rows) "
        "(sklearn's 'balanced'), so a rare class counts as much as a common one; none: every row alike.",
    )
    pooling: Literal["last", "mean"] = Field(
        default="last", description="classifier: the head reads the last real token's hidden state (last), or the "
        "mean of every real token's (mean: each part of a long input counts by its length).",
    )
    window: int | None = Field(
        default=None, gt=8, le=32768, description="classifier: read each input in windows of this many tokens, "
        "each window on its own, their hidden states pooled (method.pooling) into one for the head: a report up "
        "to training.max_length tokens is read whole at a window's attention cost. None: one window of max_length.",
    )

    @model_validator(mode="before")
    @classmethod
    def _beta_defaults_by_kind(cls, data: Any) -> Any:
        """dpo's beta (a preference temperature) and grpo's (a KL weight) share the key, not the default."""
        if isinstance(data, dict) and data.get("kind") == "grpo" and data.get("beta") is None:
            data = {**data, "beta": GRPO_BETA}
        return data

    @model_validator(mode="after")
    def _method_specific_keys_match_the_kind(self) -> MethodConfig:
        if self.from_adapter is not None and self.kind not in ("dpo", "grpo"):
            raise ValueError(f"from_adapter applies to kinds 'dpo' and 'grpo' only, not {self.kind!r}")
        if self.adapter is not None and self.kind not in ("dpo", "continued_pretraining", "grpo"):
            raise ValueError(f"adapter applies to kinds 'dpo', 'continued_pretraining' and 'grpo' only, not "
                             f"{self.kind!r} (use kind 'full' to train all weights)")
        if self.kind == "dpo" and self.beta <= 0:
            raise ValueError("dpo needs beta above 0 (it divides the preference margin)")
        if self.kind == "grpo":
            return self._grpo_keys_agree()
        changed = [key for key in GRPO_KEYS if getattr(self, key) != type(self).model_fields[key].default]
        if changed:
            raise ValueError(f"{', '.join(changed)}: grpo keys, which kind {self.kind!r} does not use; remove them")
        return self

    def _grpo_keys_agree(self) -> MethodConfig:
        names = [reward.scorer for reward in self.rewards or []]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"rewards name {repeated} more than once; give each scorer once, with its weight")
        if self.rewards == [] and not self.format_reward:
            raise ValueError("grpo has nothing to reward: rewards is empty and format_reward is off")
        per_step = self.generations_per_step
        if per_step is not None and per_step % self.num_generations:
            raise ValueError(f"generations_per_step ({per_step}) must be a multiple of num_generations "
                             f"({self.num_generations}): every prompt's group is sampled whole in one step")
        if self.adapter is False and self.from_adapter is not None and self.beta > 0:
            raise ValueError("grpo with adapter: false, from_adapter and beta > 0 would measure the KL against the "
                             "base model (TRL reloads the reference from the base weights), not the SFT model; "
                             "set beta: 0, or keep the adapter")
        return self

    @property
    def start_adapter(self) -> Path | None:
        """The SFT adapter merged into the base before this method trains (dpo and grpo runs), else None."""
        return self.from_adapter if self.kind in ("dpo", "grpo") else None

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
        "evaluations and checkpoints move with them, and time is kept for the last step's evaluation. None: off.",
    )
    min_steps: int | None = Field(
        default=None, ge=1, description="The fewest optimizer steps time_budget may cut the plan to (a budget that "
        "cannot fit them runs over instead of training too little to mean anything); None: no floor.",
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
    padding_free: bool | Literal["auto"] = Field(
        default="auto",
        description="Run each micro-batch's rows as one sequence without padding (TRL's padding_free: positions "
        "restart at each row and no row attends to another), so pad tokens cost nothing and loss and gradients are "
        "those of the padded batch. auto: on CPU, off on CUDA (there sdpa would build one dense mask over the whole "
        "micro-batch; flash attention is the way to drop padding). Methods lora, full and qlora (auto leaves the "
        "others padded; true with another method is refused).",
    )
    packed_kernels: bool | Literal["auto"] = Field(
        default="auto",
        description="Run the float32 linear layers whose weights train nothing (LoRA's frozen base layers, the "
        "output layer of the loss) through oneDNN with the weights packed once (specialist.onednn): float32's "
        "products in another order, 1.5x the LoRA training tokens/s of torch's kernels on 2 CPU cores "
        "(bench/train_precision.py), for about 1.4 GiB more memory with Gemma 3 270M. auto and true: on where the "
        "model is on the CPU and this torch has the kernels (true says when it cannot be); false: torch's own.",
    )
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
    bf16: bool | Literal["auto"] = Field(
        default="auto", description="Matmuls in bfloat16 under autocast, fp32 weights kept as the master copy. auto: "
        "where the hardware multiplies bf16 (a CUDA GPU with bf16, AMX, or AVX512-BF16: 1.3x the tokens/s on 2 such "
        "cores), else fp32. false gives every CPU the same arithmetic, so the same result.",
    )
    completion_only_loss: bool = True
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers besides metrics.jsonl, as TrainingArguments "
        "takes them (wandb, trackio, comet_ml, mlflow, tensorboard, ..., all, or none); one name or a list. The "
        "evaluation's figures go to the same ones (specialist.trackers).",
    )
    block_size: int = Field(default=256, gt=8, description="continued_pretraining: tokens per packed block.")
    select_by: str | None = Field(
        default=None, description="Keep the checkpoint with the best value of this scorer on the validation rows "
        "(a built-in scorer, macro_f1, or package.module:function; higher is better), answered at every "
        "evaluation, instead of the lowest validation loss. None: validation loss.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_names_trackers(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value  # pydantic says what is wrong with it
        unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), TRACKERS, n=1)
            raise ValueError(f"unknown tracker {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; known: {', '.join(TRACKERS)}, all, none")
        if "none" in names and len(names) > 1:
            raise ValueError("report_to: 'none' turns every tracker off, so it stands alone")
        return [] if names == ["none"] else names

    @field_validator("select_by")
    @classmethod
    def _select_by_is_a_scorer(cls, value: str | None) -> str | None:
        from specialist.core.scorers import KNOWN

        if value is not None and value not in KNOWN | {"macro_f1"} and ":" not in value:
            raise ValueError(f"unknown scorer {value!r}; built in: {sorted(KNOWN | {'macro_f1'})}, "
                             "or package.module:function")
        return value

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
    baselines: list[Literal["nearest", "majority", "linear", "retrieval"]] = Field(
        default_factory=lambda: ["nearest", "majority", "linear", "retrieval"],
        description="The cheapest alternatives scored beside the tuned arm: nearest (the answer of the most similar "
        "training input), majority and linear (label tasks: the most frequent label; TF-IDF + logistic regression), "
        "retrieval (the base model prompted with the retrieval_k nearest training rows). [] for none.",
    )
    retrieval_k: int | None = Field(default=None, ge=1, le=32,
                                    description="Rows shown to the retrieval arm; None: few_shot_k (0: no arm).")
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
    label_scoring: Literal["generate", "likelihood"] = Field(
        default="generate", description="Labelled data: generate reads the label from each arm's generated answer; "
        "likelihood scores every label's completion after the prompt (summed token log-probabilities, softmax over "
        "the labels) and answers the most probable, giving per-class probabilities: a reliability diagram, ECE and "
        "an escalation threshold table in the report.",
    )
    label_calibration: Literal["none", "batch"] = Field(
        default="none", description="Per-class probabilities (label_scoring: likelihood, a classifier run): batch "
        "divides each label's probability by its mean over the rows scored together and renormalises (Batch "
        "Calibration, Zhou et al., ICLR 2024): no labels are used, and a model that learnt the class prior answers "
        "by the evidence instead of the majority class.",
    )
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
        from specialist.core.scorers import KNOWN

        unknown = [n for n in names if n not in KNOWN and ":" not in n]
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; built in: {sorted(KNOWN)}, or package.module:function")
        return names

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, gates: list[str]) -> list[str]:
        from specialist.core.gates import parse_gate

        for gate in gates:
            parse_gate(gate)
        return gates


class OutputConfig(_Section):
    dir: Path = Field(default=Path("runs"), description="Parent folder of run folders, relative to the working dir.")
    run_name: str | None = Field(default=None, description="None: the config file's stem plus a timestamp.")

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value in {".", ".."}):
            raise ValueError("run_name must be a plain folder name without '/'")
        if value is not None:
            _check_folder_name(value)
        return value


# Characters that reorder how a name is shown (a report or a listing can then show a name that is not the folder's)
_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _check_folder_name(name: str) -> None:
    """A run name is a folder name on every file system, one line in every log and report: no NUL or other
    control character (a newline splits a log line), no bidi control, at most 255 bytes in UTF-8."""
    bad = sorted({f"U+{ord(ch):04X}" for ch in name if ord(ch) < 32 or ord(ch) == 127 or ch in _BIDI_CONTROLS})
    if bad:
        raise ValueError(f"run_name holds control or text-direction characters ({', '.join(bad)}); use letters, "
                         "digits, '-', '_' and '.'")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > 255:
        raise ValueError(f"run_name is {size} bytes in UTF-8; a folder name can have 255 at most")


# Methods whose checkpoints training.select_by can pick: they answer prompts (generated text or a label)
RETRIEVAL_METHODS = ("lora", "full", "qlora")
PADDING_FREE_METHODS = ("lora", "full", "qlora")  # continued_pretraining packs its text into full blocks instead
SELECT_BY_METHODS = ("lora", "full", "qlora", "classifier")


class RunConfig(_Section):
    """The single source of truth for a run: data, model, method, training, evaluation, output."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _method_options_fit_the_run(self) -> RunConfig:
        kind = self.method.kind
        if kind == "classifier" and self.data.shape not in ("auto", "labelled"):
            raise ValueError(f"method.kind classifier trains on labelled rows (text/label), not data.shape "
                             f"{self.data.shape!r}; set data.shape: labelled")
        if self.training.select_by and kind not in SELECT_BY_METHODS:
            raise ValueError(f"training.select_by applies to method.kind {', '.join(SELECT_BY_METHODS)}, not "
                             f"{kind!r}; remove it")
        if self.training.padding_free is True and kind not in PADDING_FREE_METHODS:
            raise ValueError(f"training.padding_free lays prompt/completion rows end to end, with method.kind "
                             f"{', '.join(PADDING_FREE_METHODS)}, not {kind!r}; set training.padding_free: auto")
        if self.data.retrieval is not None and kind not in RETRIEVAL_METHODS:
            raise ValueError(f"data.retrieval trains prompts that carry their nearest training rows, with method.kind "
                             f"{', '.join(RETRIEVAL_METHODS)}, not {kind!r}; remove data.retrieval")
        if kind != "classifier" and (self.method.window is not None or self.method.pooling != "last"):
            raise ValueError(f"method.window and method.pooling shape a classifier's head, not method.kind {kind!r}; "
                             "remove them")
        if self.method.window is not None and self.method.window > self.training.max_length:
            raise ValueError(f"method.window {self.method.window} is longer than training.max_length "
                             f"{self.training.max_length}, so every input is one window; lower it, or remove it")
        return self

    @model_validator(mode="after")
    def _grpo_fits_the_run(self) -> RunConfig:
        method = self.method
        if method.kind != "grpo":
            return self
        per_step = method.generations_per_step or self.training.batch_size * self.training.gradient_accumulation_steps
        if per_step % method.num_generations:
            raise ValueError(f"grpo samples {per_step} answers a step (training.batch_size x "
                             f"gradient_accumulation_steps), not a multiple of method.num_generations "
                             f"({method.num_generations}); set method.generations_per_step to a multiple of it")
        if any(r.scorer == "json_schema" for r in method.rewards or []) and self.evaluation.json_schema is None:
            raise ValueError("the json_schema reward needs evaluation.json_schema (a schema file)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML at `path`, apply `key.path=value` overrides, validate; relative paths resolve from the file's
    folder, or from the working directory when an override gave them.

    Raises ConfigError listing every problem at once, each with its key path and a hint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", hint="pass the path of a YAML run config")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=NoAliasLoader) or {}
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer over Python's 4300-digit limit
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...)")
    for override in overrides or []:
        apply_override(raw, override)
    config = validate_config(raw, source=str(path))
    # a path in the file is relative to the file; one typed in a --set flag, to where it was typed
    typed = {o.partition("=")[0].strip() for o in overrides or []}

    def folder_of(key: str) -> Path:
        return Path.cwd() if key in typed else path.parent

    for key in ("path", "test_path", "val_path"):
        value = getattr(config.data, key)
        if value is not None and not value.is_absolute():
            local = _resolve(folder_of(f"data.{key}") / value)
            if not (key == "path" and _names_hub_dataset(value, local)):
                setattr(config.data, key, local)
    config.data.extra_paths = [p if p.is_absolute() else _resolve(folder_of("data.extra_paths") / p)
                               for p in config.data.extra_paths]
    adapter = config.method.from_adapter
    if adapter is not None and not adapter.is_absolute():
        config.method.from_adapter = (folder_of("method.from_adapter") / adapter).resolve()
    for key in ("json_schema", "forgetting_corpus", "questions", "knowledge_probe"):
        value = getattr(config.evaluation, key)
        if value is not None and not value.is_absolute():
            setattr(config.evaluation, key, (folder_of(f"evaluation.{key}") / value).resolve())
    return config


def _names_hub_dataset(value: Path, local: Path) -> bool:
    """data.path as written names a hub dataset (org/name) and no local file or folder of that name exists."""
    from specialist.data.readers import is_hub_dataset

    return not os.path.lexists(local) and is_hub_dataset(value)


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
    try:
        node[parts[-1]] = yaml.load(value, Loader=NoAliasLoader) if value.strip() else ""
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer over Python's 4300-digit limit
        raise ConfigError(f"override {_preview(override)}: the value is not valid YAML: {exc}") from None


class NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: `*name` can repeat a value exponentially (an alias bomb: a few hundred bytes
    that expand to gigabytes once printed or dumped); a run config never needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"found the alias *{event.anchor}: run configs may not use YAML aliases; write the "
                            "value out in full", event.start_mark)
        return super().compose_node(parent, index)


def _preview(value: Any, limit: int = 200) -> str:
    """`repr(value)` cut at `limit` characters without building the whole of it: an error message quotes what it
    got, and what it got may be huge (a 5000-digit integer, whose repr raises, or a deep nest of lists)."""
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, str):
        text = repr(value[: limit + 1])
    else:
        shortener = reprlib.Repr()
        shortener.maxlevel, shortener.maxstring, shortener.maxother, shortener.maxlong = 3, limit, limit, limit
        try:
            text = shortener.repr(value)
        except ValueError:  # an integer over Python's 4300-digit str() limit, somewhere inside
            text = f"a {type(value).__name__} too large to print"
    return text if len(text) <= limit else text[:limit] + "..."


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the run config:"]
    for error in exc.errors():
        key_path = ".".join(str(part) for part in error["loc"]) or "run config"
        lines.append(f"  - {key_path}: {_describe(error)}")
    return "\n".join(lines)


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown key{_did_you_mean(error['loc'])}"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "literal_error":
        return f"{error['msg'].lower()} (got {_preview(error['input'])})"
    if not error["loc"]:  # a check across sections names its keys itself; its input is the whole config
        return error["msg"]
    return f"{error['msg']} (got {_preview(error['input'])})"


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
