"""`specialist run` and `specialist train`: the stages wired together around one run folder.

`run`: data -> training -> evaluation of every arm -> report. `train`: data -> training, resumable.
The run folder holds everything needed to audit or reuse the run:

    config.yaml        the resolved config (after flags)
    manifest.json      data hashes, package versions, seed, hardware, git commit, start/end times
    data/              train/val/test.jsonl as used, with the data manifest.json and report.json (`prepare`)
    template.json      the prompt format used by training and evaluation (and later serving)
    adapter/ | model/  the PEFT adapter (LoRA methods) or the full model (all-weights methods)
    checkpoints/       the last `save_total_limit` checkpoints and the best one (marked complete when whole)
    metrics.jsonl      every training log line; tensorboard/ the same as TensorBoard events
    predictions.jsonl  every held-out example with each arm's output (run / eval)
    metrics.json       training figures, split hashes, headline scores per arm
    eval.json          every score with its interval, paired tests, labels, overfitting, gates (run / eval)
    loss.png, figures/ training and validation loss; score, confusion and length plots
    report.html/.md    the before/after report (run / eval)

Under `torchrun`/`accelerate launch` every process runs this; only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from specialist.config import RunConfig
from specialist.console import console
from specialist.data import PromptTemplate, Split, read_split
from specialist.data.report import print_prepare_report
from specialist.errors import ConfigError
from specialist.evaluate.report import plot_loss_curve
from specialist.manifest import finish_manifest, start_manifest
from specialist.train.common import TrainResult, is_main_process, world_size


@dataclass
class RunSummary:
    run_dir: Path
    metrics: dict[str, Any]

    @property
    def report(self) -> Path:
        return self.run_dir / "report.html"


def run(config: RunConfig, config_name: str = "run") -> RunSummary:
    """The whole slice for `config`: training, then every evaluation arm on the held-out rows, then the report."""
    from specialist.evaluate.runner import check_evaluation_inputs, evaluate_run, headline_scores

    started = time.perf_counter()
    check_evaluation_inputs(config)  # a bad schema or question file fails now, not after training
    trained = train_only(config, config_name)
    if not is_main_process():
        return trained
    metrics = trained.metrics
    evaluation = evaluate_run(trained.run_dir, config)
    if evaluation.report.get("kind") == "domain_adaptation":  # perplexities and questions, not generations
        metrics["scores"] = {}
        metrics["domain"] = evaluation.report
    else:
        metrics["scores"] = {arm: headline_scores(summary)
                             | ({"field_accuracy_per_key": summary["field_accuracy_per_key"]}
                                if "field_accuracy_per_key" in summary else {})
                             for arm, summary in evaluation.report["arms"].items()}
    metrics["n_eval"] = evaluation.report["n_eval"]
    metrics["gates"] = evaluation.report["gates"]
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    (trained.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return RunSummary(run_dir=trained.run_dir, metrics=metrics)


def train_only(config: RunConfig, config_name: str = "run", resume: bool = False) -> RunSummary:
    """`specialist train`: data and training only; with `resume`, continue the newest complete checkpoint."""
    from specialist.train import check_method_runs_here, latest_complete_checkpoint

    check_method_runs_here(config.method)
    started = time.perf_counter()
    if resume:
        run_dir = find_run_to_resume(config, config_name)
        checkpoint = latest_complete_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise ConfigError(f"{run_dir} has no complete checkpoint to resume from",
                              hint="start again without --resume")
        console.log(f"resuming {run_dir} from {checkpoint.name}")
    else:
        run_dir, checkpoint = create_run_dir(config, config_name), None
    manifest = start_manifest(config, run_dir)
    tokenizer, template = load_template(config, run_dir)
    split, split_summary = prepare_data(config, run_dir / "data", tokenizer, template)
    model, tokenizer = load_base(config)
    result = train(config, model, tokenizer, template, split, run_dir, resume_from=checkpoint)
    metrics = {"model": config.model.name, "method": config.method.kind, "split": split_summary,
               "train": result.summary(), "overfitting_warning": overfitting_warning(result.log_history),
               "wall_seconds": round(time.perf_counter() - started, 1)}
    if is_main_process():
        write_training_outputs(run_dir, metrics, result, manifest)
    return RunSummary(run_dir=run_dir, metrics=metrics)


def train(config: RunConfig, model, tokenizer, template, split: Split, run_dir: Path,
          resume_from: Path | None = None) -> TrainResult:
    from specialist.train import train_model

    return train_model(model, tokenizer, template, split.train, split.val, config.method, config.training,
                       run_dir, resume_from)


def prepare_data(config: RunConfig, folder: Path, tokenizer=None, template=None,
                 show_progress: bool = True) -> tuple[Split, dict[str, Any]]:
    """`specialist prepare` into `folder` (rank 0 under several processes; the others wait, then read it)."""
    from specialist.data import prepare

    if is_main_process():
        prepared = prepare(config.data, config.method.kind, folder, config.training.seed, tokenizer=tokenizer,
                           template=template, max_length=config.training.max_length, show_progress=show_progress)
        print_prepare_report(prepared.report)
    wait_for_all_ranks()
    split = read_split(folder)
    console.log(f"data: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test rows")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return split, manifest["files"]


def load_template(config: RunConfig, run_dir: Path | None = None):
    """The base model's tokenizer and the prompt template (saved into the run folder when given)."""
    from specialist.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.name)
    template = PromptTemplate.for_tokenizer(tokenizer, config.data.instruction)
    if run_dir is not None and is_main_process():
        template.save(run_dir / "template.json")
    return tokenizer, template


