"""Train stage: one module per method family on top of TRL/transformers, one shared loop (the Trainer's)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from specialist.config import MethodConfig
from specialist.errors import ConfigError
from specialist.train.common import TrainResult, latest_complete_checkpoint
from specialist.train.job import TrainJob


def check_method_runs_here(method: MethodConfig) -> None:
    """Refuse, before anything is loaded, a method this machine cannot run (never a silent fallback)."""
    if method.kind == "grpo":
        from specialist.train.grpo import check_rewards

        check_rewards(method)  # a reward that cannot be imported fails now, not after the data stage
    if method.kind != "qlora":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "method.kind=qlora needs a CUDA GPU: its 4-bit base model runs on bitsandbytes' CUDA kernels, "
            "and no CUDA device is visible here",
            hint="use method.kind=lora on this machine (same adapter, full-precision base), or run on a CUDA GPU",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("method.kind=qlora needs the bitsandbytes package",
                          hint="pip install 'specialist[qlora]'") from exc


# method.kind -> (module under train/, its trainer): every trainer takes one TrainJob and returns a TrainResult.
# Modules are imported when their method runs, so a run of one method never imports TRL's other trainers.
TRAINERS: dict[str, tuple[str, str]] = {
    "lora": ("sft", "train_sft"),
    "full": ("sft", "train_sft"),
    "qlora": ("sft", "train_sft"),
    "continued_pretraining": ("sft", "train_sft"),
    "dpo": ("dpo", "train_dpo"),
    "grpo": ("grpo", "train_grpo"),
    "classifier": ("classifier", "train_classifier"),
}


def trainer_for(kind: str) -> Callable[[TrainJob], TrainResult]:
    """The trainer of method.kind `kind` (a new kind: its module under train/ and a row in TRAINERS)."""
    module, function = TRAINERS[kind]
    return getattr(importlib.import_module(f"specialist.train.{module}"), function)


def train_model(job: TrainJob) -> TrainResult:
    """Train with the method the job's config names into its run folder; returns the trained model and figures."""
    return trainer_for(job.method.kind)(job)


__all__ = ["TRAINERS", "TrainJob", "TrainResult", "check_method_runs_here", "latest_complete_checkpoint",
           "train_model", "trainer_for"]
