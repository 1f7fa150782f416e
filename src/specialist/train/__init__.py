"""Train stage: one module per method family on top of TRL/transformers, one shared loop (the Trainer's)."""

from __future__ import annotations

from pathlib import Path

from specialist.config import MethodConfig, TrainingConfig
from specialist.data import Example, PromptTemplate
from specialist.errors import ConfigError
from specialist.run_folder import RunFolder
from specialist.train.common import TrainResult, latest_complete_checkpoint


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


def train_model(model, tokenizer, template: PromptTemplate, train: list[Example], val: list[Example],
                method: MethodConfig, training: TrainingConfig, run: RunFolder | Path,
                resume_from: Path | None = None) -> TrainResult:
    """Train with the method the config names into the run folder `run`; returns the trained model and figures."""
    run = run if isinstance(run, RunFolder) else RunFolder(Path(run))
    if method.kind == "dpo":
        from specialist.train.dpo import train_dpo

        return train_dpo(model, tokenizer, template, train, val, method, training, run, resume_from)
    if method.kind == "grpo":
        from specialist.train.grpo import train_grpo

        return train_grpo(model, tokenizer, template, train, val, method, training, run, resume_from)
    if method.kind == "classifier":
        from specialist.train.classifier import train_classifier

        return train_classifier(model, tokenizer, template, train, val, method, training, run, resume_from)
    from specialist.train.sft import train_sft

    return train_sft(model, tokenizer, template, train, val, method, training, run, resume_from)


__all__ = ["TrainResult", "check_method_runs_here", "latest_complete_checkpoint", "train_model"]
