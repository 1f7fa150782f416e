"""LoRA training step throughput in fp32, under bf16 autocast, and in fp32 through oneDNN's packed kernels
(specialist.onednn, where this torch has them), by rows per forward pass, in one run.

    .venv/bin/python bench/train_precision.py [--model gemma-3-270m] [--rows 2,4,8] [--length 146] [--steps 3]

Gemma 3 270M (the cached embedded model) with LoRA r=16 on every linear layer, the completion-only loss the
trainer uses (`specialist.logits.completion_loss`), one forward and backward per step on random token rows of
`--length` tokens (146: the demo's mean row, instruction included) with the last 36 tokens labelled. No optimizer
and no data loading: this isolates the matmul precision and the rows a forward pass carries, the two levers
`use_bf16_autocast` and `training.micro_batch_tokens` set, and the kernel the frozen layers run on (the packed one
computes float32's products: its loss is printed beside the others). Prints tokens/s for each setting, the ratio
to fp32 at the fewest rows, and the CPU flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuinfo import cpu_description, flags_line  # noqa: E402


def step_rate(model, rows: int, length: int, steps: int, mode: str) -> tuple[float, float]:
    """(tokens/s, the last loss) of forward + backward steps in `mode`: fp32, bf16 autocast or fp32 packed."""
    import contextlib

    import torch

    from specialist.logits import completion_loss

    torch.manual_seed(rows)
    ids = torch.randint(10, 20000, (rows, length))
    labels = ids.clone()
    labels[:, : length - 36] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if mode == "fp32 packed":
        from specialist.onednn import packed_linears

        scope = packed_linears(model)
    else:
        scope = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16 autocast")
    with scope if scope is not None else contextlib.nullcontext():
        completion_loss(model, inputs, None).backward()  # warm-up: allocations, oneDNN kernel choice, packing
        started = time.perf_counter()
        for _ in range(steps):
            loss = completion_loss(model, inputs, None)
            loss.backward()
    return steps * ids.numel() / (time.perf_counter() - started), float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--rows", default="2,4,8")
    parser.add_argument("--length", type=int, default=146)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from specialist.decode import cpu_multiplies_bf16
    from specialist.models import resolve_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    print(f"{flags_line(cpu_description())}; torch {torch.__version__}; "
          f"bf16 multiply detected: {cpu_multiplies_bf16()}")
    reference = None
    try:
        from specialist.onednn import available
    except ImportError:  # a source from before the packed kernels
        modes = ("fp32", "bf16 autocast")
    else:
        modes = ("fp32", "bf16 autocast", "fp32 packed") if available() else ("fp32", "bf16 autocast")
    for rows in (int(r) for r in args.rows.split(",")):
        for mode in modes:
            rate, loss = step_rate(model, rows, args.length, args.steps, mode)
            reference = reference or rate
            print(f"{rows} rows a forward pass, {mode:<13}: {rate:6.0f} tokens/s  {rate / reference:.2f}x  "
                  f"loss {loss:.6f}")


if __name__ == "__main__":
    main()
