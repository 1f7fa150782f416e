"""Checkpoints, SIGKILL and resume, early stopping, monitoring files, the manifest."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from specialist.config import load_config, validate_config
from specialist.pipeline import train_only
from specialist.train.checkpoints import is_complete, latest_complete_checkpoint

# One parent imports torch, transformers, TRL, PEFT and specialist (about 6 s) and runs no torch op (and
# OMP_NUM_THREADS=1 starts no OpenMP pool), so it can fork a child per kill point that starts training at once.
# Each child trains with wrappers around every step of a checkpoint save and SIGKILLs itself at one point of the
# save at the step given; the parent prints each child's exit code as JSON.
FORK_SERVER = textwrap.dedent("""
    import json, os, shutil, signal, sys
    from pathlib import Path
    import transformers.trainer as trainer_module
    from transformers.trainer_callback import TrainerState
    import specialist.train.checkpoints as checkpoints
    import specialist.train.sft, peft, trl.trainer.sft_trainer  # imported once here, not in every child
    from specialist.config import load_config
    from specialist.pipeline import train_only

    config_path, kill_step, points = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    target, saving = None, {"step": None}

    def reached(point):
        if point == target and saving["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def after(owner, name, point):
        original = getattr(owner, name)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            reached(point)
            return result
        setattr(owner, name, wrapper)

    durable_save = checkpoints.DurableCheckpoints._save_checkpoint
    def save_checkpoint(self, model, trial):
        saving["step"] = self.state.global_step
        return durable_save(self, model, trial)
    checkpoints.DurableCheckpoints._save_checkpoint = save_checkpoint

    after(trainer_module.Trainer, "save_model", "model")
    after(trainer_module.Trainer, "_save_optimizer_and_scheduler", "optimizer")
    after(trainer_module.Trainer, "_save_rng_state", "rng")
    after(TrainerState, "save_to_json", "trainer_state")
    after(checkpoints, "fsync_tree", "synced")
    after(checkpoints, "write_mark", "marked")
    after(checkpoints, "rotate", "rotated")

    os_replace, os_rename, os_unlink, rmtree = os.replace, os.rename, os.unlink, shutil.rmtree
    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(checkpoints.COMPLETE_MARK):
            reached("mark_not_yet_renamed")  # written and fsync'd under its temporary name
        return os_replace(src, dst, *args, **kwargs)
    def rename(src, dst, *args, **kwargs):
        result = os_rename(src, dst, *args, **kwargs)
        if Path(dst).name.startswith(checkpoints.DISCARDED_PREFIX):
            reached("old_renamed")
        return result
    removing = {"on": False}
    def tracked_rmtree(path, *args, **kwargs):
        removing["on"] = Path(path).name.startswith(checkpoints.DISCARDED_PREFIX)
        try:
            return rmtree(path, *args, **kwargs)
        finally:
            removing["on"] = False
    def unlink(path, *args, **kwargs):
        result = os_unlink(path, *args, **kwargs)
        if removing["on"]:
            reached("mid_removal")  # one file of the old checkpoint gone, the others still there
        return result
    os.replace, os.rename, os.unlink, shutil.rmtree = replace, rename, unlink, tracked_rmtree

    exits = {}
    for point in points:
        pid = os.fork()
        if pid == 0:
            target = point
            try:
                train_only(load_config(config_path, [f"output.run_name=kill-{point}"]), "tiny")
            except BaseException:
                import traceback
                traceback.print_exc()
                os._exit(3)
            os._exit(0)
        exits[point] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(exits))
""")

# Every instant of the save at step 4 where a kill can land, in the order they happen, and the checkpoint a
# resume must find: until the mark is in place the new checkpoint does not count, so checkpoint-2 must still be
# whole; from then on checkpoint-4 is complete, whatever happened to checkpoint-2.
KILL_POINTS = {
    "model": "checkpoint-2", "optimizer": "checkpoint-2", "rng": "checkpoint-2", "trainer_state": "checkpoint-2",
    "synced": "checkpoint-2", "mark_not_yet_renamed": "checkpoint-2", "marked": "checkpoint-4",
    "old_renamed": "checkpoint-4", "mid_removal": "checkpoint-4", "rotated": "checkpoint-4",
}


def checkpointing_config(tiny_config, run_name, save_total_limit=2, max_steps=8):
    tiny_config["training"].update({"max_steps": max_steps, "eval_steps": 2, "save_steps": 2,
                                    "save_total_limit": save_total_limit, "learning_rate": 0.02})
    tiny_config["output"]["run_name"] = run_name
    return tiny_config


def assert_same_adapter(got_run, want_run):
    want = load_file(want_run / "adapter" / "adapter_model.safetensors")
    got = load_file(got_run / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_kill_at_any_instant_of_a_save_leaves_a_checkpoint_that_resumes_to_the_same_weights(tiny_config, tmp_path):
    """6 steps, a save every 2, save_total_limit=1: the save at step 4 seals checkpoint-4, then deletes checkpoint-2."""
    started = time.perf_counter()
    reference = train_only(validate_config(checkpointing_config(tiny_config, "straight", 1, 6)), "tiny")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(checkpointing_config(tiny_config, "unused", 1, 6)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.run([sys.executable, "-c", FORK_SERVER, str(config_path), "4", ",".join(KILL_POINTS)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert server.returncode == 0, server.stderr[-3000:]
    exits = json.loads(server.stdout.strip().splitlines()[-1])
    assert exits == {point: -signal.SIGKILL for point in KILL_POINTS}, server.stderr[-3000:]  # each point was hit

    for point, survivor in KILL_POINTS.items():
        run_dir = tmp_path / "runs" / f"kill-{point}"
        checkpoints = run_dir / "checkpoints"
        assert latest_complete_checkpoint(checkpoints).name == survivor, point
        assert not (run_dir / "adapter").exists(), point
        if point == "rotated":  # and a folder a crashed tool left half-written: never marked, so ignored
            (checkpoints / "checkpoint-5").mkdir()
            (checkpoints / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"truncated")
            assert latest_complete_checkpoint(checkpoints).name == survivor
        resumed = train_only(load_config(config_path, [f"output.run_name=kill-{point}"]), "tiny", resume=True)
        assert resumed.metrics["train"]["steps"] == 6, point
        assert_same_adapter(resumed.run_dir, reference.run_dir)
        assert resumed.metrics["train"]["final_loss"] == pytest.approx(reference.metrics["train"]["final_loss"],
                                                                       rel=1e-3)
        assert not list(checkpoints.glob(".discarded-*")), point  # a removal the kill interrupted was finished
        assert all(is_complete(c) for c in checkpoints.glob("checkpoint-*")), point
        assert len(json.loads((run_dir / "manifest.json").read_text())["sessions"]) == 2
    print(f"{len(KILL_POINTS)} kill points, killed and resumed in {time.perf_counter() - started:.1f} s")


def test_checkpoints_rotate_and_every_kept_one_is_complete(tiny_config):
    summary = train_only(validate_config(checkpointing_config(tiny_config, "rotate")), "tiny")
    kept = sorted((summary.run_dir / "checkpoints").glob("checkpoint-*"))
    assert 1 <= len(kept) <= 3  # the last save_total_limit, plus the best when it is older
    assert all(is_complete(c) for c in kept)
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
