"""First pass of `prepare`: rows -> validated, cleaned examples in a spool file plus small per-row arrays.

Every source (data.path, and the fixed data.val_path / data.test_path) goes into the same spool, each row tagged
with its source and, where the split is fixed (a fixed file, or data.split_column), the split it belongs to.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from specialist.data.clean import Scrubber, normalize_text, scrub_kinds
from specialist.data.dedupe import MinHasher, exact_key
from specialist.data.load import Example, Rejection
from specialist.data.readers import RawRow, iter_rows, jsonl_line_chunks, parse_jsonl_line
from specialist.data.shapes import Shape, as_text, detect_shape, row_to_example
from specialist.data.split import Part
from specialist.errors import DataError

_BLOCK = 8192
_PARALLEL_FROM_BYTES = 16 * 2**20  # below this, starting worker processes costs more than it saves
_FIRST_LINES = 5
UNSPLIT = Part.UNSPLIT  # a row whose split `prepare` decides


@dataclass
class Problems:
    counts: Counter = field(default_factory=Counter)
    first: dict[str, list[Rejection]] = field(default_factory=dict)

    def add(self, rejection: Rejection) -> None:
        self.counts[rejection.kind] += 1
        shown = self.first.setdefault(rejection.kind, [])
        if len(shown) < _FIRST_LINES:
            shown.append(rejection)

    def as_report(self) -> dict[str, Any]:
        return {kind: {"count": n, "first": [r.as_report() for r in self.first[kind]]}
                for kind, n in self.counts.most_common()}


@dataclass(frozen=True)
class Source:
    """One file `prepare` reads: the main data (part UNSPLIT) or a fixed val or test set."""

    name: str  # "data", "val", "test" or "extra" (data.extra_paths: training rows only)
    path: Path
    fmt: str
    part: Part = UNSPLIT


@dataclass
class Rows:
    """Per-row arrays for the rows that passed validation, in file order; the text lives in the spool."""

    offsets: array = field(default_factory=lambda: array("q", [0]))
    lines: array = field(default_factory=lambda: array("q"))
    keys: array = field(default_factory=lambda: array("Q"))
    labels: array = field(default_factory=lambda: array("i"))
    groups: array = field(default_factory=lambda: array("q"))
    parts: array = field(default_factory=lambda: array("b"))  # each row's Part: a fixed split or UNSPLIT
    sources: array = field(default_factory=lambda: array("b"))  # index of the Source the row came from
    label_names: dict[str, int] = field(default_factory=dict)
    group_names: dict[str, int] = field(default_factory=dict)
    signature_width: int = 0  # MinHash values a row in the signature file (0: none computed)

    def __len__(self) -> int:
        return len(self.lines)


@dataclass
class SourceRead:
    """What reading one source gave: rows and physical lines read, lines of bad rows, and why they were bad."""

    source: Source
    shape: Shape | None
    read: int = 0  # rows (records) read
    lines: int = 0  # physical lines those rows took: a CSV field may span several; the bad share counts lines
    bad_lines: int = 0
    good: int = 0
    changed: int = 0
    scrubbed: Counter = field(default_factory=Counter)
    problems: Problems = field(default_factory=Problems)


@dataclass
class Ingested:
    rows: Rows
    sources: list[SourceRead]


@dataclass
class _Block:
    """What a worker hands back for one block of rows."""

    blob: bytes = b""
    sizes: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)
    parts: list[int] = field(default_factory=list)
    problems: list[Rejection] = field(default_factory=list)
    read: int = 0
    lines_read: int = 0
    bad_lines: int = 0
    changed: int = 0
    scrubbed: Counter = field(default_factory=Counter)
    signatures: np.ndarray | None = None


def split_of(row: dict[str, Any], column: str) -> tuple[Part | None, str]:
    """(the Part, "") from the row's split column, or (None, why not): only the exact words count."""
    value = row.get(column)
    part = Part.named(as_text(value).strip() if value is not None else "")
    if part is not None:
        return part, ""
    return None, f"split column {column!r} holds {value!r}; it must be exactly train, val or test"


