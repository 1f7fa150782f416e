"""Run a GGUF file in llama.cpp (through llama-cpp-python's C API): tokenize, greedy answers, logits, quantize,
and a tokens/s measurement, one prompt at a time or several sequences in one batch.

Everything here decodes greedily by taking the argmax of llama.cpp's own logits (no sampler), so an answer is
what llama.cpp computes for the file and nothing else, and it can be compared token for token with the HF model.
Loading is quiet (what llama.cpp logs is collected, and shown only in the error when a load fails) and the
threads are configurable (None: llama.cpp's default, all cores).

llama-cpp-python is optional: `llama_cpp_available()` says whether it is installed and every entry point raises
a ConfigError naming the extra to install when it is not.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from specialist.errors import ConfigError, ModelError

_backend_ready = False
# llama.cpp's log callback is one per process: `_llama_log` blocks take turns on it (serve loads and frees each
# arm's file from that arm's own thread), else one block restores the callback of another that has ended, and
# llama.cpp's next line calls into freed memory. Reentrant: a LoneGreedy freed by the garbage collector inside a
# block closes in a block of its own
_LOG_LOCK = threading.RLock()
INSTALL_HINT = "pip install 'specialist[gguf]' (llama-cpp-python; see the Makefile for CMAKE_ARGS that build it fast)"


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_llama_cpp(what: str = "running a GGUF file in llama.cpp"):
    """The `llama_cpp` module, or a ConfigError saying what needs it and how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ConfigError(f"{what} needs llama-cpp-python, which is not installed ({error})",
                          hint=INSTALL_HINT) from None
    global _backend_ready
    if not _backend_ready:  # llama.cpp asks for this once per process, before any model
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


