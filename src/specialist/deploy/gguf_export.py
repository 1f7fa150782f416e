"""Write a merged model as one GGUF file for llama.cpp and Ollama, at the sizes people ship.

Types: f32, f16, q8_0, q5_0, q4_0 are written here with the `gguf` package (block quantization in numpy, as
llama.cpp's own converter does: 1-D tensors, norms and biases stay f32, and a tensor whose rows are not a
multiple of the block size falls back to f16; in q4_0/q5_0 files the embedding and output layer are q8_0, where
llama.cpp's quantizer gives the output layer q6_k). q6_k, q5_k_m, q4_k_m go through llama.cpp's own quantizer
(`specialist.deploy.llamacpp.quantize_gguf`) from an f16 file written first, because the k-quants' mixes
(which tensors get more bits) are llama.cpp's to decide; they need llama-cpp-python.

Architectures: the small models people tune that both transformers' GGUF map and llama.cpp know (llama, qwen2,
qwen3, phi3, gemma3). Tensor names come from the HF -> GGUF name map transformers uses to read GGUF files; the
value changes llama.cpp's converter makes are made here too (Gemma stores RMSNorm weights as 1 + w, Llama
interleaves the rotary halves of the q/k rows, Llama 3 rope scaling becomes a `rope_freqs` tensor).

Metadata: when the base model itself came from a GGUF (the embedded default does), every key of that file is
carried over (architecture parameters, the tokenizer with its scores and token types, the chat template) and
only the file type changes; otherwise it is written from the config and the tokenizer (byte-level BPE, with the
pre-tokenizer llama.cpp must use to split text the way the HF tokenizer does: `bpe_pre_tokenizer`). SentencePiece-
style tokenizers (Llama 2, TinyLlama, Phi-3-mini, Gemma loaded from HF files) are refused with a hint: their
llama.cpp vocabulary needs scores this writer does not reconstruct.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from specialist.deploy.llamacpp import K_QUANT_FILE_TYPES, k_quant_file_type
from specialist.errors import ConfigError
from specialist.gguf_layout import Architecture, architecture, gguf_weight_names, permute, rotary_heads

PYTHON_QUANT_TYPES = ("f32", "f16", "q8_0", "q5_0", "q4_0")
LLAMA_CPP_QUANT_TYPES = tuple(K_QUANT_FILE_TYPES)
QUANT_TYPES = PYTHON_QUANT_TYPES + LLAMA_CPP_QUANT_TYPES


def write_gguf(model, tokenizer, path: Path, qtype: str = "f16", source_gguf: Path | None = None,
               chat_template: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Write `model` (plain, merged) to `path` as `qtype`; returns {tensors, bytes, qtype, tensor_types}.

    The k-quants need llama-cpp-python (a ConfigError names the extra to install); `threads` is what its
    quantizer may use (None: all cores).
    """
    path = Path(path)
    if qtype not in QUANT_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}", hint=f"use one of {', '.join(QUANT_TYPES)}")
    if qtype in LLAMA_CPP_QUANT_TYPES:
        return _write_through_llama_cpp(model, tokenizer, path, qtype, source_gguf, chat_template, threads)
    spec = architecture(model)
    _check_supported_config(spec, model.config)
    import gguf

    writer = gguf.GGUFWriter(str(path), spec.gguf_name)
    if source_gguf is not None:
        _copy_metadata(writer, source_gguf)
    else:
        _write_metadata(writer, spec, model.config, tokenizer, chat_template)
    writer.add_file_type(_FILE_TYPES[qtype](gguf))
    count = _add_tensors(writer, spec, model, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": count, "bytes": path.stat().st_size, "qtype": qtype, "tensor_types": tensor_types(path)}


_FILE_TYPES = {
    "f32": lambda gguf: gguf.LlamaFileType.ALL_F32,
    "f16": lambda gguf: gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": lambda gguf: gguf.LlamaFileType.MOSTLY_Q8_0,
    "q5_0": lambda gguf: gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_0": lambda gguf: gguf.LlamaFileType.MOSTLY_Q4_0,
}


def _write_through_llama_cpp(model, tokenizer, path: Path, qtype: str, source_gguf, chat_template,
                             threads: int | None) -> dict[str, Any]:
    """f16 first (next to `path`, removed after), then llama.cpp's quantizer: what `llama-quantize` does."""
    from specialist.deploy.llamacpp import quantize_gguf, require_llama_cpp

    require_llama_cpp(f"GGUF type {qtype}")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".f16-") as work:
        f16 = Path(work) / "model-f16.gguf"
        written = write_gguf(model, tokenizer, f16, "f16", source_gguf, chat_template)
        quantize_gguf(f16, path, qtype, threads=threads)
    return {"tensors": written["tensors"], "bytes": path.stat().st_size, "qtype": qtype,
            "tensor_types": tensor_types(path)}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. {"Q4_K": 10, "Q6_K": 3, "F32": 9}."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