def load_base(config: RunConfig):
    """The base model and its tokenizer, in the dtype the method trains in."""
    from specialist.models import load_model_and_tokenizer

    dtype = config.model.dtype
    if config.method.kind == "full" and dtype == "auto":
        dtype = "float32"  # all weights train: keep fp32 master weights, bf16 only through autocast
    return load_model_and_tokenizer(config.model.name, dtype, quantize_4bit=config.method.kind == "qlora")


def create_run_dir(config: RunConfig, config_name: str) -> Path:
    name = config.output.run_name or shared_across_ranks(f"{config_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    run_dir = config.output.dir / name
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=config.output.run_name is not None)
        (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    return run_dir


def wait_for_all_ranks() -> None:
    if world_size() > 1:
        import torch.distributed as dist
        from accelerate import PartialState

        PartialState()  # initialises the process group if the Trainer has not yet
        dist.barrier()  # PartialState.wait_for_everyone skips CPU launches that accelerate does not classify


def shared_across_ranks(value: str) -> str:
    """Rank 0's value on every rank, so all processes of a launch agree on the run folder."""
    if world_size() == 1:
        return value
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()  # initialises the process group the Trainer will use anyway
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_run_to_resume(config: RunConfig, config_name: str) -> Path:
    if config.output.run_name:
        run_dir = config.output.dir / config.output.run_name
        if not run_dir.is_dir():
            raise ConfigError(f"no run folder {run_dir} to resume", hint="start it without --resume first")
        return run_dir
    candidates = sorted(config.output.dir.glob(f"{config_name}-*"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"no run of {config_name!r} under {config.output.dir} to resume",
                          hint="start it without --resume first, or set output.run_name")
    return candidates[-1]


def write_training_outputs(run_dir: Path, metrics: dict[str, Any], result: TrainResult,
                           manifest: dict[str, Any]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_loss_curve(result.log_history, run_dir / "loss.png")
    finish_manifest(manifest, run_dir, metrics.get("split", {}))
    if metrics.get("overfitting_warning"):
        console.print(f"[yellow]warning:[/] {metrics['overfitting_warning']}")


def overfitting_warning(log_history: list[dict[str, Any]], tolerance: float = 0.02) -> str | None:
    """A sentence when validation loss ended above its best while training loss kept falling, else None."""
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


