"""The one training loop every method runs: the Trainer's own, built, run and saved here.

Methods differ in the datasets they build, the trainer class and its arguments; `fit` takes those and does the
rest the same way for each: callbacks (progress, metrics.jsonl, select_by, early stopping, the time budget), the
resume point, the final save (on every rank), and the `TrainResult`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from transformers import EarlyStoppingCallback, TrainerCallback

from specialist.config import TrainingConfig
from specialist.console import console
from specialist.errors import ConfigError
from specialist.ranks import is_main_process
from specialist.run_folder import RunFolder
from specialist.trackers import record_tracker_runs
from specialist.train.common import TrainResult, forward_evaluation_steps, lora_config
from specialist.train.job import TrainJob
from specialist.train.select_by import SelectByCallback, SelectionRows


def fit(job: TrainJob, trainer_class, args, train_ds, val_ds, selection: SelectionRows | None = None,
        evaluation_steps: float | None = None) -> TrainResult:
    """Build the method's trainer, run it, and save what it trained: `adapter/` (LoRA) or `model/` (all weights).

    `selection` (training.select_by): the validation rows scored at each evaluation to pick the best checkpoint.
    `evaluation_steps`: one evaluation's cost in optimizer steps, for the time budget; None: a forward pass over
    the validation rows.
    """
    training, method = job.training, job.method
    if evaluation_steps is None:
        evaluation_steps = forward_evaluation_steps(training, len(val_ds)) if val_ds is not None else 0.0
    trainer = trainer_class(
        model=job.model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=job.tokenizer,
        peft_config=lora_config(method) if method.uses_lora else None,
        callbacks=callbacks(training, job.run, args, selection, evaluation_steps),
    )
    warn_if_fsdp_was_asked_for_but_is_off(trainer)
    seconds, tokens = run_trainer(trainer, job.resume_from, trains_packed(training, job.model))
    output_dir = job.run.trained_output(method.uses_lora)
    save_trained(trainer, output_dir, None if method.uses_lora else job.tokenizer)
    return trained_result(trainer, output_dir, seconds, tokens)


def trained_result(trainer, output_dir: Path, seconds: float, tokens: int) -> TrainResult:
    """What a finished trainer reports: the trained model, where it was saved, its log and its figures."""
    return TrainResult(
        model=trainer.model,
        output_dir=output_dir,
        log_history=list(trainer.state.log_history),
        train_tokens=tokens,
        seconds=seconds,
        steps=trainer.state.global_step,
        best_checkpoint=trainer.state.best_model_checkpoint,
        epochs=trainer.args.num_train_epochs,
        time_budget=budget_choice(trainer),
    )


def run_trainer(trainer, resume_from: Path | None, packed: bool = False) -> tuple[float, int]:
    """Train (from a checkpoint when given), the frozen layers through oneDNN's packed kernels where `packed`;
    return (seconds, tokens seen)."""
    from transformers.trainer_callback import PrinterCallback

    from specialist.onednn import drop_copies, packed_linears

    # The Rich bar replaces the Trainer's plain-text dict printer.
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    try:
        # a training scope even unpacked: no copy of a trainable weight is held (decode's bfloat16 head included)
        with packed_linears(trainer.model if packed else None, packed, training=True):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        if packed:
            drop_copies(trainer.model)  # Gemma 3 270M: 1.4 GiB that evaluation would hold for nothing
        # a training that raised never reaches on_train_end: its progress clock must not outlive it
        for callback in trainer.callback_handler.callbacks:
            if hasattr(callback, "stop_clock"):
                callback.stop_clock()
    return time.perf_counter() - started, int(trainer.state.num_input_tokens_seen or 0)


def save_trained(trainer, output_dir: Path, tokenizer=None) -> None:
    """Save the trained adapter or model (and the tokenizer with a full model) into `output_dir`.

    Called on every rank: under FSDP (or ZeRO-3) the weights are sharded and gathering them is a collective that
    every process must join; the Trainer writes the files on the main process only. A sharded state-dict setting
    (what a checkpoint wants) would make `save_model` write nothing, so the final save asks for the full one.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output_dir))
    if tokenizer is not None and is_main_process():
        tokenizer.save_pretrained(output_dir)


def warn_if_fsdp_was_asked_for_but_is_off(trainer) -> None:
    """accelerate 1.15 runs an FSDP launch on CPU as plain data parallel (it switches to FSDP only on GPUs and
    other accelerators): say so rather than let a user believe the model is sharded."""
    import os

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled and is_main_process():
        console.print("[yellow]warning:[/] FSDP was asked for, but accelerate runs this launch as data parallel "
                      "(no sharding): FSDP needs GPUs (or other accelerators) with accelerate 1.15")


