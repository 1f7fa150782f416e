"""The prompt format: one object, stored with the run, used by training, evaluation and serving alike.

Models whose tokenizer has a chat template get it (instruction and input as one user turn). Base models
without one, like the embedded Gemma 3 270M base, get the built-in format:

    {instruction}

    ### Input:
    {input}

    ### Output:
    {completion}<eos>

Prompt and completion are tokenized separately and concatenated, so the prompt tokens a model is trained on are
exactly the tokens it is given at inference (no merges across the boundary).

Truncation (`max_length`, `truncate_side`; None: off) shortens only the user input, never the instruction, the
few-shot examples or the answer: training fits prompt + completion into max_length, evaluation and serving fit
the prompt into max_length - max_new_tokens (`prompt_budget`), so a long input keeps its answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from specialist.errors import SpecialistError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_FORMAT = "{instruction}### Input:\n{input}\n\n### Output:\n"
TRUNCATE_SIDES = ("right", "left", "middle")
_PLAIN_ATTEMPTS = 4  # cuts of the measured overshoot before each further cut doubles (a tokenizer that grows)


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt encoded to fit a token budget: its ids, how many tokens the cut saved, and whether it fits."""

    ids: list[int]
    tokens_cut: int = 0
    fits: bool = True


@dataclass(frozen=True)
class PromptTemplate:
    kind: str  # "builtin" or "chat"
    instruction: str
    eos_token: str
    chat_template: str | None = None
    max_length: int | None = None  # tokens of prompt + completion in training; None: no truncation
    truncate_side: str | None = None  # "right", "left" or "middle" of the user input; None: no truncation

    def __post_init__(self) -> None:
        if self.truncate_side is not None and self.truncate_side not in TRUNCATE_SIDES:
            raise ValueError(f"truncate_side must be one of {TRUNCATE_SIDES}, not {self.truncate_side!r}")

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, instruction: str = "", *,
                      max_length: int | None = None, truncate_side: str | None = None) -> PromptTemplate:
        """The template for `tokenizer`; give max_length and truncate_side to shorten long inputs to fit."""
        chat_template = getattr(tokenizer, "chat_template", None)
        return cls(
            kind="chat" if chat_template else "builtin",
            instruction=instruction.strip(),
            eos_token=tokenizer.eos_token,
            chat_template=chat_template,
            max_length=max_length if truncate_side else None,
            truncate_side=truncate_side if max_length else None,
        )

    @property
    def truncates(self) -> bool:
        return self.max_length is not None and self.truncate_side is not None

    def prompt_budget(self, max_new_tokens: int) -> int | None:
        """Prompt tokens that leave room for `max_new_tokens` within max_length; None when truncation is off."""
        return self.max_length - max_new_tokens if self.truncates else None

    def render_prompt(self, text: str, tokenizer: PreTrainedTokenizerBase | None = None,
                      shots: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt for `text`; `shots` are (input, output) examples shown first (the few-shot arm)."""
        if self.kind == "builtin":
            instruction = f"{self.instruction}\n\n" if self.instruction else ""
            examples = "".join(BUILTIN_FORMAT.format(instruction="", input=i) + f"{o}\n\n" for i, o in shots)
            return instruction + examples + BUILTIN_FORMAT.format(instruction="", input=text)
        if tokenizer is None:
            raise ValueError("a chat template needs the tokenizer to render")
        messages = []
        for n, (shot_input, shot_output) in enumerate([*shots, (text, None)]):
            content = f"{self.instruction}\n\n{shot_input}" if self.instruction and n == 0 else shot_input
            messages.append({"role": "user", "content": content})
            if shot_output is not None:
                messages.append({"role": "assistant", "content": shot_output})
        from specialist.bounded import template_deadline

        with template_deadline():  # a template is code from a model folder or a GGUF: bounded (bounded.TimedOut)
            return tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends an answer even without EOS: a base model continues the built-in format with a new turn."""
        return ("\n### ",) if self.kind == "builtin" else ()

    def render_completion(self, text: str) -> str:
        return text + self.eos_token

    @property
    def prompt_has_special_tokens(self) -> bool:
        """A chat template writes its own BOS; the built-in format lets the tokenizer add it."""
        return self.kind == "chat"

    def encode_prompt(self, text: str, tokenizer: PreTrainedTokenizerBase,
                      shots: Sequence[tuple[str, str]] = (), budget: int | None = None) -> list[int]:
        """Prompt ids for `text`; with a `budget` (and truncation on) the input is shortened to fit it."""
        return self.fit_prompt(text, tokenizer, shots, budget).ids

    def fit_prompt(self, text: str, tokenizer: PreTrainedTokenizerBase, shots: Sequence[tuple[str, str]] = (),
                   budget: int | None = None) -> FittedPrompt:
        """The prompt for `text` in at most `budget` tokens, cutting only `text` (at truncate_side).

        The input is cut at token level, decoded and rendered again, as often as re-encoding needs (a cut can
        merge differently); when even an empty input does not fit, that shortest prompt comes back with
        fits=False. Without a budget, or with truncation off, the prompt is encoded whole.
        """
        ids = self._encode_rendered(text, tokenizer, shots)
        if budget is None or not self.truncates or len(ids) <= budget:
            return FittedPrompt(ids, 0, budget is None or len(ids) <= budget)
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep, attempt, shortest = len(pieces), 0, ids
        while keep > 0:
            step = max(1, len(shortest) - budget) * 2 ** max(0, attempt - _PLAIN_ATTEMPTS)
            keep, attempt = max(0, keep - step), attempt + 1
            shortest = self._encode_rendered(self._cut_input(pieces, keep, tokenizer), tokenizer, shots)
            if len(shortest) <= budget:
                return FittedPrompt(shortest, len(ids) - len(shortest), True)
        return FittedPrompt(shortest, len(ids) - len(shortest), False)

    def _encode_rendered(self, text: str, tokenizer: PreTrainedTokenizerBase,
                         shots: Sequence[tuple[str, str]]) -> list[int]:
        return tokenizer(
            self.render_prompt(text, tokenizer, shots), add_special_tokens=not self.prompt_has_special_tokens
        )["input_ids"]

    def _cut_input(self, pieces: list[int], keep: int, tokenizer: PreTrainedTokenizerBase) -> str:
        """The input's text with only `keep` of its tokens, taken from the side truncate_side leaves."""
        def text(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        if keep <= 0:
            return ""
        if self.truncate_side == "left":
            return text(pieces[-keep:]).lstrip("\ufffd")  # a cut through a character decodes as U+FFFD
        if self.truncate_side == "middle":
            head, tail = (keep + 1) // 2, keep // 2
            tail_text = text(pieces[-tail:]).lstrip("\ufffd") if tail else ""
            return text(pieces[:head]).rstrip("\ufffd") + tail_text
        return text(pieces[:keep]).rstrip("\ufffd")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> PromptTemplate:
        """A saved template; files written before truncation existed load with it off."""
        saved = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise SpecialistError(f"{path}: unknown template field(s) {unknown}",
                                  hint="it was written by a newer specialist: upgrade to read it")
        return cls(**saved)


def encode_for_training(
    template: PromptTemplate, tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str,
    shots: Sequence[tuple[str, str]] = (),
) -> dict[str, list[int]]:
    """`input_ids` of prompt+completion+eos and a `completion_mask` that is 1 on the completion tokens only;
    `shots` (retrieval-augmented training) are shown before the prompt exactly as evaluation and serving show them.

    With truncation on, the prompt's input is shortened so that the whole completion fits in max_length.
    """
    completion_ids = tokenizer(template.render_completion(completion), add_special_tokens=False)["input_ids"]
    budget = template.max_length - len(completion_ids) if template.truncates else None
    prompt_ids = template.encode_prompt(prompt, tokenizer, shots, budget=budget)
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }
