"""Data stage: read any supported file and shape, clean, dedupe, split and balance it, render it through one
prompt template."""

from specialist.data.load import Example
from specialist.data.prepare import Measuring, Prepared, prepare
from specialist.data.shapes import training_pairs
from specialist.data.split import Split, read_split
from specialist.data.template import FittedPrompt, PromptTemplate, encode_for_training

__all__ = ["Example", "FittedPrompt", "Measuring", "Prepared", "PromptTemplate", "Split", "encode_for_training",
           "prepare", "read_split", "training_pairs"]
