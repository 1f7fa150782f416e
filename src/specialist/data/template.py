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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_FORMAT = "{instruction}### Input:\n{input}\n\n### Output:\n"


@dataclass(frozen=True)
class PromptTemplate:
    kind: str  # "builtin" or "chat"
    instruction: str
    eos_token: str
    chat_template: str | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, instruction: str = "") -> PromptTemplate:
        chat_template = getattr(tokenizer, "chat_template", None)
        return cls(
            kind="chat" if chat_template else "builtin",
            instruction=instruction.strip(),
            eos_token=tokenizer.eos_token,
            chat_template=chat_template,
        )

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
                      shots: Sequence[tuple[str, str]] = ()) -> list[int]:
        return tokenizer(
            self.render_prompt(text, tokenizer, shots), add_special_tokens=not self.prompt_has_special_tokens
        )["input_ids"]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> PromptTemplate:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def encode_for_training(
    template: PromptTemplate, tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> dict[str, list[int]]:
    """`input_ids` of prompt+completion+eos and a `completion_mask` that is 1 on the completion tokens only."""
    prompt_ids = template.encode_prompt(prompt, tokenizer)
    completion_ids = tokenizer(template.render_completion(completion), add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }
