"""Greedy decoding without transformers' `generate` loop, for the engine's commonest case: greedy, no logits
processor (no constraint, no log-probabilities, no seeded draw).

Three things make it faster, and none changes which token is picked:

- one loop of our own (prefill, then one decoder call per token), with the rows that have ended dropped from the
  batch (their cache rows too), so a short answer stops costing work at once, and none of generate's per-token
  machinery (its logits processors, stopping criteria, model-kwargs bookkeeping) runs;
- the output layer, most of a small model's per-token work (Gemma 3 270M: 262144 x 640, 63% of its weights), is
  read in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), half the bytes of float32.
  bfloat16 logits are only approximate, so they only pick candidates: every token whose bfloat16 logit is within
  a proven error bound of the best one is re-scored exactly in float32, and the exact best is the token. The
  argmax is float32's whatever the rounding (`GreedyHead.pick`). Where the CPU lacks the instructions the layer
  stays float32 (bfloat16 there is emulated, slower than float32). The bfloat16 copy is held beside the float32
  weight (Gemma 3 270M: 320 MiB more), once per weight, shared by the arms on one base;
- a lone row (one request at a time: serve, the golden replay) checks several tokens guessed from its own context
  per decoder call (`lookup_loop`): at batch 1 every call reads all the weights for one token, so checking a few
  costs about what one does, and the answer's tokens are still the model's own picks one by one.

The logits are float32's up to the order of the sums, as between two batch sizes of `generate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from specialist import onednn
from specialist.onednn import held_copy

# the architectures whose causal-LM head is exactly `lm_head(final hidden state)`: no logit scale, no soft-capping
# (a model outside this list, or one whose config soft-caps, decodes through generate as before)
PLAIN_HEAD_MODEL_TYPES = {"llama", "gemma", "gemma3_text", "qwen2", "qwen3", "mistral", "phi3", "smollm3"}
_UNIT_ROUNDOFF_BF16 = 2.0 ** -8  # bfloat16 keeps 8 significant bits
_UNIT_ROUNDOFF_FP32 = 2.0 ** -24
# candidates re-scored exactly per row (cheap: 128 rows of the weight); a row whose band admits more is scored in
# full float32 (rare: bench/ saw at most about 100 in the band with a looser bound)
CANDIDATES = 128


def cpu_multiplies_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively and torch may use it: the avx512_bf16 or amx_bf16 flag (of
    `cpuinfo`, else /proc/cpuinfo), torch's kernels at AVX-512, and no ISA cap below bfloat16 in the environment
    (the AVX2-only emulation of bench/)."""
    try:
        flags = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return cap == "ALL" or "BF16" in cap or "AMX" in cap


def fast_path_allowed(model) -> bool:
    """Whether `model` (a PEFT wrapper or a plain causal LM) has a plain head we may compute ourselves, and a
    generation config that adds no logits processor of its own to greedy decoding."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return (config is not None and getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
            and not getattr(config, "final_logit_softcapping", None) and not getattr(config, "logit_scale", None)
            and type(head) is torch.nn.Linear and head.bias is None and hasattr(inner, "get_decoder")
            and head.weight.device.type == "cpu" and head.weight.dtype == torch.float32
            and not _processors_in(getattr(inner, "generation_config", None)))


# generation-config settings that make generate change greedy logits (penalties, banned or forced tokens)
_PROCESSOR_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                       "begin_suppress_tokens", "min_length", "min_new_tokens", "forced_bos_token_id",
                       "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty",
                       "encoder_repetition_penalty", "encoder_no_repeat_ngram_size", "watermarking_config")


def _processors_in(generation_config) -> bool:
    if generation_config is None:
        return False
    values = [getattr(generation_config, name, None) for name in _PROCESSOR_SETTINGS]
    return any(value not in (None, 0, 1.0, [], {}) for value in values)


class GreedyHead:
    """argmax over the vocabulary of `hidden @ weight.T`, float32's, read in bfloat16 where that is native.

    The bound: a bfloat16 logit differs from the exact one by at most A_j + u * |logit_j| / (1 - u), where
    A_j = (2u + u^2 + n*v*(1+u)^2) * ||w_j|| * ||h|| (rounding w and h to bfloat16, then n float32 additions in any
    order; Cauchy-Schwarz for sum |w_ij||h_i|) and the u term is the product's own rounding to bfloat16;
    u = 2^-8, v = 2^-24. float32's logits (the plain path's, and our re-scoring) are themselves off the exact ones
    by up to n*v*||w_j||*||h||: float32's best is within 2 * (bound + that) below the best bfloat16 logit, and a
    quarter more is added for margin. A token outside that band cannot be float32's best.
    (On Gemma 3 270M the band holds 1 to about 50 tokens.)"""

    def __init__(self, weight: torch.Tensor, bf16: bool) -> None:
        """`weight`: the layer's parameter itself, which its derived copies are held by."""
        self.parameter, self.weight = weight, weight.detach()
        self.low, self.largest_row = held_copy(weight, "greedy-head", _low_copy) if bf16 else (None, 0.0)
        u, v, n = _UNIT_ROUNDOFF_BF16, _UNIT_ROUNDOFF_FP32, weight.shape[1]
        self.relative = 1.25 * (2 * u + u * u + n * v * (1 + u) ** 2 + n * v)
        self.rounding = 1.25 * u / (1 - u)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of every token (through oneDNN's packed copy of the weight inside
        onednn.packed_linears: 4.2x F.linear at 16 rows, 2 cores, bench/linear_kernels.py)."""
        return onednn.head_product(hidden, self.parameter)

    def pick(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row of `hidden` (rows x hidden size, float32)."""
        if self.low is None:
            return self.logits(hidden).argmax(dim=-1)
        low = hidden.to(torch.bfloat16)
        logits = onednn.product(low, self.low) if self.low.is_mkldnn else F.linear(low, self.low)
        top = logits.topk(CANDIDATES, dim=-1)  # in bfloat16: one pass
        values = top.values.float()
        best = values[:, 0]
        # a candidate's |logit| is at most |best| + the band, so the rounding term is bounded through the band
        band = 2 * (self.relative * self.largest_row * hidden.norm(dim=-1) + self.rounding * best.abs())
        band = band / (1 - 2 * self.rounding)
        covered = values[:, -1] < best - band  # every token in the band is among the candidates
        exact = torch.einsum("bkh,bh->bk", self.weight[top.indices], hidden)
        picks = _first_best(exact, top.indices)
        for row in (~covered).nonzero().flatten().tolist():  # the band is wider than the candidates: score all
            picks[row] = F.linear(hidden[row], self.weight).argmax()  # (rare: no float32 packing for it)
        return picks


def _low_copy(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The output layer's bfloat16 copy (laid out for oneDNN where this torch has it: 1.55x F.linear's bfloat16 at
    16 rows, 1.59x at 1, 2 cores, bench/linear_kernels.py) and its largest row norm."""
    low = weight.to(torch.bfloat16)
    if onednn.available():
        try:
            low = onednn.pack(low)
        except RuntimeError:  # oneDNN packs bfloat16 only with AVX512-BW/VL/DQ or AVX-NE-CONVERT: the plain copy
            pass
    return low, float(weight.norm(dim=1).max())


def _first_best(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the id of the highest score; among equal scores the lowest id, as argmax over the vocabulary
    would pick."""
    best = scores.max(dim=-1, keepdim=True).values
    vocabulary = torch.iinfo(ids.dtype).max
    return torch.where(scores == best, ids, torch.full_like(ids, vocabulary)).min(dim=-1).values


