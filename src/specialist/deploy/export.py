"""`specialist export RUN_DIR --format merged|adapter|gguf|int8`: artifacts other tools load, checked by replay.

- merged: the LoRA folded into the base weights (or a full fine-tune's weights), a plain transformers folder
  (safetensors, config, tokenizer, a generation config listing every stop token) for vLLM and transformers;
- adapter: the PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for PEFT and vLLM's LoRA;
- gguf: a GGUF file for llama.cpp and Ollama (`specialist.deploy.gguf_export`), also checked by next-token logits
  against the run's model. A LoRA run at 4 or 5 bits is written as the base GGUF plus a GGUF LoRA adapter
  (llama.cpp's `--lora`, Ollama's ADAPTER; `--lora separate`), because merging then quantizing rounds the update
  away there; `--lora merged` writes the one merged file;
- int8: every weight matrix as int8 with a scale per row, in safetensors (`specialist.int8`).

Every export carries the run's prompt format, export.json (source run, base model, format, files) and a
model card, README.md (`specialist.deploy.model_card`).

Golden-set replay: the first `golden` test prompts of the run are answered greedily, one at a time, by the run's
own model and by the exported artifact loaded back from disk, both through the generation engine `serve` answers
with (`specialist.generation`); every difference, and every answer that ran to the token limit where the run's
own stopped, goes to export_check.json. Any mismatch fails a merged, adapter, f32 or f16 export (exit 1); a
quantized export's mismatches are listed beside its logit distance.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.atomic import replace_folder
from specialist.artifacts import EXPORT_FORMATS as FORMATS, ModelPool, load_exported, load_run
from specialist.console import console
from specialist.deploy.model_card import write_model_card
from specialist.errors import ConfigError, SpecialistError
from specialist.generation import Engine, cut_at_stop, default_max_new_tokens, stop_token_ids
from specialist.run_folder import ExportFolder, RunFolder, write_json

INT8_FILE = "model-int8.safetensors"
STRICT_GGUF_TYPES = ("f32", "f16")  # a mismatch fails these exports; quantized ones list theirs


class ExportMismatch(SpecialistError):
    """The exported artifact answers the golden prompts differently from the run it came from."""

    exit_code = 1


@dataclass
class ExportResult:
    folder: Path
    check: dict[str, Any]


@dataclass(frozen=True)
class ExportOptions:
    """How to export beyond the format: the replay check (`golden` test prompts, answered up to `max_new_tokens`,
    default the run's), the quantization (gguf: f16 unless given; int8: weight_only), a JUnit report of the replay,
    and for a gguf of a LoRA run the layout (`lora`: "separate" base + adapter files, "merged" one file, "auto"
    separate at 4/5 bits) and `compensation_rank`, the rank of the requantized base's error correction added to a
    separate adapter."""

    golden: int = 8
    max_new_tokens: int | None = None
    quantize: str | None = None
    junit: Path | None = None
    lora: str = "auto"
    compensation_rank: int | None = None


def export_run(run_dir: Path, fmt: str, out: Path | None = None,
               options: ExportOptions = ExportOptions()) -> ExportResult:
    """Write the run's model as `fmt` into `out`, load it back, replay the golden prompts and compare."""
    golden, quantize, compensation_rank = options.golden, options.quantize, options.compensation_rank
    if compensation_rank is not None and not 0 <= compensation_rank <= 1024:
        raise ConfigError(f"compensation rank must be 0 (none) to 1024, not {compensation_rank}")
    run = RunFolder.open(Path(run_dir))
    config = _check_exportable(run, fmt)
    layout = gguf_lora_layout(run, fmt, quantize or "f16", options.lora)
    pool = ModelPool()
    final = Path(out) if out else run.export_dir(fmt)
    with destination_lock(final):  # a second export to `final` is refused until this one has published
        refuse_to_replace_what_is_not_an_export(final)
        tuned = load_run(run, pool, adapter_name="tuned")
        # written beside the destination and moved into place whole: a kill mid-write leaves the previous export
        # (or nothing) at `final`, never a half-written one that loads
        export = ExportFolder(staging_folder(final))
        quantize, extra = write_artifact(fmt, run, tuned, export.path, quantize, layout, compensation_rank)
        tuned.template.save(export.template_file)
        if tuned.retrieval is not None:  # its prompts carry their nearest training rows: the export needs them
            shutil.copyfile(run.retrieval_file, export.retrieval_file)
            extra["retrieval"] = {"file": export.retrieval_file.name, "k": tuned.retrieval.k}
            note_retrieval_in_modelfile(export, tuned.retrieval.k)
        export.write_meta({"format": fmt, "run": str(run.path.resolve()), "base_model": config.model.name,
                           "method": config.method.kind, "template": export.template_file.name, **extra})
        split = run.split()
        prompts = [ex.prompt for ex in split.test[:golden]]
        limit = options.max_new_tokens or default_max_new_tokens(tuned.tokenizer, split.train)
        check = replay_check(tuned, export, prompts, limit, fmt, quantize)
        write_json(export.check_file, check)
        write_model_card(export, run)
        replace_folder(export.path, final)  # the earlier export there goes: two renames on one file system
    export = ExportFolder(final)
    if options.junit is not None:
        from specialist.junit import write_junit

        write_junit(options.junit, f"specialist.export.{fmt}", replay_cases(check))
    if check.get("prompt_token_mismatches"):  # whatever the quantization, the tokenizer must be the run's
        raise ExportMismatch(f"llama.cpp tokenizes {len(check['prompt_token_mismatches'])} of {len(prompts)} golden "
                             f"prompts differently from the run; see {export.check_file}")
    if check["mismatches"] and (fmt in ("merged", "adapter") or quantize in STRICT_GGUF_TYPES):
        raise ExportMismatch(f"{len(check['mismatches'])} of {len(prompts)} golden prompts answer differently "
                             f"after export; see {export.check_file}")
    console.log(f"export {fmt}: {describe_check(check)}")
    return ExportResult(export.path, check)


def note_retrieval_in_modelfile(export: ExportFolder, k: int) -> None:
    """Ollama cannot retrieve: the Modelfile says that each prompt must carry the examples the model expects."""
    if export.modelfile.is_file():
        note = (f"# This model was trained with its {k} nearest training rows shown before every input, as earlier "
                "turns (retrieval.json holds the rows).\n# Without them it answers worse: `specialist serve` adds "
                "them; other clients must put them in the prompt.\n")
        export.modelfile.write_text(note + export.modelfile.read_text(encoding="utf-8"), encoding="utf-8")


def staging_folder(final: Path) -> Path:
    """A new, empty folder beside `final` that is this process's alone (its name holds the pid and a random
    part), after clearing what killed exports to `final` left: the caller holds `destination_lock(final)`, so no
    other export is writing one of them."""
    import secrets

    for leftover in final.parent.glob(f".{final.name}.partial*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    return staging


@contextmanager
def destination_lock(final: Path) -> Iterator[None]:
    """An exclusive lock (flock) on `final` for one export, refused at once while another export holds it.

    The lock file (.NAME.lock beside `final`) is removed on release; a process that locked a file that was
    removed meanwhile takes the new one, so two exports never both hold the lock."""
    import fcntl

    path = final.parent / f".{final.name}.lock"
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ConfigError(f"another export is writing {final} now", hint="wait for it to finish, or give this "
                              "one another --out") from None
        if _same_file(path, descriptor):
            break
        os.close(descriptor)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _same_file(path: Path, descriptor: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def refuse_to_replace_what_is_not_an_export(final: Path) -> None:
    """An export replaces the previous export at its destination, whole; anything else there is the user's."""
    if not final.exists():
        return
    if not final.is_dir() or (any(final.iterdir()) and not ExportFolder.is_export(final)):
        raise ConfigError(f"{final} exists and is not an export: exporting there would replace what it holds",
                          hint="give --out a new or empty folder, or an earlier export of a run to replace")


def _check_exportable(run: RunFolder, fmt: str):
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    config = run.config()
    if run.is_classifier:
        raise ConfigError(f"{run.path} is a classifier run (method.kind classifier): its classification head has "
                          "no place in the merged, GGUF or int8 formats, which hold language models",
                          hint=f"serve the run folder itself (`specialist serve --arm tuned={run.path}`): it answers the label "
                          "and its probabilities; or score it with `specialist eval`")
    if fmt == "adapter" and not run.has_adapter:
        raise ConfigError(f"{run.path} has no adapter to export (method {config.method.kind})",
                          hint="export it with --format merged")
    if not run.is_trained:
        raise ConfigError(f"{run.path} holds no trained model", hint="train it first (`specialist train`)")
    return config


GGUF_LORA_LAYOUTS = ("auto", "separate", "merged")
# measured on the demo run (bench/gguf_types.py): merged q4_0 0% valid JSON, q5_0 78%, q4_k_m 90% with 0% exact
# match, where the tuned model has 100% and 95%; f16 and q8_0 merged keep every answer
SEPARATE_LORA_TYPES = ("q4_0", "q5_0", "q4_k_m", "q5_k_m")
DEFAULT_COMPENSATION_RANK = 32


def gguf_lora_layout(run: RunFolder, fmt: str, quantize: str, requested: str) -> str | None:
    """How a GGUF export holds the run's LoRA: "separate" (base GGUF + adapter GGUF) or "merged"; None for other
    formats and runs without an adapter."""
    if requested not in GGUF_LORA_LAYOUTS:
        raise ConfigError(f"unknown LoRA layout {requested!r}", hint=f"use one of {', '.join(GGUF_LORA_LAYOUTS)}")
    if fmt != "gguf":
        return None
    if not run.has_adapter:
        if requested == "separate":
            raise ConfigError(f"{run.path} has no LoRA adapter to keep separate (method {run.config().method.kind})",
                              hint="export it with --lora merged")
        return None
    if requested == "auto":
        return "separate" if quantize in SEPARATE_LORA_TYPES else "merged"
    return requested


def write_artifact(fmt: str, run: RunFolder, tuned, out: Path, quantize: str | None,
                   layout: str | None = None, compensation_rank: int | None = None) -> tuple[str | None, dict]:
    """Write the export's files; (the quantization used, what export.json records about them)."""
    if fmt == "merged":
        _write_merged(tuned, out)
        return None, {}
    if fmt == "adapter":
        _write_adapter(run, tuned.tokenizer, out)
        return None, {}
    if fmt == "int8":
        if quantize not in (None, "weight_only"):
            raise ConfigError(f"unknown int8 mode {quantize!r}", hint="int8 exports are weight_only")
        return "weight_only", _write_int8(tuned, out)
    quantize = quantize or "f16"
    if layout == "separate":
        return quantize, _write_gguf_separate(tuned, out, quantize, run.config().model.name, run.split().train,
                                              compensation_rank)
    return quantize, {**_write_gguf(tuned, out, quantize, run.config().model.name),
                      **({"gguf_layout": "merged"} if layout else {})}


def merged_copy(tuned):
    """A plain model with the run's LoRA folded in (the run's own model is left as it is), told every stop token."""
    import copy

    model = tuned.model
    with tuned.context():
        merged = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else copy.deepcopy(model)
    merged.generation_config.eos_token_id = stop_token_ids(tuned.tokenizer)
    merged.generation_config.pad_token_id = tuned.tokenizer.pad_token_id
    return merged


def _write_merged(tuned, out: Path) -> None:
    merged_copy(tuned).save_pretrained(out, safe_serialization=True)
    tuned.tokenizer.save_pretrained(out)


def _write_adapter(run: RunFolder, tokenizer, out: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(run.adapter / name, out / name)
    tokenizer.save_pretrained(out)


def _write_int8(tuned, out: Path) -> dict[str, Any]:
    from specialist.int8 import save_int8

    merged = merged_copy(tuned)
    size = save_int8(merged, out / INT8_FILE)
    merged.config.save_pretrained(out)
    merged.generation_config.save_pretrained(out)
    tuned.tokenizer.save_pretrained(out)
    return {"int8_mode": "weight_only", "int8_file": INT8_FILE, "int8_bytes": size}


def _write_gguf(tuned, out: Path, quantize: str, base_name: str) -> dict[str, Any]:
    import tempfile

    from specialist.deploy.gguf_export import write_gguf
    from specialist.models import source_gguf

    from specialist.deploy.ollama import write_modelfile

    merged = merged_copy(tuned)
    name = f"model-{quantize}.gguf"
    with tempfile.TemporaryDirectory() as work:
        source = source_gguf(base_name, Path(work))
        written = write_gguf(merged, tuned.tokenizer, out / name, quantize, source_gguf=source)
    tuned.tokenizer.save_pretrained(out)  # for loaders that want tokenizer files beside the GGUF
    modelfile = write_modelfile(out, name, tuned.template, tokenizer=tuned.tokenizer)
    return {"gguf_file": name, "gguf_bytes": written["bytes"], "metadata_from": "source GGUF" if source else "config",
            "modelfile": modelfile.name}


def _write_gguf_separate(tuned, out: Path, quantize: str, base_name: str, calibration: list,
                         compensation_rank: int | None = None) -> dict[str, Any]:
    """The base model as `base-QUANT.gguf` and the run's LoRA as `adapter.gguf` (f32), with a Modelfile naming both.

    Where the base came from a GGUF of that very type (the embedded Q4_K_M model exported as q4_k_m), the base
    file is that GGUF, byte for byte: the weights the adapter was trained on. Where it is quantized here, its
    error is corrected at `compensation_rank` (default 32) inside the adapter (`lora_compensation`), calibrated on
    the `calibration` rows (the run's training rows)."""
    import copy
    import tempfile

    from specialist.deploy.gguf_export import file_type_for, file_type_of, write_gguf, write_gguf_lora
    from specialist.deploy.ollama import write_modelfile
    from specialist.models import source_gguf

    name, lora_name = f"base-{quantize}.gguf", "adapter.gguf"
    with tuned.context():
        adapter_name = tuned.model.active_adapter
    with tempfile.TemporaryDirectory() as work:
        source = source_gguf(base_name, Path(work))
        requantized = source is None or file_type_of(source) != file_type_for(quantize)
        if not requantized:
            shutil.copyfile(source, out / name)
            base_from = "the base model's own GGUF file"
        else:
            plain = copy.deepcopy(tuned.model).unload()  # the base weights, every adapter taken off
            write_gguf(plain, tuned.tokenizer, out / name, quantize, source_gguf=source)
            del plain
            base_from = f"the base model quantized to {quantize}"
    modules, compensation = None, None
    rank = compensation_rank if compensation_rank is not None else DEFAULT_COMPENSATION_RANK
    if requantized and quantize not in ("f32", "f16") and rank > 0:
        from specialist.data.template import encode_for_training
        from specialist.deploy.lora_compensation import CALIBRATION_ROWS, compensated_modules

        rows = [encode_for_training(tuned.template, tuned.tokenizer, ex.prompt, ex.completion)["input_ids"]
                for ex in calibration[:CALIBRATION_ROWS]]  # the ids training saw: one BOS, the answer's end
        modules, compensation = compensated_modules(tuned.model, adapter_name, out / name, rows, rank,
                                                    tuned.context)
        console.log(f"gguf: the {quantize} base's error compensated at rank {rank} in the adapter "
                    f"({compensation['layers']} layers; {100 * compensation['error_left']:.0f}% of the error, "
                    f"weighted by the layers' inputs on {compensation['calibration_rows']} training rows, left)")
    lora = write_gguf_lora(tuned.model, adapter_name, out / lora_name, modules)
    tuned.tokenizer.save_pretrained(out)
    modelfile = write_modelfile(out, name, tuned.template, tokenizer=tuned.tokenizer, adapter=lora_name)
    console.log(f"gguf: {name} ({base_from}) + {lora_name} (the LoRA, f32, {lora['bytes'] / 2**20:.1f} MiB)")
    return {"gguf_file": name, "gguf_lora_file": lora_name, "gguf_layout": "separate",
            "gguf_bytes": (out / name).stat().st_size + lora["bytes"], "gguf_base_from": base_from,
            "gguf_compensation": compensation,
            "metadata_from": "source GGUF" if source else "config", "modelfile": modelfile.name}


def replay_check(tuned, export: ExportFolder, prompts: list[str], max_new_tokens: int, fmt: str,
                 quantize: str | None) -> dict[str, Any]:
    """The golden replay (and, for quantized formats, the next-token logit distance) as export_check.json.

    A GGUF file is replayed in llama.cpp itself when llama-cpp-python is installed (prompts tokenized by
    llama.cpp from the file, so a wrong tokenizer in its metadata shows); else it is read back by transformers."""
    from specialist.deploy.llamacpp import llama_cpp_available

    reference = tuned.answering_engine()
    if fmt == "gguf" and llama_cpp_available():
        gguf, lora = export.gguf_files()
        check = llama_cpp_replay(reference, gguf, prompts, max_new_tokens, lora=lora)
    else:
        exported = load_exported(export.path, ModelPool())
        candidate = exported.answering_engine()
        check = compare_outputs(reference, candidate, prompts, max_new_tokens)
        check["runtime"] = "transformers" + (" (GGUF reader)" if fmt == "gguf" else "")
        if fmt in ("gguf", "int8"):
            check["logits"] = compare_next_token_logits(reference, candidate, prompts)
    check["format"] = fmt
    if fmt in ("gguf", "int8"):
        check["quantize"] = quantize
    return check


def llama_cpp_replay(reference: Engine, gguf: Path, prompts: list[str], max_new_tokens: int,
                     lora: Path | None = None) -> dict[str, Any]:
    """The golden prompts through llama.cpp: its own tokenization against ours, its greedy answers against the
    run's, and its next-token logits against the run's."""
    from specialist.deploy import llamacpp

    template, tokenizer = reference.template, reference.tokenizer
    add_special = not template.prompt_has_special_tokens
    texts = [template.render_prompt(p, tokenizer) for p in prompts]
    ours = [reference.encode(p) for p in prompts]
    theirs = [llamacpp.tokenize(gguf, text, add_special=add_special) for text in texts]
    answers = llamacpp.greedy_answers(gguf, texts, max_new_tokens, stop_ids=sorted(reference.stop_ids),
                                      add_special=add_special, lora=lora)
    mismatches, pairs, stopped = [], [], 0
    for n, (prompt, (tokens, ended)) in enumerate(zip(prompts, answers)):
        want = reference.answer(prompt, max_new_tokens)
        raw = tokenizer.decode(tokens, skip_special_tokens=True)
        got = cut_at_stop(raw, template.stop_strings)
        got_stop = ended or any(stop in raw for stop in template.stop_strings)
        stopped += got_stop
        pairs.append({"run": want.text, "export": got})
        if want.text != got or want.stopped != got_stop:
            mismatches.append({"index": n, "prompt": prompt, "run": want.text, "export": got,
                               "run_stopped": want.stopped, "export_stopped": got_stop})
    return {"prompts": len(prompts), "mismatches": mismatches, "stopped_at_end_token": stopped,
            "max_new_tokens": max_new_tokens, "answers": pairs, "runtime": "llama.cpp",
            "prompt_token_mismatches": [n for n, (a, b) in enumerate(zip(ours, theirs)) if a != b],
            "logits": _logit_distance(reference, ours, llamacpp.next_token_logits(gguf, ours, lora=lora))}


def _logit_distance(reference: Engine, prompt_ids: list[list[int]], candidate_logits) -> dict[str, float]:
    import torch

    worst_abs, worst_rel, top1 = 0.0, 0.0, 0
    with reference.context(), torch.inference_mode():
        for ids, got in zip(prompt_ids, candidate_logits):
            want = reference.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            got = torch.as_tensor(got, dtype=torch.float32)[: want.shape[0]]
            worst_abs = max(worst_abs, float((want - got).abs().max()))
            worst_rel = max(worst_rel, float((want - got).norm() / want.norm().clamp(min=1e-12)))
            top1 += int(want.argmax() == got.argmax())
    return {"max_abs_diff": worst_abs, "max_relative_l2": worst_rel, "top1_agreement": top1 / max(1, len(prompt_ids))}


def replay_cases(check: dict[str, Any]) -> list:
    """One JUnit case per golden prompt: did the export answer as the run does?"""
    from specialist.junit import JunitCase

    failed = {m["index"]: m for m in check["mismatches"]}
    return [JunitCase(name=f"golden prompt {n}", classname=f"export.{check['format']}",
                      value=0.0 if n in failed else 1.0, threshold=1.0, passed=n not in failed,
                      message=(f"run answered {failed[n]['run']!r}, export {failed[n]['export']!r}"
                               if n in failed else "same answer"))
            for n in range(check["prompts"])]


def describe_check(check: dict[str, Any]) -> str:
    same = check["prompts"] - len(check["mismatches"])
    text = (f"{same} of {check['prompts']} golden prompts answered as the run does, "
            f"{check['stopped_at_end_token']} stopped at the end token")
    text += f" ({check.get('runtime', 'transformers')})"
    if check.get("prompt_token_mismatches"):
        text += f"; llama.cpp tokenized {len(check['prompt_token_mismatches'])} prompts differently"
    if "logits" in check:
        text += (f"; next-token logits within {100 * check['logits']['max_relative_l2']:.2f}% (relative L2), "
                 f"top-1 agreement {100 * check['logits']['top1_agreement']:.0f}%")
    return text


def compare_outputs(reference: Engine, candidate: Engine, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of both engines, one prompt at a time; mismatches in text or in where they stopped."""
    mismatches, answers, stopped = [], [], 0
    for n, prompt in enumerate(prompts):
        want = reference.answer(prompt, max_new_tokens)
        got = candidate.answer(prompt, max_new_tokens)
        stopped += got.stopped
        answers.append({"run": want.text, "export": got.text})
        if want.text != got.text or want.stopped != got.stopped:
            mismatches.append({"index": n, "prompt": prompt, "run": want.text, "export": got.text,
                               "run_stopped": want.stopped, "export_stopped": got.stopped})
    return {"prompts": len(prompts), "mismatches": mismatches, "stopped_at_end_token": stopped,
            "max_new_tokens": max_new_tokens, "answers": answers}


def compare_next_token_logits(reference: Engine, candidate: Engine, prompts: list[str]) -> dict[str, float]:
    """How far the candidate's next-token logits are from the reference's on each prompt."""
    import torch

    ids = [reference.encode(prompt) for prompt in prompts]
    with candidate.context(), torch.inference_mode():
        logits = [candidate.model(input_ids=torch.tensor([row])).logits[0, -1].float() for row in ids]
    return _logit_distance(reference, ids, logits)
