"""The same training command launched as 2 CPU processes (gloo): data parallel under torchrun, and FSDP under
`accelerate launch`, on a tiny model."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import LOG_EXAMPLES
from safetensors.torch import load_file

from specialist.train.checkpoints import is_complete, latest_complete_checkpoint

# Each rank records the rows it trained on, then runs the ordinary `specialist train` entry point.
RECORDING_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import specialist.train.fast_loss as fast_loss

    seen_path = os.path.join(os.environ["SEEN_DIR"], f"rank{os.environ['RANK']}.jsonl")
    original = fast_loss.completion_loss

    def recording_loss(model, inputs, num_items):
        if model.training:
            if "cu_seq_lens_q" in inputs:  # padding-free: the rows end to end in one sequence
                ids, edges = inputs["input_ids"][0].tolist(), inputs["cu_seq_lens_q"].tolist()
                rows = [ids[start:end] for start, end in zip(edges[:-1], edges[1:])]
            else:
                rows = [[i for i, m in zip(ids, mask) if m]
                        for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())]
            with open(seen_path, "a") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\\n")
        return original(model, inputs, num_items)

    fast_loss.completion_loss = recording_loss
    from specialist.cli import app
    app(["train", sys.argv[1]])
""")

# accelerate 1.15 switches a launch to FSDP only on GPUs and other accelerators: AcceleratorState.__init__ sets
# DistributedType.FSDP inside its MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON branch, so a CPU process group stays
# MULTI_CPU and the Trainer wraps the model in DDP (the FSDP config is silently ignored; `specialist` warns).
# PyTorch's FSDP2 itself runs on CPU with gloo, so this launcher makes accelerate use it, and the sharded code path
# (fully_shard, DTensor parameters, gathered saves) runs here as it does on GPUs. Each rank records whether the
# Trainer ran FSDP and the local and full shapes of its LoRA parameters.
FSDP_ON_CPU_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import accelerate.state as state
    from accelerate.utils import DistributedType

    accelerator_state_init = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    state.AcceleratorState.__init__ = init

    import specialist.train.loop as loop
    run_trainer = loop.run_trainer

    def recording_run(trainer, resume_from, packed=False):
        from torch.distributed.tensor import DTensor

        trained = run_trainer(trainer, resume_from, packed)
        shards = {name: [list(p.to_local().shape), list(p.shape)] for name, p in trainer.model.named_parameters()
                  if "lora_" in name and isinstance(p, DTensor)}
        record = {"fsdp": trainer.is_fsdp_enabled, "shards": shards}
        with open(os.path.join(os.environ["SEEN_DIR"], f"fsdp-rank{os.environ['RANK']}.json"), "w") as handle:
            json.dump(record, handle)
        return trained

    loop.run_trainer = recording_run
    from specialist.cli import app
    app(["train", sys.argv[1]])