class RowWorker:
    def __init__(self, data, shape: Shape, method_kind: str, part: Part = UNSPLIT) -> None:
        self.data, self.shape, self.part = data, shape, part
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
            out.lines_read += raw.span
            found = self._example(raw, scrubber, out)
            if isinstance(found, Rejection):
                out.problems.append(found)
                out.bad_lines += raw.span
                continue
            example, part = found
            encoded = _spool_line(example)
            parts.append(encoded)
            out.sizes.append(len(encoded))
            out.lines.append(example.line)
            out.keys.append(exact_key(example.prompt, example.completion, example.rejected))
            out.labels.append(example.label)
            out.groups.append(example.group)
            out.parts.append(part)
            if self.hasher is not None:
                texts.append(f"{example.prompt}\n{example.completion}")
        out.blob = b"".join(parts)
        out.scrubbed = scrubber.counts
        if self.hasher is not None and texts:
            # the top 16 bits of each MinHash value: equality is all that is compared, and a chance agreement
            # (1 in 65,536) moves a similarity estimate by nothing measurable, at half the memory
            out.signatures = (self.hasher.signatures(texts) >> 16).astype(np.uint16)
        return out

    def _example(self, raw: RawRow, scrubber: Scrubber, out: _Block) -> tuple[Example, int] | Rejection:
        """(cleaned example, its fixed split), or why the row is left out."""
        if raw.row is None:
            return Rejection(raw.kind, raw.line, raw.problem)
        part = self.part
        if self.data.split_column and part == UNSPLIT:  # extra_paths rows are training rows whatever they hold
            part, problem = split_of(raw.row, self.data.split_column)
            if part is None:
                return Rejection("bad_split_value", raw.line, problem)
        try:
            example = row_to_example(raw.row, raw.line, self.shape, self.data, self.keep_rejected)
        except RecursionError:  # a value nested too deep to write back as JSON text
            return Rejection("too_deep", raw.line, "a value is nested too deeply to use; flatten the row")
        if isinstance(example, Rejection):
            return example
        cleaned = self._clean(example, scrubber)
        out.changed += cleaned is not example and cleaned != example
        if not cleaned.completion or (self.shape.name != "text" and not cleaned.prompt):
            return Rejection("empty_field", raw.line, "empty after cleaning")
        return cleaned, part

    def _clean(self, example: Example, scrubber: Scrubber) -> Example:
        if not self.normalize and not scrubber.patterns:
            return example

        def fix(text: str | None) -> str | None:
            if text is None:
                return None
            text = normalize_text(text) if self.normalize else text
            return scrubber(text) if scrubber.patterns else text

        turns = tuple((role, fix(content), learned) for role, content, learned in example.turns)
        return Example(fix(example.prompt), fix(example.completion), example.line, fix(example.rejected),
                       example.label, example.group, turns=turns)


def _spool_line(example: Example) -> bytes:
    record: dict[str, Any] = {"prompt": example.prompt, "completion": example.completion}
    if example.rejected is not None:
        record["rejected"] = example.rejected
    if example.label is not None:
        record["label"] = example.label
    if example.group is not None:
        record["group"] = example.group
    if example.turns:
        record["turns"] = [list(turn) for turn in example.turns]
    record["source_line"] = example.line
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def ingest(data, method_kind: str, sources: list[Source], spool_path: Path, show_progress: bool) -> Ingested:
    """Validated, cleaned rows of every source into `spool_path` (JSONL), MinHash signatures beside it (.sig)."""
    result = Ingested(Rows(), [])
    with spool_path.open("wb") as spool, signature_path(spool_path).open("wb") as signatures:
        sink = _Sink(result.rows, spool, signatures)
        for number, source in enumerate(sources):
            result.sources.append(_ingest_source(data, method_kind, source, number, sink, show_progress))
    return result


@dataclass
class _Sink:
    """Where ingested rows go: their columns, the open spool file (records) and signature file."""

    rows: Rows
    spool: Any
    signatures: Any


