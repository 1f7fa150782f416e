"""The model card (README.md) of an export folder, in Hugging Face's format: a YAML header the Hub reads
(base_model, base_model_relation, library_name, license, tags, pipeline_tag, and from deploy.model_index the
evaluation as `model-index` and a Hub training dataset as `datasets`), then what a reader needs before using the model: the task,
the data it was trained and scored on (rows per split with their sha256, the preparation steps, training steps),
the held-out evaluation (every arm's scores with 95% intervals, the gates, forgetting), the prompt format,
intended use and limits, how to load the export's format, and the license terms.

Everything comes from files the run already wrote (config, template, data manifest, metrics, eval.json, the
export's export.json and replay check): rendering loads no model. A run without eval.json gets a card that says
it has not been evaluated. Text a user wrote (the instruction, arm and metric names, gate reasons, file names) is
escaped: it goes into the body only, as an indented code block or as escaped table text, never into the header,
so it can neither end the front matter nor inject HTML or Markdown.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import yaml

from specialist.core.stats import Interval
from specialist.deploy.model_index import HUB_ID, evaluation_header
from specialist.run_folder import ExportFolder, RunFolder, read_json

GEMMA_TERMS = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
# the embedded model's original on the Hub (what `base_model` must name: a Hub id, never a local folder)
EMBEDDED_HUB_IDS = {"gemma-3-270m": "google/gemma-3-270m"}
LIBRARIES = {"merged": "transformers", "adapter": "peft", "gguf": "gguf", "int8": "specialist"}
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,63}$")
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_TEXT = 4000  # characters of user text shown (an instruction can be a whole document)


def write_model_card(export: ExportFolder, run: RunFolder | None = None, repo_id: str | None = None) -> Path:
    """Write `export`'s README.md from its run's files; returns its path."""
    run = run or export.source_run()
    replace_file(export.model_card, render_model_card(export, run, repo_id))
    return export.model_card


def replace_file(path: Path, text: str) -> None:
    """Write `path` as a new file renamed over the old one: a README.md that is a symlink is replaced by the card,
    never written through (which would overwrite the file it points to, outside the export)."""
    import os
    import tempfile

    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)  # what write_text gives under the usual umask; mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def render_model_card(export: ExportFolder, run: RunFolder | None, repo_id: str | None = None) -> str:
    """The card's text: the YAML front matter, then the Markdown sections."""
    meta = export.meta()
    config = run.config() if run is not None else None
    base = meta.get("base_model") if isinstance(meta.get("base_model"), str) else None
    gemma = is_gemma_derivative(base, export.path)
    header = card_header(meta["format"], base, gemma, meta.get("method"))
    header.update(evaluation_header(run, repo_id, header["pipeline_tag"]))
    sections = [
        title_section(meta, base, run, config),
        task_section(config),
        data_section(run),
        evaluation_section(run),
        replay_section(export),
        prompt_section(run),
        use_section(),
        loading_section(meta, base, repo_id or "ORG/NAME", export),
        license_section(gemma, base),
    ]
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=10**6)
    return f"---\n{front}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


# -- the header ------------------------------------------------------------------------------------------------
def card_header(fmt: str, base: str | None, gemma: bool, method: Any) -> dict[str, Any]:
    """The Hub's metadata; built from fixed words and checked names only (no free text from the run)."""
    header: dict[str, Any] = {}
    hub_base = hub_id_of(base)
    if hub_base:
        header["base_model"] = hub_base
        # Every export is of a fine-tune: GGUF and int8 files too are the tuned weights (quantized or not), and
        # "quantized" would list them on the Hub as a quantization of the base model.
        header["base_model_relation"] = "adapter" if fmt == "adapter" else "finetune"
    header["library_name"] = LIBRARIES.get(fmt, "transformers")
    license_id = "gemma" if gemma else base_license(base)
    if license_id:
        header["license"] = license_id
    tags = ["specialist", fmt]
    if isinstance(method, str) and re.fullmatch(r"[a-z0-9_-]{1,32}", method):
        tags.append(method)
    header["tags"] = tags + (["gemma3"] if gemma else []) + (["gguf"] if fmt == "gguf" and "gguf" not in tags else [])
    header["pipeline_tag"] = "text-classification" if method == "classifier" else "text-generation"
    return header


