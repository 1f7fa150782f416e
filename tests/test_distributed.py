"""The same training command under torchrun: 2 CPU processes, gloo backend, a tiny model."""

import json
import os
import subprocess
import sys
import textwrap

import yaml

# Each rank records the rows it trained on, then runs the ordinary `specialist train` entry point.
RECORDING_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import specialist.train.fast_loss as fast_loss

    seen_path = os.path.join(os.environ["SEEN_DIR"], f"rank{os.environ['RANK']}.jsonl")
    original = fast_loss.completion_loss

    def recording_loss(model, inputs, num_items):
        if model.training:
            with open(seen_path, "a") as handle:
                for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
                    handle.write(json.dumps([i for i, m in zip(ids, mask) if m]) + "\\n")
        return original(model, inputs, num_items)

    fast_loss.completion_loss = recording_loss
    from specialist.cli import app
    app(["train", sys.argv[1]])
""")


def test_two_processes_train_on_different_shards_and_only_rank0_writes(tiny_config, tmp_path):
    tiny_config["training"].update({"max_steps": 3, "batch_size": 2})
    tiny_config["output"]["run_name"] = None  # both ranks must agree on the timestamped name
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config))
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    script = tmp_path / "launch.py"
    script.write_text(RECORDING_SCRIPT)
    env = {**os.environ, "SEEN_DIR": str(seen_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
         str(script), str(config_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    rank0 = [json.loads(line) for line in (seen_dir / "rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(line) for line in (seen_dir / "rank1.jsonl").read_text().splitlines()]
    assert len(rank0) == len(rank1) == 3 * 2  # 3 steps of 2 rows each, on each rank
    assert not {tuple(r) for r in rank0} & {tuple(r) for r in rank1}, "ranks trained on the same rows"

    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # one folder: both ranks agreed on its name, and only one wrote
    run_dir = runs[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["launch"]["WORLD_SIZE"] == "2" and manifest["launch"]["RANK"] == "0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"loss"' in line]) == 3  # written once, not once per rank
