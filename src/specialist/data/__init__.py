"""Data stage: load examples, split them deterministically, render them through one prompt template."""

from specialist.data.load import Columns, Example, load_examples
from specialist.data.split import Split, read_split, split_examples, write_split
from specialist.data.template import PromptTemplate, encode_for_training

__all__ = [
    "Columns",
    "Example",
    "PromptTemplate",
    "Split",
    "encode_for_training",
    "load_examples",
    "read_split",
    "split_examples",
    "write_split",
]
