"""How many optimizer steps a run takes, and where its warm-up, evaluations and checkpoints fall.

Pure arithmetic on the config and the training-set size (no torch), shared by the Trainer arguments and by the
time budget, which lowers the step count once training has started and must move everything else with it.
"""

from __future__ import annotations

import math

from specialist.config import TrainingConfig

# `training.epochs: auto`, the rule of OpenAI's hosted fine-tuning (n_epochs "auto"), as published in the OpenAI
# Cookbook, examples/Chat_finetuning_data_prep.ipynb ("Pricing and default n_epochs estimate"): 3 epochs, raised so
# that a small set is seen at least 100 times in all, lowered so that a large one is seen at most 25,000 times,
# within 1..25 epochs.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_AUTO_EPOCHS = 1
MAX_AUTO_EPOCHS = 25

EVALUATIONS_PER_RUN = 4  # when training.eval_steps is not set


def auto_epochs(n_train: int) -> tuple[int, str]:
    """(epochs, the reason in words) for `n_train` training rows, by the rule above."""
    n = max(1, n_train)
    if n * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // n)
        why = f"{n} rows x {TARGET_EPOCHS} < {MIN_TARGET_EXAMPLES} examples seen, so {MIN_TARGET_EXAMPLES} // {n}"
    elif n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_AUTO_EPOCHS, MAX_TARGET_EXAMPLES // n)
        why = f"{n} rows x {TARGET_EPOCHS} > {MAX_TARGET_EXAMPLES:,} examples seen, so {MAX_TARGET_EXAMPLES:,} // {n}"
    else:
        epochs = TARGET_EPOCHS
        why = f"{n} rows x {TARGET_EPOCHS} is within {MIN_TARGET_EXAMPLES}..{MAX_TARGET_EXAMPLES:,} examples seen"
    epochs = max(MIN_AUTO_EPOCHS, min(MAX_AUTO_EPOCHS, epochs))
    return epochs, f"epochs auto -> {epochs} ({why}; OpenAI's default rule, clamped to " \
                   f"{MIN_AUTO_EPOCHS}..{MAX_AUTO_EPOCHS})"


def resolve_epochs(training: TrainingConfig, n_train: int) -> tuple[float, str | None]:
    """(epochs to train, why, when `auto` chose them)."""
    if training.epochs == "auto":
        return auto_epochs(n_train)
    return float(training.epochs), None


def planned_steps(training: TrainingConfig, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps the config asks for: max_steps, or the epochs over `n_train` rows."""
    if training.max_steps > 0:
        return training.max_steps
    per_step = training.batch_size * training.gradient_accumulation_steps * world_size
    epochs, _ = resolve_epochs(training, n_train)
    return max(1, math.ceil(math.ceil(n_train / per_step) * epochs))


def eval_and_save_steps(training: TrainingConfig, steps: int) -> tuple[int, int]:
    """(evaluate every, checkpoint every) for a run of `steps` optimizer steps."""
    eval_steps = training.eval_steps or max(1, steps // EVALUATIONS_PER_RUN)
    return eval_steps, training.save_steps or eval_steps


def warmup_steps(training: TrainingConfig, steps: int) -> int:
    # floor, not ceil: a 6-step run gets no warmup rather than spending a sixth of its steps at lr 0
    return int(training.warmup_ratio * steps)
