"""Training throughput: TRL's SFTTrainer defaults against `specialist train` defaults, one process tree.

    .venv/bin/python bench/train_throughput.py [--steps 8] [--model gemma-3-270m] [--out bench/results/...json]

Each arm runs in its own child process (so peak RSS is its own), one after the other, on the same training
rows of examples/log-to-json, the same LoRA settings (r=16, alpha=32, all-linear), batch size and number of
optimizer steps:

  (a) reference: SFTTrainer + PEFT with TRL's defaults for everything else (dtype as transformers loads it,
      TRL's own tokenization of prompt/completion, full-vocabulary entropy/accuracy metrics, its loss path);
  (b) specialist: the same rows through `specialist.train` with its defaults (dtype auto, completion-only
      logits computed in chunks with the gradient fused in (no logits tensor kept), one row per forward pass on
      CPU (micro-batches accumulated into the same batch: no padding, bounded activations), activation
      checkpointing as in TRL, warmup rounded down, pre-tokenized data).

SPECIALIST_BENCH_TRAINING='{"micro_batch_tokens": null}' (a JSON object of training keys) changes (b)'s
settings, to measure one lever at a time.

Printed for each: training tokens/s (prompt + completion tokens processed, no padding), peak RSS of the process
up to the end of training, final training loss, and validation loss (mean cross-entropy per completion token on
the same validation rows, computed after training by the same code for both arms), and FLOPs utilisation against the faster of the
fp32/bf16 matmul rates this script measures on this machine in this run: once with the FLOPs each arm executes
(forward + input gradients; the LM head only where it projects) and once with the 6 x parameters convention,
which overstates a run that skips most of the LM head. Then the ratios (b)/(a). Figures go to JSON as well.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpuinfo import cpu_description, flags_line  # noqa: E402
DATA = REPO / "examples" / "log-to-json" / "data.jsonl"
INSTRUCTION = ('Parse the log line into JSON with the keys "level", "component" and "template" (the event template '
               "with every variable part replaced by <*>; null for a field the line lacks).")


def matmul_rate(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in this process, best of `repeats`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def rows(n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    examples = [json.loads(line) for line in DATA.read_text().splitlines()]
    return examples[:n_train], examples[n_train : n_train + n_val]


def run_reference(args) -> dict:
    """(a) TRL defaults: the prompt/completion dataset handed to SFTTrainer as is."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from specialist.data import PromptTemplate
    from specialist.models import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    template = PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION)
    train, val = rows(args.train_rows, args.val_rows)
    to_ds = lambda part: Dataset.from_list(  # noqa: E731
        [{"prompt": template.render_prompt(r["prompt"]), "completion": r["completion"]} for r in part])
    config = SFTConfig(output_dir=args.workdir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       per_device_eval_batch_size=args.batch_size, learning_rate=3e-4, report_to="none",
                       save_strategy="no", logging_steps=1, include_num_input_tokens_seen="non_padding",
                       seed=42, disable_tqdm=True,
                       # The one non-default a TRL user must set on a machine without a GPU (TRL asks for bf16).
                       use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_ds(train), eval_dataset=to_ds(val),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    return measure(trainer, model, head_fraction=1.0, held_out=(tokenizer, template, val))


def run_specialist(args) -> dict:
    """(b) specialist defaults through its own training entry point."""
    from specialist.config import validate_config
    from specialist.data import Example, PromptTemplate
    from specialist.models import load_model_and_tokenizer
    from specialist.train.fast_loss import CompletionOnlySFTTrainer
    from specialist.train.sft import build_dataset, lora_config, sft_config, use_bf16_autocast

    config = validate_config({"data": {"path": str(DATA), "instruction": INSTRUCTION},
                              "training": {"max_steps": args.steps, "batch_size": args.batch_size,
                                           "learning_rate": 3e-4, "report_to": [], "logging_steps": 1,
                                           **json.loads(os.environ.get("SPECIALIST_BENCH_TRAINING", "{}"))}})
    model, tokenizer = load_model_and_tokenizer(args.model, config.model.dtype)
    template = PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION)
    train, val = rows(args.train_rows, args.val_rows)
    as_examples = lambda part: [Example(r["prompt"], r["completion"], i) for i, r in enumerate(part)]  # noqa: E731
    sft = sft_config(config.training, Path(args.workdir), len(train), use_bf16_autocast(model), has_val=False)
    sft.save_strategy = "no"
    trainer = CompletionOnlySFTTrainer(model=model, args=sft,
                                       train_dataset=build_dataset(as_examples(train), template, tokenizer),
                                       eval_dataset=build_dataset(as_examples(val), template, tokenizer),
                                       processing_class=tokenizer, peft_config=lora_config(config.method))
    labels = trainer.train_dataset["labels"]
    labelled = sum(sum(1 for t in row if t != -100) for row in labels) / sum(len(row) for row in labels)
    return measure(trainer, model, head_fraction=labelled, held_out=(tokenizer, template, val))


