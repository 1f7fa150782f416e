"""`specialist run` and `specialist train`: the stages wired together around one run folder (`RunFolder`).

`run`: data -> training -> evaluation of every arm -> report. `train`: data -> training, resumable.
Under `torchrun`/`accelerate launch` every process runs this; only rank 0 writes the run folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.config import RunConfig
from specialist.console import console
from specialist.data import PromptTemplate, Split, read_split
from specialist.data.report import print_prepare_report
from specialist.errors import ConfigError
from specialist.evaluate.report import plot_loss_curve
from specialist.manifest import finish_manifest, start_manifest
from specialist.ranks import is_main_process, wait_for_all_ranks
from specialist.run_folder import RunFolder, write_json
from specialist.train.common import TrainResult


@dataclass
class RunSummary:
    run: RunFolder
    metrics: dict[str, Any]
    evaluation: Any = None  # EvalReport or DomainReport, after `run`

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def report(self) -> Path:
        return self.run.report_html


def run(config: RunConfig, config_name: str = "run") -> RunSummary:
    """The whole slice for `config`: training, then every evaluation arm on the held-out rows, then the report."""
    from specialist.evaluate.runner import check_evaluation_inputs, evaluate_run

    started = time.perf_counter()
    check_evaluation_inputs(config)  # a bad schema or question file fails now, not after training
    trained = train_only(config, config_name)
    if not is_main_process():
        return trained
    evaluation = evaluate_run(trained.run_dir, config)
    metrics = trained.metrics | headline_metrics(evaluation)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(trained.run.metrics, metrics)
    return RunSummary(trained.run, metrics, evaluation)


def headline_metrics(evaluation) -> dict[str, Any]:
    """What metrics.json keeps of an evaluation: headline scores per arm (or the domain report), gates, rows."""
    metrics: dict[str, Any] = {"n_eval": evaluation.n_eval, "gates": [_plain_gate(g) for g in evaluation.gates]}
    if evaluation.kind == "domain_adaptation":  # perplexities and questions, not generations
        metrics["scores"], metrics["domain"] = {}, evaluation.to_json()
    else:
        metrics["scores"] = {name: arm.headline() | ({"field_accuracy_per_key": arm.field_accuracy_per_key}
                                                     if arm.field_accuracy_per_key else {})
                             for name, arm in evaluation.arms.items()}
        metrics["best_baseline"] = dict(evaluation.best_baseline)
    return metrics


def _plain_gate(gate) -> dict[str, Any]:
    return gate.as_dict() if hasattr(gate, "as_dict") else {"gate": gate.gate, "value": gate.value,
                                                             "passed": gate.passed}


def train_only(config: RunConfig, config_name: str = "run", resume: bool = False) -> RunSummary:
    """`specialist train`: data and training only; with `resume`, continue the newest complete checkpoint."""
    from specialist.train import check_method_runs_here, latest_complete_checkpoint

    check_method_runs_here(config.method)
    started = time.perf_counter()
    checkpoint = None
    if resume:
        run_folder = RunFolder.newest(config, config_name)
        checkpoint = latest_complete_checkpoint(run_folder.checkpoints)
        if checkpoint is None:
            raise ConfigError(f"{run_folder.path} has no complete checkpoint to resume from",
                              hint="start again without --resume")
        console.log(f"resuming {run_folder.path} from {checkpoint.name}")
    else:
        run_folder = RunFolder.create(config, config_name)
    manifest = start_manifest(config, run_folder.manifest)
    tokenizer, template = load_template(config, run_folder)
    split, split_summary = prepare_data(config, run_folder.data, tokenizer, template)
    model, tokenizer = load_base(config)
    result = train(config, model, tokenizer, template, split, run_folder, resume_from=checkpoint)
    metrics = {"model": config.model.name, "method": config.method.kind, "split": split_summary,
               "train": result.summary(), "overfitting_warning": overfitting_warning(result.log_history),
               "wall_seconds": round(time.perf_counter() - started, 1)}
    if is_main_process():
        write_training_outputs(run_folder, metrics, result, manifest)
    return RunSummary(run_folder, metrics)


def train(config: RunConfig, model, tokenizer, template, split: Split, run: RunFolder,
          resume_from: Path | None = None) -> TrainResult:
    from specialist.train import TrainJob, train_model

    split = with_retrieval(config, split, run)
    return train_model(TrainJob(config, model, tokenizer, template, split, run, resume_from))


def with_retrieval(config: RunConfig, split: Split, run: RunFolder) -> Split:
    """data.retrieval: store the training rows as the run's index and give every train and val row its k nearest
    training rows as shots (a training row never sees itself, a near duplicate or, split by group, its group)."""
    from dataclasses import replace

    from specialist.core.retrieval import RetrievalIndex

    retrieval = config.data.retrieval
    if retrieval is None:
        return split
    index = RetrievalIndex.of_examples(split.train, retrieval.near_duplicate, retrieval.k)
    if is_main_process():
        index.save(run.retrieval_file)
    train_shots = index.training_shots(retrieval.k, use_groups=config.data.split_by == "grouped")
    val_shots = index.prompt_shots([ex.prompt for ex in split.val])
    console.log(f"retrieval: each prompt carries its {retrieval.k} nearest of {len(index)} training rows")
    return Split([replace(ex, shots=tuple(shots)) for ex, shots in zip(split.train, train_shots)],
                 [replace(ex, shots=tuple(shots)) for ex, shots in zip(split.val, val_shots)], split.test)


def prepare_data(config: RunConfig, folder: Path, tokenizer=None, template=None, show_progress: bool = True,
                 protect: list[Path] | None = None) -> tuple[Split, dict[str, Any]]:
    """`specialist prepare` into `folder` (rank 0 under several processes; the others wait, then read it)."""
    from specialist.data import Measuring, prepare

    if is_main_process():
        measuring = (Measuring(tokenizer, template, config.training.max_length)
                     if tokenizer is not None and template is not None else None)
        prepared = prepare(config.data, config.method.kind, folder, config.training.seed, measuring=measuring,
                           show_progress=show_progress, protect=protect or [])
        print_prepare_report(prepared.report)
    wait_for_all_ranks()
    split = read_split(folder)
    console.log(f"data: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test rows")
    return split, prepared_files(folder)


def prepared_files(folder: Path) -> dict[str, Any]:
    from specialist.data.prepare import read_manifest

    return read_manifest(folder)["files"]


def load_template(config: RunConfig, run: RunFolder | None = None):
    """The base model's tokenizer and the prompt template (saved into the run folder when given)."""
    from specialist.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.name)
    template = template_for(config, tokenizer)
    if run is not None and is_main_process():
        run.save_template(template)
    return tokenizer, template


