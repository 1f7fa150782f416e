"""Decoding that cannot break the format: a logits processor that lets each row of a batch take only the tokens that
keep its answer inside a language (a JSON schema, a set of labels, or a regex), and then a stop token.

The grammar work is xgrammar's (`pip install 'specialist[constrain]'`). Measured on this project's 2-core CPU
against outlines-core 0.2.14 and lm-format-enforcer 0.11.3, with Gemma 3's 262k vocabulary: xgrammar compiles a
small object schema in 36-75 ms (outlines-core: 5-10 s, its index walks the whole vocabulary per regex) and needs
1-1.5 ms per decode step at batch 1, 11-17 ms at batch 16, most of it setting -inf across 262k logits per row (1% and
3% of a Gemma 270M step). lm-format-enforcer's transformers integration does not import on transformers 5 and its
steps inside a string took 20-260 ms on average. xgrammar reads the vocabulary of a Hugging Face tokenizer itself
(byte-level BPE, SentencePiece with byte fallback) and takes full JSON schemas, EBNF and regexes; its cost is an
install that pulls triton (about 1 GB, unused on CPU) on Linux x86_64.

How a row is decoded:
- before each token the row's matcher writes the set of tokens that keep the text a prefix of the language; every
  other logit becomes -inf, so greedy decoding and sampling (temperature, top-p) both pick inside the language;
- the stop tokens (`stop_ids`) are allowed only once the text is a whole sentence of the language, and are the only
  tokens allowed once nothing can follow (a JSON object's closing brace, the end of the longest label);
- given each row's token budget (`max_new_tokens`), the processor keeps a plan for closing the text in time: a
  short way to a whole sentence and a stop token (close the string, fill the required properties with their
  smallest values, close the braces), found a character at a time (closing characters first, which always ends
  for JSON schemas and labels; a regex may have no closing within reach) and then spelt in the tokenizer's own
  tokens, as the model would write it. Once the plan needs nearly all the tokens left (`CLOSE_MARGIN` spare),
  the row follows it, so an answer that would loop inside a string until the limit ends as valid, if emptier,
  JSON instead of a cut-off prefix; an answer that would end in time is left alone;
- without a budget, or with fewer tokens than the shortest closing, a row that reaches the token limit first
  ends as a valid *prefix*, reported by `ConstrainedLogits.completed` (False) and by `Constraint.check`;
- a row that generation ended for another reason (its own token limit, a cancellation, a stop string) is padded by
  transformers from then on; the pad token is outside the language, so the processor stops constraining that row.

Two holes in xgrammar 0.2.9 are closed here (see `_TokenBytes`): raw control characters in length-bounded JSON
strings, and UTF-16 surrogates spelled byte by byte. JSON schema keywords the grammar cannot express (uniqueItems, not, if/then/else, multipleOf on numbers) are not
enforced while decoding; `Constraint.check` validates the finished text against the whole schema.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialist.core.labels import render_label
from specialist.errors import ConfigError

KINDS = ("json_schema", "labels", "regex")
INSTALL_HINT = "pip install 'specialist[constrain]'  (xgrammar)"
_JSON_SEPARATORS = (", ", ": ")  # json.dumps' default, the spacing training completions are usually written in
_GRAMMARS_PER_TOKENIZER = 32
CLOSE_MARGIN = 8  # spare tokens kept beyond the closing plan: one token the model picks may lengthen the plan
_REPLAN_EVERY = 8  # steps between plans while the budget is still far from the last plan's length
_MAX_PLAN = 512  # characters; a grammar that does not close within this is left to the token limit
# A schema's size bounds its grammar's compile, which runs on the first constrained request while holding the
# engine (20,000 properties: 51 s), and its depth the recursion of the checks and the compiler (200 levels of
# `items` raised RecursionError). Real output schemas have tens of properties, a few levels.
MAX_SCHEMA_NODES = 5000  # objects, arrays and values in the schema's JSON
MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in the schema's JSON
# Characters the closing plan tries, best first: what ends a string, an object or an array, then what separates,
# then the smallest values. The matcher accepts at most one of them where the grammar allows one way on.
_CLOSING_ORDER = ('"}],: 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ{[-.+_'
                  "!#$%&'()*/;<=>?@\\^`|~")


@dataclass(frozen=True)
class Constraint:
    """The language every completion must belong to. `spec` is the schema as JSON text (its property order kept:
    the grammar writes properties in that order), the tuple of allowed completions, or the regex pattern."""

    kind: str
    spec: str | tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"constraint kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Constraint:
        """Completions that are one JSON value valid against `schema` (Draft 2020-12), written on one line with
        json.dumps' default spacing."""
        import jsonschema

        if not isinstance(schema, dict):
            raise ConfigError(f"a JSON schema constraint needs a JSON object (a dict), got {type(schema).__name__}")
        check_schema_size(schema)
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
            text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"the JSON schema constraint is not a valid JSON schema: {exc.message}") from exc
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"the JSON schema constraint cannot be written as JSON: {exc}") from exc
        return cls("json_schema", text)

    @classmethod
    def labels(cls, labels: list[str], template: str = "{label}") -> Constraint:
        """Completions that are exactly one label rendered through `template`, e.g. '{"priority": "{label}"}'
        (a plain replacement of '{label}': the template's other braces stay as they are)."""
        if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or not labels:
            raise ConfigError("a labels constraint needs a non-empty list of label strings",
                              hint='e.g. labels: ["Blocker", "Major", "Minor"]')
        bad = [label for label in labels if not isinstance(label, str) or not label]
        if bad:
            raise ConfigError(f"labels must be non-empty strings; got {bad[:3]!r}")
        if not isinstance(template, str) or "{label}" not in template:
            raise ConfigError(f"the labels template {template!r} must contain '{{label}}' where the label goes")
        rendered = tuple(dict.fromkeys(render_label(label, template) for label in labels))
        return cls("labels", rendered)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Completions that match `pattern` whole. xgrammar reads a subset of Python's syntax: no lookaround,
        word boundary, back reference or inline flag."""
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("a regex constraint needs a non-empty pattern string")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"the regex constraint {pattern!r} does not compile: {exc}") from exc
        return cls("regex", pattern)

    def check(self, text: str) -> bool:
        """Whether `text` is a whole sentence of the language (the full schema, not only what the grammar
        enforces): how an evaluation tells a complete answer from one cut by the token limit."""
        if self.kind == "labels":
            return text in self.spec
        from specialist import bounded

        if self.kind == "regex":  # the pattern is the run's, the text a model's: bounded like a schema's patterns
            return _bounded_check(lambda: bounded.search(f"\\A(?:{self.spec})\\Z", text))
        try:
            value = json.loads(text)
        except (ValueError, TypeError, RecursionError):  # any answer: the digit limit and deep nesting included
            return False
        bounded.bound_jsonschema_patterns()
        return _bounded_check(lambda: _validator(self.spec).is_valid(value))


def constraint_of(config):
    """The output language of a run (evaluation.constraint) as a Constraint: what constrained decoding keeps the
    answers inside (evaluation, serve) and what GRPO's format reward checks."""
    evaluation, data = config.evaluation, config.data
    kind = evaluation.constraint
    if kind == "auto":
        kind = next((k for k, given in (("json_schema", evaluation.json_schema), ("labels", data.labels),
                                         ("regex", evaluation.constraint_regex)) if given), "json")
    if kind == "json_schema":
        if evaluation.json_schema is None:
            raise ConfigError("evaluation.constraint json_schema needs evaluation.json_schema (a schema file)")
        return Constraint.json_schema(json.loads(Path(evaluation.json_schema).read_text(encoding="utf-8")))
    if kind == "labels":
        if not data.labels:
            raise ConfigError("evaluation.constraint labels needs data.labels (the label set)")
        return Constraint.labels(list(data.labels), template=data.label_template)
    if kind == "regex":
        if not evaluation.constraint_regex:
            raise ConfigError("evaluation.constraint regex needs evaluation.constraint_regex")
        return Constraint.regex(evaluation.constraint_regex)
    return Constraint.json_schema({})


