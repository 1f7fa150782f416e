"""Write a merged model as one GGUF file (f32, f16 or q8_0) for llama.cpp and Ollama, with the `gguf` package.

Tensor names come from the same HF -> GGUF name map transformers uses to read GGUF files, so what this writes,
transformers' GGUF loader reads back (the test compares next-token logits). Per architecture, the value changes
llama.cpp's own converter makes are made here too: Gemma stores RMSNorm weights as 1 + w, Llama interleaves the
rotary halves of the q/k rows.

Metadata: when the base model itself came from a GGUF (the embedded default does), every key of that file is
carried over (architecture parameters, the tokenizer with its scores and token types, the chat template) and
only the file type changes; otherwise it is written from the config and the tokenizer (byte-level BPE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from specialist.errors import ConfigError

QUANT_TYPES = ("f32", "f16", "q8_0")
_ARCH_OF_MODEL_TYPE = {"gemma3_text": "gemma3", "gemma3": "gemma3", "llama": "llama"}


def gguf_arch(model) -> str:
    model_type = model.config.model_type
    if model_type not in _ARCH_OF_MODEL_TYPE:
        raise ConfigError(f"GGUF export supports {sorted(set(_ARCH_OF_MODEL_TYPE.values()))} models, not {model_type!r}",
                          hint="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return _ARCH_OF_MODEL_TYPE[model_type]


def write_gguf(model, tokenizer, path: Path, qtype: str = "f16", source_gguf: Path | None = None,
               chat_template: str | None = None) -> dict[str, Any]:
    """Write `model` (plain, merged) to `path`; returns {tensors, bytes, qtype}."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    if qtype not in QUANT_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}", hint=f"use one of {', '.join(QUANT_TYPES)}")
    arch = gguf_arch(model)
    config = model.config
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)  # gguf name -> hf name
    tied = bool(getattr(config, "tie_word_embeddings", False))
    writer = gguf.GGUFWriter(str(path), arch)
    if source_gguf is not None:
        _copy_metadata(writer, source_gguf)
    else:
        _write_metadata(writer, arch, config, tokenizer, chat_template)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    state = model.state_dict()
    count = 0
    for gguf_name, hf_name in sorted(names.items(), key=lambda item: _tensor_order(item[0])):
        if tied and gguf_name.startswith("output.weight") or hf_name not in state:
            continue
        data = _to_gguf_layout(arch, gguf_name, state[hf_name].detach().float().cpu().numpy(), config)
        array, raw_dtype = _encode(data, qtype, gguf)
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)  # the shape is told from the quantized bytes
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": count, "bytes": path.stat().st_size, "qtype": qtype}


def _tensor_order(name: str) -> tuple[int, int, str]:
    """token_embd first, blocks in order, the rest after: the order llama.cpp's converter writes."""
    if name.startswith("blk."):
        return 1, int(name.split(".")[1]), name
    return (0 if name.startswith("token_embd") else 2), 0, name


def _to_gguf_layout(arch: str, name: str, data: np.ndarray, config) -> np.ndarray:
    if arch == "gemma3" and name.endswith("norm.weight"):
        return data + 1.0  # HF Gemma RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return _permute(data, heads)
    return data


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout (the inverse of transformers' reverse_permute)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(data: np.ndarray, qtype: str, gguf):
    """(array to write, raw dtype or None); 1-D tensors (norms, biases) stay f32 as llama.cpp expects."""
    if qtype == "f32" or data.ndim < 2:
        return data.astype(np.float32), None
    if qtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def _copy_metadata(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for field in reader.fields.values():
        if field.name in skip or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def _write_metadata(writer, arch: str, config, tokenizer, chat_template: str | None) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or "specialist export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope_theta:
        writer.add_rope_freq_base(float(rope_theta))
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
    _write_tokenizer(writer, tokenizer, config.vocab_size, chat_template)


def _write_tokenizer(writer, tokenizer, vocab_size: int, chat_template: str | None) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model: tokens by id, types, merges, specials."""
    import json

    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}",
                          hint="export from a GGUF base model, or --format merged and llama.cpp's converter")
    by_id = {index: token for token, index in model["vocab"].items()}
    special = {added["id"] for added in backend.get("added_tokens", []) if added.get("special")}
    for added in backend.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None)
    if chat_template or getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(chat_template or tokenizer.chat_template)