def hub_id_of(base: str | None) -> str | None:
    """The Hub id of a base model name: the embedded model's original, a name shaped like `org/name`, else None
    (a local folder is no Hub id)."""
    if base is None:
        return None
    if base in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[base]
    return base if HUB_ID.match(base) and not Path(base).expanduser().exists() else None


def is_gemma_derivative(base: str | None, export_path: Path) -> bool:
    """Whether the Gemma Terms of Use apply: the embedded model (by name, or its converted folder in the model
    cache), or any base or export whose config says it is a Gemma model."""
    from specialist.models import EMBEDDED_MODELS, models_dir

    if base is None:
        return _config_says_gemma(export_path)
    if base in EMBEDDED_MODELS or ("gemma" in base.lower() and hub_id_of(base)):
        return True
    path = Path(base).expanduser()
    for name in EMBEDDED_MODELS:
        embedded = (models_dir() / name).resolve()
        if path.exists() and (path.resolve() == embedded or path.resolve().is_relative_to(embedded)):
            return True
    return _config_says_gemma(export_path) or (path.is_dir() and _config_says_gemma(path))


def _config_says_gemma(folder: Path) -> bool:
    config = folder / "config.json"
    try:
        data = read_json(config) if config.is_file() else {}
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    kinds = [data.get("model_type"), *(data.get("architectures") or [])] if isinstance(data, dict) else []
    return any(isinstance(k, str) and "gemma" in k.lower() for k in kinds)


def base_license(base: str | None) -> str | None:
    """The license id in a local base folder's own model card, when it has one."""
    if base is None or not (Path(base).expanduser() / "README.md").is_file():
        return None
    text = (Path(base).expanduser() / "README.md").read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    try:
        found = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    value = found.get("license") if isinstance(found, dict) else None
    return value if isinstance(value, str) and _LICENSE.match(value) else None


# -- escaping --------------------------------------------------------------------------------------------------
def md_escape(value: Any) -> str:
    """User text as inert Markdown on one line: HTML escaped, Markdown's specials backslashed, no line breaks."""
    text = _CONTROL.sub("", str(value)).replace("\r", " ").replace("\n", " ")
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text[:MAX_TEXT], quote=False))


