"""Batched evaluation against one example at a time, on the same examples with the same greedy decoding.

    .venv/bin/python bench/eval_batching.py [--examples 64] [--batch-size 32] [--max-new-tokens 32]

Both arms use `specialist.evaluate.generate_outputs` on the embedded model with the log-to-json prompts;
the only difference is the batch size (left padding and the KV cache in both). Prints seconds, examples/s,
the ratio, and how many outputs agree (left padding can move a greedy tie in low-precision arithmetic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "log-to-json" / "data.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval_batching.json")
    args = parser.parse_args()

    from specialist.data import PromptTemplate
    from specialist.evaluate.generate import generate_outputs
    from specialist.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    template = PromptTemplate.for_tokenizer(tokenizer, "Parse the log line into JSON.")
    prompts = [json.loads(line)["prompt"] for line in DATA.read_text().splitlines()[: args.examples]]
    generate_outputs(model, tokenizer, template, prompts[:2], 4, batch_size=2, label="warm-up")

    timings, outputs = {}, {}
    for name, batch_size in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        start = time.perf_counter()
        outputs[name] = generate_outputs(model, tokenizer, template, prompts, args.max_new_tokens,
                                         batch_size=batch_size, label=name)
        timings[name] = time.perf_counter() - start
    single, batched = timings.values()
    first, second = outputs.values()
    agree = sum(a == b for a, b in zip(first, second))
    print(f"\n{len(prompts)} examples, greedy, {args.max_new_tokens} new tokens at most, {args.model}")
    for name, seconds in timings.items():
        print(f"{name:>20}: {seconds:7.1f} s  {len(prompts) / seconds:6.2f} examples/s")
    print(f"{'speed-up':>20}: {single / batched:7.2f}x")
    print(f"{'identical outputs':>20}: {agree}/{len(prompts)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "seconds": timings,
                                    "speedup": single / batched, "identical_outputs": agree}, indent=2))


if __name__ == "__main__":
    main()
