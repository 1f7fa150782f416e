"""specialist: turn a general pretrained LLM into a specialist for one job, with proof."""

__version__ = "0.1.0"