""")

# What `accelerate config` writes for FSDP2, sharded checkpoints as in examples/accelerate/fsdp.yaml. use_cpu is
# false because accelerate's CPU launcher drops the FSDP settings; its torchrun launcher passes them on, and with
# no GPU visible the processes run on CPU with gloo.
CPU_FSDP_ACCELERATE_CONFIG = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 2,
    "mixed_precision": "no", "machine_rank": 0, "main_training_function": "main", "use_cpu": False,
    "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                    "fsdp_cpu_ram_efficient_loading": False, "fsdp_offload_params": False},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_folder(folder, tiny_model_dir, name):
    """Data, a 3-step config and an empty SEEN_DIR for one launch; returns (config path, env)."""
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{LOG_EXAMPLES[i % 3][0]} #{i}",
                                        "completion": json.dumps(LOG_EXAMPLES[i % 3][1])}) + "\n" for i in range(40)))
    config = {
        "data": {"path": str(data), "instruction": "Parse the log line into JSON.", "dedupe": {"near": False}},
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "method": {"r": 4, "alpha": 8},
        # fp32: the launches are compared to 1e-4, and FSDP's bf16 policy rounds where DDP's autocast does not
        "training": {"max_steps": 3, "batch_size": 2, "max_length": 128, "learning_rate": 0.01, "logging_steps": 1,
                     "report_to": [], "bf16": False},
        "output": {"dir": str(folder / "runs"), "run_name": None},  # both ranks must agree on the timestamped name
    }
    config_path = folder / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    (folder / "seen").mkdir()
    # SPECIALIST_HOME by hand: the autouse fixture that isolates it is not set up yet for a module-scoped fixture
    env = {**os.environ, "SEEN_DIR": str(folder / "seen"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "SPECIALIST_HOME": str(folder / "home"), "TOKENIZERS_PARALLELISM": "false"}
    return config_path, env


def only_run(folder):
    runs = list((folder / "runs").iterdir())
    assert len(runs) == 1, runs  # one folder: both ranks agreed on its name, and only one wrote
    return runs[0]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("ddp")
    config_path, env = launch_folder(folder, tiny_model_dir, "ddp")
    script = folder / "launch.py"
    script.write_text(RECORDING_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(script), str(config_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=folder,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


def test_two_processes_train_on_different_shards_and_only_rank0_writes(data_parallel_run):
    seen_dir = data_parallel_run / "seen"
    rank0 = [json.loads(line) for line in (seen_dir / "rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(line) for line in (seen_dir / "rank1.jsonl").read_text().splitlines()]
    assert len(rank0) == len(rank1) == 3 * 2  # 3 steps of 2 rows each, on each rank
    assert not {tuple(r) for r in rank0} & {tuple(r) for r in rank1}, "ranks trained on the same rows"

    run_dir = only_run(data_parallel_run)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["launch"]["WORLD_SIZE"] == "2" and manifest["launch"]["RANK"] == "0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert len(losses(run_dir)) == 3  # written once, not once per rank
    checkpoint = latest_complete_checkpoint(run_dir / "checkpoints")
    assert checkpoint.name == "checkpoint-3" and (checkpoint / "rng_state_1.pth").is_file()  # rank 1's, sealed too


def test_fsdp_launch_shards_the_model_and_saves_the_whole_adapter(data_parallel_run, tmp_path, tiny_model_dir):
    """accelerate launch with an FSDP2 config: each rank holds half of every LoRA matrix, the saved adapter is whole
    (the gather at the final save runs on every rank), and training matches the data-parallel launch."""
    config_path, env = launch_folder(tmp_path, tiny_model_dir, "fsdp")
    accelerate_config = tmp_path / "fsdp-cpu.yaml"
    accelerate_config.write_text(yaml.safe_dump(CPU_FSDP_ACCELERATE_CONFIG))
    script = tmp_path / "launch_fsdp.py"
    script.write_text(FSDP_ON_CPU_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
         "--main_process_port", str(free_port()), str(script), str(config_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    records = [json.loads((tmp_path / "seen" / f"fsdp-rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["fsdp"] is True and record["shards"], record
        for name, (local, full) in record["shards"].items():
            assert local == [math.ceil(full[0] / 2), *full[1:]], name  # sharded on the first dimension

    run_dir = only_run(tmp_path)
    got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    want = load_file(only_run(data_parallel_run) / "adapter" / "adapter_model.safetensors")
    full_shapes = {name.replace("base_model.model.", "").replace(".default", ""): full
                   for name, (_, full) in records[0]["shards"].items()}
    assert {k.replace("base_model.model.", "") for k in got} == set(full_shapes)
    assert got.keys() == want.keys()
    for key, tensor in got.items():
        assert list(tensor.shape) == full_shapes[key.replace("base_model.model.", "")], key  # gathered, not a shard
        assert torch.isfinite(tensor).all(), key
        torch.testing.assert_close(tensor, want[key], rtol=1e-4, atol=1e-5, msg=key)  # the same training
    fsdp_losses, ddp_losses = losses(run_dir), losses(only_run(data_parallel_run))
    assert fsdp_losses[-1] < fsdp_losses[0]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4)
    assert is_complete(latest_complete_checkpoint(run_dir / "checkpoints"))
    assert "FSDP was asked for" not in result.stdout + result.stderr


@pytest.mark.parametrize(("asked", "sharded", "warned"), [("true", False, True), ("TRUE", True, False),
                                                         ("false", False, False), (None, False, False)])
def test_an_fsdp_launch_that_runs_unsharded_says_so(monkeypatch, asked, sharded, warned):
    from types import SimpleNamespace

    from specialist.console import console
    from specialist.train.loop import warn_if_fsdp_was_asked_for_but_is_off

    if asked is None:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", asked)
    with console.capture() as captured:
        warn_if_fsdp_was_asked_for_but_is_off(SimpleNamespace(is_fsdp_enabled=sharded))
    assert ("FSDP was asked for" in captured.get()) is warned
