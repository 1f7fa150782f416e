"""The int8 weight codec of `specialist export --format int8`: every weight matrix as int8 with one scale per row.

Stored as safetensors only (no pickle is ever loaded). Symmetric per-row quantization: `w ~ q * scale[row]`,
q in [-127, 127]. Tied weights (the embedding and the LM head of most small models) share storage and are stored
once. 1-D tensors (norms, biases) stay in float32.
"""

from __future__ import annotations

from pathlib import Path

from specialist.errors import ConfigError

SCALE_SUFFIX = ".int8_scale"


def int8_weights(state: dict) -> dict:
    """Every 2-D float weight as int8 with one fp32 scale per row (symmetric); 1-D weights kept as fp32."""
    import torch

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
    import torch

    return {name: tensor.float() * stored[f"{name}{SCALE_SUFFIX}"][:, None] if tensor.dtype == torch.int8 else tensor
            for name, tensor in stored.items() if not name.endswith(SCALE_SUFFIX)}


def save_int8(model, path: Path) -> int:
    """Write `model`'s weights as int8 safetensors; returns the file's size in bytes."""
    from safetensors.torch import save_file

    save_file(int8_weights(model.state_dict()), str(path))
    return path.stat().st_size


def load_int8(folder: Path, weights: Path):
    """The model of an int8 export folder: its config, with the int8 weights dequantized into float32."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    try:
        state = dequantize_weights(load_file(str(weights)))
    except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"{weights}: not readable int8 safetensors ({exc})", hint="export it again") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{folder}: int8 weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {unexpected[:3]})", hint="export it again")
    model.tie_weights()
    return model
