"""Preference tuning with TRL's DPOTrainer on prompt/chosen/rejected rows.

Starting from an SFT run's adapter, that adapter is merged into the base first and a new LoRA adapter is trained
on top: the reference model (the merged model with the new adapter switched off) is then the SFT model, which is
what DPO's KL pull should point at.
"""

from __future__ import annotations

from trl import DPOTrainer

from specialist.data import Example, PromptTemplate
from specialist.run_folder import merge_adapter
from specialist.train.checkpoints import DurableCheckpoints
from specialist.train.common import TrainResult, common_arguments
from specialist.train.job import TrainJob
from specialist.train.loop import fit, use_bf16_autocast


class DurableDPOTrainer(DurableCheckpoints, DPOTrainer):
    """TRL's DPOTrainer with checkpoints that survive a kill at any instant."""


def preference_dataset(examples: list[Example], template: PromptTemplate, tokenizer):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": template.render_prompt(ex.prompt, tokenizer), "chosen": ex.completion, "rejected": ex.rejected}
        for ex in examples
    ])


def train_dpo(job: TrainJob) -> TrainResult:
    """Preference-tune on the job's prompt/chosen/rejected rows (from its SFT adapter, merged, when it names one)."""
    from trl import DPOConfig

    method, training, run = job.method, job.training, job.run
    if method.from_adapter is not None:
        job = job.with_model(merge_adapter(job.model, method.from_adapter))
    train_ds = preference_dataset(job.train, job.template, job.tokenizer)
    val_ds = preference_dataset(job.val, job.template, job.tokenizer) if job.val else None
    args = DPOConfig(
        **common_arguments(training, run.checkpoints, len(train_ds), val_ds is not None,
                           use_bf16_autocast(job.model, training.bf16), tensorboard_dir=run.tensorboard,
                           sequence_length=2 * training.max_length),  # chosen and rejected in one forward
        beta=method.beta,
        max_length=training.max_length,
    )
    args.prediction_loss_only = False  # DPO's eval reports reward margins and accuracy alongside the loss
    return fit(job, DurableDPOTrainer, args, train_ds, val_ds)
