"""Serving: on-the-fly batching against one request at a time, and the memory of one base shared by many arms.

    .venv/bin/python bench/serve_batching.py RUN_OR_EXPORT_DIR [--clients 32] [--requests 128] [--max-tokens 16]
    .venv/bin/python bench/serve_batching.py --memory BASE_MODEL [--adapters A B C] [--work DIR]

Throughput: starts `specialist serve`'s app twice on loopback (max_batch 8, then max_batch 1), each time firing
the same requests (held-out prompts of the run's data, chat endpoint, greedy) from `--clients` concurrent clients,
and prints requests/s and latency p50/p95 for both, with the ratio. Figures go to bench/results/serve_batching.json.

Memory (--memory): the base model plus three tuned arms, loaded the way `specialist serve` loads them (one
ModelPool: one base copy, the three LoRA adapters attached to it by name) against each arm loaded on its own (a
fresh ModelPool per arm: four base copies). Each configuration runs in a fresh child process that loads the arms,
answers one short prompt per arm (so every weight page is read in: safetensors are memory-mapped) and reads
/proc/self/status (VmRSS, VmHWM) and /proc/self/smaps_rollup (Pss, Anonymous). The three arms are --adapters
(run folders or adapter exports on BASE_MODEL), or else three random LoRA adapters (rank 8, all linear layers,
A and B random: PEFT's init_lora_weights=False) made with PEFT on the base, nothing trained, written under --work
as run folders (config, prompt format, adapter/), or with --as-exports as adapter export folders, each of which
loads its own tokenizer. Figures go to bench/results/serve_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "serve_batching.json"


def prompts_of(source: Path, n: int) -> list[str]:
    run = source
    if (source / "export.json").is_file():
        run = Path(json.loads((source / "export.json").read_text())["run"])
    rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    return [rows[i % len(rows)]["prompt"] for i in range(n)]


async def fire(url: str, prompts: list[str], clients: int, max_tokens: int) -> list[float]:
    import httpx

    semaphore = asyncio.Semaphore(clients)
    latencies: list[float] = []

    async def one(session, prompt):
        async with semaphore:
            start = time.perf_counter()
            response = await session.post("/v1/chat/completions", timeout=600, json={
                "model": "arm", "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=clients)) as session:
        await asyncio.gather(*(one(session, p) for p in prompts))
    return latencies


def measure(arm, prompts: list[str], clients: int, max_tokens: int, max_batch: int) -> dict:
    from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app

    with tempfile.TemporaryDirectory() as scratch:
        settings = ServeSettings(split={"arm": 1.0}, db=Path(scratch) / "log.sqlite", max_batch=max_batch,
                                 max_wait_ms=20, queue_size=len(prompts) + 1)
        app = create_app({"arm": arm}, settings)
        with BackgroundServer(app) as server:
            asyncio.run(fire(server.url, prompts[:2], 2, max_tokens))  # warm-up
            start = time.perf_counter()
            latencies = asyncio.run(fire(server.url, prompts, clients, max_tokens))
            seconds = time.perf_counter() - start
        worker = app.state.workers["arm"]
    ordered = sorted(latencies)
    return {"max_batch": max_batch, "requests": len(prompts), "seconds": seconds,
            "requests_per_s": len(prompts) / seconds, "latency_p50_s": statistics.median(ordered),
            "latency_p95_s": ordered[int(0.95 * (len(ordered) - 1))],
            "mean_batch": worker.batched_requests / max(1, worker.batches)}


# -- memory: one base shared by many arms ------------------------------------------------------------------------
ARM_NAMES = ("tuned_a", "tuned_b", "tuned_c")


def process_memory_mib() -> dict[str, float]:
    """VmRSS and VmHWM (/proc/self/status), Pss and Anonymous (/proc/self/smaps_rollup), in MiB.

    RSS counts a page once per mapping of it: a weights file memory-mapped by four model copies counts four times
    though the kernel holds it once; Pss splits each shared page between its mappings (the memory really used);
    Anonymous is what no file backs (copies that had to be made, activations)."""
    wanted = {"VmRSS", "VmHWM", "Pss", "Anonymous"}
    figures = {}
    for source in ("/proc/self/status", "/proc/self/smaps_rollup"):
        for line in Path(source).read_text().splitlines():
            name, _, value = line.partition(":")
            if name in wanted and name not in figures:
                figures[name] = int(value.split()[0]) / 1024
    return figures


def memory_child(base: str, arms: list[tuple[str, str]], shared: bool) -> dict:
    """Load base + arms (one pool, or a fresh pool per arm), answer one prompt per arm, measure this process."""
    import torch

    from specialist.artifacts import ModelPool
    from specialist.deploy.arms import load_arms

    torch.set_num_threads(1)
    specs = [("base", base), *arms]
    start = time.perf_counter()
    if shared:
        served = load_arms(specs)  # what `specialist serve --arm ...` does: one ModelPool for every arm
    else:
        served = {name: load_arms([(name, source)], ModelPool())[name] for name, source in specs}
    seconds = time.perf_counter() - start
    answers = {name: arm.engine.answer("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster", 4).text
               for name, arm in served.items()}
    weights = {arm.engine.model.get_input_embeddings().weight.data_ptr() for arm in served.values()}
    return {**process_memory_mib(), "load_seconds": seconds, "base_copies": len(weights), "answers": answers}


def random_adapters(base: str, work: Path, as_exports: bool) -> list[tuple[str, str]]:
    """Three arms on `base` with random LoRA adapters (PEFT, nothing trained), made once under `work`: run folders
    (config, prompt format, adapter/), or adapter export folders (which carry their own tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from specialist.config import validate_config
    from specialist.data import PromptTemplate
    from specialist.models import load_model_and_tokenizer
    from specialist.run_folder import ExportFolder, RunFolder

    kind = "exports" if as_exports else "runs"
    folders = [work / kind / name for name in ARM_NAMES]
    if all(ExportFolder.is_export(f) or RunFolder.is_run(f) for f in folders):
        return [(name, str(f)) for name, f in zip(ARM_NAMES, folders)]
    model, tokenizer = load_model_and_tokenizer(base, "float32")
    template = PromptTemplate.for_tokenizer(tokenizer)
    config = validate_config({"data": {"path": str(work / "unused.jsonl")}, "model": {"name": base},
                              "method": {"r": 8, "alpha": 16}, "evaluation": {"max_new_tokens": 16}})
    for seed, folder in enumerate(folders):
        torch.manual_seed(seed)
        tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False))
        if as_exports:
            export = ExportFolder(folder)
            tuned.save_pretrained(export.path)
            tokenizer.save_pretrained(export.path)
            template.save(export.template_file)
            export.write_meta({"format": "adapter", "base_model": base, "method": "lora (random, untrained)",
                               "template": export.template_file.name})
        else:
            run = RunFolder(folder)
            tuned.save_pretrained(run.adapter)
            run.write_config(config)
            run.save_template(template)
        model = tuned.unload()  # the base again, for the next adapter
    return [(name, str(f)) for name, f in zip(ARM_NAMES, folders)]