# ---- configs llama.cpp computes the same way ------------------------------------------------------------------


def _check_supported_config(spec: Architecture, config) -> None:
    """Refuse configs whose graph llama.cpp would compute differently from transformers (a silent wrong model)."""
    problems = []
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    allowed_rope = {"default", "linear", "yarn"} | ({"llama3"} if spec.gguf_name == "llama" else set()) | (
        {"longrope", "su"} if spec.gguf_name == "phi3" else set())
    if rope_type not in allowed_rope:
        problems.append(f"rope scaling {rope_type!r} (this writer handles {sorted(allowed_rope)})")
    if spec.gguf_name == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True (llama.cpp's qwen2 attends to the whole context)")
    if spec.gguf_name == "gemma3":
        problems += _gemma3_problems(config)
    if problems:
        raise ConfigError(f"this {config.model_type} config cannot be written as GGUF: {'; '.join(problems)}",
                          hint="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def _gemma3_problems(config) -> list[str]:
    head_dim = config.head_dim
    problems = []
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("attn_logit_softcapping (removed in Gemma 3; llama.cpp does not apply it)")
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B model
    expected = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
    if float(getattr(config, "query_pre_attn_scalar", head_dim)) != float(expected):
        problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp uses {expected:g})")
    return problems


def _rope_parameters(config, layer_kind: str = "full_attention") -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`, per layer kind for Gemma 3."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_kind in params and isinstance(params[layer_kind], dict):
        return dict(params[layer_kind])
    legacy = getattr(config, "rope_scaling", None) or {}
    return {**legacy, **params} if isinstance(legacy, dict) else params


# ---- tensors ---------------------------------------------------------------------------------------------------


def _add_tensors(writer, spec: Architecture, model, qtype: str) -> int:
    config = model.config
    names = gguf_weight_names(model, spec)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    count = 0
    for gguf_name, data in _extra_tensors(spec, config):
        _add_tensor(writer, gguf_name, data, qtype)
        count += 1
    for gguf_name, hf_name in sorted(names.items(), key=lambda item: _tensor_order(item[0])):
        if (tied and gguf_name.startswith("output.weight")) or hf_name not in state:
            continue
        data = _to_gguf_layout(spec, gguf_name, state[hf_name].detach().float().cpu().numpy(), config)
        _add_tensor(writer, gguf_name, data, qtype)
        count += 1
    return count


def _tensor_order(name: str) -> tuple[int, int, str]:
    """token_embd first, blocks in order, the rest after: the order llama.cpp's converter writes."""
    if name.startswith("blk."):
        return 1, int(name.split(".")[1]), name
    return (0 if name.startswith("token_embd") else 2), 0, name


def _to_gguf_layout(spec: Architecture, name: str, data: np.ndarray, config) -> np.ndarray:
    if spec.norm_offset and name.endswith("norm.weight"):
        return data + spec.norm_offset
    heads = rotary_heads(spec, name, config)
    return permute(data, heads) if heads else data


def _add_tensor(writer, name: str, data: np.ndarray, qtype: str) -> None:
    array, raw_dtype = _encode(name, data, qtype)
    writer.add_tensor(name, array, raw_dtype=raw_dtype)  # the shape is told from the quantized bytes


# 4- and 5-bit blocks on the output layer cost the most: llama.cpp's own quantizer gives output.weight (or, when
# the head is tied, token_embd.weight) q6_k in its q4_0/q5_0 files; the gguf package cannot write k-quants, so
# that layer is q8_0 here. (On the demo run this moved q4_0's next-token logits only from 43% to 40% off: there
# the loss is in the 4-bit body, whose base was already 4-bit, and the LoRA update rounds away.)
OUTPUT_KEPT_AT_Q8_0 = ("q4_0", "q5_0")


def _is_output_layer(name: str) -> bool:
    return name in ("output.weight", "token_embd.weight")


def _encode(name: str, data: np.ndarray, qtype: str):
    """(array to write, raw dtype or None), choosing types as llama.cpp's converter does."""
    import gguf

    if qtype == "f32" or data.ndim < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return data.astype(np.float32), None  # llama.cpp's kernels expect 1-D tensors, norms and biases in f32
    if qtype == "f16":
        return data.astype(np.float16), None
    if qtype in OUTPUT_KEPT_AT_Q8_0 and _is_output_layer(name):
        qtype = "q8_0"
    ggml_type = gguf.GGMLQuantizationType[qtype.upper()]
    try:
        return gguf.quants.quantize(data.astype(np.float32), ggml_type), ggml_type
    except gguf.QuantError:  # rows not a multiple of the block size
        return data.astype(np.float16), None


def _extra_tensors(spec: Architecture, config):
    """Tensors llama.cpp wants that the HF state dict does not hold: rope frequency factors."""
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type") or rope.get("type")
    if spec.gguf_name == "llama" and rope_type == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(rope, _head_dim(config))
    if spec.gguf_name == "phi3" and rope.get("long_factor"):
        yield "rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32)


def _llama3_rope_factors(rope: dict[str, Any], dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, computed as llama.cpp's converter does."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---- metadata --------------------------------------------------------------------------------------------------


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


def _write_metadata(writer, spec: Architecture, config, tokenizer, chat_template: str | None) -> None:
    writer.add_name(getattr(config, "_name_or_path", "") or "specialist export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "head_dim", None) and spec.gguf_name != "phi3":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    _write_rope(writer, spec, config)
    if spec.gguf_name == "gemma3":
        _write_gemma3(writer, config)
    if spec.gguf_name == "phi3":
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0 tells Phi-4 from Phi-3
    write_bpe_tokenizer(writer, tokenizer, config.vocab_size, chat_template)


def _write_rope(writer, spec: Architecture, config) -> None:
    import gguf

    rope = _rope_parameters(config)
    if rope.get("rope_theta"):
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    if spec.gguf_name == "llama":
        writer.add_rope_dimension_count(_head_dim(config))
    if spec.gguf_name == "phi3":
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        writer.add_rope_dimension_count(int(partial * config.hidden_size) // config.num_attention_heads)
        original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        if rope.get("long_factor"):
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
    rope_type, factor = rope.get("rope_type") or rope.get("type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def _write_gemma3(writer, config) -> None:
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
        # the per-layer pattern itself, so llama.cpp does not assume its default of every 6th layer global
        layer_types = getattr(config, "layer_types", None) or []
        if layer_types:
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
    local = _rope_parameters(config, "sliding_attention").get("rope_theta")
    if local:
        writer.add_rope_freq_base_swa(float(local))


# ---- tokenizer -------------------------------------------------------------------------------------------------

# The regexes of HF `Split` pre-tokenizers (as tokenizer.json spells them) that llama.cpp implements, by the name
# of llama.cpp's pre-tokenizer (src/llama-vocab.cpp) and whether llama.cpp then ignores merges for whole words.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    ("bytelevel-gpt2",): ("gpt-2", False),  # GPT-2 and byte-level BPEs trained with `tokenizers` defaults
    ("digits", "bytelevel-gpt2"): ("smollm", False),  # SmolLM, StarCoder: single digits, then GPT-2's split
    (f"split:{_LLAMA3_REGEX}", "bytelevel"): ("llama-bpe", True),  # Llama 3.x
    (f"split:{_QWEN2_REGEX}", "bytelevel"): ("qwen2", False),  # Qwen 2, 2.5, 3
    (f"split:{_GPT4O_REGEX}", "bytelevel"): ("gpt-4o", False),  # Phi-4-mini, o200k-style
}
_PRE_TOKENIZER_NAMES = ", ".join(sorted({name for name, _ in _PRE_TOKENIZERS.values()}))


def bpe_pre_tokenizer(tokenizer) -> str:
    """The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that splits text as this HF byte-level BPE does.

    llama.cpp's converter recognises known tokenizers by hashing their ids on a fixed text, which cannot know
    a tokenizer trained or extended for a run; the pre-tokenizer itself (its regex and byte-level step) is what
    decides the split, so it is matched here. Anything else is refused rather than written as llama.cpp's
    "default", which splits digits and punctuation differently and silently changes every prompt.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}"
                          f"{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}",
                          hint="export from a GGUF base model, or --format merged and llama.cpp's converter")
    normalizer = (backend.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # llama.cpp does not normalize; NFC text (nearly all text) is unchanged
        raise ConfigError(f"the tokenizer normalizes text with {normalizer}, which llama.cpp does not do",
                          hint="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    shape = _pre_tokenizer_shape(backend.get("pre_tokenizer"))
    if shape not in _PRE_TOKENIZERS:
        raise ConfigError(f"llama.cpp has no pre-tokenizer matching this tokenizer's {shape}",
                          hint=f"llama.cpp implements {_PRE_TOKENIZER_NAMES}; export --format merged and "
                               "convert it with llama.cpp's convert_hf_to_gguf.py")
    name, ignores_merges = _PRE_TOKENIZERS[shape]
    if bool(model.get("ignore_merges")) != ignores_merges:
        raise ConfigError(f"the tokenizer splits like {name!r} but its BPE has ignore_merges="
                          f"{bool(model.get('ignore_merges'))}, while llama.cpp uses {ignores_merges} for {name!r}",
                          hint="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return name


def _pre_tokenizer_shape(pre: dict[str, Any] | None) -> tuple[str, ...]:
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    return tuple(_describe_step(step or {}) for step in steps)


def _describe_step(step: dict[str, Any]) -> str:
    kind = step.get("type")
    if kind == "ByteLevel" and not step.get("add_prefix_space"):
        return "bytelevel-gpt2" if step.get("use_regex", True) else "bytelevel"
    if kind == "Digits" and step.get("individual_digits"):
        return "digits"
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        return f"split:{(step.get('pattern') or {}).get('Regex')}"
    return json.dumps(step, sort_keys=True)


def write_bpe_tokenizer(writer, tokenizer, vocab_size: int, chat_template: str | None) -> None:
    """A byte-level BPE as llama.cpp's `gpt2` tokenizer model: tokens by id, types, merges, specials, template.

    Merges, special ids and the chat template are read by gguf's `SpecialVocab` from the saved tokenizer, the
    code llama.cpp's converter uses; whether BOS/EOS are added is taken from what the HF tokenizer does.
    """
    import gguf

    pre = bpe_pre_tokenizer(tokenizer)
    tokens, types = _bpe_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
    }
    if chat_template:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (`[PADn]` for ids the tokenizer lacks) and their llama.cpp types."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in backend["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in backend.get("added_tokens", [])}
    if max([*by_id, *added], default=-1) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max([*by_id, *added])} but the model only {vocab_size} rows",
                          hint="resize the model's embeddings to the tokenizer before exporting")
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index]["content"])  # llama.cpp matches added tokens on their raw text
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


# ---- LoRA adapters as llama.cpp loads them (`--lora FILE`, Ollama's ADAPTER) ------------------------------------
#
# A 4- or 5-bit GGUF of a merged LoRA run loses the fine-tune when the base was itself 4-bit (the embedded
# default is Q4_K_M): the merged weights sit within half a quantization step of the base's grid, so requantizing
# rounds most of the update away (measured on the demo run: q4_k_m 0% exact match, q4_0 0% valid JSON, where
# f16 and q8_0 keep every answer). Shipping the base at 4 bits and the update beside it, unquantized, keeps it.

def write_gguf_lora(model, adapter_name: str, path: Path | str,
                    modules: list[tuple[str, np.ndarray, np.ndarray, float]] | None = None) -> dict[str, Any]:
    """The LoRA `adapter_name` of PEFT `model` as a GGUF LoRA adapter (what llama.cpp's convert_lora_to_gguf.py
    writes): for each adapted weight W, `W.lora_a` (rank x in) and `W.lora_b` (out x rank) in f32 and one
    `adapter.lora.alpha`. llama.cpp scales by alpha / rank per tensor, so a module whose PEFT scaling differs
    (rank_pattern, alpha_pattern, rslora) has the difference folded into its lora_b. `modules`: the
    (weight, A, B, scaling) to write instead of the adapter's own (`lora_compensation` extends them)."""
    import gguf

    path = Path(path)
    modules = modules or lora_modules(model, adapter_name)
    plain = model.get_base_model()
    spec = architecture(plain)
    to_gguf = {hf: name for name, hf in gguf_weight_names(plain, spec).items()}
    first = modules[0]
    alpha = first[3] * first[2].shape[0]  # scaling * rank of the first module: its lora_b is written as is
    writer = gguf.GGUFWriter(str(path), spec.gguf_name)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    count = 0
    for hf_weight, lora_a, lora_b, scaling in modules:
        name = to_gguf.get(hf_weight)
        if name is None:
            raise ConfigError(f"the LoRA on {hf_weight} has no llama.cpp tensor to apply to",
                              hint="export --format gguf --lora merged, or train without that target module")
        rank = lora_b.shape[1]
        lora_b = lora_b * (scaling * rank / alpha)
        heads = rotary_heads(spec, name, plain.config)
        if heads:
            lora_b = permute(lora_b, heads)  # the output rows move as the base weight's rows do
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
        count += 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": count, "bytes": path.stat().st_size, "alpha": float(alpha)}


def lora_modules(model, adapter_name: str) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(HF weight name, A, B, scaling) for each linear LoRA of `adapter_name`; what llama.cpp cannot apply
    (DoRA, embedding LoRA, fully trained modules_to_save, LoRA biases) is refused with the way out."""
    from peft.tuners.lora import LoraLayer

    way_out = "export --format gguf --lora merged (one file, merged weights) or --format merged"
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ConfigError(f"the model holds no LoRA named {adapter_name!r}", hint=way_out)
    config = model.peft_config[adapter_name]
    if getattr(config, "use_dora", False):
        raise ConfigError("a DoRA adapter has no llama.cpp LoRA form (its magnitude vector rescales W)", hint=way_out)
    if getattr(config, "modules_to_save", None):
        raise ConfigError(f"modules_to_save {config.modules_to_save} are trained in full, not as a LoRA",
                          hint=way_out)
    prefix = "base_model.model."
    found = []
    for module_name, module in model.named_modules():
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise ConfigError(f"{module_name}: a LoRA on the embeddings has no llama.cpp LoRA form", hint=way_out)
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "lora_bias", {}).get(adapter_name, False):
            raise ConfigError(f"{module_name}: a LoRA with a bias has no llama.cpp LoRA form", hint=way_out)
        a = module.lora_A[adapter_name].weight.detach().float().cpu().numpy()
        b = module.lora_B[adapter_name].weight.detach().float().cpu().numpy()
        if a.ndim != 2 or b.ndim != 2:
            raise ConfigError(f"{module_name}: only LoRA on linear layers has a llama.cpp form", hint=way_out)
        hf_name = module_name[len(prefix):] if module_name.startswith(prefix) else module_name
        found.append((f"{hf_name}.weight", a, b, float(module.scaling[adapter_name])))
    if not found:
        raise ConfigError(f"the model holds no LoRA named {adapter_name!r}", hint=way_out)
    return found


def file_type_of(path: Path) -> int | None:
    """`general.file_type` of a GGUF file (a gguf.LlamaFileType value), or None where it is not written."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    return int(field.contents()) if field is not None else None


def file_type_for(qtype: str) -> int:
    """The `general.file_type` (gguf.LlamaFileType) a file of `qtype` carries."""
    import gguf

    return k_quant_file_type(qtype) if qtype in LLAMA_CPP_QUANT_TYPES else int(_FILE_TYPES[qtype](gguf))
