"""int8 weight-only matmul kernels on this CPU, against fp32: time per call and the memory each one holds.

    .venv/bin/python bench/int8_kernels.py [--threads 2] [--repeat 20] [--torchao]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python bench/int8_kernels.py

The shapes are Gemma 3 270M's: its tied LM head (1 or 16 rows @ 640 x 262144, most of the model's weights) and
an MLP projection (640 x 2048). Kernels, all on the same int8 weight with one fp32 scale per output row:
- fp32: F.linear on the float weight (the reference; 4 bytes per weight resident);
- int8pack: torch._weight_int8pack_mm (ATen's weight-only int8 kernel);
- specialist Int8Linear (what `specialist.int8` ships): int8 rows converted to fp32 a block at a time (4 MiB per
  thread), multiplied into a transposed output, scaled once;
- column slices: the same blocks written into column slices of a row-major output (the first version);
- int_mm dynamic: activations quantized per token to int8, torch._int_mm (int32 accumulate), rescaled (changes
  the numbers: its error is printed);
- torchao (--torchao, needs `pip install torchao`): Int8WeightOnlyConfig via quantize_, eager and compiled.
Prints the CPU model and flags beside the figures; writes bench/results/int8_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpuinfo import cpu_description, flags_line  # noqa: E402,F401 - int8_generation imports these from here too
SHAPES = {"lm_head 640x262144": (640, 262144), "mlp 640x2048": (640, 2048)}


def timed(fn, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` calls after two warm-up calls."""
    import statistics

    fn(), fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def chunked_linear(x, q, scale, rows: int = 4096):
    """x @ (q * scale[:, None]).T with at most `rows` weight rows in float at once, written into column slices."""
    import torch

    out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype)
    for start in range(0, q.shape[0], rows):
        block = q[start:start + rows].to(x.dtype)
        torch.matmul(x, block.t(), out=out[:, start:start + rows])
    return out.mul_(scale)


def dynamic_int_mm(x, q, scale):
    """Per-token int8 activations through torch._int_mm (int32 accumulate), rescaled to float."""
    import torch

    x_scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    xq = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
    return torch._int_mm(xq, q.t()).float() * x_scale * scale


def kernels(weight, q, scale, with_torchao: bool):
    import torch
    import torch.nn.functional as F

    from specialist.int8 import Int8Linear

    shipped = Int8Linear(q, scale)
    found = {"fp32": lambda x: F.linear(x, weight),
             "int8pack": lambda x: torch._weight_int8pack_mm(x, q, scale),
             "specialist Int8Linear": lambda x: shipped(x),
             "column slices 1024 rows": lambda x: chunked_linear(x, q, scale, 1024),
             "column slices 4096 rows": lambda x: chunked_linear(x, q, scale, 4096),
             "int_mm dynamic": lambda x: dynamic_int_mm(x, q, scale)}
    if with_torchao:
        found.update(torchao_kernels(weight))
    return found


def torchao_kernels(weight) -> dict:
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    quantize_(linear, Int8WeightOnlyConfig())
    compiled = torch.compile(linear)
    return {"torchao eager": lambda x: linear(x), "torchao compiled": lambda x: compiled(x)}


def measure_shape(k: int, n: int, batches: list[int], repeat: int, with_torchao: bool) -> dict:
    import torch

    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    dequantized = q.float() * scale[:, None]
    rows = {}
    for name, fn in kernels(weight, q, scale, with_torchao).items():
        for m in batches:
            x = torch.randn(m, k)
            with torch.inference_mode():
                try:
                    seconds = timed(lambda: fn(x), repeat)
                    error = float((fn(x) - x @ dequantized.t()).norm() / (x @ dequantized.t()).norm())
                except (RuntimeError, NotImplementedError) as exc:
                    rows[f"{name} m={m}"] = {"error": str(exc).splitlines()[0][:120]}
                    continue
            rows[f"{name} m={m}"] = {"ms": 1000 * seconds, "relative_error": error}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--torchao", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_kernels.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    cpu = cpu_description()
    print(f"{flags_line(cpu)}; torch {torch.__version__} capability {cpu['torch_capability']}, "
          f"{args.threads} threads")
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    for shape, (k, n) in SHAPES.items():
        results[shape] = measure_shape(k, n, batches, args.repeat, args.torchao)
        print(f"\n{shape}")
        for name, row in results[shape].items():
            print(f"  {name:26}" + (f"{row['ms']:>9.2f} ms  rel. error {row['relative_error']:.1e}" if "ms" in row
                                     else f"  failed: {row['error']}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
