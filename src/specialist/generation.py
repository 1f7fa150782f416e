"""One generation engine for every caller: the evaluation arms, the export's golden replay and `serve`.

`Engine.run` takes a batch of requests (prompt token ids, a token limit each, optionally a callback that receives
the answer text as it grows, and a cancellation flag) and generates them together: left padding, the KV cache,
transformers' `generate`, and one stopping rule per row, checked after every token:

- a stop token (EOS, or a chat model's end-of-turn token) ends the row, as does its own token limit, a stop string
  of the prompt format (the built-in format's next-turn marker), or its cancellation (a client that hung up);
- a finished row stops costing its own work at once, and the batch ends when every row has, so a short answer
  never waits for the batch's longest limit and a base model that echoes the input stops at the next turn marker;
- the text is the decoded tokens (special tokens dropped) cut at the first stop string and stripped, the same for
  every caller, and what a streaming callback receives adds up to exactly that text.

Because evaluation, the export check and the server all answer through `run`, "the export replays the golden
answers" proves what users will be served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specialist.constrain import Constraint
    from specialist.data import Example, PromptTemplate

END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
_INCOMPLETE_CHARACTER = "\ufffd"  # a byte-level token that ends inside a multi-byte character decodes to this


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy by default, or sampled with temperature and nucleus (top-p). The one
    sampling type: evaluation builds it from its config, `serve` from each request (`Sampling.of`).

    Unseeded sampling draws from torch's global generator through transformers' own sampler (what evaluation has
    always done). A `seed` gives every row of the batch a generator of its own, seeded with it, so a seeded request
    answers the same whatever else is generated at the same time, in this thread or another."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def of(cls, temperature: float | None = None, top_p: float | None = None, seed: int | None = None) -> Sampling:
        """Greedy when `temperature` is 0 or unset (a seed is then moot and dropped, so greedy requests batch
        together); else sampled at `temperature` with nucleus `top_p` (1: the whole distribution)."""
        if not temperature:
            return GREEDY
        return cls(True, float(temperature), float(1.0 if top_p is None else top_p), seed)

    def generate_kwargs(self) -> dict:
        if not self.do_sample or self.seed is not None:  # a seeded draw is made by _SeededDraw, then taken greedily
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


GREEDY = Sampling()


@dataclass
class Request:
    """One prompt to answer. `on_text` receives each new piece of the answer (streaming), from the generating
    thread; setting `cancelled` ends the row at the next token."""

    prompt_ids: list[int]
    max_new_tokens: int
    on_text: Callable[..., None] | None = None  # (piece, logprobs of the tokens the piece completes)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop: tuple[str, ...] = ()  # the caller's own stop strings, beside the prompt format's
    constraint: Constraint | None = None  # this row's output language, in place of the engine's
    logprobs: int | None = None  # None: none; k >= 0: each answer token's log-probability and the k likeliest
    # True once no continuation of the answer so far could change its scores (an evaluation's rule): the row ends
    decided: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class RowRules:
    """What one `Engine.generate` call asks of each row beyond the engine's defaults."""

    shots: Sequence[Sequence[tuple[str, str]]] | None = None  # each prompt's own examples (retrieval), in order
    decided: Callable[[str], bool] | None = None  # Request.decided for every row


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's log-probability under the model (before temperature, top-p and any constraint: the
    model's own distribution, as vLLM reports by default) and the `top` likeliest tokens there, (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or string), "length" (token limit), "cancelled" or "decided"
    probabilities: dict[str, float] | None = None  # a classifier's answer: every label's probability
    logprobs: tuple[TokenLogprob, ...] | None = None  # the answer's tokens, where the request asked for them

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip()


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus a chat model's end-of-turn token, so generation stops where training taught it to."""
    ids = {tokenizer.eos_token_id}
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


