"""Train stage: one module per method on top of TRL/transformers."""

from specialist.train.sft import TrainResult, train_lora

__all__ = ["TrainResult", "train_lora"]
