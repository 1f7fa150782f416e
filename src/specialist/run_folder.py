"""The one owner of the on-disk layout of a run folder and of an export folder.

Every stage and the CLI reach a run's files through `RunFolder` (and an export's through `ExportFolder`), so the
layout is written down once, here, and can change in one place:

    config.yaml        the resolved config (after flags)
    manifest.json      data hashes, package versions, seed, hardware, git commit, start/end times
    data/              train/val/test.jsonl as used, with the data manifest.json and report.json (`prepare`)
    template.json      the prompt format used by training, evaluation and serving
    adapter/ | model/  the PEFT adapter (LoRA methods) or the full model (all-weights methods)
    labels.json        a classifier run's classes in head order, and which head it trained
    retrieval.json     data.retrieval runs: the training rows every prompt retrieves its examples from
    checkpoints/       the last `save_total_limit` checkpoints and the best one (marked complete when whole)
    metrics.jsonl      every training log line; tensorboard/ the same as TensorBoard events (and the evaluation's)
    trackers.json      the tracker runs training logged to (wandb, mlflow, trackio, comet_ml), for the evaluation
    metrics.json       training figures, split hashes, headline scores per arm
    eval.json          every score with its interval, paired tests, labels, overfitting, gates
    predictions.jsonl  every held-out example with each arm's output
    loss.png, figures/ training and validation loss; score, confusion and length plots
    report.html/.md    the before/after report
    export/<format>/   exports (`ExportFolder`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from specialist.errors import ConfigError
from specialist.ranks import is_main_process, shared_across_ranks

if TYPE_CHECKING:
    from specialist.config import RunConfig
    from specialist.data import PromptTemplate, Split


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_retrieval(path: Path):
    from specialist.core.retrieval import RetrievalIndex

    if not path.is_file():
        return None
    try:
        return RetrievalIndex.load(path)
    except ValueError as exc:
        raise ConfigError(str(exc), hint="write the run again (or export it again): the index is the training rows "
                          "its prompts were trained to see") from exc


@dataclass(frozen=True)
class RunFolder:
    path: Path

    # -- the layout --------------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def template_file(self) -> Path:
        return self.path / "template.json"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def full_model(self) -> Path:
        return self.path / "model"

    @property
    def labels_file(self) -> Path:
        return self.path / "labels.json"

    @property
    def retrieval_file(self) -> Path:
        return self.path / "retrieval.json"

    def retrieval(self):
        """The run's retrieval index (core.retrieval.RetrievalIndex), None when it was not trained with one."""
        return _read_retrieval(self.retrieval_file)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_log(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def tracker_runs(self) -> Path:
        """Which run each tracker (wandb, mlflow, trackio, comet_ml) opened for training, so that the evaluation,
        often a later process, logs its figures into that same run."""
        return self.path / "trackers.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def eval_json(self) -> Path:
        return self.path / "eval.json"

    @property
    def promotion_record(self) -> Path:
        """What `specialist promote` decided about this run as a candidate: its gates and the swap."""
        return self.path / "promotion.json"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    def export_dir(self, fmt: str) -> Path:
        return self.path / "export" / fmt

    def trained_output(self, uses_lora: bool) -> Path:
        """Where training saves what it trained: the adapter, or the whole model."""
        return self.adapter if uses_lora else self.full_model

    # -- creating and opening ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, config: RunConfig, config_name: str) -> RunFolder:
        """A new run folder under output.dir (the same on every rank of a launch), holding the resolved config."""
        stamp = f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        name = config.output.run_name or shared_across_ranks(stamp)
        run = cls(config.output.dir / name)
        if is_main_process():
            run.path.mkdir(parents=True, exist_ok=config.output.run_name is not None)
            run.write_config(config)
        return run

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        run = cls(Path(path))
        if not run.config_file.is_file():
            raise ConfigError(f"{path} is not a run folder (no {run.config_file.name})",
                              hint="pass a folder written by `specialist run` or `specialist train`")
        return run

    @classmethod
    def newest(cls, config: RunConfig, config_name: str) -> RunFolder:
        """The run to resume: output.run_name, else the newest run of this config under output.dir."""
        if config.output.run_name:
            path = config.output.dir / config.output.run_name
            if not path.is_dir():
                raise ConfigError(f"no run folder {path} to resume", hint="start it without --resume first")
            return cls(path)
        candidates = sorted(config.output.dir.glob(f"{config_name}-*"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"no run of {config_name!r} under {config.output.dir} to resume",
                              hint="start it without --resume first, or set output.run_name")
        return cls(candidates[-1])

    @staticmethod
    def is_run(path: Path) -> bool:
        run = RunFolder(Path(path))
        return run.config_file.is_file() and run.template_file.is_file()

    # -- reading and writing -----------------------------------------------------------------------------------
    def write_config(self, config: RunConfig) -> None:
        self.config_file.write_text(config.to_yaml(), encoding="utf-8")

    def config(self, overrides: list[str] | None = None) -> RunConfig:
        """The run's resolved config, with `key.path=value` overrides applied."""
        from specialist.config import apply_override, validate_config

        if not self.config_file.is_file():
            raise ConfigError(f"{self.path} is not a run folder (no {self.config_file.name})",
                              hint="pass a folder written by `specialist run` or `specialist train`")
        raw = yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}
        for override in overrides or []:
            apply_override(raw, override)
        return validate_config(raw, source=str(self.config_file))

    def template(self) -> PromptTemplate:
        from specialist.data import PromptTemplate

        if not self.template_file.is_file():
            raise ConfigError(f"{self.path} has no prompt format ({self.template_file.name})",
                              hint="the run did not get past its data stage; run it again")
        return PromptTemplate.load(self.template_file)

    def save_template(self, template: PromptTemplate) -> None:
        template.save(self.template_file)

    def split(self) -> Split:
        from specialist.data import read_split

        return read_split(self.data)

    @property
    def data_manifest(self) -> Path:
        return self.data / "manifest.json"

    def metrics_so_far(self) -> dict[str, Any]:
        return read_json(self.metrics) if self.metrics.is_file() else {}

    # -- the trained model -------------------------------------------------------------------------------------
    @property
    def has_adapter(self) -> bool:
        return (self.adapter / "adapter_config.json").is_file()

    @property
    def has_full_model(self) -> bool:
        return (self.full_model / "config.json").is_file()

    @property
    def is_trained(self) -> bool:
        return self.has_adapter or self.has_full_model

    @property
    def is_classifier(self) -> bool:
        """A `method.kind: classifier` run: its model answers a label and probabilities, it does not generate."""
        return self.labels_file.is_file()

    def load_base(self, config: RunConfig | None = None, dtype: str | None = None):
        """(base model, tokenizer) as this run starts from: the base model, with a DPO or GRPO run's SFT adapter
        merged."""
        from specialist.models import load_model_and_tokenizer

        config = config or self.config()
        model, tokenizer = load_model_and_tokenizer(config.model.name, dtype or config.model.dtype)
        if config.method.start_adapter is not None:
            # the adapter was trained on top of the merged SFT model, which is this run's starting point
            model = merge_adapter(model, config.method.start_adapter)
        return model, tokenizer

    def load_model(self, base, adapter_name: str = "default"):
        """The trained model on `base`: the adapter applied (a PeftModel whose adapter can be switched off, so
        `base` and the tuned model share one copy of the weights), or the full model loaded alone."""
        if self.has_adapter:
            from peft import PeftModel

            return PeftModel.from_pretrained(base, self.adapter, adapter_name=adapter_name).eval()
        if self.has_full_model:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(self.full_model, dtype=base.dtype).eval()
        raise ConfigError(f"{self.path} holds no trained model (no {self.adapter.name}/ or {self.full_model.name}/)",
                          hint="train it first (`specialist train`)")


def merge_adapter(model, adapter: Path):
    """`model` with the PEFT adapter in `adapter` folded into its weights."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"no PEFT adapter in {adapter}", hint="point at the adapter/ folder of an SFT run")
    from specialist.onednn import drop_copies

    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    drop_copies(merged)  # PEFT merges through `weight.data`, which no version counter sees: packed copies go stale
    return merged


@dataclass(frozen=True)
class ExportFolder:
    """An export: the artifact, its prompt format, what it came from (export.json) and its replay check."""

    path: Path

    @property
    def meta_file(self) -> Path:
        return self.path / "export.json"

    @property
    def template_file(self) -> Path:
        return self.path / "template.json"

    @property
    def check_file(self) -> Path:
        return self.path / "export_check.json"

    @property
    def modelfile(self) -> Path:
        return self.path / "Modelfile"

    @property
    def model_card(self) -> Path:
        return self.path / "README.md"

    @property
    def retrieval_file(self) -> Path:
        return self.path / "retrieval.json"

    def retrieval(self):
        """The index the exported model's prompts retrieve from (a data.retrieval run's), None without one."""
        return _read_retrieval(self.retrieval_file)

    @staticmethod
    def is_export(path: Path) -> bool:
        return ExportFolder(Path(path)).meta_file.is_file()

    def meta(self) -> dict[str, Any]:
        if not self.meta_file.is_file():
            raise ConfigError(f"{self.path} is not an export folder (no {self.meta_file.name})",
                              hint="pass a folder written by `specialist export`")
        try:
            meta = read_json(self.meta_file)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(f"{self.meta_file} is not valid JSON ({exc})", hint="export it again") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
            raise ConfigError(f"{self.meta_file} does not describe an export", hint="export it again")
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.meta_file, meta)

    def template(self) -> PromptTemplate:
        from specialist.data import PromptTemplate

        return PromptTemplate.load(self.template_file)

    def gguf_files(self) -> tuple[Path, Path | None]:
        """A GGUF export's model file and, where a LoRA was written beside its base, the adapter file (else None)."""
        meta = self.meta()
        lora = meta.get("gguf_lora_file")
        return self.file(meta.get("gguf_file")), (self.file(lora) if lora else None)

    def file(self, name: Any) -> Path:
        """A file named in export.json, refused unless it is a plain name that resolves inside this folder."""
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise ConfigError(f"{self.meta_file}: file name {name!r} is not a plain file name in the folder",
                              hint="export it again; export.json names files beside it")
        path = (self.path / name).resolve()
        if not path.is_relative_to(self.path.resolve()) or not path.is_file():
            raise ConfigError(f"{self.meta_file}: {name!r} is not a file inside {self.path}",
                              hint="export it again; export.json names files beside it")
        return path

    def source_run(self) -> RunFolder | None:
        run = self.meta().get("run")
        return RunFolder(Path(run)) if isinstance(run, str) and RunFolder.is_run(Path(run)) else None

    def weights_bytes(self) -> int:
        """Bytes of the weight files (what serving it costs on disk)."""
        suffixes = (".safetensors", ".bin", ".gguf")
        return sum(p.stat().st_size for p in self.path.iterdir() if p.suffix in suffixes)
