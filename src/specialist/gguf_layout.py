"""How a Hugging Face model's weights sit in a GGUF file, per architecture: tensor names, llama's rotary row order,
Gemma's norm offset; and reading a GGUF LoRA adapter back onto an HF model (`merge_gguf_lora`).

The writer (deploy/gguf_export.py) and the quantization-error compensation (deploy/lora_compensation.py) lay weights
out through this; the artifact loader reads an export's GGUF LoRA through it, so loading an export for evaluation
or serving does not import the deploy stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specialist.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """How one HF model type is laid out in llama.cpp."""

    gguf_name: str
    permute_qk: bool = False  # llama.cpp's llama graph rotates interleaved pairs; HF rotates halves
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores the sum


ARCHITECTURES = {
    "llama": Architecture("llama", permute_qk=True),
    "qwen2": Architecture("qwen2"),
    "qwen3": Architecture("qwen3"),
    "phi3": Architecture("phi3"),
    "gemma3_text": Architecture("gemma3", norm_offset=1.0),
}


def architecture(model) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"GGUF export supports the model types {known}; this model is {model_type!r}",
                          hint="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def rotary_heads(spec: Architecture, name: str, config) -> int | None:
    """The heads of a q or k weight whose rows llama.cpp keeps in its own rotary order (llama), else None."""
    if not spec.permute_qk:
        return None
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout (the inverse of transformers' reverse_permute); biases (1-D) too."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_weight_names(model, spec: Architecture) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name for a plain model or one PEFT has injected LoRA layers into."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(spec.gguf_name, TensorProcessor)(config=model.config.to_dict())
    # PEFT wraps an adapted linear as `<name>.base_layer`: map the names the plain model would have
    plain_names = [name.replace(".base_layer.", ".") for name in model.state_dict()
                   if ".lora_" not in name]
    return get_gguf_hf_weights_map(_NamesOnly(plain_names, model.config), processor)


class _NamesOnly:
    """What transformers' name mapper reads of a model (its state dict keys and config), without the model."""

    def __init__(self, names: list[str], config) -> None:
        self.config, self._names = config, names

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list:
        return []


def merge_gguf_lora(model, lora_path: Path) -> int:
    """Add a GGUF LoRA adapter's update to `model`'s weights in place (the reader side of `write_gguf_lora`, for
    loaders without llama.cpp); returns how many weights changed."""
    import gguf
    import torch

    spec = architecture(model)
    wrong_base = "the adapter must come from an export of a run on this base model"
    try:
        reader = gguf.GGUFReader(str(lora_path))
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise ConfigError(f"{lora_path}: not a readable GGUF file ({error})",
                          hint="export it again with `specialist export --format gguf --lora separate`") from None
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    if fields.get(gguf.Keys.General.TYPE) != gguf.GGUFType.ADAPTER or fields.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise ConfigError(f"{lora_path}: not a GGUF LoRA adapter (general.type / adapter.type)",
                          hint="export one with `specialist export --format gguf --lora separate`")
    alpha = float(fields.get(gguf.Keys.Adapter.LORA_ALPHA) or 0.0)
    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors if t.tensor_type in float_types}
    to_hf = gguf_weight_names(model, spec)
    state = dict(model.named_parameters())
    updates = []  # every tensor checked before any weight changes
    for name in sorted(n[: -len(".lora_a")] for n in tensors if n.endswith(".lora_a")):
        a, b = tensors[f"{name}.lora_a"], tensors.get(f"{name}.lora_b")
        weight = state.get(to_hf.get(name, ""))
        if b is None or weight is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] \
                or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise ConfigError(f"{lora_path}: tensor {name}.lora_a has no lora_b or model weight of a matching shape",
                              hint=wrong_base)
        delta = (b @ a) * (alpha / b.shape[1] if alpha else 1.0)
        heads = rotary_heads(spec, name, model.config)
        updates.append((weight, unpermute(delta, heads) if heads else delta))
    if len(updates) * 2 != len(reader.tensors):
        raise ConfigError(f"{lora_path}: {len(reader.tensors)} tensors, of which {2 * len(updates)} are f32/f16 LoRA "
                          "pairs this model has", hint=wrong_base)
    with torch.no_grad():
        for weight, delta in updates:
            weight += torch.from_numpy(delta).to(weight.dtype)
    return len(updates)


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute`: llama.cpp's rotary row order back to transformers'."""
    return (weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