def _bounded_check(check: Callable[[], bool]) -> bool:
    """`check()` within one pattern deadline; a check that times out or recurses too deep is a failed check."""
    from specialist import bounded

    try:
        with bounded.time_limit(bounded.PATTERN_SECONDS):
            return check()
    except (bounded.TimedOut, RecursionError):
        return False


def check_schema_size(schema: Any) -> None:
    """Refuse a schema over MAX_SCHEMA_NODES values or MAX_SCHEMA_DEPTH levels, measured without recursion, before
    anything recursive (validation, json.dumps, the grammar compiler) walks it."""
    stack, nodes = [(schema, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH or nodes > MAX_SCHEMA_NODES:
            what = f"nests over {MAX_SCHEMA_DEPTH} levels" if depth > MAX_SCHEMA_DEPTH else \
                f"has over {MAX_SCHEMA_NODES} values"
            raise ConfigError(f"the JSON schema constraint {what}: too large to compile into a grammar",
                              hint="constrain the answer with a smaller schema (its output's shape only), or turn "
                                   "the constraint off (evaluation.constraint)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


@functools.lru_cache(maxsize=32)
def _validator(schema_text: str):
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(schema_text))


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:
        raise ConfigError("constrained decoding needs the xgrammar package", hint=INSTALL_HINT) from exc
    return xgrammar


class _TokenizerGrammars:
    """What one tokenizer needs, built once: xgrammar's view of its vocabulary, a compiler, the ids that may never
    be generated inside a text, and the grammars compiled for it so far (least recently used dropped first)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self.special_ids = _special_ids(tokenizer, vocab_size)
        decoded_vocab = self.info.decoded_vocab  # a property that copies the whole vocabulary each time
        self.bytes = _TokenBytes(decoded_vocab, self.special_ids)
        self.closing_ids = _single_character_ids(decoded_vocab, self.special_ids)
        self.closing_bytes = {i: decoded_vocab[i] for i in self.closing_ids}  # all a closing plan is spelt from
        self.grammars: OrderedDict[Constraint, Any] = OrderedDict()
        self.lock = threading.Lock()

    def compiled(self, constraint: Constraint):
        with self.lock:
            if constraint in self.grammars:
                self.grammars.move_to_end(constraint)
                return self.grammars[constraint]
            grammar = self._compile(constraint)
            self.grammars[constraint] = grammar
            if len(self.grammars) > _GRAMMARS_PER_TOKENIZER:
                self.grammars.popitem(last=False)
            return grammar

    def _compile(self, constraint: Constraint):
        try:
            if constraint.kind == "json_schema":
                return self.compiler.compile_json_schema(constraint.spec, any_whitespace=False,
                                                         separators=_JSON_SEPARATORS, strict_mode=True)
            if constraint.kind == "labels":
                return self.compiler.compile_grammar(labels_ebnf(constraint.spec))
            return self.compiler.compile_regex(constraint.spec)
        except (RuntimeError, ValueError) as exc:  # xgrammar reports what it cannot read this way
            raise ConfigError(f"the {constraint.kind} constraint cannot be compiled to a grammar: "
                              f"{str(exc).strip().splitlines()[-1]}") from exc


def labels_ebnf(completions: tuple[str, ...]) -> str:
    """An EBNF grammar whose sentences are exactly `completions`. The literals are JSON strings, which xgrammar's
    EBNF reads with the same escapes; non-ASCII stays as UTF-8 (a \\u surrogate pair would not be joined)."""
    return "root ::= " + " | ".join(json.dumps(text, ensure_ascii=False) for text in completions)


def _special_ids(tokenizer, vocab_size: int) -> list[int]:
    """Control tokens (pad, bos, end-of-turn, unused...) that xgrammar would read as their literal text inside a
    JSON string; decoding drops them, so an answer that took one would not be the text the grammar saw."""
    ids = set(getattr(tokenizer, "all_special_ids", []))
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i < vocab_size)


def _single_character_ids(decoded_vocab: list[bytes], special_ids: list[int]) -> list[int]:
    """One token id for each character of `_CLOSING_ORDER` the vocabulary spells alone, in that order."""
    special = set(special_ids)
    first: dict[bytes, int] = {}
    for i, text in enumerate(decoded_vocab):
        if len(text) == 1 and i not in special:
            first.setdefault(text, i)
    # then UTF-8 continuation bytes: a row that stopped inside a multi-byte character must finish it first
    wanted = [char.encode() for char in _CLOSING_ORDER] + [bytes([b]) for b in range(0x80, 0xC0)]
    return [first[text] for text in wanted if text in first]


def closing_plan(matcher, closing_ids: list[int], stop_ids: list[int], limit: int = _MAX_PLAN) -> list[int] | None:
    """The tokens that take `matcher` from where it is to a stop token, found greedily: at each step the first stop
    token, else the first of `closing_ids`, the grammar accepts. None when it does not close within `limit`. The
    matcher is left where it was."""
    taken: list[int] = []
    try:
        while len(taken) < limit:
            step = next((t for t in stop_ids if matcher.accept_token(t)), None)
            if step is not None:
                taken.append(step)
                return taken
            step = next((t for t in closing_ids if matcher.accept_token(t)), None)
            if step is None:
                return None
            taken.append(step)
        return None
    finally:
        if taken:
            matcher.rollback(len(taken))


def spelt_in_tokens(matcher, plan: list[int], closing_bytes: dict[int, bytes], encode) -> list[int]:
    """`plan` (single characters from `closing_bytes`, then a stop token) spelt as the tokenizer spells its text,
    where the grammar takes that spelling and it is shorter; else `plan`. Leading UTF-8 continuation bytes (the end
    of a character the row began) stay single tokens. The matcher is left where it was."""
    body = plan[:-1]
    raw = b"".join(closing_bytes[t] for t in body)
    lead = len(raw) - len(raw.lstrip(bytes(range(0x80, 0xC0))))
    try:
        text = raw[lead:].decode("utf-8")
    except UnicodeDecodeError:
        return plan
    spelt = body[:lead] + (list(encode(text)) if text else []) + plan[-1:]
    if len(spelt) >= len(plan):
        return plan
    accepted = 0
    try:
        for token in spelt:
            if not matcher.accept_token(token):
                return plan
            accepted += 1
    finally:
        if accepted:
            matcher.rollback(accepted)
    return spelt


class _TokenBytes:
    """Tokens whose bytes xgrammar 0.2.9 lets through although the text could not be what the grammar means:

    - a raw control character (U+0000-U+001F): JSON never allows one unescaped, but xgrammar lets them into strings
      that carry minLength/maxLength (its issue #800), so JSON constraints ban these tokens outright;
    - a UTF-16 surrogate written in UTF-8 (ED A0-BF ..): invalid UTF-8 that decodes to three U+FFFD, which a
      byte-level or byte-fallback model can spell byte by byte; banned inside a token, and after a token that
      ends on ED, the tokens that start with A0-BF are banned for the next step.
    A UTF-8 continuation byte is >= 0x80, so no multi-byte character is mistaken for a control character."""

    def __init__(self, decoded_vocab: list[bytes], special_ids: list[int]) -> None:
        special = set(special_ids)
        regular = [(i, text) for i, text in enumerate(decoded_vocab) if i not in special and text]
        self.control_ids = [i for i, text in regular if _CONTROL.search(text)]
        self.surrogate_ids = [i for i, text in regular if _SURROGATE.search(text)]
        self.ends_on_ed = {i for i, text in regular if text[-1] == 0xED}
        self.surrogate_tail_ids = [i for i, text in regular if 0xA0 <= text[0] <= 0xBF]


_CONTROL = re.compile(rb"[\x00-\x1f]")
_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def grammars_for(tokenizer) -> _TokenizerGrammars:
    """The cached grammars of `tokenizer` (per tokenizer object and vocabulary size: tokens added later rebuild)."""
    vocab_size = len(tokenizer)
    with _CACHE_LOCK:
        entry = _CACHE.get(tokenizer)
        if entry is None or entry.vocab_size != vocab_size:
            entry = _CACHE[tokenizer] = _TokenizerGrammars(tokenizer, vocab_size)
        return entry


def logits_processor(constraint: Constraint, tokenizer, batch_size: int, prompt_lengths: list[int],
                     stop_ids: list[int], max_new_tokens: int | list[int] | None = None) -> ConstrainedLogits:
    """A transformers LogitsProcessor (a ConstrainedLogits) that keeps every row of one left-padded `generate` call
    inside `constraint`; `prompt_lengths` are the rows' unpadded prompt lengths, `stop_ids` the tokens that end one,
    `max_new_tokens` the rows' token budgets (one for all, or one a row): with them a row closes its text in time.

    Pass it as `model.generate(..., logits_processor=LogitsProcessorList([processor]))`, one new processor per
    call (it holds the rows' states), with `eos_token_id=stop_ids` so a stop token ends the row. After the call,
    `processor.completed(output_ids)` says which rows reached a whole sentence of the language."""
    if not isinstance(constraint, Constraint):
        raise TypeError(f"constraint must be a Constraint, got {type(constraint).__name__}")
    if batch_size < 1 or len(prompt_lengths) != batch_size:
        raise ValueError(f"batch_size {batch_size} needs as many prompt lengths, got {len(prompt_lengths)}")
    stops = sorted({int(i) for i in stop_ids})
    grammars = grammars_for(tokenizer)
    if not stops or not all(0 <= i < grammars.vocab_size for i in stops):
        raise ValueError(f"stop_ids must be token ids of this tokenizer, got {list(stop_ids)}")
    budgets = _row_budgets(max_new_tokens, batch_size)
    processor_class = _logits_processor_class()
    return processor_class(grammars.compiled(constraint), grammars, constraint.kind, list(prompt_lengths), stops,
                           budgets, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])


def _row_budgets(max_new_tokens: int | list[int] | None, batch_size: int) -> list[int] | None:
    if max_new_tokens is None:
        return None
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * batch_size
    if len(budgets) != batch_size or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                             for b in budgets):
        raise ValueError(f"max_new_tokens must be a positive int or one a row ({batch_size}), got {max_new_tokens!r}")
    return budgets


def _bitmask_without(vocab_size: int, banned_ids: list[int] | set[int]):
    """A one-row token bitmask in xgrammar's layout (bit j of word k is token 32k+j) with every bit set but those
    of `banned_ids`: ANDed into a row's mask, it removes those tokens."""
    import numpy as np
    import torch

    words = np.full((vocab_size + 31) // 32, 0xFFFFFFFF, dtype=np.uint32)
    ids = np.array(sorted(banned_ids), dtype=np.int64)
    np.bitwise_and.at(words, ids >> 5, ~(np.uint32(1) << (ids & 31).astype(np.uint32)))
    return torch.from_numpy(words.view(np.int32))


_OPEN, _COMPLETE, _LEFT = "open", "complete", "left"


class ConstrainedLogits:
    """The per-row matchers of one generate call; a transformers LogitsProcessor (it is called with the batch's
    token ids so far and the next-token scores, and returns the masked scores)."""

    def __init__(self, compiled, grammars: _TokenizerGrammars, kind: str, prompt_lengths: list[int],
                 stop_ids: list[int], budgets: list[int] | None = None,
                 encode: Callable[[str], list[int]] | None = None) -> None:
        batch_size = len(prompt_lengths)  # one row a prompt
        xgr = _xgrammar()
        self.xgr, self.vocab_size, self.prompt_lengths = xgr, grammars.vocab_size, prompt_lengths
        self.matchers = [xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids) for _ in range(batch_size)]
        self.states = [_OPEN] * batch_size
        self.fed = [0] * batch_size  # generated tokens each matcher has taken
        self.start: int | None = None  # column of the first generated token (the padded prompt's width)
        self.bitmask = xgr.allocate_token_bitmask(batch_size, self.vocab_size)
        token_bytes = grammars.bytes
        banned = set(grammars.special_ids) | set(token_bytes.surrogate_ids)
        if kind == "json_schema":
            banned |= set(token_bytes.control_ids)
        self.allowed_ever = _bitmask_without(self.vocab_size, banned - set(stop_ids))
        self.ends_on_ed = token_bytes.ends_on_ed
        self.no_surrogate_tail = _bitmask_without(self.vocab_size, token_bytes.surrogate_tail_ids)
        self.last = [-1] * batch_size  # each row's last accepted token
        self.stop_ids, self.closing_ids, self.budgets = stop_ids, grammars.closing_ids, budgets
        self.closing_bytes = grammars.closing_bytes
        self.encode = encode  # text -> the tokenizer's token ids, to spell a closing plan as the model would
        self.plans: list[list[int] | None] = [None] * batch_size  # each row's way to close, while it holds
        self.plan_length: list[int | None] = [0] * batch_size  # the last plan's length (None: none found)

    def __call__(self, input_ids, scores):
        self._check_shapes(input_ids, scores)
        if self.start is None:
            self.start = input_ids.shape[1]
        self._catch_up(input_ids)
        rows = [i for i, state in enumerate(self.states) if state == _OPEN]
        if not rows:
            return scores
        for i in rows:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
            if self.last[i] in self.ends_on_ed:
                self.bitmask[i] &= self.no_surrogate_tail
        self.bitmask[rows] &= self.allowed_ever
        if scores.shape[1] > self.vocab_size:  # a model whose output layer is padded past the tokenizer
            scores[rows, self.vocab_size:] = float("-inf")
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), vocab_size=self.vocab_size,
                                             indices=rows)
        if self.budgets is not None:
            for i in rows:
                forced = self._closing_token(i)
                if forced is not None:
                    scores[i, :] = float("-inf")
                    scores[i, forced] = 0.0
        return scores

    def _closing_token(self, row: int) -> int | None:
        """The token row `row` must take now to close within its budget, or None while it may still choose."""
        left = self.budgets[row] - self.fed[row]  # tokens left, this one included
        plan, last_length = self.plans[row], self.plan_length[row]
        near = last_length is not None and left <= last_length + 2 * CLOSE_MARGIN
        if plan is None and (self.fed[row] % _REPLAN_EVERY == 0 or near):
            plan = self.plans[row] = self._plan(row)
            self.plan_length[row] = len(plan) if plan is not None else None  # no way found: retry on the cadence
        if plan is None:
            return None
        if len(plan) >= left or (len(plan) > 1 and len(plan) + CLOSE_MARGIN >= left):
            return plan[0]
        return None

    def _plan(self, row: int) -> list[int] | None:
        matcher = self.matchers[row]
        plan = closing_plan(matcher, self.closing_ids, self.stop_ids)
        if plan is None or self.encode is None:
            return plan
        return spelt_in_tokens(matcher, plan, self.closing_bytes, self.encode)

    def _check_shapes(self, input_ids, scores) -> None:
        if input_ids.shape[0] != len(self.matchers) or scores.shape[0] != len(self.matchers):
            raise ValueError(f"this processor was built for {len(self.matchers)} rows, generate passed "
                             f"{input_ids.shape[0]} (beam search and num_return_sequences are not supported)")
        if scores.shape[1] < self.vocab_size:
            raise ValueError(f"the model scores {scores.shape[1]} tokens, fewer than the tokenizer's "
                             f"{self.vocab_size}: the constraint needs the tokenizer that matches the model")
        if self.start is None and max(self.prompt_lengths) > input_ids.shape[1]:
            raise ValueError(f"prompt lengths {self.prompt_lengths} exceed the padded batch width "
                             f"{input_ids.shape[1]}: pass the unpadded prompt lengths of a left-padded batch")

    def _catch_up(self, input_ids) -> None:
        """Give each open row's matcher the tokens generated since it last looked (one, inside generate)."""
        open_rows = [i for i, state in enumerate(self.states) if state == _OPEN]
        if not open_rows:
            return
        first = self.start + min(self.fed[i] for i in open_rows)
        if first >= input_ids.shape[1]:
            return
        tail = input_ids[:, first:].tolist()
        for i in open_rows:
            skip = self.start + self.fed[i] - first
            for token in tail[i][skip:]:
                if not self._accept(i, token):
                    break

    def _accept(self, row: int, token: int) -> bool:
        """Feed one token; False once the row is no longer open (stopped, or padded by generate)."""
        matcher = self.matchers[row]
        if not matcher.accept_token(token):
            self.states[row] = _LEFT  # generate ended this row by another rule and pads it
            return False
        self.fed[row] += 1
        self.last[row] = token
        plan = self.plans[row]
        self.plans[row] = plan[1:] if plan and plan[0] == token else None  # a plan followed still holds
        if matcher.is_terminated():
            self.states[row] = _COMPLETE
            return False
        return True

    def completed(self, output_ids) -> list[bool]:
        """After generate: for each row, whether its answer is a whole sentence of the language and was ended by
        a stop token. False means the row ran out of tokens (its text is a valid but unfinished prefix) or was
        ended by another rule. `output_ids` is what generate returned (prompt columns included)."""
        if self.start is None:  # generate made no step that needed scores
            self.start = max(self.prompt_lengths)
        self._catch_up(output_ids)
        return [state == _COMPLETE for state in self.states]


@functools.cache
def _logits_processor_class() -> type:
    """ConstrainedLogits as a subclass of transformers' LogitsProcessor, made on first use: importing this module
    (the config and the engine do) must not import torch, which takes 1.6 s."""
    from transformers import LogitsProcessor

    return type("ConstrainedLogitsProcessor", (ConstrainedLogits, LogitsProcessor), {"__module__": __name__})