def greedy_head(model) -> GreedyHead:
    """The model's output layer as a GreedyHead; its bfloat16 copy (or float32 packing) is made once per weight
    (again if the weight is changed in place) and shared by every engine on it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = inner.get_output_embeddings().weight
    # inside a training a trainable head's copy could go stale unseen (onednn.holds_copies): float32 there
    return GreedyHead(weight, cpu_multiplies_bf16() and onednn.holds_copies(weight))


def greedy_decode(model, inputs: dict, take, lookup: int = 0) -> None:
    """Greedy decoding of a batch until `take` has ended every row.

    `inputs` are the engine's: left-padded `input_ids` and `attention_mask`, and a shared prefix's `cache` whose
    tokens lead every row. `take(rows, tokens)` is given the rows still going (their indices in the batch) and
    each one's new token, and answers which of them have ended; those leave the batch, cache rows and all.
    Positions and masks are generate's (positions count the mask's ones; an all-ones mask is dropped).
    A single row with `lookup` > 0 drafts up to that many tokens a step from its own context (`lookup_loop`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), greedy_head(model)
    ids, mask, cache = inputs["input_ids"], inputs["attention_mask"], inputs.get("cache")
    past = cache.get_seq_length() if cache is not None else 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    padded = not bool((mask == 1).all())
    out = decoder(input_ids=ids[:, past:], attention_mask=mask if padded else None,
                  position_ids=positions[:, past:], cache=cache, use_cache=True)
    tokens = head.pick(out.last_hidden_state[:, -1])
    if lookup and ids.shape[0] == 1 and not padded:
        window = getattr(inner.config, "sliding_window", None) or float("inf")
        lookup_loop(decoder, head, out.cache, ids[0].tolist() + tokens.tolist(), take, (lookup, window))
    else:
        batch_loop(decoder, head, (out.cache, mask if padded else None, positions[:, -1:]), tokens, take)


def batch_loop(decoder, head: GreedyHead, state: tuple, tokens: torch.Tensor, take) -> None:
    """One decoder call per token for the rows still going; `state` is (cache, mask or None, last positions)."""
    cache, mask, position = state
    rows = list(range(tokens.shape[0]))
    while True:
        done = take(rows, tokens.tolist())
        if all(done):
            return
        if any(done):  # ended rows leave the batch
            keep = torch.tensor([n for n, ended in enumerate(done) if not ended])
            cache.batch_select_indices(keep)
            rows, tokens, position = [rows[n] for n in keep.tolist()], tokens[keep], position[keep]
            mask = mask[keep] if mask is not None else None
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        position = position + 1
        out = decoder(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, cache=cache,
                      use_cache=True)
        tokens = head.pick(out.last_hidden_state[:, -1])


def lookup_loop(decoder, head: GreedyHead, cache, context: list[int], take, limits: tuple) -> None:
    """One row, greedy, with prompt-lookup drafts: the tokens that followed the latest earlier occurrence of the
    context's last few tokens are guessed as the next ones, and one decoder call checks them all at once (a
    batch-1 step reads every weight for one token; checking several costs about the same). The model's own pick
    at each drafted position is taken up to the first guess it disagrees with, plus that pick: exactly the tokens
    one-at-a-time decoding gives, several per call when the answer copies its input (a field, a name, a
    template). The cache keeps only the checked tokens. `limits` is (draft length, the model's sliding window:
    no draft reaches it, where a cache can no longer be cut back)."""
    most, window = limits
    while True:
        if take([0], [context[-1]])[0]:
            return
        fed = len(context) - 1  # every token but the newest is in the cache
        draft = propose(context, most) if fed + most + 1 < window else []
        step = torch.tensor([context[-1:] + draft])
        out = decoder(input_ids=step, position_ids=torch.arange(fed, fed + step.shape[1])[None], cache=cache,
                      use_cache=True)
        picks = head.pick(out.last_hidden_state[0]).tolist()
        agreed = 0
        while agreed < len(draft) and picks[agreed] == draft[agreed]:
            agreed += 1
        if agreed < len(draft):
            cache.crop(-(len(draft) - agreed))  # the guesses after the first wrong one were never the answer
        for token in picks[:agreed]:  # the agreed guesses are tokens of the answer: the row takes them in turn
            context.append(token)
            if take([0], [token])[0]:
                return
        context.append(picks[agreed])


def propose(context: list[int], most: int, longest: int = 3) -> list[int]:
    """Up to `most` tokens that followed the latest earlier occurrence of the context's last `longest` (else
    fewer, down to 1) tokens; none when they never occurred before."""
    for size in range(min(longest, len(context) - 1), 0, -1):
        tail = context[-size:]
        for start in range(len(context) - size - 1, -1, -1):
            if context[start:start + size] == tail:
                return context[start + size:start + size + most]
    return []
