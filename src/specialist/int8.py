"""The int8 weight codec of `specialist export --format int8`, and a model that keeps its weights int8 in memory.

Stored as safetensors only (no pickle is ever loaded). Symmetric per-row quantization: `w ~ q * scale[row]`,
q in [-127, 127]. Tied weights (the embedding and the LM head of most small models) share storage and are stored
once. 1-D tensors (norms, biases) stay in float32.

At load every `nn.Linear` and the input embedding become `Int8Linear` / `Int8Embedding`, which hold the int8
matrix and its scales and nothing else, so the weights take a quarter of their float32 memory (Gemma 3 270M: its
tied 262144 x 640 embedding / LM head is most of them, and is held once). `Int8Linear` converts its int8 rows to
float a block at a time (`BLOCK_BYTES`), multiplies, and scales the outputs once. That was the fastest of what we
measured on this CPU (bench/int8_kernels.py, AVX-512 and AVX2-only; bench/results/int8_kernels*.json): the LM head
at batch 1 took 33-38 ms against float32's 54-55 (it reads a quarter of the bytes), while `torch._weight_int8pack_mm`
was 1.3-15x slower than float32, torchao's int8 weight-only converts the whole matrix on every call (225-300 ms,
eager or compiled), and int8 activations (`torch._int_mm`, fast) changed 3 of 8 greedy answers of Gemma 3 270M.
The numbers are those of the weights dequantized to float32: only the order of the sums differs. Whole-model
figures (bench/int8_generation.py): RSS after generating 984 MiB against 1691, 1.3-1.4x the tokens/s of float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from specialist.errors import ConfigError

SCALE_SUFFIX = ".int8_scale"
# float bytes converted at once per thread: 1.6-2k rows of Gemma's 640 columns measured fastest on one thread (the
# block stays in cache; bench/int8_kernels.py), 4k rows (10 MiB) was 2-3x slower
BLOCK_BYTES = 4 * 2**20
# decoding (a few rows per call) converts on the calling thread alone, through numpy: a block converts in tens of
# microseconds, and on a shared machine each of torch's parallel regions can wait a whole time slice for a
# descheduled thread (2-thread int8 decoding measured 6-19 tokens/s from run to run on a busy 2-core machine).
# numpy rather than torch.set_num_threads(1): that count is also process state, which a thread starting its first
# torch op inside the window would keep for good
ONE_THREAD_ROWS = 4


def _convert_on_this_thread(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`part.to(dtype)` by numpy, on the calling thread alone (no OpenMP region to wait on)."""
    import numpy as np

    if dtype not in (torch.float32, torch.float64):
        return part.to(dtype)  # numpy has no bfloat16
    block = np.empty(tuple(part.shape), dtype=np.float32 if dtype == torch.float32 else np.float64)
    np.copyto(block, part.numpy(), casting="unsafe")
    return torch.from_numpy(block)


