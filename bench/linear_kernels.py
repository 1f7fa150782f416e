"""Linear-layer kernels on Gemma 3 270M's shapes: torch's F.linear (MKL's sgemm for float32) against oneDNN with
the weight packed once (specialist.onednn), side by side in one run.

    .venv/bin/python bench/linear_kernels.py [--threads 2] [--out bench/results/linear_kernels.json]

Two sets of products, each at 1, 16, 64 and 1,024 rows (decoding one row, a batch of 16 rows, prefill):
  decoder layer  the seven float32 linear layers of one decoder layer (q, k, v, o, gate, up, down)
  output layer   262144 x 640: float32 and bfloat16 (the greedy head's candidate pass), each plain and packed
Prints milliseconds, GFLOP/s and the packed/plain speed ratio, the largest difference from a float64 reference
(packed float32 must stay float32: its error is of float32's size, the bfloat16 rows' is not), and the CPU line
(with the AVX2-only emulation when ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
are set). Timings are the best of three repeats (a shared machine only ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "src"))

DECODER_LAYER = [(1024, 640), (256, 640), (256, 640), (640, 1024), (2048, 640), (2048, 640), (640, 2048)]
VOCABULARY, HIDDEN = 262144, 640
ROWS = (1, 16, 64, 1024)


def best_seconds(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def relative_error(value, reference) -> float:
    return float((value.double() - reference).abs().max() / reference.abs().max())


def decoder_layer(rows: int) -> dict:
    import torch
    import torch.nn.functional as F

    from specialist import onednn

    weights = [torch.randn(shape) * 0.02 for shape in DECODER_LAYER]
    inputs = [torch.randn(rows, shape[1]) for shape in DECODER_LAYER]
    repeats = max(2, 2000 // rows)
    plain = sum(best_seconds(lambda x=x, w=w: F.linear(x, w), repeats) for x, w in zip(inputs, weights))
    packed = sum(best_seconds(lambda x=x, w=w: onednn.linear(x, w), repeats) for x, w in zip(inputs, weights))
    reference = F.linear(inputs[4].double(), weights[4].double())
    flops = sum(2 * rows * out * inp for out, inp in DECODER_LAYER)
    return {"rows": rows, "plain_ms": plain * 1e3, "packed_ms": packed * 1e3, "plain_gflops": flops / plain / 1e9,
            "packed_gflops": flops / packed / 1e9, "ratio": plain / packed,
            "plain_error": relative_error(F.linear(inputs[4], weights[4]), reference),
            "packed_error": relative_error(onednn.linear(inputs[4], weights[4]), reference)}


def output_layer(rows: int, weight, low) -> dict:
    import torch
    import torch.nn.functional as F

    from specialist import onednn

    hidden = torch.randn(rows, HIDDEN)
    repeats = 3 if rows > 16 else 5
    found = {"rows": rows}
    reference = F.linear(hidden.double(), weight.double())
    for name, w, x in (("fp32", weight, hidden), ("bf16", low, hidden.bfloat16())):
        found[f"{name}_plain_ms"] = 1e3 * best_seconds(lambda w=w, x=x: F.linear(x, w), repeats)
        try:
            onednn.linear(x, w)
        except RuntimeError as error:  # oneDNN packs bfloat16 only with AVX512-BW/VL/DQ (not under AVX2 emulation)
            found.update({f"{name}_packed_ms": float("nan"), f"{name}_ratio": float("nan"),
                          f"{name}_packed_error": float("nan"), f"{name}_packed_refused": str(error)[:200]})
            continue
        found[f"{name}_packed_ms"] = 1e3 * best_seconds(lambda w=w, x=x: onednn.linear(x, w), repeats)
        found[f"{name}_ratio"] = found[f"{name}_plain_ms"] / found[f"{name}_packed_ms"]
        found[f"{name}_packed_error"] = relative_error(onednn.linear(x, w), reference)
    return found


def main() -> None:
    import torch

    from cpuinfo import cpu_description, flags_line
    from specialist import onednn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "linear_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not onednn.available():
        sys.exit("this torch has no oneDNN packed linear kernel")
    torch.manual_seed(0)
    layers = [decoder_layer(rows) for rows in ROWS]
    weight = torch.randn(VOCABULARY, HIDDEN) * 0.03
    low = weight.bfloat16()
    heads = [output_layer(rows, weight, low) for rows in ROWS[:3]]
    print("decoder layer (7 float32 products)   F.linear ms  GFLOP/s   packed ms  GFLOP/s   ratio   "
          "rel. error plain/packed")
    for r in layers:
        print(f"  {r['rows']:>5} rows{'':<24}{r['plain_ms']:>9.3f}{r['plain_gflops']:>9.0f}{r['packed_ms']:>12.3f}"
              f"{r['packed_gflops']:>9.0f}{r['ratio']:>8.2f}x   {r['plain_error']:.1e} / {r['packed_error']:.1e}")
    print("output layer 262144 x 640            fp32 plain  packed  ratio    bf16 plain  packed  ratio   "
          "rel. error fp32/bf16 packed")
    for r in heads:
        print(f"  {r['rows']:>5} rows{'':<24}{r['fp32_plain_ms']:>9.1f}{r['fp32_packed_ms']:>8.1f}"
              f"{r['fp32_ratio']:>6.2f}x{r['bf16_plain_ms']:>14.1f}{r['bf16_packed_ms']:>8.1f}"
              f"{r['bf16_ratio']:>6.2f}x   "
              f"{r['fp32_packed_error']:.1e} / {r['bf16_packed_error']:.1e}")
    cpu = cpu_description()
    print(flags_line(cpu))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "decoder_layer": layers,
                                    "output_layer": heads}, indent=2))


if __name__ == "__main__":
    main()
