"""`specialist export RUN_DIR --format merged|adapter`: artifacts other tools load, checked by replaying prompts.

- merged: the LoRA folded into the base weights (or a full fine-tune's weights), a plain transformers folder
  (safetensors, config, tokenizer, generation config) that vLLM and transformers load as any model;
- adapter: the PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that PEFT and vLLM's LoRA
  support load on top of the base;
- gguf: one GGUF file (f32, f16 or q8_0) for llama.cpp and Ollama (`specialist.deploy.gguf_export`), checked
  also by next-token logits against the run's model after loading it back through transformers' GGUF reader.

Both carry the run's `template.json` (the prompt format the model was trained on) and `export.json` (source run,
base model, format). The generation config lists every stop token, so a server that honours it stops at the end
of the answer.

Golden-set replay: the first `golden` test prompts of the run are answered greedily (one at a time, no padding)
by the run's own model and by the exported artifact loaded back from disk; every difference, and every answer
that ran to the token limit where the run's own stopped, goes to `export_check.json`. Any mismatch fails a
merged, adapter, f32 or f16 export (exit 1); a q8_0 file's mismatches are listed beside its logit distance.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.console import console
from specialist.data import PromptTemplate, read_split
from specialist.errors import ConfigError, SpecialistError

FORMATS = ("merged", "adapter", "gguf", "int8")


class ExportMismatch(SpecialistError):
    """The exported artifact answers the golden prompts differently from the run it came from."""

    exit_code = 1


@dataclass
class ExportResult:
    folder: Path
    check: dict[str, Any]


def export_run(run_dir: Path, fmt: str, out: Path | None = None, golden: int = 8,
               max_new_tokens: int | None = None, quantize: str | None = None) -> ExportResult:
    from specialist.evaluate.runner import default_max_new_tokens, load_run_config
    from specialist.models import load_model_and_tokenizer

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    config = load_run_config(run_dir)
    adapter, full = run_dir / "adapter", run_dir / "model"
    if fmt == "adapter" and not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} has no adapter to export (method {config.method.kind})",
                          hint="export it with --format merged")
    if not (adapter / "adapter_config.json").is_file() and not (full / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds no trained model", hint="train it first (`specialist train`)")
    template = PromptTemplate.load(run_dir / "template.json")
    split = read_split(run_dir / "data")
    out = out or run_dir / "export" / fmt
    base, tokenizer = load_model_and_tokenizer(config.model.name, "float32")
    tuned = _run_model(base, adapter, full)
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if fmt == "merged":
        _write_merged(tuned, tokenizer, out)
    elif fmt == "adapter":
        _write_adapter(adapter, tokenizer, out)
    elif fmt == "int8":
        quantize = quantize or "weight_only"
        extra = _write_int8(tuned, tokenizer, out, quantize)
    else:
        quantize = quantize or "f16"
        extra = _write_gguf(tuned, tokenizer, out, quantize, config.model.name)
    template.save(out / "template.json")
    (out / "export.json").write_text(json.dumps({
        "format": fmt, "run": str(run_dir.resolve()), "base_model": config.model.name,
        "method": config.method.kind, "template": "template.json", **extra}, indent=2), encoding="utf-8")
    exported = load_exported(out)[0]
    prompts = [ex.prompt for ex in split.test[:golden]]
    limit = max_new_tokens or default_max_new_tokens(tokenizer, split.train)
    check = compare_outputs(tuned, exported, tokenizer, template, prompts, limit)
    check["format"] = fmt
    if fmt in ("gguf", "int8"):
        check["quantize"] = quantize
        check["logits"] = compare_next_token_logits(tuned, exported, tokenizer, template, prompts)
    (out / "export_check.json").write_text(json.dumps(check, indent=2), encoding="utf-8")
    # a quantized model may change a greedy tie: its mismatches are listed beside the logit distance, not fatal
    strict = fmt in ("merged", "adapter") or quantize in ("f32", "f16")
    if check["mismatches"] and strict:
        raise ExportMismatch(f"{len(check['mismatches'])} of {len(prompts)} golden prompts answer differently "
                             f"after export; see {out / 'export_check.json'}")
    console.log(f"export {fmt}: {describe_check(check)}")
    return ExportResult(out, check)


def describe_check(check: dict[str, Any]) -> str:
    same = check["prompts"] - len(check["mismatches"])
    text = (f"{same} of {check['prompts']} golden prompts answered as the run does, "
            f"{check['stopped_at_end_token']} stopped at the end token")
    if "logits" in check:
        text += (f"; next-token logits within {100 * check['logits']['max_relative_l2']:.2f}% (relative L2), "
                 f"top-1 agreement {100 * check['logits']['top1_agreement']:.0f}%")
    return text


def _run_model(base, adapter: Path, full: Path):
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(full, dtype=base.dtype).eval()


def merged_copy(tuned, tokenizer):
    """A plain model with the run's LoRA folded in (the run's own model is left as it is), told every stop token."""
    import copy

    from specialist.evaluate.generate import stop_token_ids

    merged = copy.deepcopy(tuned).merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer)
    return merged


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files in an export folder (what serving it costs on disk)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".pt", ".bin", ".gguf"))


def _write_merged(tuned, tokenizer, out: Path) -> None:
    merged = merged_copy(tuned, tokenizer)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_adapter(adapter: Path, tokenizer, out: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter / name, out / name)
    tokenizer.save_pretrained(out)


INT8_STATE = "int8_state.pt"
INT8_WEIGHTS = "model-int8.safetensors"
INT8_MODES = ("weight_only", "dynamic")


def quantize_dynamic_int8(model):
    """The Linear layers (not the LM head) as PyTorch dynamic int8: int8 weights with per-channel scales, and
    activations quantized on the fly, so the matrix-vector products of decoding run in int8 (fbgemm).

    Fast on CPU, but lossy for models with large activation outliers: the export check and `specialist eval`
    measure how lossy for yours.
    """
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}
    return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=False)


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
            out[f"{name}.int8_scale"] = scale.contiguous()
        else:
            out[name] = tensor.float().contiguous()
    return out


def dequantize_weights(stored: dict) -> dict:
    import torch

    return {name: tensor.float() * stored[f"{name}.int8_scale"][:, None] if tensor.dtype == torch.int8 else tensor
            for name, tensor in stored.items() if not name.endswith(".int8_scale")}


def _write_int8(tuned, tokenizer, out: Path, mode: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    if mode not in INT8_MODES:
        raise ConfigError(f"unknown int8 mode {mode!r}", hint=f"use --quantize {' or '.join(INT8_MODES)}")
    merged = merged_copy(tuned, tokenizer)
    if mode == "weight_only":
        save_file(int8_weights(merged.state_dict()), str(out / INT8_WEIGHTS))
        weights = out / INT8_WEIGHTS
    else:
        # the float weights left (embedding, norms) are stored as bf16: the embedding is most of a small model
        torch.save(_cast_floats(quantize_dynamic_int8(merged).state_dict(), torch.float32, torch.bfloat16),
                   out / INT8_STATE)
        weights = out / INT8_STATE
    merged.config.save_pretrained(out)
    merged.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"int8_mode": mode, "int8_file": weights.name, "int8_bytes": weights.stat().st_size}


def _load_int8(folder: Path, meta: dict[str, Any]):
    """weight_only: int8 weights dequantized once at load (fp32 compute); dynamic: int8 matmuls at run time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    if meta.get("int8_mode", "dynamic") == "weight_only":
        from safetensors.torch import load_file

        state = dequantize_weights(load_file(str(folder / meta["int8_file"])))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {n for n in missing if n.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ConfigError(f"{folder}: int8 weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {unexpected[:3]})", hint="export it again")
        model.tie_weights()
        return model
    model = quantize_dynamic_int8(model)
    state = torch.load(folder / meta.get("int8_file", INT8_STATE), weights_only=False)  # packed int8 weights
    model.load_state_dict(_cast_floats(state, torch.bfloat16, torch.float32))
    return model


def _cast_floats(state, source, target):
    """`state` with its `source`-dtype tensors cast to `target`; keeps the version metadata quantized modules need."""
    from collections import OrderedDict

    import torch

    done: dict[int, Any] = {}  # tied tensors (embedding and head) stay one tensor, saved once

    def convert(key: str, value):
        if not (torch.is_tensor(value) and value.dtype == source) or key.endswith(".scale"):
            return value
        return done.setdefault(value.data_ptr(), value.to(target))

    cast = OrderedDict((k, convert(k, v)) for k, v in state.items())
    cast._metadata = getattr(state, "_metadata", None)
    return cast


def _write_gguf(tuned, tokenizer, out: Path, quantize: str, base_name: str) -> dict[str, Any]:
    import tempfile

    from specialist.deploy.gguf_export import write_gguf
    from specialist.models import source_gguf

    merged = merged_copy(tuned, tokenizer)
    name = f"model-{quantize}.gguf"
    with tempfile.TemporaryDirectory() as work:
        source = source_gguf(base_name, Path(work))
        written = write_gguf(merged, tokenizer, out / name, quantize, source_gguf=source)
    tokenizer.save_pretrained(out)  # for loaders that want tokenizer files beside the GGUF
    return {"gguf_file": name, "gguf_bytes": written["bytes"], "metadata_from": "source GGUF" if source else "config"}


def compare_next_token_logits(reference, candidate, tokenizer, template: PromptTemplate,
                              prompts: list[str]) -> dict[str, float]:
    """How far the candidate's next-token logits are from the reference's on each prompt."""
    import torch

    worst_abs, worst_rel, top1 = 0.0, 0.0, 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([template.encode_prompt(prompt, tokenizer)])
            want = reference(input_ids=ids).logits[0, -1].float()
            got = candidate(input_ids=ids).logits[0, -1].float()
            worst_abs = max(worst_abs, float((want - got).abs().max()))
            worst_rel = max(worst_rel, float((want - got).norm() / want.norm().clamp(min=1e-12)))
            top1 += int(want.argmax() == got.argmax())
    return {"max_abs_diff": worst_abs, "max_relative_l2": worst_rel, "top1_agreement": top1 / max(1, len(prompts))}


def load_exported(folder: Path):
    """(model, tokenizer, template) from an export folder: merged loads alone, an adapter onto its base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta_path = folder / "export.json"
    if not meta_path.is_file():
        raise ConfigError(f"{folder} is not an export folder (no export.json)",
                          hint="pass a folder written by `specialist export`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    template = PromptTemplate.load(folder / "template.json")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if meta["format"] == "int8":
        return _load_int8(folder, meta).eval(), tokenizer, template
    if meta["format"] == "gguf":
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=meta["gguf_file"])
        model.hf_quantizer = None
        return model.eval(), tokenizer, template
    if meta["format"] == "adapter":
        from peft import PeftModel

        from specialist.models import load_model_and_tokenizer

        base, _ = load_model_and_tokenizer(meta["base_model"], "float32")
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval(), tokenizer, template


def compare_outputs(reference, candidate, tokenizer, template: PromptTemplate, prompts: list[str],
                    max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of both models, one prompt at a time; mismatches in text or in where they stopped."""
    mismatches, stopped = [], 0
    for n, prompt in enumerate(prompts):
        want, want_stop = greedy_answer(reference, tokenizer, template, prompt, max_new_tokens)
        got, got_stop = greedy_answer(candidate, tokenizer, template, prompt, max_new_tokens)
        stopped += got_stop
        if want != got or want_stop != got_stop:
            mismatches.append({"index": n, "prompt": prompt, "run": want, "export": got,
                               "run_stopped": want_stop, "export_stopped": got_stop})
    return {"prompts": len(prompts), "mismatches": mismatches, "stopped_at_end_token": stopped,
            "max_new_tokens": max_new_tokens}


def greedy_answer(model, tokenizer, template: PromptTemplate, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """(answer text, whether generation ended on a stop token rather than at the limit)."""
    import torch

    from specialist.evaluate.generate import cut_at_stop, stop_token_ids

    stops = stop_token_ids(tokenizer)
    ids = torch.tensor([template.encode_prompt(prompt, tokenizer)])
    with torch.inference_mode():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    new = generated[0, ids.shape[1]:].tolist()
    ended = bool(new) and new[-1] in stops
    return cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), template.stop_strings), ended
