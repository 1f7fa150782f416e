"""Tiny models and tokenizers built in-process (no downloads), and a cache that never touches the user's."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import pytest

CORPUS = [
    '{"level": "INFO", "component": "dfs.DataNode", "template": "Receiving block blk_<*>"}',
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865 terminating",
    "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186",
    "[Sun Dec 04 04:47:44 2005] [notice] workerEnv.init() ok /etc/httpd/conf/workers2.properties",
    "### Input:\n### Output:\nParse the log line into JSON. null true false 0123456789",
] * 20


def under_ci() -> bool:
    """CI is set by GitHub Actions, GitLab CI and the like, and by .ci/run for any other runner."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str, reason: str) -> ModuleType:
    """pytest.importorskip on a developer's machine; under CI an import, so a package the test extra installs
    (the openai and LangChain clients, xgrammar) failing to install fails the run instead of skipping its
    tests silently."""
    if under_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(autouse=True)
def one_torch_thread(request):
    """Tiny models run fastest on one thread: a second one only spin-waits on 2 busy cores (a tiny generate took
    0.1 s on one thread and up to 11 s on two, measured here). The slow test on the real model keeps them all."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("specialist-home")
    monkeypatch.setenv("SPECIALIST_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved random Llama (2 layers, hidden 32) with a BPE tokenizer trained on log-like text."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


LOG_EXAMPLES = [
    ("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_3886 terminating",
     {"level": "INFO", "component": "dfs.DataNode$PacketResponder",
      "template": "PacketResponder <*> for block blk_<*> terminating"}),
    ("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186",
     {"level": None, "component": "sshd", "template": "Invalid user <*> from <*>"}),
    ("[Sun Dec 04 04:47:44 2005] [notice] workerEnv.init() ok /etc/httpd/conf/workers2.properties",
     {"level": "notice", "component": None, "template": "workerEnv.init() ok <*>"}),
]


@pytest.fixture
def log_data(tmp_path) -> Path:
    """40 prompt/completion rows cycling through three loghub-like lines."""
    path = tmp_path / "data.jsonl"
    rows = [
        {"prompt": f"{LOG_EXAMPLES[i % 3][0]} #{i}", "completion": json.dumps(LOG_EXAMPLES[i % 3][1])}
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir, log_data):
    """A config dict for a 2-step run of the tiny model."""
    return {
        "data": {"path": str(log_data), "instruction": "Parse the log line into JSON.", "val_fraction": 0.1,
                 "test_fraction": 0.1, "dedupe": {"near": False}},  # rows differ by a counter only
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "method": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 128, "learning_rate": 0.01, "logging_steps": 1,
                     "report_to": []},
        "evaluation": {"max_new_tokens": 8, "batch_size": 4, "samples_in_report": 2, "knowledge_probe_size": 8,
                       "forgetting_max_texts": 20},
        "output": {"dir": str(tmp_path / "runs"), "run_name": "tiny"},
    }


def wait_until(check, timeout: float = 30.0, every: float = 0.05) -> bool:
    """Poll `check` every `every` seconds until it holds (True) or `timeout` passes (False)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(every)
    return False


def train_tiny_run(model_dir: Path, work: Path) -> Path:
    """Train the tiny run (a LoRA adapter, 2 steps on 40 log lines) on the tiny model in `model_dir`, under `work`.
    The session fixture and bench/serve_soak.py both call it, so the soak serves what CI serves."""
    from specialist.config import validate_config
    from specialist.pipeline import train_only

    data = work / "data.jsonl"
    rows = [{"prompt": f"{LOG_EXAMPLES[i % 3][0]} #{i}", "completion": json.dumps(LOG_EXAMPLES[i % 3][1])}
            for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config({
        "data": {"path": str(data), "dedupe": {"near": False}},
        "model": {"name": str(model_dir), "dtype": "float32"},
        "method": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 128, "learning_rate": 0.05, "report_to": []},
        "evaluation": {"max_new_tokens": 8},
        "output": {"dir": str(work / "runs"), "run_name": "tiny"}})
    return train_only(config, "tiny").run_dir


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A run folder with a LoRA adapter on the tiny model, trained once for the whole session (2 steps).

    Tests may read it and add files (exports go elsewhere); they must not change what is in it."""
    return train_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="module")
def arms(tiny_run_dir, tiny_model_dir):
    """The tiny run and the tiny base model as served arms, answers cut at 8 tokens (serve and loop tests)."""
    from specialist.deploy.arms import load_arms

    loaded = load_arms([("tuned", str(tiny_run_dir)), ("base", str(tiny_model_dir))])
    for arm in loaded.values():
        arm.max_new_tokens = 8
    return loaded
