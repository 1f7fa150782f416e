"""int8 export against the merged fp32 export: size on disk and greedy generation speed on the same prompts.

    .venv/bin/python bench/int8_generation.py RUN_DIR/export/merged RUN_DIR/export/int8 [--prompts 16]

Both load through `specialist.deploy.export.load_exported`, the way `serve` and `eval` load them; each answers the
same held-out prompts of the run one at a time (greedy, up to --max-new-tokens, stopping at the end token).
Prints the size of the weights on disk, generated tokens/s and the share of identical answers. Quality on the
whole test split comes from `specialist eval RUN --arm int8=RUN/export/int8`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("merged", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_generation.json")
    args = parser.parse_args()

    import torch

    from specialist.data import read_split
    from specialist.deploy.export import greedy_answer, load_exported, weights_bytes

    run = Path(json.loads((args.merged / "export.json").read_text())["run"])
    prompts = [ex.prompt for ex in read_split(run / "data").test[: args.prompts]]
    results, answers = {}, {}
    for name, folder in (("merged fp32", args.merged), ("int8", args.int8)):
        model, tokenizer, template = load_exported(folder)
        greedy_answer(model, tokenizer, template, prompts[0], 4)  # warm-up
        tokens, start, texts = 0, time.perf_counter(), []
        for prompt in prompts:
            text, _ = greedy_answer(model, tokenizer, template, prompt, args.max_new_tokens)
            texts.append(text)
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        seconds = time.perf_counter() - start
        results[name] = {"weights_bytes": weights_bytes(folder), "seconds": seconds, "tokens": tokens,
                         "tokens_per_s": tokens / seconds, "threads": torch.get_num_threads()}
        answers[name] = texts
        del model
    same = sum(a == b for a, b in zip(answers["merged fp32"], answers["int8"], strict=True)) / len(prompts)
    a, b = results["merged fp32"], results["int8"]
    print(f"\n{len(prompts)} held-out prompts, greedy, up to {args.max_new_tokens} new tokens, one at a time")
    print(f"{'':14}{'weights MiB':>13}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:14}{r['weights_bytes'] / 2**20:>13.0f}{r['tokens_per_s']:>10.1f}")
    print(f"int8 / fp32: size {b['weights_bytes'] / a['weights_bytes']:.2f}x, speed "
          f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x; identical answers {100 * same:.0f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": len(prompts), "results": results, "identical_answers": same},
                                   indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
