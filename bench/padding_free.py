"""LoRA training step on the demo's own rows: padded micro-batches, padding-free with transformers' one mask over
the whole sequence, and padding-free with attention row by row (specialist.train.row_attention), in one run.

    .venv/bin/python bench/padding_free.py [--model gemma-3-270m] [--rows 4] [--batches 8]

Gemma 3 270M (the cached embedded model) with LoRA r=16 on every linear layer, the completion-only loss the
trainer uses, one forward and backward per micro-batch of `--rows` rows of examples/log-to-json (its config's
instruction and prompt format), collated by TRL's collator as the trainer does. Prints seconds per micro-batch,
the tokens computed, the ratio to padded, how far each way's loss and LoRA gradients are from the padded ones,
and the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuinfo import cpu_description, flags_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "log-to-json"


def demo_features(tokenizer, count: int) -> list[dict]:
    """The first `count` demo rows as the trainer sees them: input ids and labels (-100 on the prompt)."""
    import yaml

    from specialist.data import Example, PromptTemplate
    from specialist.train.sft import build_dataset

    instruction = yaml.safe_load((DEMO / "config.yaml").read_text())["data"]["instruction"]
    rows = [json.loads(line) for line in (DEMO / "data.jsonl").read_text().splitlines()[:count]]
    dataset = build_dataset([Example(r["prompt"], r["completion"], i) for i, r in enumerate(rows)],
                            PromptTemplate.for_tokenizer(tokenizer, instruction), tokenizer, 256)
    return [{"input_ids": r["input_ids"],
             "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]} for r in dataset]


def measure(model, batches: list[dict], by_rows: bool) -> tuple[float, float, dict]:
    """(seconds per micro-batch after the first, the first batch's loss, its LoRA gradients)."""
    from specialist.logits import completion_loss
    from specialist.train.row_attention import attending_by_rows

    with attending_by_rows(model) if by_rows else nullcontext():
        model.zero_grad()
        loss = completion_loss(model, batches[0], None)
        loss.backward()  # also the warm-up: allocations, oneDNN kernel choice
        gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        started = time.perf_counter()
        for batch in batches[1:]:
            completion_loss(model, batch, None).backward()
        return (time.perf_counter() - started) / (len(batches) - 1), loss.item(), gradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from specialist.config import MethodConfig
    from specialist.models import resolve_model
    from specialist.train.sft import lora_config

    torch.manual_seed(0)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           lora_config(MethodConfig(r=16, alpha=32, target_modules="all-linear")))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # nonzero, so that every adapter weight has a gradient to compare
            torch.nn.init.normal_(parameter, std=0.02)
    features = demo_features(tokenizer, args.rows * (args.batches + 1))
    print(f"{flags_line(cpu_description())}; torch {torch.__version__}; {args.rows} demo rows a micro-batch")
    reference = None
    for label, free, by_rows in (("padded", False, False), ("padding-free, one mask", True, False),
                                 ("padding-free, row by row", True, True)):
        collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=free)
        batches = [collate(features[i:i + args.rows]) for i in range(0, len(features), args.rows)]
        tokens = sum(b["input_ids"].numel() for b in batches[1:]) / (len(batches) - 1)
        seconds, loss, gradients = measure(model, batches, by_rows)
        reference = reference or (seconds, loss, gradients)
        gap = max(((gradients[n] - g).norm() / g.norm()).item() for n, g in reference[2].items())
        print(f"{label:26s}: {seconds:5.2f} s a micro-batch, {tokens:5.0f} tokens computed, "
              f"{reference[0] / seconds:4.2f}x padded; loss {loss:.6f} (padded {reference[1]:.6f}), "
              f"largest relative gradient difference {gap:.1e}")


if __name__ == "__main__":
    main()
