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
               max_new_tokens: int | None = None, quantize: str = "f16") -> ExportResult:
    from specialist.evaluate.runner import default_max_new_tokens, load_run_config
    from specialist.models import load_model_and_tokenizer

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    config = load_run_config(run_dir)
    template = PromptTemplate.load(run_dir / "template.json")
    split = read_split(run_dir / "data")
    adapter, full = run_dir / "adapter", run_dir / "model"
    if fmt == "adapter" and not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} has no adapter to export (method {config.method.kind})",
                          hint="export it with --format merged")
    if not (adapter / "adapter_config.json").is_file() and not (full / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds no trained model", hint="train it first (`specialist train`)")
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
        extra = _write_int8(tuned, tokenizer, out)
    else:
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
    if fmt == "gguf":
        check["quantize"] = quantize
        check["logits"] = compare_next_token_logits(tuned, exported, tokenizer, template, prompts)
    (out / "export_check.json").write_text(json.dumps(check, indent=2), encoding="utf-8")
    if fmt == "int8":
        check["logits"] = compare_next_token_logits(tuned, exported, tokenizer, template, prompts)
    # a quantized model may change a greedy tie: its mismatches are listed beside the logit distance, not fatal
    strict = fmt in ("merged", "adapter") or (fmt == "gguf" and quantize in ("f32", "f16"))
    if check["mismatches"] and strict:
        raise ExportMismatch(f"{len(check['mismatches'])} of {len(prompts)} golden prompts answer differently "
                             f"after export; see {out / 'export_check.json'}")
    console.log(f"export {fmt}: {len(prompts)} golden prompts answered identically, every answer stopped "
                f"where the run's own did")
    return ExportResult(out, check)


def _run_model(base, adapter: Path, full: Path):
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(full, dtype=base.dtype).eval()


def _write_merged(tuned, tokenizer, out: Path) -> None:
    import copy

    from specialist.evaluate.generate import stop_token_ids

    merged = copy.deepcopy(tuned).merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_adapter(adapter: Path, tokenizer, out: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter / name, out / name)
    tokenizer.save_pretrained(out)


INT8_STATE = "int8_state.pt"


def quantize_int8(model):
    """Every Linear layer (the LM head included) as int8 weights with per-channel scales, dynamic activations.

    PyTorch's own dynamic quantization: int8 matrix-vector products, which is what token-by-token decoding on a
    CPU spends its time in. The (tied) input embedding stays a float lookup.
    """
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False)


def _write_int8(tuned, tokenizer, out: Path) -> dict[str, Any]:
    import copy

    import torch

    from specialist.evaluate.generate import stop_token_ids

    merged = copy.deepcopy(tuned).merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer)
    quantized = quantize_int8(merged)
    # the float weights left (embedding, norms) are stored as bf16: the embedding is most of a small model
    torch.save(_cast_floats(quantized.state_dict(), torch.float32, torch.bfloat16), out / INT8_STATE)
    merged.config.save_pretrained(out)
    merged.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"int8_state": INT8_STATE, "int8_bytes": (out / INT8_STATE).stat().st_size}


def _load_int8(folder: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model = quantize_int8(model)
    state = torch.load(folder / INT8_STATE, weights_only=False)  # packed int8 weights are not plain tensors
    model.load_state_dict(_cast_floats(state, torch.bfloat16, torch.float32))
    return model


def _cast_floats(state, source, target):
    """`state` with its `source`-dtype tensors cast to `target`; keeps the version metadata quantized modules need."""
    from collections import OrderedDict

    import torch

    cast = OrderedDict((k, v.to(target) if torch.is_tensor(v) and v.dtype == source and not k.endswith(".scale")
                        else v) for k, v in state.items())
    cast._metadata = getattr(state, "_metadata", None)
    return cast


def _write_gguf(tuned, tokenizer, out: Path, quantize: str, base_name: str) -> dict[str, Any]:
    import copy
    import tempfile

    from specialist.deploy.gguf_export import write_gguf
    from specialist.models import source_gguf

    merged = copy.deepcopy(tuned).merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
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
        return _load_int8(folder).eval(), tokenizer, template
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
