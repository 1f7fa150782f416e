"""What every benchmark prints beside its figures: the CPU, the vector flags that decide which kernels run, the
torch kernel level in use, and whether AVX2-only was emulated on a wider CPU (the env vars below) -- figures taken
that way are said to be."""

from __future__ import annotations

import os
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
EMULATION = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_description() -> dict:
    """The CPU model, its vector flags, torch's kernel level and any ISA-restricting environment variables."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    import torch

    return {"model": model, "cores": os.cpu_count(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "emulated": {name: os.environ[name] for name in EMULATION if name in os.environ},
            **{flag: flag in flags for flag in FLAGS}}


def flags_line(cpu: dict) -> str:
    """e.g. `CPU AMD EPYC, 2 cores; avx2=yes, avx512f=yes, ...; torch kernels AVX2 (emulated: ...)`."""
    flags = ", ".join(f"{flag}={'yes' if cpu.get(flag) else 'no'}" for flag in FLAGS)
    emulated = cpu.get("emulated") or {}
    note = f" (AVX2-only emulated: {' '.join(f'{k}={v}' for k, v in emulated.items())})" if emulated else ""
    return (f"CPU {cpu['model']}, {cpu['cores']} cores; {flags}; torch kernels {cpu['torch_capability']}, "
            f"{cpu.get('torch_threads', '?')} threads{note}")