def code_block(text: str) -> str:
    """User text as an indented code block: shown verbatim, nothing in it renders, no line of it reads '---'."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + f"\n[... {len(text) - MAX_TEXT} more characters]"
    return "\n".join("    " + line for line in text.split("\n"))


# -- the sections ----------------------------------------------------------------------------------------------
def title_section(meta: dict[str, Any], base: str | None, run: RunFolder | None, config) -> str:
    name = md_escape(run.path.name) if run is not None else "specialist export"
    method = md_escape(meta.get("method", "?"))
    origin = md_escape(hub_id_of(base) or (Path(base).name if base else "an unknown base model"))
    lines = [f"# {name}", "",
             f"A specialist fine-tuned from **{origin}** with specialist "
             f"(method `{method}`), exported as **{md_escape(meta['format'])}**."]
    if config is not None and run.has_adapter:
        lines.append(f"LoRA rank {config.method.r}, alpha {config.method.alpha}.")
    return "\n".join(lines)


def task_section(config) -> str:
    if config is None:
        return "## Task\n\nThe run this export came from was not found, so its task is not described here."
    instruction = config.data.instruction.strip()
    if not instruction:
        return ("## Task\n\nNo instruction: the model learned the task from its examples alone (each prompt is the "
                "input itself).")
    return f"## Task\n\nThe instruction every prompt carries:\n\n{code_block(instruction)}"


def data_section(run: RunFolder | None) -> str:
    if run is None or not run.data_manifest.is_file():
        return "## Training data\n\nNo data manifest was found for this export."
    manifest = read_json(run.data_manifest)
    lines = ["## Training data", "", "| split | rows | sha256 |", "|---|---:|---|"]
    for split, entry in (manifest.get("files") or {}).items():
        lines.append(f"| {md_escape(split)} | {entry.get('rows', '?')} | `{md_escape(entry.get('sha256', '?'))}` |")
    lines += ["", "Sources (file name, sha256 of the file as read):", ""]
    sources = [("train/val/test", manifest.get("source") or {})]
    sources += [(name, source) for name, source in (manifest.get("fixed_sources") or {}).items()]
    for role, source in sources:
        lines.append(f"- {md_escape(role)}: `{md_escape(Path(str(source.get('path', '?'))).name)}` "
                     f"sha256 `{md_escape(source.get('sha256', '?'))}`")
    steps = manifest.get("steps") or []
    if steps:
        lines += ["", "Preparation: " + "; ".join(
            f"{md_escape(s.get('step', '?'))} {s.get('rows_in', '?')} -> {s.get('rows_out', '?')} rows" for s in steps)
            + f" (split {md_escape((manifest.get('split') or {}).get('by', '?'))}, seed {manifest.get('seed', '?')})."]
    train = run.metrics_so_far().get("train") or {}
    if train.get("steps") is not None:
        lines += ["", f"Training: {train['steps']} optimizer steps, {train.get('epochs', '?')} epochs"
                      + (f", final validation loss {train['final_val_loss']:.4f}"
                         if isinstance(train.get("final_val_loss"), (int, float)) else "") + "."]
    return "\n".join(lines)


def evaluation_section(run: RunFolder | None) -> str:
    if run is None or not run.eval_json.is_file():
        return ("## Evaluation\n\n**Not evaluated yet.** This run has no held-out evaluation: run "
                "`specialist eval RUN_DIR`; the card is written again, with its scores, by the next "
                "`specialist export` or `specialist push`. Until then nothing here says how well the model does "
                "its task.")
    report = read_json(run.eval_json)
    if report.get("kind") == "domain_adaptation":
        lines = domain_table(report)
    else:
        lines = score_table(report) + forgetting_lines(report.get("forgetting"))
    return "\n".join(["## Evaluation", "", *lines, *gate_lines(report.get("gates") or [])])


def _interval(cell: dict[str, Any]) -> str:
    return Interval.from_dict(cell).format(".1f", 100, "%") if isinstance(cell.get("mean"), (int, float)) else ""


def _points(difference: dict[str, Any]) -> str:
    if not isinstance(difference.get("mean"), (int, float)):
        return ""
    return Interval.from_dict(difference).format("+.1f", 100, " pts")


def score_table(report: dict[str, Any]) -> list[str]:
    """Each arm's scores (rows: metrics) with 95% intervals, and tuned minus base with its paired interval."""
    arms = report.get("arms") or {}
    if not arms:
        return ["No arm was scored."]
    metrics = list(next(iter(arms.values())).get("scores") or {})
    versus = (report.get("comparisons") or {}).get("tuned_vs_base") or {}
    lines = [f"{report.get('n_eval', '?')} held-out examples, the same prompts and greedy decoding for every arm "
             f"(up to {report.get('max_new_tokens', '?')} new tokens); mean with its 95% interval.", "",
             "| metric | " + " | ".join(md_escape(a) for a in arms) + (" | tuned - base |" if versus else " |"),
             "|---|" + "---:|" * (len(arms) + bool(versus))]
    for metric in metrics:
        cells = [_interval((arms[a].get("scores") or {}).get(metric) or {}) for a in arms]
        if versus:
            difference = (versus.get(metric) or {}).get("difference") or {}
            cells.append(_points(difference))
        lines.append(f"| {md_escape(metric)} | " + " | ".join(cells) + " |")
    return lines