class LlamaRunner:
    """One llama.cpp model and context: tokenize, decode batches of (token, position, sequence), read logits.

    `n_ctx` is the context for all `n_seq` sequences together (llama.cpp gives each its share).
    """

    def __init__(self, path: Path | str, n_ctx: int = 2048, n_seq: int = 1, threads: int | None = None,
                 vocab_only: bool = False, lora: Path | str | None = None) -> None:
        lib = self.lib = require_llama_cpp()
        path = self.path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file", hint="export one with `specialist export --format gguf`")
        model_params = lib.llama_model_default_params()
        model_params.vocab_only = vocab_only
        self.ctx = None
        with _llama_log() as log:
            self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
            if self.model and not vocab_only:
                self._init_context(n_ctx, n_seq, threads)
        if not self.model:
            raise ModelError(f"{path}: llama.cpp could not load this GGUF file: {_tail(log)}",
                             hint="re-export it with `specialist export --format gguf`")
        if not vocab_only and not self.ctx:
            lib.llama_model_free(self.model)
            self.model = None
            raise ModelError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens: {_tail(log)}",
                             hint="use a smaller context")
        if lora is not None and not vocab_only:
            self._attach_lora(Path(lora))
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def _init_context(self, n_ctx: int, n_seq: int, threads: int | None) -> None:
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, min(n_ctx, 512)
        params.n_seq_max = n_seq
        if threads:
            params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if self.ctx:
            self.n_ctx, self.n_seq = n_ctx, n_seq
            self._batch = lib.llama_batch_init(n_ctx, 0, 1)

    def _attach_lora(self, path: Path) -> None:
        """Apply a GGUF LoRA adapter (llama.cpp's `--lora FILE`) at scale 1 to every decode of this context."""
        lib = self.lib
        if not path.is_file():
            self.close()
            raise ModelError(f"{path}: no such GGUF LoRA adapter", hint="export one with `specialist export --format gguf`")
        with _llama_log() as log:
            adapter = lib.llama_adapter_lora_init(self.model, str(path).encode())
            status = lib.llama_set_adapters_lora(self.ctx, (lib.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                                 (ctypes.c_float * 1)(1.0)) if adapter else -1
        if status != 0:
            self.close()  # the adapter, if any, is freed with the model
            raise ModelError(f"{path}: llama.cpp could not apply this LoRA adapter to {self.path}: {_tail(log)}",
                             hint="the adapter must come from an export of a run on this base model")

    def close(self) -> None:
        with _llama_log():  # freeing logs buffer sizes
            if getattr(self, "ctx", None):
                self.lib.llama_batch_free(self._batch)
                self.lib.llama_free(self.ctx)
                self.ctx = None
            if getattr(self, "model", None):
                self.lib.llama_model_free(self.model)
                self.model = None

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of `text` from the file's vocabulary (BOS added as the file says)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buffer = (self.lib.llama_token * size)()
        count = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, size, add_special, parse_special)
        if count < 0:  # the buffer was short: -count is what it needs
            size = -count
            buffer = (self.lib.llama_token * size)()
            count = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, size, add_special, parse_special)
        return list(buffer[:count])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence id, wants logits) entries as one llama.cpp batch."""
        if len(entries) > self.n_ctx:
            raise ModelError(f"{len(entries)} tokens do not fit a llama.cpp batch of {self.n_ctx}",
                             hint="use shorter prompts or a larger n_ctx")
        batch = self._batch
        for i, (token, position, sequence, wants_logits) in enumerate(entries):
            batch.token[i], batch.pos[i] = token, position
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, sequence
            batch.logits[i] = wants_logits
        batch.n_tokens = len(entries)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise ModelError(f"llama.cpp could not decode a batch of {len(entries)} tokens (status {status})",
                             hint="the context may be full: use shorter prompts, fewer new tokens or a larger n_ctx")

    def logits(self, index: int) -> np.ndarray:
        """The logits of the `index`-th entry of the last batch (a copy)."""
        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                     shape=(self.n_vocab,)).copy()


class LoneGreedy:
    """llama.cpp answering one greedy request at a time from a GGUF export, for `Engine` (its `lone` runtime).

    At batch 1 every token reads all of the weights, and llama.cpp's kernels read them faster than torch's on a
    CPU (bench/generation.py: f16 at 45 tokens/s against our 14 on 2 cores, where batched the two are level), so
    `serve` answers a request that arrives alone here and batches through torch. The tokens are fed to the
    engine's own row (`take`), so stop tokens, stop strings, cancellation, streaming and the text are the
    engine's rules, not llama.cpp's. The file is loaded at the first request, and the context keeps the previous
    prompt's cache: a request that starts with the same tokens (the instruction) computes only the rest.
    """

    def __init__(self, gguf: Path | str, lora: Path | str | None = None, n_ctx: int = 4096,
                 threads: int | None = None) -> None:
        self.gguf, self.lora, self.n_ctx, self.threads = Path(gguf), lora, n_ctx, threads
        self._runner: LlamaRunner | None = None
        self._cached: list[int] = []  # the tokens whose keys and values the context holds, in order

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return prompt_tokens + max_new_tokens <= self.n_ctx

    def runner(self) -> LlamaRunner:
        if self._runner is None:
            import torch

            self._runner = LlamaRunner(self.gguf, n_ctx=self.n_ctx, threads=self.threads or torch.get_num_threads(),
                                       lora=self.lora)
        return self._runner

    def decode(self, prompt_ids: Sequence[int], take) -> None:
        """Greedy tokens after `prompt_ids`, each handed to `take(token)` until it returns True (the row ended)."""
        runner = self.runner()
        prompt = _prompt_ids(runner, [prompt_ids], add_special=False)[0]
        try:
            position = self._reuse_prefix(runner, prompt)
            runner.decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt[position:], start=position)])
            # the list grows by each token once llama.cpp holds it; any failure below empties the cache's record
            self._cached, index = prompt, len(prompt) - 1 - position
            while True:
                token = int(np.argmax(runner.logits(index)))
                if take(token):
                    return
                runner.decode([(token, len(prompt), 0, True)])
                prompt.append(token)
                index = 0
        except BaseException:
            self._cached = []  # a failed decode leaves the cache unknown: the next request starts afresh
            raise

    def _reuse_prefix(self, runner: LlamaRunner, prompt: list[int]) -> int:
        """How many of `prompt`'s first tokens the context already holds (at least one token is left to compute,
        whose logits pick the first answer token); the rest of the cache is dropped. 0 where llama.cpp cannot
        drop a tail (a sliding-window cache may not): the context is cleared."""
        shared = 0
        limit = min(len(self._cached), len(prompt) - 1)
        while shared < limit and self._cached[shared] == prompt[shared]:
            shared += 1
        lib = runner.lib
        memory = lib.llama_get_memory(runner.ctx)
        window = lib.llama_model_n_swa(runner.model)
        # a sliding-window layer keeps only the last `window` positions: the kept prefix is usable only if the
        # positions its next token attends to are still held (llama.cpp's server checks the same). Checked before
        # the tail is dropped: dropping it can empty the sliding-window cache, whose lowest position then reads -1
        if (shared == 0 or (window > 0 and lib.llama_memory_seq_pos_min(memory, 0) > max(0, shared - window))
                or not lib.llama_memory_seq_rm(memory, 0, shared, -1)):
            runner.clear()
            return 0
        return shared

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner, self._cached = None, []

    def __del__(self) -> None:  # an arm swapped out of `serve` frees llama.cpp's memory with it
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the library may be gone already
            pass


def lone_runtime(export, choice: str) -> LoneGreedy | None:
    """What answers a GGUF export's (an ExportFolder's) lone greedy requests: llama.cpp on the export's own file
    ("auto" where llama-cpp-python is installed; "llama.cpp" requires it), or None: torch, as batches do."""
    if choice == "torch" or (choice == "auto" and not llama_cpp_available()):
        return None
    require_llama_cpp("answering a GGUF export's lone requests in llama.cpp")
    return LoneGreedy(*export.gguf_files())


def load_llama(path: Path | str, n_ctx: int = 2048, n_seq: int = 1, threads: int | None = None) -> LlamaRunner:
    """A `LlamaRunner` on `path` (close it, or use it in a `with`)."""
    return LlamaRunner(path, n_ctx=n_ctx, n_seq=n_seq, threads=threads)


def tokenize(gguf_path: Path | str, text: str, add_special: bool = True) -> list[int]:
    """llama.cpp's tokenization of `text` with the vocabulary stored in the file."""
    with LlamaRunner(gguf_path, vocab_only=True) as runner:
        return runner.tokenize(text, add_special=add_special)


