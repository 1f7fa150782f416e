"""GGUF at the sizes people ship: each type's size, speed in llama.cpp and answers on the held-out rows.

    .venv/bin/python bench/gguf_types.py RUN [--types f16,q8_0,q4_0,q4_k_m,q4_k_m/merged] [--threads 2]

RUN is a trained run folder with an evaluation (the demo's: runs/log-to-json-*). For each type (TYPE, or
TYPE/merged or TYPE/separate to choose how a LoRA run's update is held; the default is export's own choice):
`specialist export RUN --format gguf --quantize TYPE --lora LAYOUT` (which replays its 8 golden prompts in
llama.cpp), then

  size          the .gguf file (base + adapter where the LoRA is kept separate)
  golden        golden prompts answered exactly as the run answers them (the export's own check)
  tokens/s      llama.cpp greedy, exactly 32 new tokens per prompt, one prompt at a time and --batch sequences
                per batch (`deploy.llamacpp.measure_throughput`, prefill included)
  scores        every held-out prompt answered by llama.cpp (greedy, its own tokenizer from the file, the run's
                stop tokens and strings), scored with the run's scorers beside the tuned model's answers from
                the run's evaluation (predictions.jsonl): the difference is what the format costs

Prints one table with the CPU and its flags; writes bench/results/gguf_types.json.
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


def held_out(run) -> tuple[list[str], list[str], list[str]]:
    """Prompts, expected answers and the tuned model's answers, as the run's evaluation wrote them."""
    rows = [json.loads(line) for line in run.predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["input"] for r in rows], [r["expected"] for r in rows], [r["tuned"] for r in rows]


def llama_cpp_answers(reference, gguf: Path, prompts: list[str], max_new_tokens: int, threads: int,
                      lora: Path | None = None) -> list[str]:
    """llama.cpp's greedy answers, tokenized by llama.cpp from the rendered prompt, cut as the engine cuts."""
    from specialist.deploy import llamacpp
    from specialist.generation import cut_at_stop

    template, tokenizer = reference.template, reference.tokenizer
    texts = [template.render_prompt(p, tokenizer) for p in prompts]
    answers = llamacpp.greedy_answers(gguf, texts, max_new_tokens, stop_ids=sorted(reference.stop_ids),
                                      threads=threads, add_special=not template.prompt_has_special_tokens, lora=lora)
    return [cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), template.stop_strings).strip()
            for tokens, _ in answers]


def mean_scores(outputs: list[str], expected: list[str], scorers: dict, prompts: list[str]) -> dict[str, float]:
    from specialist.core.scorers import score_rows

    rows = score_rows(outputs, expected, scorers, prompts)
    return {name: sum(values) / len(values) for name, values in rows.items()}


def measure_type(run, reference, spec: str, work: Path, data: dict, args) -> dict:
    from specialist.deploy import llamacpp
    from specialist.deploy.export import ExportMismatch, ExportOptions, export_run
    from specialist.run_folder import ExportFolder, read_json

    qtype, _, layout = spec.partition("/")
    out = work / spec.replace("/", "-")
    started = time.perf_counter()
    try:
        export_run(run.path, "gguf", out, ExportOptions(quantize=qtype, lora=layout or "auto"))
    except ExportMismatch:  # strict types (f32/f16) raise on a golden difference; the check is written first
        pass
    export_seconds = time.perf_counter() - started
    folder = ExportFolder(out)
    meta = folder.meta()
    gguf = folder.file(meta["gguf_file"])
    lora = folder.file(meta["gguf_lora_file"]) if meta.get("gguf_lora_file") else None
    check = read_json(folder.check_file)
    speed_ids = data["prompt_ids"][: args.speed_rows]
    speed = llamacpp.measure_throughput(gguf, speed_ids, 32, parallel=args.batch, threads=args.threads, lora=lora)
    answers = llama_cpp_answers(reference, gguf, data["prompts"], data["max_new_tokens"], args.threads, lora)
    return {"size_mib": meta["gguf_bytes"] / 2**20, "layout": meta.get("gguf_layout", "merged"),
            "export_seconds": round(export_seconds, 1),
            "golden_equal": check["prompts"] - len(check["mismatches"]), "golden": check["prompts"],
            "tokens_per_s_one": speed["one_at_a_time"]["tokens_per_s"],
            "tokens_per_s_batched": speed["batched"]["tokens_per_s"],
            "scores": mean_scores(answers, data["expected"], data["scorers"], data["prompts"]),
            "same_as_tuned": sum(a == b for a, b in zip(answers, data["tuned"])) / len(answers)}


def prepare(run) -> tuple[object, dict]:
    from specialist.artifacts import ModelPool, load_run
    from specialist.core.labels import label_rule
    from specialist.core.scorers import resolve_scorers
    from specialist.generation import Engine, default_max_new_tokens

    config = run.config()
    tuned = load_run(run, ModelPool(), adapter_name="tuned")
    reference = Engine(tuned.model, tuned.tokenizer, tuned.template, context=tuned.context)
    prompts, expected, tuned_answers = held_out(run)
    evaluation = config.evaluation
    scorers = resolve_scorers(evaluation.scorers, label_rule(evaluation), evaluation.json_schema)
    limit = evaluation.max_new_tokens or default_max_new_tokens(tuned.tokenizer, run.split().train)
    data = {"prompts": prompts, "expected": expected, "tuned": tuned_answers, "scorers": scorers,
            "max_new_tokens": limit, "prompt_ids": [reference.encode(p, max_new_tokens=32) for p in prompts],
            "tuned_scores": mean_scores(tuned_answers, expected, scorers, prompts)}
    return reference, data


def print_table(results: dict, data: dict, args, cpu_line: str) -> None:
    names = list(data["tuned_scores"])
    header = f"{'type':<16}{'MiB':>8}{'golden':>8}{'tok/s 1':>9}{'tok/s b':>9}" + "".join(f"{n:>16}" for n in names)
    print(f"\n{len(data['prompts'])} held-out rows of {args.run}; tokens/s: llama.cpp, 32 new tokens, "
          f"{args.speed_rows} prompts, one at a time / {args.batch} sequences per batch, {args.threads} threads")
    print(header + f"{'same answers':>14}")
    print(f"{'tuned':<16}{'':>8}{'':>8}{'':>9}{'':>9}" + "".join(f"{100 * data['tuned_scores'][n]:>15.1f}%"
                                                               for n in names))
    for qtype, r in results.items():
        cells = "".join(f"{100 * r['scores'][n]:>9.1f}% ({100 * (r['scores'][n] - data['tuned_scores'][n]):+.1f})"
                        for n in names)
        print(f"{qtype + ('' if '/' in qtype else '/' + r['layout']):<16}{r['size_mib']:>8.0f}{r['golden_equal']:>5}/{r['golden']:<2}{r['tokens_per_s_one']:>9.1f}"
              f"{r['tokens_per_s_batched']:>9.1f}{cells}{100 * r['same_as_tuned']:>13.0f}%")
    print(cpu_line)


def main() -> None:
    from cpuinfo import cpu_description, flags_line

    from specialist.run_folder import RunFolder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--speed-rows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gguf_types.json")
    args = parser.parse_args()
    run = RunFolder.open(args.run)
    reference, data = prepare(run)
    with tempfile.TemporaryDirectory() as work:
        results = {qtype: measure_type(run, reference, qtype, Path(work), data, args)
                   for qtype in args.types.split(",")}
    cpu = cpu_description()
    print_table(results, data, args, flags_line(cpu))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu,
                                    "tuned_scores": data["tuned_scores"], "results": results}, indent=2))


if __name__ == "__main__":
    main()
