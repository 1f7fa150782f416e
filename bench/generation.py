"""Generation speed: our evaluation generation against llama.cpp on the same model, the same prompts, one run.

    .venv/bin/python bench/generation.py RUN [--rows 60] [--batch 16] [--max-new-tokens 32] [--threads 2]

RUN is a trained run folder (the demo's: runs/log-to-json-*). Its tuned model answers its held-out prompts
greedily, every answer exactly --max-new-tokens long (stop tokens ignored, so every arm does the same work and
"tokens/s" means the same thing), prefill included:

  ours, batched      specialist.generation.Engine (what `specialist eval` and `serve` run), --batch rows at a time,
                     the adapter on the base (as evaluation runs it) and the merged model (as an export serves it)
  ours, one at a time   the same engine, batch 1; and the f16 GGUF export as `serve` answers a lone request
                     (the engine's lone runtime: llama.cpp on the export's file, fed through the engine's rows)
  llama.cpp          the run exported to GGUF f16 (`specialist export --format gguf --quantize f16`), through
                     llama-cpp-python, one prompt at a time and --batch sequences in one batch

Prints tokens/s side by side with the ratios, whether the arms give the same answers, our decode rate against the
machine's matmul limit (the decode step's matrix products alone, timed at batch 1 and --batch), the CPU and its
flags (and
the AVX2-only emulation, when the env vars ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 are set); writes bench/results/generation.json (the answers too, to compare runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def ours(engine, prompts: list[str], max_new_tokens: int, batch: int) -> dict:
    """Tokens/s of the engine with every row generating exactly `max_new_tokens`."""
    engine.stop_ids, engine.stop_strings = set(), ()
    engine.generate(prompts[:2], 4, batch_size=2, label="warm-up")
    started = time.perf_counter()
    answers = engine.generate(prompts, max_new_tokens, batch_size=batch, label=f"ours, batch {batch}")
    seconds = time.perf_counter() - started
    tokens = sum(a.completion_tokens for a in answers)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "answers": [a.text for a in answers]}


def matmul_limit(model, batch: int, head_bf16: bool, packed: bool, repeats: int = 8) -> dict:
    """The decode step's matrix products alone (every nn.Linear of the model once, on `batch` rows; the output
    layer in bfloat16 where `head_bf16`; through oneDNN's packed kernel where `packed`, else F.linear), timed
    without attention, cache or Python around them: the tokens/s a decoder made of nothing else would reach. The
    best of `repeats` (a shared machine only ever slows it down)."""
    import torch
    import torch.nn.functional as F

    head = model.get_output_embeddings()
    products = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            low = head_bf16 and module is head
            weight = module.weight.detach().to(torch.bfloat16) if low else module.weight.detach()
            if packed:
                weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 16)
            products.append((torch.randn(batch, module.in_features).to(weight.dtype), weight))
    product = ((lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")) if packed
               else F.linear)
    best = float("inf")
    with torch.inference_mode():
        for x, weight in products:  # warm-up: oneDNN builds its kernels on the first call of a shape
            product(x, weight)
        for _ in range(repeats):
            started = time.perf_counter()
            for x, weight in products:
                product(x, weight)
            best = min(best, time.perf_counter() - started)
    flops = sum(2 * batch * w.shape[0] * w.shape[1] for _, w in products)
    return {"batch": batch, "head": "bfloat16" if head_bf16 else "float32", "kernel": "onednn" if packed else "torch",
            "seconds_per_step": best, "tokens_per_s": batch / best, "gflops": flops / best / 1e9}


def limits(model, batch: int) -> dict:
    """The matmul limits at batch 1 and `batch`, with the output layer as our engine runs it on this CPU (bfloat16
    where it is native) and in float32; through the fastest kernel this torch has (oneDNN's packed one, which the
    engine uses where it exists: the limit is the machine's, not F.linear's), and through F.linear."""
    try:
        from specialist.decode import cpu_multiplies_bf16
    except ImportError:  # a source from before issue 26: its output layer is float32 everywhere
        native = False
    else:
        native = cpu_multiplies_bf16()
    packed = hasattr(torch_ops_mkldnn(), "_reorder_linear_weight")
    found = {}
    for rows in (1, batch):
        for head_bf16 in sorted({native, False}):
            name = f"batch{rows}_{'bf16' if head_bf16 else 'fp32'}_head"
            found[name] = matmul_limit(model, rows, head_bf16, packed)
            if packed:
                found[name + "_torch"] = matmul_limit(model, rows, head_bf16, False)
    found["engine_head"] = "bf16" if native else "fp32"
    return found


def torch_ops_mkldnn():
    import torch

    return torch.ops.mkldnn if torch.backends.mkldnn.is_available() else None


def llama_cpp(gguf: Path, prompt_ids: list[list[int]], max_new_tokens: int, batch: int, threads: int) -> dict:
    from specialist.deploy.llamacpp import measure_throughput

    return measure_throughput(gguf, prompt_ids, max_new_tokens, parallel=batch, threads=threads)


def export_f16(run_dir: Path, work: Path) -> Path:
    from specialist.deploy.export import ExportOptions, export_run

    options = ExportOptions(golden=2, max_new_tokens=8, quantize="f16")
    return export_run(run_dir, "gguf", work / "gguf-f16", options).folder


def ours_lone_export(folder: Path, prompts: list[str], max_new_tokens: int) -> dict | None:
    """The GGUF export as `serve` answers it one request at a time: the engine with its lone runtime (llama.cpp
    on the export's file), where this source has one."""
    from specialist.artifacts import ModelPool

    try:
        from specialist.deploy.arms import load_for_serving
    except ImportError:  # a source from before the lone runtime
        return None
    loaded = load_for_serving(str(folder), ModelPool(lone_runtime="llama.cpp"))
    engine = loaded.answering_engine()
    engine.stop_ids, engine.stop_strings = set(), ()
    engine.generate(prompts[:1], 4, batch_size=1, label="warm-up")  # loads llama.cpp's copy of the file
    result = ours(engine, prompts, max_new_tokens, 1)
    engine.lone.close()
    return result


def measure(args) -> dict:
    import torch

    from specialist.artifacts import ModelPool, load_run
    from specialist.deploy.export import merged_copy
    from specialist.generation import Engine
    from specialist.run_folder import RunFolder

    torch.set_num_threads(args.threads)
    run = RunFolder.open(args.run)
    prompts = [ex.prompt for ex in run.split().test[: args.rows]]
    tuned = load_run(run, ModelPool(), adapter_name="tuned")
    adapter = Engine(tuned.model, tuned.tokenizer, tuned.template, context=tuned.context)
    merged = Engine(merged_copy(tuned).eval(), tuned.tokenizer, tuned.template)
    prompt_ids = [merged.encode(p, max_new_tokens=args.max_new_tokens) for p in prompts]
    results = {"ours_batched_adapter": ours(adapter, prompts, args.max_new_tokens, args.batch),
               "ours_batched_merged": ours(merged, prompts, args.max_new_tokens, args.batch),
               "ours_one_at_a_time_merged": ours(merged, prompts, args.max_new_tokens, 1),
               "matmul_limit": limits(merged.model, args.batch)}
    if getattr(merged, "lookup", 0):  # prompt lookup helps answers that copy their input: its rate without it too
        merged.lookup = 0
        results["ours_one_at_a_time_merged_no_lookup"] = ours(merged, prompts, args.max_new_tokens, 1)
    with tempfile.TemporaryDirectory() as work:
        from specialist.run_folder import ExportFolder

        export = export_f16(run.path, Path(work))
        gguf = ExportFolder(export).file(ExportFolder(export).meta()["gguf_file"])
        results["llama_cpp"] = llama_cpp(gguf, prompt_ids, args.max_new_tokens, args.batch, args.threads)
        lone = ours_lone_export(export, prompts, args.max_new_tokens)
        if lone is not None:
            results["ours_one_at_a_time_gguf_lone"] = lone
    answers = results["llama_cpp"].pop("answers", None)  # token ids; older sources do not return them
    if answers is not None:
        results["llama_cpp"]["answer_texts"] = [tuned.tokenizer.decode(a, skip_special_tokens=True).strip()
                                                for a in answers]
    return results


def print_table(results: dict, args, cpu_line: str) -> dict:
    ours_batched = results["ours_batched_merged"]["tokens_per_s"]
    llama = results["llama_cpp"]
    rows = [("ours, batched, adapter on base (evaluation)", results["ours_batched_adapter"]["tokens_per_s"]),
            ("ours, batched, merged (export)", ours_batched),
            ("ours, one at a time, merged", results["ours_one_at_a_time_merged"]["tokens_per_s"]),
            *([("ours, one at a time, merged, no prompt lookup",
                results["ours_one_at_a_time_merged_no_lookup"]["tokens_per_s"])]
              if "ours_one_at_a_time_merged_no_lookup" in results else []),
            *([("ours, one at a time, GGUF export (lone runtime)",
                results["ours_one_at_a_time_gguf_lone"]["tokens_per_s"])]
              if "ours_one_at_a_time_gguf_lone" in results else []),
            (f"llama.cpp f16, batched ({args.batch} sequences)", llama["batched"]["tokens_per_s"]),
            ("llama.cpp f16, one at a time", llama["one_at_a_time"]["tokens_per_s"])]
    print(f"\n{args.rows} held-out prompts of {args.run}, greedy, exactly {args.max_new_tokens} new tokens each")
    print(f"{'':<48}{'tokens/s':>10}")
    for name, rate in rows:
        print(f"{name:<48}{rate:>10.1f}")
    ratios = {"ours_batched_vs_llama_batched": ours_batched / llama["batched"]["tokens_per_s"],
              "ours_batched_adapter_vs_llama_batched":
                  results["ours_batched_adapter"]["tokens_per_s"] / llama["batched"]["tokens_per_s"],
              "ours_one_vs_llama_one": results["ours_one_at_a_time_merged"]["tokens_per_s"]
                  / llama["one_at_a_time"]["tokens_per_s"]}
    if "ours_one_at_a_time_merged_no_lookup" in results:
        ratios["ours_one_no_lookup_vs_llama_one"] = (results["ours_one_at_a_time_merged_no_lookup"]["tokens_per_s"]
                                                     / llama["one_at_a_time"]["tokens_per_s"])
    if "ours_one_at_a_time_gguf_lone" in results:
        ratios["ours_one_gguf_lone_vs_llama_one"] = (results["ours_one_at_a_time_gguf_lone"]["tokens_per_s"]
                                                     / llama["one_at_a_time"]["tokens_per_s"])
    for name, value in ratios.items():
        print(f"{name:<48}{value:>9.2f}x")
    print(f"llama.cpp batched answers equal to its one-at-a-time answers: {100 * llama['batched_equal_share']:.0f}%")
    print_agreement(results)
    print_limits(results, args.batch)
    print(cpu_line)
    return ratios


def equal_share(first: list[str], second: list[str]) -> float:
    return sum(a == b for a, b in zip(first, second, strict=True)) / max(1, len(first))


def print_agreement(results: dict) -> None:
    """Whether the arms answer alike: ours batched against one at a time, the adapter against the merged model,
    and ours against llama.cpp f16 (float32 and float16 may part on a near-tie)."""
    one = results["ours_one_at_a_time_merged"]["answers"]
    if "ours_one_at_a_time_merged_no_lookup" in results:
        print(f"ours one at a time with prompt lookup equal to without: "
              f"{100 * equal_share(results['ours_one_at_a_time_merged_no_lookup']['answers'], one):.0f}%")
    print(f"ours batched answers equal to ours one at a time: "
          f"{100 * equal_share(results['ours_batched_merged']['answers'], one):.0f}%; adapter equal to merged: "
          f"{100 * equal_share(results['ours_batched_adapter']['answers'], one):.0f}%")
    if "answer_texts" in results["llama_cpp"]:
        print(f"ours (merged, one at a time) equal to llama.cpp f16 one at a time: "
              f"{100 * equal_share(one, results['llama_cpp']['answer_texts']):.0f}%")
    if "ours_one_at_a_time_gguf_lone" in results:
        lone = results["ours_one_at_a_time_gguf_lone"]["answers"]
        print(f"ours (GGUF export, lone runtime) equal to ours merged one at a time: {100 * equal_share(lone, one):.0f}%"
              + (f"; to llama.cpp f16 one at a time: "
                 f"{100 * equal_share(lone, results['llama_cpp']['answer_texts']):.0f}%"
                 if "answer_texts" in results["llama_cpp"] else ""))


def print_limits(results: dict, batch: int) -> None:
    """Our decode rate against the machine's matmul limit for the decode step (prefill is in ours, not in the
    limit, so the share is a floor)."""
    found = results["matmul_limit"]
    engine = found["engine_head"]
    for rows, name in ((batch, "ours_batched_merged"), (1, "ours_one_at_a_time_merged")):
        limit = found[f"batch{rows}_{engine}_head"]
        ours_rate = results[name]["tokens_per_s"]
        line = (f"matmul limit, batch {rows} ({engine} output layer, {limit.get('kernel', 'torch')} kernel): "
                f"{limit['tokens_per_s']:.0f} tokens/s ({limit['gflops']:.0f} GFLOP/s); "
                f"ours {ours_rate:.1f} = {100 * ours_rate / limit['tokens_per_s']:.0f}%")
        if f"batch{rows}_{engine}_head_torch" in found:
            line += f"; through F.linear {found[f'batch{rows}_{engine}_head_torch']['tokens_per_s']:.0f} tokens/s"
        if engine != "fp32":
            line += f"; all-float32 limit {found[f'batch{rows}_fp32_head']['tokens_per_s']:.0f} tokens/s"
        if rows == 1 and "ours_one_at_a_time_merged_no_lookup" in results:  # the limit is one token per step
            line += (f" (prompt lookup checks several tokens a step and may pass it; without: "
                     f"{results['ours_one_at_a_time_merged_no_lookup']['tokens_per_s']:.1f})")
        print(line)


def main() -> None:
    from cpuinfo import cpu_description, flags_line

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generation.json")
    args = parser.parse_args()
    results = measure(args)
    cpu = cpu_description()
    ratios = print_table(results, args, flags_line(cpu))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu,
                                    "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
