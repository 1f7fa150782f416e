"""Preference tuning with TRL's DPOTrainer on prompt/chosen/rejected rows.

Starting from an SFT run's adapter, that adapter is merged into the base first and a new LoRA adapter is trained
on top: the reference model (the merged model with the new adapter switched off) is then the SFT model, which is
what DPO's KL pull should point at.
"""

from __future__ import annotations

from pathlib import Path

from trl import DPOTrainer

from specialist.config import MethodConfig, TrainingConfig
from specialist.data import Example, PromptTemplate
from specialist.run_folder import RunFolder, merge_adapter
from specialist.train.checkpoints import DurableCheckpoints
from specialist.train.common import TrainResult, common_arguments
from specialist.train.sft import fit, use_bf16_autocast


class DurableDPOTrainer(DurableCheckpoints, DPOTrainer):
    """TRL's DPOTrainer with checkpoints that survive a kill at any instant."""


def preference_dataset(examples: list[Example], template: PromptTemplate, tokenizer):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": template.render_prompt(ex.prompt, tokenizer), "chosen": ex.completion, "rejected": ex.rejected}
        for ex in examples
    ])


def train_dpo(
    model,
    tokenizer,
    template: PromptTemplate,
    train: list[Example],
    val: list[Example],
    method: MethodConfig,
    training: TrainingConfig,
    run: RunFolder,
    resume_from: Path | None = None,
) -> TrainResult:
    from trl import DPOConfig

    if method.from_adapter is not None:
        model = merge_adapter(model, method.from_adapter)
    train_ds = preference_dataset(train, template, tokenizer)
    val_ds = preference_dataset(val, template, tokenizer) if val else None
    args = DPOConfig(
        **common_arguments(training, run.checkpoints, len(train_ds), val_ds is not None,
                           use_bf16_autocast(model), tensorboard_dir=run.tensorboard,
                           sequence_length=2 * training.max_length),  # chosen and rejected in one forward
        beta=method.beta,
        max_length=training.max_length,
    )
    args.prediction_loss_only = False  # DPO's eval reports reward margins and accuracy alongside the loss
    return fit(DurableDPOTrainer, model, args, train_ds, val_ds, tokenizer, method, training, run, resume_from)
