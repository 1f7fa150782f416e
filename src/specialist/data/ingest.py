"""First pass of `prepare`: rows -> validated, cleaned examples in a spool file plus small per-row arrays.

Each block of rows is validated, cleaned, keyed for exact dedupe and MinHashed by a RowWorker. Large JSONL files
(the common case for big data) are parsed by a pool of worker processes, one per core, with blocks handed back in
file order so "keep the first duplicate" still means the first in the file; other formats and small files run
the same worker in this process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from specialist.data.clean import Scrubber, normalize_text, scrub_kinds
from specialist.data.dedupe import MinHasher, exact_key
from specialist.data.load import Example
from specialist.data.readers import RawRow, iter_rows, jsonl_line_chunks, parse_jsonl_line
from specialist.data.shapes import Shape, detect_shape, row_to_example

_BLOCK = 8192
_PARALLEL_FROM_BYTES = 16 * 2**20  # below this, starting worker processes costs more than it saves
_FIRST_LINES = 5


@dataclass
class Problems:
    counts: Counter = field(default_factory=Counter)
    first: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, kind: str, line: int, message: str) -> None:
        self.counts[kind] += 1
        shown = self.first.setdefault(kind, [])
        if len(shown) < _FIRST_LINES:
            shown.append({"line": line, "problem": message})

    def as_report(self) -> dict[str, Any]:
        return {kind: {"count": n, "first": self.first[kind]} for kind, n in self.counts.most_common()}


@dataclass
class Rows:
    """Per-row arrays for the rows that passed validation, in file order; the text lives in the spool."""

    offsets: array = field(default_factory=lambda: array("q", [0]))
    lines: array = field(default_factory=lambda: array("q"))
    keys: array = field(default_factory=lambda: array("Q"))
    labels: array = field(default_factory=lambda: array("i"))
    groups: array = field(default_factory=lambda: array("q"))
    label_names: dict[str, int] = field(default_factory=dict)
    group_names: dict[str, int] = field(default_factory=dict)
    signature_width: int = 0  # MinHash values a row in the signature file (0: none computed)

    def __len__(self) -> int:
        return len(self.lines)


@dataclass
class Ingested:
    rows: Rows
    shape: Shape | None
    read: int
    changed: int
    scrubbed: Counter
    problems: Problems


@dataclass
class _Block:
    """What a worker hands back for one block of rows."""

    blob: bytes = b""
    sizes: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)
    problems: list[tuple[str, int, str]] = field(default_factory=list)
    read: int = 0
    changed: int = 0
    scrubbed: Counter = field(default_factory=Counter)
    signatures: np.ndarray | None = None


class RowWorker:
    def __init__(self, data, shape: Shape, method_kind: str) -> None:
        self.data, self.shape = data, shape
        self.keep_rejected = method_kind == "dpo"
        self.normalize = data.clean.normalize
        self.scrub_kinds = scrub_kinds(data.clean.scrub)
        self.hasher = MinHasher(data.dedupe.num_perm, data.dedupe.shingle_words) \
            if data.dedupe.near or data.dedupe.leakage else None

    def jsonl_block(self, block: tuple[int, list[bytes]]) -> _Block:
        first, raw_lines = block
        parsed = (parse_jsonl_line(first + n, raw) for n, raw in enumerate(raw_lines))
        return self.rows_block([row for row in parsed if row is not None])

    def rows_block(self, raws: list[RawRow]) -> _Block:
        out, parts, texts = _Block(read=len(raws)), [], []
        scrubber = Scrubber(self.scrub_kinds, self.data.clean.placeholder)
        for raw in raws:
            if raw.row is None:
                out.problems.append((raw.kind, raw.line, raw.problem))
                continue
            example, kind, message = row_to_example(raw.row, raw.line, self.shape, self.data, self.keep_rejected)
            if example is None:
                out.problems.append((kind, raw.line, message))
                continue
            cleaned = self._clean(example, scrubber)
            if cleaned is not example:
                out.changed += cleaned != example
            if not cleaned.completion or (self.shape.name != "text" and not cleaned.prompt):
                out.problems.append(("empty_field", raw.line, "empty after cleaning"))
                continue
            encoded = _spool_line(cleaned)
            parts.append(encoded)
            out.sizes.append(len(encoded))
            out.lines.append(cleaned.line)
            out.keys.append(exact_key(cleaned.prompt, cleaned.completion, cleaned.rejected))
            out.labels.append(cleaned.label)
            out.groups.append(cleaned.group)
            if self.hasher is not None:
                texts.append(f"{cleaned.prompt}\n{cleaned.completion}")
        out.blob = b"".join(parts)
        out.scrubbed = scrubber.counts
        if self.hasher is not None and texts:
            # the top 16 bits of each MinHash value: equality is all that is compared, and a chance agreement
            # (1 in 65,536) moves a similarity estimate by nothing measurable, at half the memory
            out.signatures = (self.hasher.signatures(texts) >> 16).astype(np.uint16)
        return out

    def _clean(self, example: Example, scrubber: Scrubber) -> Example:
        if not self.normalize and not scrubber.patterns:
            return example

        def fix(text: str | None) -> str | None:
            if text is None:
                return None
            text = normalize_text(text) if self.normalize else text
            return scrubber(text) if scrubber.patterns else text

        return Example(fix(example.prompt), fix(example.completion), example.line, fix(example.rejected),
                       example.label, example.group)


def _spool_line(example: Example) -> bytes:
    record: dict[str, Any] = {"prompt": example.prompt, "completion": example.completion}
    if example.rejected is not None:
        record["rejected"] = example.rejected
    if example.label is not None:
        record["label"] = example.label
    if example.group is not None:
        record["group"] = example.group
    record["source_line"] = example.line
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def ingest(data, method_kind: str, path: Path, fmt: str, spool_path: Path, show_progress: bool) -> Ingested:
    """Validated, cleaned rows into `spool_path` (JSONL) and their MinHash signatures beside it (.sig, uint16)."""
    shape = _shape_of_first_good_row(path, fmt, data, method_kind)
    result = Ingested(Rows(), shape, 0, 0, Counter(), Problems())
    if shape is None:  # no readable row at all: count the problems for the report and the error
        for raw in iter_rows(path, fmt):
            result.read += 1
            result.problems.add(raw.kind, raw.line, raw.problem)
        return result
    worker = RowWorker(data, shape, method_kind)
    with spool_path.open("wb") as spool, signature_path(spool_path).open("wb") as signatures, \
            _progress(show_progress, path) as advance:
        for block in _worker_blocks(worker, path, fmt, data, shape, method_kind):
            _collect(result, spool, signatures, block)
            advance(block.read)
    return result


def signature_path(spool_path: Path) -> Path:
    return spool_path.with_suffix(".sig")


def load_signatures(spool_path: Path, rows: Rows) -> np.ndarray | None:
    if not rows.signature_width:
        return None
    return np.fromfile(signature_path(spool_path), dtype=np.uint16).reshape(len(rows), rows.signature_width)


def _worker_blocks(worker: RowWorker, path: Path, fmt: str, data, shape: Shape, method_kind: str) -> Iterator[_Block]:
    workers = os.cpu_count() or 1
    if fmt == "jsonl" and workers > 1 and path.stat().st_size >= _PARALLEL_FROM_BYTES:
        # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_pool_worker, initargs=(data, shape, method_kind)) as pool:
            yield from pool.imap(_pool_jsonl_block, jsonl_line_chunks(path, _BLOCK), chunksize=1)
        return
    for raws in _blocks(iter_rows(path, fmt)):
        yield worker.rows_block(raws)


_POOL_WORKER: RowWorker | None = None


def _init_pool_worker(data, shape: Shape, method_kind: str) -> None:
    global _POOL_WORKER
    _POOL_WORKER = RowWorker(data, shape, method_kind)


def _pool_jsonl_block(block: tuple[int, list[bytes]]) -> _Block:
    assert _POOL_WORKER is not None
    return _POOL_WORKER.jsonl_block(block)


def _blocks(rows: Iterable[RawRow]) -> Iterator[list[RawRow]]:
    block: list[RawRow] = []
    for row in rows:
        block.append(row)
        if len(block) == _BLOCK:
            yield block
            block = []
    if block:
        yield block


def _shape_of_first_good_row(path: Path, fmt: str, data, method_kind: str) -> Shape | None:
    for raw in iter_rows(path, fmt):
        if raw.row is not None:
            return detect_shape(list(raw.row), data, method_kind)
    return None


def _collect(result: Ingested, spool, signatures, block: _Block) -> None:
    rows = result.rows
    result.read += block.read
    result.changed += block.changed
    result.scrubbed.update(block.scrubbed)
    for kind, line, message in block.problems:
        result.problems.add(kind, line, message)
    if not block.sizes:
        return
    spool.write(block.blob)
    ends = np.cumsum(np.asarray(block.sizes, dtype=np.int64)) + rows.offsets[-1]
    rows.offsets.extend(ends.tolist())
    rows.lines.extend(block.lines)
    rows.keys.extend(block.keys)
    rows.labels.extend(_ids(block.labels, rows.label_names))
    rows.groups.extend(_ids(block.groups, rows.group_names))
    if block.signatures is not None:
        block.signatures.tofile(signatures)
        rows.signature_width = block.signatures.shape[1]


def _ids(names: list[str | None], table: dict[str, int]) -> list[int]:
    return [-1 if name is None else table.setdefault(name, len(table)) for name in names]


def _progress(show: bool, path: Path):
    from contextlib import contextmanager

    from specialist.console import progress

    @contextmanager
    def bar_or_nothing():
        if not show:
            yield lambda n: None
            return
        with progress() as bar:
            task = bar.add_task(f"reading {path.name}", total=None, info="")
            yield lambda n: bar.advance(task, n)

    return bar_or_nothing()