class Int8Linear(nn.Module):
    """`y = x @ (weight * weight_scale[:, None]).T + bias` with `weight` int8, never held in float as a whole.

    The output is computed transposed (one contiguous slab of output rows per weight block) and scaled once at the
    end: at 16 rows on 2 threads that measured twice as fast as writing column slices of a row-major output."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.block_rows: int | None = None  # None: BLOCK_BYTES per thread

    def rows_per_block(self, x: torch.Tensor) -> int:
        if self.block_rows is not None:
            return self.block_rows
        # each thread converts its share of a block: fewer, larger blocks also mean fewer parallel regions, which
        # is what a busy machine punishes (a thread descheduled at each of thousands of barriers)
        budget = BLOCK_BYTES * max(1, torch.get_num_threads())
        return max(1, budget // (x.element_size() * self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.empty(self.out_features, flat.shape[0], dtype=x.dtype, device=x.device)
        rows = self.rows_per_block(x)
        convert = _convert_on_this_thread if flat.shape[0] <= ONE_THREAD_ROWS and x.device.type == "cpu" else None
        for start in range(0, self.out_features, rows):
            part = self.weight[start:start + rows]
            block = convert(part, x.dtype) if convert is not None else part.to(x.dtype)
            torch.mm(block, flat.t(), out=out[start:start + part.shape[0]])
        out.mul_(self.weight_scale.to(x.dtype)[:, None])  # one scale per output: applied once, after the sums
        if self.bias is not None:
            out.add_(self.bias.to(x.dtype)[:, None])
        return out.t().contiguous().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding lookup that reads int8 rows and scales them (times `embed_scale`, as Gemma's embedding does)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, embed_scale: torch.Tensor | None = None,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dtype = self.weight_scale.dtype
        rows = self.weight[input_ids].to(dtype) * self.weight_scale[input_ids].unsqueeze(-1)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def int8_weights(state: dict) -> dict:
    """Every 2-D float weight as int8 with one fp32 scale per row (symmetric); 1-D weights kept as fp32."""
    out, seen = {}, set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:  # tied weights (embedding and LM head) share storage: stored once
            continue
        seen.add(tensor.data_ptr())
        if tensor.ndim == 2 and tensor.is_floating_point():
            scale = (tensor.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
            out[name] = torch.round(tensor.float() / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            out[f"{name}{SCALE_SUFFIX}"] = scale.contiguous()
        else:
            out[name] = tensor.float().contiguous()
    return out


def dequantize_weights(stored: dict) -> dict:
    """The stored weights in float32 (int8 ones times their row scales)."""
    return {name: tensor.float() * stored[f"{name}{SCALE_SUFFIX}"][:, None] if tensor.dtype == torch.int8 else tensor
            for name, tensor in stored.items() if not name.endswith(SCALE_SUFFIX)}


def save_int8(model, path: Path) -> int:
    """Write `model`'s weights as int8 safetensors; returns the file's size in bytes."""
    from safetensors.torch import save_file

    save_file(int8_weights(model.state_dict()), str(path))
    return path.stat().st_size


def load_int8(folder: Path, weights: Path):
    """The model of an int8 export folder, its matrices kept int8 in memory (`Int8Linear`, `Int8Embedding`).

    The model is built without memory for its weights (parameters on the meta device), so loading never holds a
    float32 copy either. Inference only: every parameter has requires_grad off."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = read_int8_file(weights)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables, Gemma's embed_scale) are real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    swapped = install_int8_modules(model, stored)
    share_tied_int8(model)
    rest = dequantize_weights({k: v for k, v in stored.items() if k not in swapped and not _is_scale_of(k, swapped)})
    try:
        unexpected = model.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    except RuntimeError as exc:  # a stored tensor of the wrong shape
        raise ConfigError(f"{folder}: int8 weights do not fit the model ({exc})", hint="export it again") from exc
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise ConfigError(f"{folder}: int8 weights do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})", hint="export it again")
    return model.requires_grad_(False)


def read_int8_file(weights: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ConfigError(f"{weights}: not readable int8 safetensors ({exc})", hint="export it again") from exc
    for name, tensor in stored.items():
        if tensor.dtype == torch.int8 and (tensor.ndim != 2 or stored.get(f"{name}{SCALE_SUFFIX}") is None
                                           or stored[f"{name}{SCALE_SUFFIX}"].shape != (tensor.shape[0],)):
            raise ConfigError(f"{weights}: int8 tensor {name!r} has no scale per row", hint="export it again")
    return stored


def _is_scale_of(name: str, swapped: set[str]) -> bool:
    return name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in swapped


def install_int8_modules(model, stored: dict) -> set[str]:
    """Replace each module whose int8 weight is stored (nn.Linear, the embedding) by its int8 twin; returns the
    names of the weights now held as int8. Any other int8 matrix is left to be loaded dequantized."""
    swapped = set()
    for name, tensor in stored.items():
        module_name, _, attr = name.rpartition(".")
        if tensor.dtype != torch.int8 or attr != "weight":
            continue
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # reported as unexpected when the rest is loaded
        twin = int8_twin(module, tensor, stored[f"{name}{SCALE_SUFFIX}"])
        if twin is not None:
            model.set_submodule(module_name, twin)
            swapped.add(name)
    return swapped


def int8_twin(module, weight: torch.Tensor, scale: torch.Tensor) -> nn.Module | None:
    """The int8 module that computes what `module` did, or None where there is none (it stays float)."""
    if tuple(getattr(module, "weight", torch.empty(0)).shape) != tuple(weight.shape):
        return None
    if type(module) is nn.Linear:
        return Int8Linear(weight, scale, module.bias)
    # Gemma's ScaledWordEmbedding multiplies the looked-up rows by embed_scale; any other subclass may do more
    if type(module) is nn.Embedding or type(module).__name__.endswith("ScaledWordEmbedding"):
        return Int8Embedding(weight, scale, getattr(module, "embed_scale", None), module.padding_idx)
    return None


def share_tied_int8(model) -> None:
    """With tied word embeddings only one of the embedding and the LM head was stored: the other shares its int8
    matrix and scales (one copy in memory, as in the float model)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    names = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, Int8Embedding) and type(head) is nn.Linear and head.weight.is_meta:
        model.set_submodule(names[head], Int8Linear(embedding.weight, embedding.weight_scale, head.bias))
    elif isinstance(head, Int8Linear) and embedding is not None and embedding.weight.is_meta:
        twin = int8_twin(embedding, head.weight, head.weight_scale)
        if twin is not None:
            model.set_submodule(names[embedding], twin)
