"""Data preparation throughput on a generated 1,000,000-row JSONL (about 300 bytes a row).

    .venv/bin/python bench/prepare_throughput.py [--rows 1000000]

Two arms, each in its own process so each peak RSS is its own:
  (a) validate + clean + exact dedupe (near dedupe and the leakage check off),
  (b) the same plus MinHash near-dedupe and the leakage check (the defaults).
Both split and write train/val/test.jsonl. Prints rows/s and peak RSS per arm, beside the file size, and the
targets (>= 50,000 rows/s for (a), >= 10,000 rows/s for (b), memory that does not grow with the file held in
Python objects: compare peak RSS with what the rows would take as dicts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ["dfs.DataNode", "dfs.FSNamesystem", "mapred.JobTracker", "ipc.Server", "net.NetworkTopology",
              "security.UserGroupInformation", "yarn.ResourceManager", "hdfs.StateChange"]
EVENTS = ["Receiving block", "PacketResponder terminating", "Served block", "Deleting block", "Verification "
          "succeeded for", "allocateBlock", "Got exception while serving", "Starting thread to transfer"]
SEVERITY = ["INFO", "WARN", "ERROR"]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Log-line rows; 5% exact copies of an earlier row (case changed), 2% near copies (one word changed)."""
    rng = random.Random(seed)
    kept: list[str] = []
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            roll = rng.random()
            if kept and roll < 0.05:
                out.write(rng.choice(kept).replace("INFO", "info"))
                continue
            if kept and roll < 0.07:
                out.write(rng.choice(kept).replace(" size ", " size 9"))  # one word differs
                continue
            component, event, severity = rng.choice(COMPONENTS), rng.choice(EVENTS), rng.choice(SEVERITY)
            block = rng.getrandbits(60)
            ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}:{rng.randrange(1024, 65535)}"
            prompt = (f"081109 {rng.randrange(10**6):06d} {rng.randrange(10**4)} {severity} {component}: {event} "
                      f"blk_{block} src: /{ip} dest: /{ip} size {rng.randrange(10**8)}")
            completion = json.dumps({"component": component, "event": event, "severity": severity,
                                     "block": f"blk_{block}"})
            line = json.dumps({"prompt": prompt, "completion": completion}) + "\n"
            out.write(line)
            if len(kept) < 10_000 and rng.random() < 0.1:
                kept.append(line)


def dict_bytes_per_row(path: Path, sample: int = 20_000) -> float:
    import tracemalloc

    with path.open(encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(sample)]
    tracemalloc.start()
    rows = [json.loads(line) for line in lines]
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del rows
    return held / sample


def run_arm(data_path: Path, near: bool, out_dir: Path) -> dict:
    from specialist.config import DataConfig
    from specialist.data import prepare

    data = DataConfig.model_validate({"path": str(data_path), "val_fraction": 0.01, "test_fraction": 0.01,
                                      "dedupe": {"near": near, "leakage": near}})
    started = time.perf_counter()
    prepared = prepare(data, "lora", out_dir, seed=0, show_progress=False)
    seconds = time.perf_counter() - started
    report = prepared.report
    return {"seconds": round(seconds, 2), "rows": report["rows_read"], "rows_per_s": round(report["rows_read"] / seconds),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "exact_duplicates": report["duplicates"]["exact"], "near_duplicates": report["duplicates"]["near"],
            "leakage_test": report["leakage"]["test"]["rows"], "splits": report["splits"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prepare_throughput.json")
    parser.add_argument("--arm", choices=["exact", "near"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.data, args.arm == "near", args.data.parent / f"out-{args.arm}")))
        return

    with tempfile.TemporaryDirectory() as scratch:
        data_path = Path(scratch) / "rows.jsonl"
        started = time.perf_counter()
        generate(data_path, args.rows)
        size = data_path.stat().st_size
        as_dicts_mib = dict_bytes_per_row(data_path) * args.rows / 2**20
        print(f"generated {args.rows:,} rows, {size / 2**20:.0f} MiB ({size / args.rows:.0f} bytes a row) "
              f"in {time.perf_counter() - started:.0f} s", flush=True)
        results = {}
        for arm, label in (("exact", "(a) validate + clean + exact dedupe"), ("near", "(b) + near dedupe + leakage")):
            child = subprocess.run([sys.executable, __file__, "--arm", arm, "--data", str(data_path)],
                                   capture_output=True, text=True, check=True, env={**os.environ})
            results[label] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{label}: {results[label]}", flush=True)
    targets = {"(a) validate + clean + exact dedupe": 50_000, "(b) + near dedupe + leakage": 10_000}
    print()
    results_note = {"as_dicts_mib": round(as_dicts_mib)}
    print(f"{'arm':40} {'rows/s':>10} {'target':>10} {'ratio':>7} {'peak RSS':>10} {'seconds':>8}")
    for label, figures in results.items():
        ratio = figures["rows_per_s"] / targets[label]
        print(f"{label:40} {figures['rows_per_s']:>10,} {targets[label]:>10,} {ratio:>6.2f}x "
              f"{figures['peak_rss_mib']:>7} MiB {figures['seconds']:>8}")
    print(f"file: {size / 2**20:.0f} MiB; the same rows held as Python dicts: about {as_dicts_mib:,.0f} MiB "
          f"(measured with tracemalloc on 20,000 rows, scaled)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": args.rows, "file_bytes": size, "arms": results, "targets": targets,
                                    **results_note},
                                   indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