def memory_in_child(base: str, arms: list[tuple[str, str]], shared: bool) -> dict:
    payload = json.dumps({"base": base, "arms": arms, "shared": shared})
    done = subprocess.run([sys.executable, __file__, "--memory-child"], input=payload, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if done.returncode != 0:
        raise SystemExit(f"memory child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(args) -> None:
    arms = (list(zip(ARM_NAMES, map(str, args.adapters))) if args.adapters
            else random_adapters(args.memory, args.work, args.as_exports))
    results = {"one pool (serve)": memory_in_child(args.memory, arms, True),
               "a pool per arm": memory_in_child(args.memory, arms, False)}
    same = results["one pool (serve)"]["answers"] == results["a pool per arm"]["answers"]
    named = ", ".join(f"{name}={Path(path).parent.name}/{Path(path).name}" for name, path in arms)
    print(f"\nbase {args.memory} + {len(arms)} LoRA arms ({named}); one prompt per arm, one thread")
    print(f"{'':18}{'base copies':>12}{'RSS MiB':>10}{'peak RSS':>10}{'PSS MiB':>10}{'anonymous':>11}{'load s':>8}")
    for name, r in results.items():
        print(f"{name:18}{r['base_copies']:>12}{r['VmRSS']:>10.0f}{r['VmHWM']:>10.0f}{r['Pss']:>10.0f}"
              f"{r['Anonymous']:>11.0f}{r['load_seconds']:>8.1f}")
    one, each = results["one pool (serve)"], results["a pool per arm"]
    print(f"a pool per arm / one pool: RSS {each['VmRSS'] / one['VmRSS']:.2f}x, PSS {each['Pss'] / one['Pss']:.2f}x, "
          f"anonymous {each['Anonymous'] / one['Anonymous']:.2f}x; same answers in both: {same} "
          f"({len(set(one['answers'].values()))} different answers among the {len(one['answers'])} arms)")
    out = args.out if args.out != DEFAULT_OUT else REPO / "bench" / "results" / "serve_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": args.memory, "arms": arms, "results": results, "same_answers": same},
                              indent=2), encoding="utf-8")


def main() -> None:
    if sys.argv[1:] == ["--memory-child"]:
        request = json.loads(sys.stdin.read())
        print(json.dumps(memory_child(request["base"], [tuple(a) for a in request["arms"]], request["shared"])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, nargs="?", help="a run folder or an export folder")
    parser.add_argument("--memory", metavar="BASE_MODEL", help="measure memory of base + 3 arms instead")
    parser.add_argument("--adapters", type=Path, nargs=3, help="the three arms (default: random LoRA adapters)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/specialist-serve-memory"))
    parser.add_argument("--as-exports", action="store_true",
                        help="the random arms as adapter export folders (each loads its own tokenizer)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.memory:
        measure_memory(args)
        return
    if args.source is None:
        parser.error("give a run or export folder, or --memory BASE_MODEL")

    from specialist.deploy.arms import load_arms

    arm = load_arms([("arm", str(args.source))])["arm"]
    prompts = prompts_of(args.source, args.requests)
    results = {name: measure(arm, prompts, args.clients, args.max_tokens, batch)
               for name, batch in (("batched (8)", 8), ("one at a time", 1))}
    a, b = results["one at a time"], results["batched (8)"]
    print(f"\n{args.requests} requests, {args.clients} concurrent clients, max_tokens {args.max_tokens}, {args.source}")
    print(f"{'':20}{'requests/s':>12}{'p50 s':>10}{'p95 s':>10}{'mean batch':>12}")
    for name, r in results.items():
        print(f"{name:20}{r['requests_per_s']:>12.2f}{r['latency_p50_s']:>10.2f}{r['latency_p95_s']:>10.2f}"
              f"{r['mean_batch']:>12.1f}")
    ratio = b["requests_per_s"] / a["requests_per_s"]
    print(f"batched / one at a time: {ratio:.2f}x requests/s, p95 {b['latency_p95_s'] / a['latency_p95_s']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                    "requests_per_s_ratio": ratio}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