def domain_table(report: dict[str, Any]) -> list[str]:
    lines = ["Continued pretraining: perplexity on held-out documents and on general text (lower is better).", "",
             "| arm | document perplexity | general perplexity | question accuracy |", "|---|---:|---:|---:|"]
    for name, arm in (report.get("arms") or {}).items():
        lines.append(f"| {md_escape(name)} | {arm.get('doc_perplexity', float('nan')):.2f} | "
                     f"{arm.get('general_perplexity', float('nan')):.2f} | "
                     f"{_interval(arm.get('question_accuracy') or {})} |")
    return lines


def forgetting_lines(forgetting: dict[str, Any] | None) -> list[str]:
    """Perplexity on general text and the knowledge probe, with the base weights and with the tuned ones."""
    if not isinstance(forgetting, dict) or not isinstance(forgetting.get("before"), dict):
        return []
    before, after = forgetting["before"], forgetting.get("after") or {}
    change = forgetting.get("ppl_increase")
    interval = forgetting.get("ppl_increase_interval") or {}
    lines = ["", "Forgetting (base weights against tuned):", "", "| figure | before | after | change |",
             "|---|---:|---:|---:|",
             f"| perplexity on {md_escape(forgetting.get('corpus', '?'))} ({forgetting.get('texts', '?')} texts) | "
             f"{before.get('perplexity', float('nan')):.2f} | {after.get('perplexity', float('nan')):.2f} | "
             + (f"{Interval.from_dict(interval, mean=change).format('+.1f', 100, '%', '%')} |"
                if isinstance(change, (int, float)) else " |")]
    if forgetting.get("questions"):
        lines.append(f"| knowledge probe accuracy ({forgetting['questions']} questions) | "
                     f"{100 * before.get('knowledge', float('nan')):.1f}% | "
                     f"{100 * after.get('knowledge', float('nan')):.1f}% | "
                     f"{100 * (after.get('knowledge', 0) - before.get('knowledge', 0)):+.1f} pts |")
    return lines


def gate_lines(gates: list[dict[str, Any]]) -> list[str]:
    if not gates:
        return ["", "No release gates were set for this run."]
    lines = ["", "Release gates:", ""]
    for gate in gates:
        mark = "pass" if gate.get("passed") else "**FAIL**"
        value = gate.get("value")
        figure = f"value {value:.3f}" if isinstance(value, (int, float)) else ""
        interval = Interval.from_dict(gate, mean=value if isinstance(value, (int, float)) else 0.0)
        if interval.bounded:
            figure += f", interval {interval.format_bounds()}"
        lines.append(f"- {mark}: {md_escape(gate.get('gate', '?'))} ({figure}; {md_escape(gate.get('reason', ''))})")
    return lines


def replay_section(export: ExportFolder) -> str:
    if not export.check_file.is_file():
        return ""
    check = read_json(export.check_file)
    prompts = check.get("prompts", 0)
    same = prompts - len(check.get("mismatches") or [])
    text = (f"## Export check\n\n{same} of {prompts} held-out prompts answered by this export exactly as the run's "
            f"own model answers them (greedy, {md_escape(check.get('runtime', 'transformers'))}).")
    logits = check.get("logits")
    if isinstance(logits, dict) and isinstance(logits.get("max_relative_l2"), (int, float)):
        text += (f" Next-token logits within {100 * logits['max_relative_l2']:.2f}% (relative L2) of the run's, "
                 f"top-1 agreement {100 * logits.get('top1_agreement', 0):.0f}%.")
    return text