def trains_packed(training: TrainingConfig, model) -> bool:
    """training.packed_kernels resolved: on where the model is on the CPU and torch has oneDNN's packed kernel;
    true where it cannot be is an error rather than a silent fallback."""
    from specialist.onednn import available

    if training.packed_kernels is False:
        return False
    on_cpu = next(model.parameters()).device.type == "cpu"
    if training.packed_kernels is True and not (on_cpu and available()):
        raise ConfigError("training.packed_kernels: true needs the model on the CPU and a torch built with oneDNN "
                          f"(here: {'CPU' if on_cpu else 'not the CPU'}, oneDNN kernels "
                          f"{'present' if available() else 'missing'}); set it to auto or false")
    return on_cpu and available()


def use_bf16_autocast(model, asked: bool | Literal["auto"] = "auto") -> bool:
    """training.bf16: true or false as asked; auto: bf16 autocast where the weights are bf16 or the hardware
    multiplies bf16 (fp32 weights stay the master copy).

    On 2 AVX512-BF16 cores without AMX, autocast trains Gemma 3 270M with LoRA 1.22x faster than fp32 at 2 rows a
    forward pass and 1.34x at 4 (bench/results/train_precision_avx512_2cores.txt); bf16 *weights* were slower there (models.torch_dtype),
    so the weights stay fp32 and only the matmuls drop to bf16."""
    import torch

    from specialist.decode import cpu_multiplies_bf16
    from specialist.models import bf16_is_fast

    if asked != "auto":
        return bool(asked)
    on_cpu = next(model.parameters()).device.type == "cpu"
    return (next(model.parameters()).dtype == torch.bfloat16 or bf16_is_fast()
            or (on_cpu and cpu_multiplies_bf16()))


def callbacks(training: TrainingConfig, run: RunFolder, args, selection: SelectionRows | None = None,
              evaluation_steps: float = 0.0) -> list[TrainerCallback]:
    """`evaluation_steps`: what one evaluation costs in optimizer steps (estimated), which the time budget keeps
    for the evaluation of the last step."""
    from specialist.train.progress import RichProgressCallback

    metrics = MetricsJsonlCallback(run.metrics_log)
    found: list[TrainerCallback] = [RichProgressCallback(), metrics, TrackerRunsCallback(run.tracker_runs)]
    if selection is not None:  # before early stopping, which reads the score it adds
        if not args.load_best_model_at_end:
            from specialist.errors import ConfigError

            raise ConfigError("training.select_by needs checkpoints at evaluation steps",
                              hint="set training.save_steps to a multiple of training.eval_steps (or leave both "
                              "unset)")
        found.append(SelectByCallback(selection, record=metrics.write))
    if training.early_stopping_patience:
        if not args.load_best_model_at_end:
            from specialist.errors import ConfigError

            raise ConfigError(
                "early stopping needs validation rows and checkpoints at evaluation steps",
                hint="set data.val_fraction > 0 and training.save_steps to a multiple of training.eval_steps",
            )
        found.append(EarlyStoppingCallback(training.early_stopping_patience, training.early_stopping_min_delta))
    if training.time_budget:  # last: an evaluation it times includes select_by's scoring, which runs before it
        from specialist.train.budget import TimeBudgetCallback

        found.append(TimeBudgetCallback(training, record=metrics.write, evaluation_steps=evaluation_steps))
    return found


def budget_choice(trainer) -> dict | None:
    """What training.time_budget chose for this trainer's run (None without a budget)."""
    from specialist.train.budget import TimeBudgetCallback

    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TimeBudgetCallback)]
    return found[0].choice if found else None


class TrackerRunsCallback(TrainerCallback):
    """Records which run each tracker opened (specialist.trackers), for the evaluation to log into. It runs after
    the trackers' own callbacks, which the Trainer puts first, so their runs are open by on_train_begin."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record_tracker_runs(self.path, args)


class MetricsJsonlCallback(TrainerCallback):
    """Every Trainer log (loss, lr, eval loss, ...) as one JSON line with step, epoch and wall time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.write({"step": state.global_step, "epoch": state.epoch,
                    **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}})

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (with the wall time since training began); the caller is rank 0."""
        row = {**row, "time": round(time.time() - self.started, 2)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