def template_for(config: RunConfig, tokenizer) -> PromptTemplate:
    """The run's prompt format; with `over_length: truncate`, it shortens inputs to fit `max_length`."""
    data = config.data
    if data.over_length != "truncate":
        return PromptTemplate.for_tokenizer(tokenizer, data.instruction)
    return PromptTemplate.for_tokenizer(tokenizer, data.instruction, max_length=config.training.max_length,
                                        truncate_side=data.truncate_side)


def load_base(config: RunConfig):
    """The base model and its tokenizer, in the dtype the method trains in."""
    from specialist.models import load_model_and_tokenizer

    dtype = config.model.dtype
    if config.method.kind == "full" and dtype == "auto":
        dtype = "float32"  # all weights train: keep fp32 master weights, bf16 only through autocast
    return load_model_and_tokenizer(config.model.name, dtype, quantize_4bit=config.method.kind == "qlora")


def write_training_outputs(run: RunFolder, metrics: dict[str, Any], result: TrainResult,
                           manifest: dict[str, Any]) -> None:
    write_json(run.metrics, metrics)
    plot_loss_curve(result.log_history, run.loss_plot)
    finish_manifest(manifest, run.manifest, metrics.get("split", {}))
    if metrics.get("overfitting_warning"):
        console.print(f"[yellow]warning:[/] {metrics['overfitting_warning']}")


def overfitting_warning(log_history: list[dict[str, Any]], tolerance: float = 0.02) -> str | None:
    """A sentence when validation loss ended above its best while training loss kept falling, else None."""
    if any("reward" in e for e in log_history):  # grpo: its loss centres on 0 by construction, fit or not
        return None
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    train_losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if len(val) < 2 or len(train_losses) < 2:
        return None
    best_step, best = min(val, key=lambda item: item[1])
    last_step, last = val[-1]
    train_at_best = min(train_losses, key=lambda item: abs(item[0] - best_step))[1]
    if last > best + tolerance and train_losses[-1][1] < train_at_best:
        return (f"possible overfitting: validation loss rose from {best:.3f} (step {best_step}) to {last:.3f} "
                f"(step {last_step}) while training loss kept falling")
    return None
