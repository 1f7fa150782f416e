"""An Ollama `Modelfile` for an exported GGUF: the run's prompt format as Ollama's Go template, its stop strings
and greedy decoding, so `ollama create NAME -f Modelfile` serves the prompts the run was trained and checked on.

The template is built from the run's own `PromptTemplate`: the text it renders around a placeholder input
becomes literal text around `{{ .Prompt }}`, and the instruction goes to `SYSTEM` (rendered where the run puts
it, `{{ if .System }}...{{ end }}`). Before the file is written, the template is rendered here
(`render_template`, the subset of Go's text/template this module emits) and compared byte for byte with
`PromptTemplate.render_prompt`; a prompt format that does not survive the translation (a chat template that
rewrites the user's text) is refused instead of shipping a Modelfile that prompts the model differently.

Ollama adds BOS itself when the GGUF says to (`tokenizer.ggml.add_bos_token`), so a BOS the chat template writes
as text is left out of the template; `render_template(..., bos=...)` puts it back for the comparison.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specialist.errors import ConfigError
from specialist.run_folder import ExportFolder

if TYPE_CHECKING:
    from specialist.data.template import PromptTemplate

DEFAULT_PARAMETERS: dict[str, Any] = {"temperature": 0}  # greedy, as the run's evaluation decodes
_SYSTEM_SLOT = "{{ if .System }}{{ .System }}\n\n{{ end }}"
_PROBES = ("PROBE-INPUT-7f3a", "a second probe: with {{ braces }}, \"quotes\" and\nlines")
_PLACEHOLDER = "\u0000SPECIALIST-PROMPT\u0000"
_PLAIN_VALUE = re.compile(r'[^\s"]+')


def write_modelfile(folder: Path, gguf_name: str, template: PromptTemplate, stop_strings: Sequence[str] = (),
                    params: Mapping[str, Any] | None = None, tokenizer=None, adapter: str | None = None) -> Path:
    """Write `folder/Modelfile` for `folder/gguf_name`; returns its path.

    `stop_strings` are added to the template's EOS token and its own stop strings (each one a `PARAMETER
    stop`); `params` are more `PARAMETER`s (default temperature 0). A chat template needs `tokenizer`.
    `adapter`: a GGUF LoRA file in the folder, applied on top (Ollama's ADAPTER).
    """
    folder = Path(folder)
    gguf_path = folder / gguf_name
    if Path(gguf_name).name != gguf_name or not gguf_path.is_file():
        raise ConfigError(f"{gguf_path}: no GGUF file of that name in the export folder",
                          hint="pass the file name (not a path) of a GGUF written into the folder")
    bos = _runtime_bos(gguf_path)
    go_template = ollama_template(template, tokenizer, bos)
    stops = _unique([template.eos_token, *template.stop_strings, *stop_strings])
    source = f"./{gguf_name}"
    lines = [f"FROM {_value(source)}"]
    if adapter is not None:
        if Path(adapter).name != adapter or not (folder / adapter).is_file():
            raise ConfigError(f"{folder / adapter}: no GGUF adapter of that name in the export folder",
                              hint="pass the file name (not a path) of a GGUF LoRA written into the folder")
        lines.append(f"ADAPTER {_value(f'./{adapter}')}")
    lines.append(f"TEMPLATE {_quote(go_template)}")
    if template.instruction:
        lines.append(f"SYSTEM {_quote(template.instruction)}")
    lines += [f"PARAMETER stop {_value(stop)}" for stop in stops]
    for name, value in {**DEFAULT_PARAMETERS, **(params or {})}.items():
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", str(name)):
            raise ConfigError(f"Ollama parameter names are lowercase words, not {name!r}",
                              hint="see https://github.com/ollama/ollama/blob/main/docs/modelfile.md")
        lines.append(f"PARAMETER {name} {_value(_parameter_text(value))}")
    path = ExportFolder(Path(folder)).modelfile
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ollama_template(template: PromptTemplate, tokenizer=None, bos: str | None = None) -> str:
    """The run's prompt format as an Ollama TEMPLATE, checked against `render_prompt` on probe inputs.

    The built-in format puts the instruction before everything, a chat format inside the user's turn; both are
    rendered without it around a placeholder input, and the instruction comes back through `.System`.
    `bos`: the BOS text Ollama adds itself (left out of the template when the prompt starts with it).
    """
    if template.kind not in ("builtin", "chat"):
        raise ConfigError(f"unknown prompt format kind {template.kind!r}", hint="use 'builtin' or 'chat'")
    if template.kind == "chat" and tokenizer is None:
        raise ConfigError("a chat prompt format needs the tokenizer to write its Ollama template")
    prefix, suffix = _split_at_placeholder(dataclasses.replace(template, instruction=""), tokenizer)
    if bos and prefix.startswith(bos):
        prefix = prefix[len(bos):]
    turn = "{{ .Prompt }}" + _literal(suffix) + "{{ .Response }}"
    if template.kind == "builtin":
        go = _SYSTEM_SLOT + _literal(prefix) + turn
    else:
        go = _literal(prefix) + _SYSTEM_SLOT + turn
    _check_template(go, template, tokenizer, bos)
    return go


def _split_at_placeholder(template: PromptTemplate, tokenizer) -> tuple[str, str]:
    rendered = template.render_prompt(_PLACEHOLDER, tokenizer)
    if rendered.count(_PLACEHOLDER) != 1:
        raise ConfigError("the prompt format does not place the input text once, verbatim; Ollama's template "
                          "cannot reproduce it", hint="use the built-in prompt format for this export")
    prefix, suffix = rendered.split(_PLACEHOLDER)
    return prefix, suffix


def _check_template(go: str, template: PromptTemplate, tokenizer, bos: str | None) -> None:
    for probe in _PROBES:
        want = template.render_prompt(probe, tokenizer)
        got = render_template(go, system=template.instruction, prompt=probe, bos=bos or "")
        if bos and not want.startswith(bos):
            got = got[len(bos):]  # this format gets its BOS from the tokenizer, not from the text
        if got != want:
            raise ConfigError("the prompt format could not be written as an Ollama template that renders the "
                              f"same text (wanted {want[:120]!r}, the template gives {got[:120]!r})",
                              hint="use the built-in prompt format for this export")


def _runtime_bos(gguf_path: Path) -> str | None:
    """The BOS token text llama.cpp (and so Ollama) adds to every prompt of this file, or None."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    adds = fields.get("tokenizer.ggml.add_bos_token")
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    if adds is None or not adds.contents() or bos_id is None:
        return None
    return fields["tokenizer.ggml.tokens"].contents(bos_id.contents())


# ---- Modelfile and Go template text ------------------------------------------------------------------------------


def _literal(text: str) -> str:
    """`text` as literal Go template text: only `{{` starts an action, so it alone is written as an action."""
    return text.replace("{{", '{{ "{{" }}')


def _value(text: str) -> str:
    """A Modelfile value: bare when it is one word without quotes, else in triple quotes."""
    return text if _PLAIN_VALUE.fullmatch(text) and text.isprintable() else _quote(text)


def _quote(value: str) -> str:
    """A Modelfile value in triple quotes, which Ollama's parser takes verbatim (it has no escapes).

    Ollama's parser drops characters Go does not print and would end the value at an inner `\"\"\"` followed by
    a space, so such values are refused rather than changed.
    """
    if '"""' in value or value.endswith('"'):
        raise ConfigError(f"{value[:60]!r} cannot be written in a Modelfile (it holds or ends with a quote run)",
                          hint="remove the double quotes from the instruction or stop strings")
    unprintable = sorted({c for c in value if not (c.isprintable() or c in "\t\n\r")})
    if unprintable:
        raise ConfigError(f"{value[:60]!r} holds characters Ollama's Modelfile parser drops: {unprintable}",
                          hint="remove control or invisible characters from the instruction or stop strings")
    return f'"""{value}"""'


def _parameter_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError(f"an Ollama parameter is a number, a bool or a string, not {type(value).__name__}")


def _unique(values: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for value in values:
        if value and value not in seen:
            seen.append(value)
    return seen


_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


def render_template(go: str, system: str = "", prompt: str = "", response: str = "", bos: str = "") -> str:
    """Render the subset of Go's text/template this module writes: `{{ .System }}`, `{{ .Prompt }}`,
    `{{ .Response }}`, `{{ "literal" }}` and `{{ if .System }}...{{ end }}` (not nested), as Ollama would for one
    turn, with `bos` (what the runtime adds) in front."""
    values = {".System": system, ".Prompt": prompt, ".Response": response}
    out, skipping, position = [bos], False, 0
    for match in _ACTION.finditer(go):
        if not skipping:
            out.append(go[position:match.start()])
        action = match.group(1).strip()
        position = match.end()
        if action.startswith("if "):
            if skipping:
                raise ConfigError("nested {{ if }} is not in the template subset rendered here")
            skipping = not values.get(action[3:].strip(), "")
        elif action == "end":
            skipping = False
        elif not skipping:
            out.append(_action_value(action, values))
    out.append(go[position:])
    return "".join(out)


def _action_value(action: str, values: dict[str, str]) -> str:
    if action in values:
        return values[action]
    literal = re.fullmatch(r'"((?:[^"\\]|\\.)*)"', action)
    if literal:  # a Go string literal; this module only writes "{{"
        return re.sub(r"\\(.)", r"\1", literal.group(1))
    raise ConfigError(f"{{{{ {action} }}}} is not in the template subset rendered here")
