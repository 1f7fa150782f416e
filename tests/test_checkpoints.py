"""Checkpoints, SIGKILL and resume, early stopping, monitoring files, the manifest."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from specialist.config import validate_config
from specialist.pipeline import train_only
from specialist.train.common import COMPLETE_MARK, latest_complete_checkpoint

# Runs `train_only` in a child process that SIGKILLs itself right after the checkpoint at KILL_AT is complete.
KILLING_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from transformers import TrainerCallback
    import specialist.train.common as common
    from specialist.config import load_config
    from specialist.pipeline import train_only

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            mark = Path(args.output_dir) / f"checkpoint-{state.global_step}" / common.COMPLETE_MARK
            if state.global_step == int(os.environ["KILL_AT"]) and mark.is_file():
                os.kill(os.getpid(), signal.SIGKILL)

    original = common.callbacks
    common.callbacks = lambda *a: original(*a) + [KillAfterSave()]
    import specialist.train.sft as sft
    sft.callbacks = common.callbacks
    train_only(load_config(sys.argv[1]), "tiny", resume=False)
""")


def checkpointing_config(tiny_config, run_name):
    tiny_config["training"].update({"max_steps": 8, "eval_steps": 2, "save_steps": 2, "save_total_limit": 2,
                                    "learning_rate": 0.02})
    tiny_config["output"]["run_name"] = run_name
    return tiny_config


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_config, tmp_path):
    reference = train_only(validate_config(checkpointing_config(tiny_config, "straight")), "tiny")

    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(checkpointing_config(tiny_config, "killed")))
    child = subprocess.run([sys.executable, "-c", KILLING_SCRIPT, str(config_path)],
                           env={**os.environ, "KILL_AT": "4"}, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    run_dir = tmp_path / "runs" / "killed"
    assert latest_complete_checkpoint(run_dir / "checkpoints").name == "checkpoint-4"
    assert not (run_dir / "adapter").exists()

    # A save interrupted half-way: the folder exists but was never marked complete. It must be ignored.
    half = run_dir / "checkpoints" / "checkpoint-6"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"truncated")
    assert latest_complete_checkpoint(run_dir / "checkpoints").name == "checkpoint-4"

    resumed = train_only(validate_config(yaml.safe_load(config_path.read_text())), "tiny", resume=True)
    assert resumed.metrics["train"]["steps"] == 8
    want = load_file(reference.run_dir / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert resumed.metrics["train"]["final_loss"] == pytest.approx(reference.metrics["train"]["final_loss"], rel=1e-3)
    assert len(json.loads((run_dir / "manifest.json").read_text())["sessions"]) == 2


def test_checkpoints_rotate_and_every_kept_one_is_complete(tiny_config):
    summary = train_only(validate_config(checkpointing_config(tiny_config, "rotate")), "tiny")
    kept = sorted((summary.run_dir / "checkpoints").glob("checkpoint-*"))
    assert 1 <= len(kept) <= 3  # the last save_total_limit, plus the best when it is older
    assert all((c / COMPLETE_MARK).is_file() for c in kept)
    assert summary.metrics["train"]["best_checkpoint"] is not None


def test_early_stopping_ends_a_run_whose_validation_loss_stalls(tiny_config):
    tiny_config["training"].update({"max_steps": 40, "eval_steps": 1, "save_steps": 1, "learning_rate": 0.5,
                                    "early_stopping_patience": 2, "early_stopping_min_delta": 10.0})
    summary = train_only(validate_config(tiny_config), "tiny")
    # min_delta larger than any possible gain: the first evaluation is the best, two more end the run.
    assert summary.metrics["train"]["steps"] == 3


def test_monitoring_files_and_manifest(tiny_config):
    tiny_config["training"]["report_to"] = ["tensorboard"]
    tiny_config["training"]["max_steps"] = 4
    summary = train_only(validate_config(tiny_config), "tiny")
    rows = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "learning_rate" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert all({"step", "epoch", "time"} <= set(r) for r in rows)
    assert list((summary.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert (summary.run_dir / "loss.png").is_file()
    manifest = json.loads((summary.run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["packages"]["torch"] and manifest["packages"]["trl"]
    assert len(manifest["data_file"]["sha256"]) == 64 and manifest["split"]["train"]["rows"] == 32
    assert manifest["hardware"]["cpu_count"] and manifest["started"] <= manifest["finished"]
