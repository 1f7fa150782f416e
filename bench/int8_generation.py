"""int8 export against the merged fp32 export: resident memory, load time, greedy generation speed, same answers.

    .venv/bin/python bench/int8_generation.py RUN_DIR/export/merged RUN_DIR/export/int8 [--prompts 16]
    .venv/bin/python bench/int8_generation.py --from-base gemma-3-270m --work /tmp/int8-bench   # no run: the base
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python bench/...

Each export is measured in a fresh child process (so one's memory never counts against the other): it loads the
folder through `specialist.artifacts.load_exported` (as `serve` and `eval` do) and answers the same prompts with the
generation engine, greedy, up to --max-new-tokens, --batch at a time. Memory is read from /proc/self/status:
VmRSS after the imports, after loading, after generating, and VmHWM (the peak). Prompts are the run's held-out
ones, or (--from-base) a fixed list. `--from-base` writes a merged and an int8 export folder of the base model
itself (nothing trained) into --work. Prints the CPU and its vector flags beside the figures; writes
bench/results/int8_generation.json. Quality on a run's whole test split: `specialist eval RUN --arm int8=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
BASE_PROMPTS = [
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865 terminating",
    "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186",
    "Write one sentence about the sea.",
    "The capital of France is",
    "List three prime numbers:",
    "def fibonacci(n):",
    "Translate to French: good morning",
    "[Sun Dec 04 04:47:44 2005] [notice] workerEnv.init() ok /etc/httpd/conf/workers2.properties",
]


def memory_mib() -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (resident at its peak) of this process, in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) / 1024
    return fields


def child(folder: Path, prompts: list[str], max_new_tokens: int, batch: int, threads: int) -> dict:
    """Load one export and generate; every figure this process measured (run in a fresh process)."""
    import torch

    from specialist.artifacts import load_exported
    from specialist.generation import Engine

    torch.set_num_threads(threads)
    before = memory_mib()
    start = time.perf_counter()
    loaded = load_exported(folder)
    load_seconds = time.perf_counter() - start
    after_load = memory_mib()
    engine = Engine(loaded.model, loaded.tokenizer, loaded.template, context=loaded.context)
    engine.answer(prompts[0], 4)  # warm-up
    start = time.perf_counter()
    answers = engine.generate(prompts, max_new_tokens, batch_size=batch)
    seconds = time.perf_counter() - start
    tokens = sum(a.completion_tokens for a in answers)
    return {"rss_imports_mib": before["VmRSS"], "rss_loaded_mib": after_load["VmRSS"],
            "model_mib": after_load["VmRSS"] - before["VmRSS"], "peak_after_load_mib": after_load["VmHWM"],
            "rss_after_generation_mib": memory_mib()["VmRSS"], "peak_mib": memory_mib()["VmHWM"],
            "load_seconds": load_seconds, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
            "weights_bytes": loaded.weights_bytes, "answers": [a.text for a in answers]}


def measure_in_child(folder: Path, args, prompts: list[str]) -> dict:
    payload = json.dumps({"folder": str(folder), "prompts": prompts, "max_new_tokens": args.max_new_tokens,
                          "batch": args.batch, "threads": args.threads})
    done = subprocess.run([sys.executable, __file__, "--child"], input=payload, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if done.returncode != 0:
        raise SystemExit(f"child for {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(measured: list[dict]) -> dict:
    """The first run's figures, with tokens/s as the median of all runs (and every run's value)."""
    import statistics

    rates = [m["tokens_per_s"] for m in measured]
    return {**measured[0], "tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates,
            "peak_mib": max(m["peak_mib"] for m in measured)}


def exports_of_base(name: str, work: Path) -> tuple[Path, Path]:
    """A merged and an int8 export folder of base model `name` itself (what a run's export of it would hold)."""
    from specialist.data import PromptTemplate
    from specialist.deploy.export import INT8_FILE
    from specialist.int8 import save_int8
    from specialist.models import load_model_and_tokenizer
    from specialist.run_folder import ExportFolder

    merged, int8 = ExportFolder(work / "merged"), ExportFolder(work / "int8")
    if merged.meta_file.is_file() and int8.meta_file.is_file():
        return merged.path, int8.path
    model, tokenizer = load_model_and_tokenizer(name, "float32")
    template = PromptTemplate.for_tokenizer(tokenizer)
    for export in (merged, int8):
        export.path.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(export.path)
        template.save(export.template_file)
    model.save_pretrained(merged.path, safe_serialization=True)
    size = save_int8(model, int8.path / INT8_FILE)
    model.config.save_pretrained(int8.path)
    model.generation_config.save_pretrained(int8.path)
    common = {"base_model": name, "method": "none", "template": merged.template_file.name}
    merged.write_meta({"format": "merged", **common})
    int8.write_meta({"format": "int8", "int8_mode": "weight_only", "int8_file": INT8_FILE, "int8_bytes": size,
                     **common})
    return merged.path, int8.path


def prompts_for(folder: Path, n: int) -> list[str]:
    from specialist.run_folder import ExportFolder

    run = ExportFolder(folder).source_run()
    rows = [ex.prompt for ex in run.split().test] if run is not None else BASE_PROMPTS
    return [rows[i % len(rows)] for i in range(n)]


def print_table(results: dict, same: float, args, cpu: dict) -> None:
    from int8_kernels import flags_line

    print(f"\n{flags_line(cpu)}; {args.threads} threads, torch capability {results['int8']['capability']}")
    print(f"{args.prompts} prompts, greedy, up to {args.max_new_tokens} new tokens, batch {args.batch}; "
          f"tokens/s: median of {args.repeat} fresh processes each (all: "
          + ", ".join(f"{name} {' '.join(f'{x:.1f}' for x in r['tokens_per_s_runs'])}" for name, r in results.items())
          + ")")
    print(f"{'':6}{'disk MiB':>10}{'RSS imports':>13}{'RSS loaded':>12}{'RSS after gen':>15}{'peak RSS':>10}"
          f"{'load s':>8}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:6}{r['weights_bytes'] / 2**20:>10.0f}{r['rss_imports_mib']:>13.0f}{r['rss_loaded_mib']:>12.0f}"
              f"{r['rss_after_generation_mib']:>15.0f}{r['peak_mib']:>10.0f}{r['load_seconds']:>8.1f}"
              f"{r['tokens_per_s']:>10.1f}")
    a, b = results["fp32"], results["int8"]
    print(f"int8 / fp32: disk {b['weights_bytes'] / a['weights_bytes']:.2f}x, RSS after generation "
          f"{b['rss_after_generation_mib'] / a['rss_after_generation_mib']:.2f}x "
          f"({a['rss_after_generation_mib'] - b['rss_after_generation_mib']:.0f} MiB less), peak "
          f"{b['peak_mib'] / a['peak_mib']:.2f}x, tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.2f}x; "
          f"identical answers {100 * same:.0f}%")
    print("(RSS loaded counts the tokenizer too, and only the weight pages touched so far: safetensors are mapped "
          "and read in as the first tokens use them, so compare RSS after generation and the peak)")


def main() -> None:
    if sys.argv[1:] == ["--child"]:
        request = json.loads(sys.stdin.read())
        print(json.dumps(child(Path(request["folder"]), request["prompts"], request["max_new_tokens"],
                               request["batch"], request["threads"])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("merged", type=Path, nargs="?")
    parser.add_argument("int8", type=Path, nargs="?")
    parser.add_argument("--from-base", help="build both exports from this base model (nothing trained)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/specialist-int8-bench"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="children per export, interleaved; median tokens/s")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_generation.json")
    args = parser.parse_args()
    if args.from_base:
        args.merged, args.int8 = exports_of_base(args.from_base, args.work)
    if args.merged is None or args.int8 is None:
        parser.error("give MERGED and INT8 export folders, or --from-base NAME")

    from int8_kernels import cpu_description

    prompts = prompts_for(args.merged, args.prompts)
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for _ in range(args.repeat):  # interleaved, so a burst of load on a shared machine hits both alike
        for name, folder in (("fp32", args.merged), ("int8", args.int8)):
            runs[name].append(measure_in_child(folder, args, prompts))
    results = {name: summarize(measured) for name, measured in runs.items()}
    pairs = list(zip(results["fp32"].pop("answers"), results["int8"].pop("answers"), strict=True))
    same = sum(a == b for a, b in pairs) / len(pairs)
    cpu = cpu_description()
    print_table(results, same, args, cpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "settings": {k: str(v) for k, v in vars(args).items()},
                                    "results": results, "identical_answers": same}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