def prompt_section(run: RunFolder | None) -> str:
    """The prompt format the model was trained and scored with; other formats answer worse."""
    if run is None or not run.template_file.is_file():
        return ""
    template = run.template()
    retrieval = run.retrieval()
    if retrieval is not None:
        return (f"## Prompt format\n\nRetrieval-augmented: every input is preceded by its {retrieval.k} most "
                "similar training rows with their answers, as earlier examples in the same format (the least similar "
                "first), and the model was trained that way. `retrieval.json` in this folder holds the rows; "
                "`specialist serve` adds them itself (TF-IDF cosine, `specialist.core.retrieval`), any other client "
                "must put them in the prompt or the model answers worse.")
    if template.kind == "builtin":
        return ("## Prompt format\n\nThe built-in format (the model was trained on exactly this text; `{input}` is "
                "the user's input, and the answer ends with the end-of-sequence token or at a new `### ` line):"
                f"\n\n{code_block(template.render_prompt('{input}'))}")
    return ("## Prompt format\n\nThe tokenizer's chat template (in the tokenizer files): the instruction and the "
            "input together as one user turn, the answer as the assistant turn.")


def use_section() -> str:
    return ("## Intended use and limits\n\n"
            "- Made for the one task above, on inputs like its training data. Scores on other inputs, other tasks "
            "or other prompt formats are unknown and likely lower.\n"
            "- The evaluation covers the held-out rows of the same data; check it on your own traffic before "
            "relying on it, and keep a person in the loop where a wrong answer is costly.\n"
            "- A small model can state wrong things fluently; it has no knowledge past its base model's.\n"
            "- Quantized formats (gguf, int8) can answer a little differently from the run: see the export check.")


def _plain_gguf_name(name: Any) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,100}\.gguf", name) is not None


def loading_section(meta: dict[str, Any], base: str | None, repo: str, export: ExportFolder) -> str:
    fmt = meta["format"]
    base_id = hub_id_of(base) or "BASE_MODEL"
    name = meta.get("gguf_file")
    plain = _plain_gguf_name(name)
    gguf_file = f" --hf-file {name}" if plain else ""
    snippets = {
        "merged": f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                  f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n"
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")",
        "adapter": f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   f"base = AutoModelForCausalLM.from_pretrained(\"{base_id}\")\n"
                   f"model = PeftModel.from_pretrained(base, \"{repo}\")\n"
                   f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")",
        "gguf": (f"# llama.cpp: the base file and the LoRA beside it\nhf download {repo} --local-dir model\n"
                 f"llama-cli -m model/{name} --lora model/{meta['gguf_lora_file']} -p \"...\"\n"
                 if plain and _plain_gguf_name(meta.get("gguf_lora_file")) else
                 f"# llama.cpp\nllama-cli -hf {repo}{gguf_file} -p \"...\"\n")
                + f"# Ollama (the Modelfile carries the prompt format)\n"
                f"hf download {repo} --local-dir model && cd model\n"
                f"ollama create my-specialist -f Modelfile && ollama run my-specialist",
        "int8": f"# int8 weights with a scale per row, read by specialist (kept int8 in memory)\n"
                f"hf download {repo} --local-dir model\n"
                f"specialist serve --arm tuned=model",
    }
    text = "## How to load\n\n" + code_block(snippets.get(fmt, f"specialist serve --arm tuned={repo}"))
    if fmt in ("merged", "adapter"):
        text += ("\n\nRender prompts in the format above (or serve it with `specialist serve --arm tuned=FOLDER`, "
                 "which does).")
    if fmt == "adapter" and base_id == "BASE_MODEL":
        text += f"\n\nBASE_MODEL is the model the adapter was trained on: `{md_escape(Path(str(base)).name)}`."
    return text


def license_section(gemma: bool, base: str | None) -> str:
    if gemma:
        return (f"## License\n\n{GEMMA_TERMS} (<https://ai.google.dev/gemma/terms>). This model is a derivative of "
                "Gemma, distributed under those terms; its use must also follow the Gemma Prohibited Use Policy "
                "(<https://ai.google.dev/gemma/prohibited_use_policy>).")
    origin = md_escape(hub_id_of(base) or (Path(base).name if base else "the base model"))
    return f"## License\n\nThe license of the base model ({origin}) applies to this derivative."