def _prompt_ids(runner: LlamaRunner, prompts: Sequence[Sequence[int] | str], add_special: bool) -> list[list[int]]:
    ids = [runner.tokenize(p, add_special=add_special) if isinstance(p, str) else [int(t) for t in p]
           for p in prompts]
    for n, prompt in enumerate(ids):
        if not prompt:
            raise ConfigError(f"prompt {n} is empty", hint="give at least one token")
        bad = [t for t in prompt if not 0 <= t < runner.n_vocab]
        if bad:
            raise ConfigError(f"prompt {n} has token ids outside the vocabulary of {runner.n_vocab}: {bad[:5]}",
                              hint="tokenize with the exported model's tokenizer")
    return ids


def greedy_answers(gguf_path: Path | str, prompts: Sequence[Sequence[int] | str], max_new_tokens: int,
                   stop_ids: Sequence[int] | None = None, threads: int | None = None,
                   add_special: bool = True, lora: Path | str | None = None) -> list[tuple[list[int], bool]]:
    """Greedy answers of llama.cpp for each prompt (token ids, or text llama.cpp tokenizes itself), one at a time.

    Each answer is (new token ids, whether a stop token ended it); a stop token is kept as the last id.
    `stop_ids` default to llama.cpp's end-of-generation tokens of the file. `add_special` applies to text
    prompts only: whether llama.cpp adds BOS as the file says (False when the text already holds it). `lora`: a
    GGUF LoRA adapter applied on top of the file.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if not prompts:
        return []
    with LlamaRunner(gguf_path, vocab_only=True) as vocabulary:
        ids = _prompt_ids(vocabulary, prompts, add_special)
    n_ctx = max(64, max((len(p) for p in ids), default=1) + max_new_tokens)
    with LlamaRunner(gguf_path, n_ctx=n_ctx, threads=threads, lora=lora) as runner:
        stops = set(stop_ids) if stop_ids is not None else None
        return [_generate(runner, [prompt], max_new_tokens, stops)[0] for prompt in ids]


def _generate(runner: LlamaRunner, prompts: list[list[int]], max_new_tokens: int, stops: set[int] | None,
              stop_early: bool = True) -> list[tuple[list[int], bool]]:
    """Greedy decoding of `prompts` as parallel sequences of one context: one batch per step."""
    runner.clear()
    entries, last = [], []
    for sequence, prompt in enumerate(prompts):
        entries += [(token, position, sequence, position == len(prompt) - 1) for position, token in enumerate(prompt)]
        last.append(len(entries) - 1)
    runner.decode(entries)
    answers: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        step = []
        for sequence, index in zip(active, last, strict=True):
            token = int(np.argmax(runner.logits(index)))
            answers[sequence].append(token)
            if stop_early and (token in stops if stops is not None else runner.is_end_of_generation(token)):
                stopped[sequence] = True
            else:
                step.append((token, len(prompts[sequence]) + len(answers[sequence]) - 1, sequence, True))
        if not step or len(answers[active[0]]) == max_new_tokens:
            break
        runner.decode(step)
        active, last = [sequence for _, _, sequence, _ in step], list(range(len(step)))
    return list(zip(answers, stopped, strict=True))


def next_token_logits(gguf_path: Path | str, prompts: Sequence[Sequence[int]],
                      threads: int | None = None, lora: Path | str | None = None) -> list[np.ndarray]:
    """llama.cpp's logits for the token after each prompt (token ids), to compare with the HF model's."""
    if not prompts:
        return []
    with LlamaRunner(gguf_path, vocab_only=True) as vocabulary:
        ids = _prompt_ids(vocabulary, prompts, True)
    with LlamaRunner(gguf_path, n_ctx=max(64, max(len(p) for p in ids)), threads=threads, lora=lora) as runner:
        out = []
        for prompt in ids:
            runner.clear()
            runner.decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            out.append(runner.logits(len(prompt) - 1))
        return out


K_QUANT_FILE_TYPES = {"q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M", "q4_k_m": "MOSTLY_Q4_K_M"}


def k_quant_file_type(qtype: str) -> int:
    """The `general.file_type` (gguf.LlamaFileType) of a k-quant llama.cpp's quantizer writes."""
    import gguf

    if qtype not in K_QUANT_FILE_TYPES:
        raise ConfigError(f"llama.cpp quantization to {qtype!r} is not offered here",
                          hint=f"use one of {', '.join(K_QUANT_FILE_TYPES)}")
    return int(gguf.LlamaFileType[K_QUANT_FILE_TYPES[qtype]])