def _ingest_source(data, method_kind: str, source: Source, number: int, sink: _Sink,
                   show_progress: bool) -> SourceRead:
    shape = _shape_of_first_good_row(source, data, method_kind)
    read = SourceRead(source, shape)
    if shape is None:  # no readable row at all: count the problems for the report and the error
        for raw in _source_rows(source, data):
            read.read, read.lines, read.bad_lines = read.read + 1, read.lines + raw.span, read.bad_lines + raw.span
            read.problems.add(Rejection(raw.kind, raw.line, raw.problem, file=source.path))
        return read
    worker = RowWorker(data, shape, method_kind, source.part)
    first = len(sink.rows)
    with _progress(show_progress, source.path) as advance:
        for block in _worker_blocks(worker, source, data, shape, method_kind):
            _collect(read, sink, number, block)
            advance(block.read)
    read.good = len(sink.rows) - first
    return read


def signature_path(spool_path: Path) -> Path:
    return spool_path.with_suffix(".sig")


def load_signatures(spool_path: Path, rows: Rows) -> np.ndarray | None:
    if not rows.signature_width:
        return None
    return np.fromfile(signature_path(spool_path), dtype=np.uint16).reshape(len(rows), rows.signature_width)


def _worker_blocks(worker: RowWorker, source: Source, data, shape: Shape, method_kind: str) -> Iterator[_Block]:
    workers = os.cpu_count() or 1
    path = source.path
    if source.fmt == "jsonl" and workers > 1 and path.stat().st_size >= _PARALLEL_FROM_BYTES:
        # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_pool_worker,
                          initargs=(data, shape, method_kind, source.part)) as pool:
            yield from pool.imap(_pool_jsonl_block, jsonl_line_chunks(path, _BLOCK), chunksize=1)
        return
    for raws in _blocks(_source_rows(source, data)):
        yield worker.rows_block(raws)


_POOL_WORKER: RowWorker | None = None


def _init_pool_worker(data, shape: Shape, method_kind: str, part: Part) -> None:
    global _POOL_WORKER
    _POOL_WORKER = RowWorker(data, shape, method_kind, part)


def _pool_jsonl_block(block: tuple[int, list[bytes]]) -> _Block:
    assert _POOL_WORKER is not None
    return _POOL_WORKER.jsonl_block(block)


def _source_rows(source: Source, data) -> Iterator[RawRow]:
    return iter_rows(source.path, source.fmt, csv_max_field_lines=data.csv_max_field_lines, hub_split=data.split,
                     hub_subset=data.subset)


def _blocks(rows: Iterable[RawRow]) -> Iterator[list[RawRow]]:
    block: list[RawRow] = []
    for row in rows:
        block.append(row)
        if len(block) == _BLOCK:
            yield block
            block = []
    if block:
        yield block


def _shape_of_first_good_row(source: Source, data, method_kind: str) -> Shape | None:
    for raw in _source_rows(source, data):
        if raw.row is not None:
            try:
                return detect_shape(list(raw.row), data, method_kind)
            except DataError as exc:  # name the file: with a fixed val/test file there are several
                message = str(exc).split("\n  hint: ")[0]
                raise DataError(f"{source.path}:{raw.line}: {message}", hint=exc.hint) from None
    return None


def _collect(read: SourceRead, sink: _Sink, number: int, block: _Block) -> None:
    read.read += block.read
    read.lines += block.lines_read
    read.bad_lines += block.bad_lines
    read.changed += block.changed
    read.scrubbed.update(block.scrubbed)
    for rejection in block.problems:
        read.problems.add(replace(rejection, file=read.source.path))
    if not block.sizes:
        return
    rows = sink.rows
    sink.spool.write(block.blob)
    ends = np.cumsum(np.asarray(block.sizes, dtype=np.int64)) + rows.offsets[-1]
    rows.offsets.extend(ends.tolist())
    rows.lines.extend(block.lines)
    rows.keys.extend(block.keys)
    rows.labels.extend(_ids(block.labels, rows.label_names))
    rows.groups.extend(_ids(block.groups, rows.group_names))
    rows.parts.extend(block.parts)
    rows.sources.extend([number] * len(block.sizes))
    if block.signatures is not None:
        block.signatures.tofile(sink.signatures)
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