def held_out_loss(model, tokenizer, template, rows: list[dict]) -> float:
    """Mean cross-entropy per completion token over `rows`, by the same code for both arms.

    The trainers' own eval losses average per-batch means, which depends on the eval batch size; this does not.
    """
    import torch
    import torch.nn.functional as F

    from specialist.data import encode_for_training

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            encoded = encode_for_training(template, tokenizer, row["prompt"], row["completion"])
            ids = torch.tensor([encoded["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            mask = torch.tensor(encoded["completion_mask"][1:], dtype=torch.bool)
            total += F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum").item()
            count += int(mask.sum())
    return total / count


def measure(trainer, model, head_fraction: float, held_out) -> dict:
    """Run the trainer; `head_fraction` is the share of positions the LM head projects (for executed FLOPs)."""
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    val_loss = held_out_loss(trainer.model, *held_out)
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    tokens = int(trainer.state.num_input_tokens_seen)
    # Executed FLOPs per token with a frozen base: forward (2 x params) and input gradients (2 x params), plus
    # the forward again under activation checkpointing; the LM head's share only on the positions it projects.
    # LoRA's own FLOPs are under 1% and left out.
    recompute = 2 * (params - head) if trainer.args.gradient_checkpointing else 0
    executed_per_token = 4 * (params - head) + recompute + 4 * head * head_fraction
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "executed_flops_per_token": executed_per_token, "head_fraction": head_fraction,
            "final_train_loss": losses[-1], "val_loss": val_loss, "parameters": params,
            "dtype": str(next(model.parameters()).dtype),
            "peak_rss_mib": peak_training}


def child(arm: str, args) -> dict:
    """Run one arm in a fresh interpreter and read its JSON back."""
    out = Path(args.workdir) / f"{arm}.json"
    cmd = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps), "--model", args.model,
           "--batch-size", str(args.batch_size), "--train-rows", str(args.train_rows),
           "--val-rows", str(args.val_rows), "--workdir", args.workdir, "--child-out", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--val-rows", type=int, default=32)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.json")
    parser.add_argument("--arm", choices=["reference", "specialist"])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child-out", type=Path)
    args = parser.parse_args()
    if args.arm:
        result = run_reference(args) if args.arm == "reference" else run_specialist(args)
        args.child_out.write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        rates = {"fp32": matmul_rate("float32"), "bf16": matmul_rate("bfloat16")}
        results = {"reference": child("reference", args), "specialist": child("specialist", args)}
    best_rate = max(rates.values())
    for result in results.values():
        result["mfu_6n_convention"] = 6 * result["parameters"] * result["tokens_per_second"] / best_rate
        result["mfu_executed"] = result["executed_flops_per_token"] * result["tokens_per_second"] / best_rate
    a, b = results["reference"], results["specialist"]
    ratios = {"tokens_per_second": b["tokens_per_second"] / a["tokens_per_second"],
              "peak_rss": b["peak_rss_mib"] / a["peak_rss_mib"],
              "val_loss_difference": b["val_loss"] - a["val_loss"]}
    print_table(results, ratios, rates, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k in
                                                  ("steps", "batch_size", "train_rows", "val_rows", "model")},
                                    "matmul_flops": rates, "results": results, "ratios": ratios,
                                    "cpu": cpu_description()}, indent=2))
    print(f"figures written to {args.out}")


def print_table(results: dict, ratios: dict, rates: dict, args) -> None:
    print(f"\n{args.steps} optimizer steps, batch {args.batch_size}, LoRA r=16 all-linear, {args.model}")
    print(f"measured matmul: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s "
          "(MFU against the faster)")
    header = f"{'':28}{'(a) TRL defaults':>18}{'(b) specialist':>18}{'(b)/(a)':>10}"
    print(header + "\n" + "-" * len(header))
    a, b = results["reference"], results["specialist"]
    lines = [
        ("dtype", a["dtype"], b["dtype"], ""),
        ("training tokens/s", f"{a['tokens_per_second']:.1f}", f"{b['tokens_per_second']:.1f}",
         f"{ratios['tokens_per_second']:.2f}x"),
        ("peak RSS (MiB)", f"{a['peak_rss_mib']:.0f}", f"{b['peak_rss_mib']:.0f}", f"{ratios['peak_rss']:.2f}x"),
        ("final training loss", f"{a['final_train_loss']:.4f}", f"{b['final_train_loss']:.4f}", ""),
        ("validation loss", f"{a['val_loss']:.4f}", f"{b['val_loss']:.4f}", f"{ratios['val_loss_difference']:+.4f}"),
        ("LM head on positions", f"{100 * a['head_fraction']:.0f}%", f"{100 * b['head_fraction']:.0f}%", ""),
        ("MFU, executed FLOPs", f"{100 * a['mfu_executed']:.1f}%", f"{100 * b['mfu_executed']:.1f}%", ""),
        ("MFU, 6N convention", f"{100 * a['mfu_6n_convention']:.1f}%", f"{100 * b['mfu_6n_convention']:.1f}%", ""),
    ]
    for name, x, y, r in lines:
        print(f"{name:28}{x:>18}{y:>18}{r:>10}")
    print(flags_line(cpu_description()))


if __name__ == "__main__":
    main()
