"""What a trainer is given: one `TrainJob`, the same for every method.

A trainer reads everything from the job (the run's config included) and nothing from disk: the config in the run
folder is what the job was built from, so reading it again could only disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from specialist.config import MethodConfig, RunConfig, TrainingConfig
from specialist.data import Example, PromptTemplate, Split
from specialist.run_folder import RunFolder


@dataclass(frozen=True)
class TrainJob:
    """One training run: the config, the loaded base model and its tokenizer, the prompt format, the rows (train and
    val; test is never read here), the run folder to write into, and the checkpoint to resume from (None: start)."""

    config: RunConfig
    model: Any
    tokenizer: Any
    template: PromptTemplate
    split: Split
    run: RunFolder
    resume_from: Path | None = None

    @property
    def method(self) -> MethodConfig:
        return self.config.method

    @property
    def training(self) -> TrainingConfig:
        return self.config.training

    @property
    def train(self) -> list[Example]:
        return self.split.train

    @property
    def val(self) -> list[Example]:
        return self.split.val

    def with_model(self, model: Any) -> TrainJob:
        """The same job on another model (the base with an SFT adapter merged in, for dpo and grpo)."""
        return replace(self, model=model)