# Below this, computing the shared prefix apart costs more than it saves (a forward call of its own).
PREFIX_CACHE_MIN_TOKENS = 16


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own (the next token is
    predicted from a row's last token, which must go through the batch)."""
    if not rows:
        return 0
    shortest = min(len(r) for r in rows) - 1
    first = rows[0]
    length = 0
    while length < shortest and all(r[length] == first[length] for r in rows):
        length += 1
    return length


def left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        input_ids[n, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[n, width - len(row):] = 1
    return input_ids, attention_mask


def prefix_cached_batch(model, prompts: list[list[int]], pad_id: int):
    """(shared, cache, rest ids, attention mask) for a batch of prompts. When they share a prefix of at least
    PREFIX_CACHE_MIN_TOKENS (the instruction, the few-shot examples), its KV cache is computed once and repeated
    per row, and the rows are laid out as [prefix][padding][rest]: `rest ids` are the left-padded rests, the mask
    covers prefix and rest, and positions come from the mask, so every token sits where it would without the
    padding. Otherwise shared is 0, cache None and the rest ids are the whole rows, left-padded."""
    import torch

    device = model.device
    shared, cache = shared_prefix_length(prompts), None
    if len(prompts) < 2 or shared < PREFIX_CACHE_MIN_TOKENS:
        shared = 0
    else:
        cache = model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True,
                      logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(len(prompts))
    rest_ids, rest_mask = left_pad([p[shared:] for p in prompts], pad_id)
    mask = torch.cat([torch.ones((len(prompts), shared), dtype=rest_mask.dtype), rest_mask], dim=1)
    return shared, cache, rest_ids.to(device), mask.to(device)


def default_max_new_tokens(tokenizer, train: list[Example]) -> int:
    """Room for the longest training completion plus a margin: enough to be right, short enough to stay fast."""
    longest = max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in train)
    return longest + max(8, longest // 4)


class _Row:
    """One request's answer as it grows: its tokens (and their log-probabilities, where asked), its text, what has
    been streamed, and why it ended."""

    def __init__(self, request: Request, engine: Engine) -> None:
        self.request, self.engine = request, engine
        self.stops = engine.stop_strings + tuple(request.stop)
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish: str | None = None
        self.sent = ""
        self.released = 0  # log-probabilities handed to the streaming callback so far

    def add(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Take the next token; True once the row has ended."""
        if self.finish is not None:
            return True
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        # the text so far, decoded once for both checks that read it (every token of every row passes here)
        raw = self.raw_text() if self.stops or self.request.decided is not None else ""
        if token in self.engine.stop_ids:
            self.finish = "stop"
        elif self.stops and self._stop_string_reached(raw):
            self.finish = "stop"
        elif self.request.decided is not None and self._decided(raw):
            self.finish = "decided"
        elif self.request.cancelled.is_set():
            self.finish = "cancelled"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish = "length"
        if self.request.on_text is not None:
            self._stream()
        return self.finish is not None

    def raw_text(self, tokens: int | None = None) -> str:
        return self.engine.tokenizer.decode(self.tokens[:tokens], skip_special_tokens=True)

    def text(self) -> str:
        return cut_at_stop(self.raw_text(), self.stops)

    def _decided(self, raw: str) -> bool:
        """Request.decided holds for the text so far and for every answer a stop string may still cut it to: a
        stop string that has begun in the text's tail would end the answer before it (a few-shot answer's JSON is
        followed by the start of the next turn, `\n### `, and is judged without it)."""
        if not self.request.decided(raw):
            return False
        cuts = (at for at in range(len(raw)) if any(stop.startswith(raw[at:]) for stop in self.stops))
        return all(self.request.decided(raw[:at]) for at in cuts)

    def _stop_string_reached(self, raw: str | None = None) -> bool:
        raw = self.raw_text() if raw is None else raw
        return any(stop in raw for stop in self.stops)

    def answer_tokens(self) -> int:
        """How many tokens the answer is made of: not a closing stop token, nor the tokens from the one where a
        stop string begins (the text leaves the stop string out, so its log-probabilities leave it out too)."""
        count = len(self.tokens) - (bool(self.tokens) and self.tokens[-1] in self.engine.stop_ids)
        if self.finish != "stop" or not self.stops or not self._stop_string_reached():
            return count
        cut = len(self.text())
        while count and len(self.raw_text(count).strip()) > cut:
            count -= 1
        return count

    def _stream(self) -> None:
        final = self.text() if self.finish is not None else self._stable_text()
        if final.startswith(self.sent) and len(final) > len(self.sent):
            piece, self.sent = final[len(self.sent):], final
            if self.request.logprobs is None:
                self.request.on_text(piece)
            else:
                self.request.on_text(piece, self._release())

    def _release(self) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the tokens the text streamed so far is made of, not yet handed over."""
        if self.finish is not None:
            upto = self.answer_tokens()
        else:
            upto = self.released
            while upto < len(self.tokens) and len(self.raw_text(upto + 1).lstrip()) <= len(self.sent):
                upto += 1
        released, self.released = tuple(self.logprobs[self.released:upto]), max(self.released, upto)
        return released

    def _stable_text(self) -> str:
        """The part of the answer no later token can change: leading space stripped; trailing space, a partial
        character and the start of a possible stop string held back."""
        text = self.raw_text().lstrip().rstrip(_INCOMPLETE_CHARACTER)
        for stop in self.stops:
            for size in range(min(len(stop), len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    text = text[:-size]
                    break
        return text.rstrip()

    def result(self) -> Generation:
        logprobs = None if self.request.logprobs is None else tuple(self.logprobs[:self.answer_tokens()])
        return Generation(self.text(), len(self.request.prompt_ids), len(self.tokens), self.finish or "length",
                          logprobs=logprobs)


class _RowStops:
    """transformers' per-row stopping hook: feeds each row its new token (with its log-probability, where the row
    asked for it) and reports which rows are done."""

    def __init__(self, rows: list[_Row], capture: _LogprobCapture | None = None) -> None:
        self.rows, self.capture = rows, capture

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        last = input_ids[:, -1].tolist()
        done = [row.add(token, self.capture.take(n, token) if self.capture is not None else None)
                for n, (row, token) in enumerate(zip(self.rows, last))]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _LogprobCapture:
    """The first of generate's logits processors: keeps this step's log-probabilities for the rows that asked
    (the model's own distribution: before the constraint masks it and temperature or top-p reshape it). The token
    is picked after every processor has run; `_RowStops` then takes its entry."""

    def __init__(self, tops: list[int | None]) -> None:
        self.tops = tops
        self.rows = [n for n, top in enumerate(tops) if top is not None]
        self.position = {row: j for j, row in enumerate(self.rows)}
        self.step = None

    def __call__(self, input_ids, scores):
        import torch

        logprobs = torch.log_softmax(scores[self.rows].float(), dim=-1)
        most = max(self.tops[n] for n in self.rows)
        self.step = (logprobs, logprobs.topk(most, dim=-1) if most else None)
        return scores

    def take(self, row: int, token: int) -> TokenLogprob | None:
        if self.tops[row] is None or self.step is None:
            return None
        logprobs, top = self.step
        j, k = self.position[row], self.tops[row]
        best = tuple(zip(top.indices[j, :k].tolist(), top.values[j, :k].tolist())) if k else ()
        return TokenLogprob(token, float(logprobs[j, token]), best)


class _SeededDraw:
    """The last of generate's logits processors for a seeded Sampling: each row draws its next token with a
    generator of its own, seeded with the seed, from the distribution transformers' sampler would use
    (temperature, the model's top-k, top-p, the model's min-p, in its order); only the drawn token is left, and
    greedy decoding takes it. A row's draws depend on its own scores only, not on the batch around it."""

    def __init__(self, sampling: Sampling, rows: int, model_config) -> None:
        from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        top_k, min_p = getattr(model_config, "top_k", None), getattr(model_config, "min_p", None)
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        self.warpers += [TopKLogitsWarper(top_k)] if top_k else []
        self.warpers += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []
        self.warpers += [MinPLogitsWarper(min_p)] if min_p is not None else []
        self.seed, self.rows, self.generators = int(sampling.seed) % 2**64, rows, None

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(self.seed) for _ in range(self.rows)]
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probabilities = torch.softmax(scores, dim=-1)
        picks = [torch.multinomial(row, 1, generator=generator) if torch.isfinite(row).all() and row.sum() > 0
                 else torch.zeros(1, dtype=torch.long, device=row.device)  # a row with nothing left: padded anyway
                 for row, generator in zip(probabilities, self.generators)]
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(1, torch.stack(picks), 0.0)


_MODEL_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.Lock:
    """One lock per model object: engines that share a model (arms that differ by adapter) take turns on it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the same weights
    with _LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(id(inner), threading.Lock())


class Engine:
    """Generate answers with `model` in the prompt format `template`; thread-safe (one generation per model at a
    time). `context` is entered around every generation: an arm that shares its model with others switches its
    adapter on (or all adapters off, for the base) there."""

    def __init__(self, model, tokenizer, template: PromptTemplate, stop_ids: list[int] | None = None,
                 context: Callable[[], AbstractContextManager] = nullcontext, constraint=None,
                 retrieval=None) -> None:
        self.model, self.tokenizer, self.template, self.context = model, tokenizer, template, context
        self.constraint = constraint  # a specialist.constrain.Constraint: every answer stays inside its language
        # a core.retrieval.RetrievalIndex: the model was trained with its k nearest training rows before every
        # input, so every prompt it is given carries them too (evaluation, the export's replay, serving)
        self.retrieval = retrieval
        self.stop_ids = set(stop_ids if stop_ids is not None else stop_token_ids(tokenizer))
        self.stop_strings = tuple(template.stop_strings)
        self.lock = model_lock(model)
        self.busy = False
        # greedy rows with no logits processor decode through specialist.decode (the same tokens, faster), and the
        # linear layers read oneDNN-packed weights (specialist.onednn: float32, 2-3x faster); False sends every
        # batch through transformers' generate on torch's own layers (the plain path the fast one is checked against)
        self.fast = True
        # a single greedy row checks up to this many tokens guessed from its own context per model call (prompt
        # lookup: the same tokens, several per call where the answer copies its input); 0: one token per call
        self.lookup = 8
        # a second runtime for a greedy row that comes alone (deploy.llamacpp.LoneGreedy: llama.cpp on the GGUF
        # file this model was read from), faster than torch at batch 1; it hands its tokens to the same rows
        self.lone = None

    def encode(self, text: str, shots: Sequence[tuple[str, str]] = (), max_new_tokens: int | None = None) -> list[int]:
        """The prompt's token ids in the template's format (its input shortened to fit, where the run truncates),
        after the retrieved examples of a retrieval-trained model (when no `shots` are given)."""
        if self.retrieval is not None and not shots:
            shots = self.retrieval.prompt_shots([text])[0]
        return encode_prompt(self.template, self.tokenizer, text, shots, max_new_tokens)

    def run(self, requests: list[Request], sampling: Sampling = GREEDY) -> list[Generation]:
        """Answer `requests` as one batch; the rows end independently (see the module docstring). Rows held to
        different output languages (a request's own constraint, else the engine's) are generated in turn, a batch
        per language: one generate call keeps one grammar."""
        groups: dict[Constraint | None, list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault(request.constraint or self.constraint, []).append(n)
        results: list[Generation | None] = [None] * len(requests)
        for constraint, members in groups.items():
            for n, result in zip(members, self._run_batch([requests[n] for n in members], sampling, constraint)):
                results[n] = result
        return [r for r in results if r is not None]

    def _run_batch(self, requests: list[Request], sampling: Sampling, constraint) -> list[Generation]:
        import torch

        from specialist.decode import greedy_decode
        from specialist.onednn import packed_linears

        rows = [_Row(request, self) for request in requests]
        wanted = [request.logprobs for request in requests]
        capture = _LogprobCapture(wanted) if any(top is not None for top in wanted) else None
        with self.lock, self.context(), torch.inference_mode(), packed_linears(self.model, self.fast):
            self.busy = True
            try:
                if self._answers_lone(requests, sampling, constraint, capture):
                    self.lone.decode(requests[0].prompt_ids, rows[0].add)
                elif self._decodes_fast(sampling, constraint, capture):
                    greedy_decode(self.model, self._inputs([r.prompt_ids for r in requests]),
                                  lambda going, tokens: [rows[n].add(t) for n, t in zip(going, tokens)],
                                  self.lookup)
                else:
                    self._generate(requests, rows, sampling, constraint, capture)
            finally:
                self.busy = False
        return [self._finished(row) for row in rows]

    def _generate(self, requests: list[Request], rows: list[_Row], sampling: Sampling, constraint,
                  capture: _LogprobCapture | None) -> None:
        """The plain path: transformers' generate, any sampling, any logits processors."""
        from transformers import StoppingCriteriaList

        self.model.generate(
            **self._inputs([r.prompt_ids for r in requests]),
            max_new_tokens=max(r.max_new_tokens for r in requests),
            stopping_criteria=StoppingCriteriaList([_RowStops(rows, capture)]),
            eos_token_id=sorted(self.stop_ids), pad_token_id=self.tokenizer.pad_token_id,
            **self._processors(requests, sampling, constraint, capture), **sampling.generate_kwargs())

    def _answers_lone(self, requests: list[Request], sampling: Sampling, constraint,
                      capture: _LogprobCapture | None) -> bool:
        """One greedy row with no logits processor, which the lone runtime's context holds."""
        return (self.lone is not None and len(requests) == 1 and self._plain_greedy(sampling, constraint, capture)
                and self.lone.fits(len(requests[0].prompt_ids), requests[0].max_new_tokens))

    def _plain_greedy(self, sampling: Sampling, constraint, capture: _LogprobCapture | None) -> bool:
        """Greedy with no logits processor (no constraint, no log-probabilities), the fast paths not switched off."""
        return self.fast and not sampling.do_sample and constraint is None and capture is None

    def _decodes_fast(self, sampling: Sampling, constraint, capture: _LogprobCapture | None) -> bool:
        """Greedy with no logits processor, on a model whose head specialist.decode computes exactly."""
        from specialist.decode import fast_path_allowed

        return self._plain_greedy(sampling, constraint, capture) and fast_path_allowed(self.model)

    def _inputs(self, prompts: list[list[int]]) -> dict:
        """generate's inputs for a batch: left-padded rows, a shared prefix's KV cache computed once
        (`prefix_cached_batch`)."""
        import torch

        shared, cache, rest_ids, mask = prefix_cached_batch(self.model, prompts, self.tokenizer.pad_token_id)
        if cache is None:
            return {"input_ids": rest_ids, "attention_mask": mask}
        prefix = torch.tensor([prompts[0][:shared]], device=rest_ids.device).expand(len(prompts), -1)
        return {"input_ids": torch.cat([prefix, rest_ids], dim=1), "attention_mask": mask, "cache": cache}

    def _processors(self, requests: list[Request], sampling: Sampling, constraint,
                    capture: _LogprobCapture | None) -> dict:
        """generate's logits processors, in the order they must run: the log-probabilities are read from the
        model's scores, the constraint masks them, and a seeded draw picks among what is left."""
        from transformers import LogitsProcessorList

        processors: list = [capture] if capture is not None else []
        if constraint is not None:
            processors.append(self._constrained(requests, constraint))
        if sampling.do_sample and sampling.seed is not None:
            processors.append(_SeededDraw(sampling, len(requests), getattr(self.model, "generation_config", None)))
        return {"logits_processor": LogitsProcessorList(processors)} if processors else {}

    def _constrained(self, requests: list[Request], constraint):
        """A processor keeping every row inside `constraint`, each row closing its answer within its own token
        budget."""
        from specialist.constrain import logits_processor

        return logits_processor(constraint, self.tokenizer, len(requests), [len(r.prompt_ids) for r in requests],
                                sorted(self.stop_ids), max_new_tokens=[r.max_new_tokens for r in requests])

    def _finished(self, row: _Row) -> Generation:
        if row.finish is None:
            row.finish = "length"
        if row.request.on_text is not None:
            row._stream()
        return row.result()

    def answer(self, text: str, max_new_tokens: int, sampling: Sampling = GREEDY) -> Generation:
        """One prompt, alone (the export's replay, a notebook)."""
        return self.run([Request(self.encode(text, max_new_tokens=max_new_tokens), max_new_tokens)], sampling)[0]

    def generate(self, prompts: list[str], max_new_tokens: int, sampling: Sampling = GREEDY, batch_size: int = 16,
                 shots: Sequence[tuple[str, str]] = (), label: str = "generating",
                 rows: RowRules = RowRules()) -> list[Generation]:
        """Every prompt's answer, in input order; batched after sorting by length so batches carry little padding.
        `rows.shots`, where given, are each prompt's own examples (retrieval) in place of the shared `shots`;
        `rows.decided` ends an answer early (Request.decided)."""
        row_shots, decided = rows.shots, rows.decided
        if row_shots is None and not shots and self.retrieval is not None:  # one search for the whole list
            row_shots = self.retrieval.prompt_shots(prompts)
        encoded = [self.encode(p, shots if row_shots is None else row_shots[i], max_new_tokens)
                   for i, p in enumerate(prompts)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Generation | None] = [None] * len(prompts)
        with GenerationProgress(label, len(prompts)) as progress:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                answers = self.run([Request(encoded[i], max_new_tokens, decided=decided) for i in batch], sampling)
                for i, answer in zip(batch, answers):
                    results[i] = answer
                progress.advance(len(batch), sum(a.completion_tokens for a in answers))
        return [r for r in results if r is not None]


def encode_prompt(template: PromptTemplate, tokenizer, text: str, shots: Sequence[tuple[str, str]] = (),
                  max_new_tokens: int | None = None) -> list[int]:
    """The template's encoding, with the input shortened to leave room for the answer where the run truncates."""
    budget_of = getattr(template, "prompt_budget", None)
    budget = budget_of(max_new_tokens) if budget_of is not None and max_new_tokens else None
    if budget is None:
        return template.encode_prompt(text, tokenizer, shots)
    return template.encode_prompt(text, tokenizer, shots, budget=budget)


class GenerationProgress:
    """A Rich bar on a terminal; in a log file, a line at least every `every` seconds (rows, tokens/s, ETA)."""

    def __init__(self, label: str, total: int, every: float = 30.0, counted: str = "generated") -> None:
        self.label, self.total, self.every, self.counted = label, total, every, counted
        self.done = self.tokens = 0
        self.started = self.last_line = time.perf_counter()
        self.bar = self.task = None
        self._lines = threading.Lock()
        self._clock = None  # console.QuietLineClock, into a log file

    def __enter__(self) -> GenerationProgress:
        from specialist.console import QuietLineClock, console, progress

        if console.is_terminal:
            self.bar = progress()
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, info="")
        else:  # one batch can outlast `every` (16 retrieval prompts of the demo: 23 s on 2 cores, 37 s on one)
            self._clock = QuietLineClock(self.every, lambda: time.perf_counter() - self.last_line, self._log_line,
                                         "generation-progress").start()
        return self

    def advance(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens
        if self.bar is not None:
            self.bar.advance(self.task, rows)
            self.bar.update(self.task, info=f"{self._rate():.1f} tok/s")
        elif time.perf_counter() - self.last_line >= self.every or self.done == self.total:
            self._log_line()

    def _rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def _log_line(self) -> None:
        from specialist.console import console

        with self._lines:
            elapsed = time.perf_counter() - self.started
            eta = f"{elapsed / self.done * (self.total - self.done):.0f} s" if self.done else "?"
            console.log(f"{self.label}: {self.done}/{self.total} rows, {self._rate():.1f} {self.counted} tok/s, "
                        f"{elapsed:.0f} s elapsed, ETA {eta}")
            self.last_line = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self._clock is not None:
            self._clock.stop()
        if self.bar is not None:
            self.bar.__exit__(*exc)