def quantize_gguf(source: Path, target: Path, qtype: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (what `llama-quantize` runs) from an f16/f32 GGUF to q4_k_m, q5_k_m or q6_k."""
    lib = require_llama_cpp(f"GGUF type {qtype}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = k_quant_file_type(qtype)
    params.nthread = threads or 0  # 0: all cores
    with _llama_log() as log:
        status = lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise ModelError(f"llama.cpp could not quantize {source} to {qtype} (status {status}): {_tail(log)}",
                         hint="check the disk space and that the source is an f16/f32 GGUF")


def _tail(log: list[str]) -> str:
    return "".join(log)[-600:].strip() or "(llama.cpp said nothing)"


@contextlib.contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect what llama.cpp logs during the block (and print none of it): tensor lists, fallback notes and the
    reason a load failed, which the caller puts in its error. The callback in place before is restored after.

    (llama-cpp-python's own callback filters by an older numbering of ggml's log levels, so it hides errors and
    shows notes; collecting everything here sidesteps it.)
    """
    lib = require_llama_cpp()
    lines: list[str] = []

    def collect(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    callback = lib.llama_log_callback(collect)  # kept referenced until restored below
    with _LOG_LOCK:
        previous, previous_data = lib.llama_log_callback(), ctypes.c_void_p()
        lib.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
        lib.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            lib.llama_log_set(previous, previous_data)


def measure_throughput(gguf_path: Path | str, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       parallel: int = 4, threads: int | None = None,
                       lora: Path | str | None = None) -> dict[str, Any]:
    """Greedy tokens/s of llama.cpp on `prompts`, one prompt at a time and `parallel` sequences per batch.

    Every prompt generates exactly `max_new_tokens` (end-of-generation does not stop it) so both modes do the
    same work; prefill time is included. Returns {"one_at_a_time": {...}, "batched": {...}} with tokens,
    seconds and tokens_per_s, the share of batched answers equal to the one-at-a-time ones, and the one-at-a-time
    answers (new token ids).
    """
    if parallel < 1 or max_new_tokens < 1 or not prompts:
        raise ConfigError(f"measuring needs prompts, parallel >= 1 and max_new_tokens >= 1; got {len(prompts)} "
                          f"prompts, parallel={parallel}, max_new_tokens={max_new_tokens}")
    with LlamaRunner(gguf_path, vocab_only=True) as vocabulary:
        ids = _prompt_ids(vocabulary, prompts, True)
    per_sequence = -(-(max(len(p) for p in ids) + max_new_tokens) // 256) * 256  # llama.cpp pads to 256
    with LlamaRunner(gguf_path, n_ctx=per_sequence, threads=threads, lora=lora) as runner:
        single, single_s = _timed(lambda: [_generate(runner, [p], max_new_tokens, None, False)[0] for p in ids])
    with LlamaRunner(gguf_path, n_ctx=per_sequence * parallel, n_seq=parallel, threads=threads, lora=lora) as runner:
        groups = [ids[i:i + parallel] for i in range(0, len(ids), parallel)]
        batched, batched_s = _timed(
            lambda: [a for group in groups for a in _generate(runner, group, max_new_tokens, None, False)])
    tokens = sum(len(answer) for answer, _ in single)
    same = sum(a == b for (a, _), (b, _) in zip(single, batched, strict=True))
    return {"prompts": len(ids), "max_new_tokens": max_new_tokens, "parallel": parallel,
            "one_at_a_time": _rate(tokens, single_s),
            "batched": _rate(sum(len(answer) for answer, _ in batched), batched_s),
            "batched_equal_share": same / max(1, len(ids)),
            "answers": [answer for answer, _ in single]}  # token ids, to compare with another engine's


def _timed(work):
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def _rate(tokens: int, seconds: float) -> dict[str, float]:
    return {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
