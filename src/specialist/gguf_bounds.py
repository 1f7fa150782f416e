"""A GGUF file's header checked against the file's own size before any reader allocates what it claims.

The GGUF readers (gguf-py, and transformers through it) trust the counts in the header: a 27 MB file whose
vocabulary claims 3 million tokens was still loading after two minutes. `check_gguf_header` walks the header with
seeks and fixed-size reads only: every count must fit in the bytes left in the file (each string takes at least
its 8-byte length, each array item at least its item size), and the vocabulary, metadata and tensor counts must
stay within what real models have. It refuses anything else with a ModelError naming the file and the count.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from specialist.errors import ModelError

MAX_VOCABULARY = 1 << 20  # the largest real vocabularies are about 260k tokens (Gemma 3: 262,144)
MAX_METADATA_KEYS = 100_000
MAX_TENSORS = 1_000_000
MAX_KEY_BYTES = 65_536
MAX_STRING_BYTES = 1 << 26  # a chat template or a licence text: tens of KB in real files
# GGUF value types: their fixed sizes (8 = string, 9 = array: variable)
FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


class _Header:
    def __init__(self, path: Path, view) -> None:
        self.path, self.view, self.at = path, view, 0

    def read(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size, "the header")
        value = struct.unpack_from(fmt, self.view, self.at)[0]
        self.at += size
        return value

    def need(self, size: int, what: str) -> None:
        if size < 0 or self.at + size > len(self.view):
            raise ModelError(f"{self.path}: {what} claims {size:,} bytes where {len(self.view) - self.at:,} are left "
                             "in the file", hint="the file is truncated or not a GGUF model: download it again")

    def string(self, limit: int, what: str) -> str:
        length = self.read("<Q")
        if length > limit:
            raise ModelError(f"{self.path}: {what} is {length:,} bytes long (at most {limit:,})",
                             hint="not a GGUF model this project can read")
        self.need(length, what)
        text = bytes(self.view[self.at:self.at + length]).decode("utf-8", errors="replace")
        self.at += length
        return text

    def skip_string(self, what: str) -> None:
        length = self.read("<Q")
        if length > MAX_STRING_BYTES:
            raise ModelError(f"{self.path}: {what} holds a string of {length:,} bytes",
                             hint="not a GGUF model this project can read")
        self.need(length, what)
        self.at += length


def check_gguf_header(path: Path) -> None:
    """Refuse (ModelError) a GGUF file whose header claims more than the file holds or than real models have."""
    path = Path(path)
    with path.open("rb") as handle:
        if path.stat().st_size < 24:
            raise ModelError(f"{path}: {path.stat().st_size} bytes is too short for a GGUF file",
                             hint="download or assemble it again")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            header = _Header(path, view)
            if bytes(view[:4]) != b"GGUF":
                raise ModelError(f"{path}: not a GGUF file (no GGUF magic)", hint="give a .gguf model file")
            header.at = 4
            header.read("<I")  # version
            tensors, keys = header.read("<Q"), header.read("<Q")
            _refuse_over(path, "tensors", tensors, MAX_TENSORS)
            _refuse_over(path, "metadata keys", keys, MAX_METADATA_KEYS)
            for _ in range(keys):
                key = header.string(MAX_KEY_BYTES, "a metadata key")
                _skip_value(header, header.read("<I"), key)


def _skip_value(header: _Header, kind: int, key: str) -> None:
    if kind in FIXED_SIZES:
        header.need(FIXED_SIZES[kind], key)
        header.at += FIXED_SIZES[kind]
    elif kind == STRING:
        header.skip_string(key)
    elif kind == ARRAY:
        _skip_array(header, key)
    else:
        raise ModelError(f"{header.path}: metadata {key!r} has an unknown value type {kind}",
                         hint="not a GGUF model this project can read")


def _skip_array(header: _Header, key: str) -> None:
    item, count = header.read("<I"), header.read("<Q")
    if key in VOCABULARY_KEYS:
        _refuse_over(header.path, f"vocabulary entries ({key})", count, MAX_VOCABULARY)
    smallest = FIXED_SIZES.get(item, 8)  # a string takes at least its 8-byte length
    header.need(count * smallest, f"{key} ({count:,} items)")
    if item in FIXED_SIZES:
        header.at += count * FIXED_SIZES[item]
    elif item == STRING:
        for _ in range(count):
            header.skip_string(key)
    else:
        raise ModelError(f"{header.path}: metadata {key!r} is an array of type {item}, which models do not use",
                         hint="not a GGUF model this project can read")


def _refuse_over(path: Path, what: str, count: int, limit: int) -> None:
    if count > limit:
        raise ModelError(f"{path}: the header claims {count:,} {what}; at most {limit:,} are read",
                         hint="the file is corrupt or not a model: download or assemble it again")
