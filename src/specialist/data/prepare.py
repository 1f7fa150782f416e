"""`specialist prepare`: read, validate, clean, dedupe, split, balance and measure a dataset; write it atomically.

Rows stream from the file into a spool (one JSON line each, in a scratch folder beside the output), and only
small per-row arrays stay in memory (offset, exact-duplicate key, label and group ids, MinHash signature), so
a million-row file costs tens of megabytes, not its size in Python objects. Every later step works on row
indices; the output files are written at the end by copying spool lines, then the scratch folder is renamed
into place, so a run that stops on bad data writes nothing.

Output folder: train.jsonl, val.jsonl, test.jsonl, manifest.json (source hashes, rows per step, seed,
options) and report.json (what was dropped and why, with line numbers; lengths, labels, duplicates, leakage).
The output folder must be new, empty, or an earlier prepare output (it is replaced whole), and never one that
holds, or lies inside, the config or the data: that is checked before anything is written.

Fixed splits: data.test_path / data.val_path (files read like data.path) or data.split_column (a train/val/test
column) fix which rows are val and test. Those rows are cleaned, and their duplicates among themselves reported,
but never cut by dedupe, length, max_examples or leakage unless data.dedupe.fixed_split_leakage asks; training rows
that copy one of them are dropped from train instead.

Extra training rows: data.extra_paths (files read like data.path, e.g. corrected harvest rows) only ever join
train. The split of data.path's rows does not depend on them, and an extra row that copies a val or test row is
dropped from train (never the other way round), so a retrained model faces the test set its predecessor faced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from specialist.atomic import replace_folder
from specialist.data.dedupe import leaking_rows, near_duplicate_roots
from specialist.data.ingest import UNSPLIT, Problems, Rows, Source, SourceRead, ingest, load_signatures, signature_path
from specialist.data.load import Rejection
from specialist.data.readers import HUB, detect_format, is_hub_dataset
from specialist.data.split import Part, Split, read_split
from specialist.errors import DataError
from specialist.manifest import sha256_of

if TYPE_CHECKING:
    from specialist.data.template import PromptTemplate

PREPARED_MARK = "specialist-prepared/1"
SPLITS = tuple(part.file_name for part in Part.splits())
PREPARED_FILES = frozenset(f"{name}.jsonl" for name in SPLITS) | {"manifest.json", "report.json"}


@dataclass(frozen=True)
class Measuring:
    """What token lengths are measured with: the base model's tokenizer, the run's prompt format and
    training.max_length (`over_length`, data.over_length, is set by `prepare`). Without it, prepare measures nothing
    and drops nothing for length."""

    tokenizer: Any
    template: PromptTemplate
    max_length: int
    over_length: str = "drop"


@dataclass(frozen=True)
class _Spool:
    """The rows read so far: the spool file that holds their records, and their columns."""

    path: Path
    rows: Rows

    def record(self, handle, i: int) -> dict[str, Any]:
        return json.loads(_spool_record(handle, self.rows, i))


@dataclass
class Prepared:
    folder: Path
    report: dict[str, Any]

    @property
    def split(self) -> Split:
        return read_split(self.folder)


def prepare(data, method_kind: str, out_dir: Path, seed: int, *, measuring: Measuring | None = None,
            show_progress: bool = True, protect: list[Path] | None = None) -> Prepared:
    """Prepare `data` (a DataConfig) for `method_kind` into `out_dir`; with `measuring`, lengths are measured too.

    `protect`: paths (the config file) that must never lie inside `out_dir`; the data files always are. The
    folder is checked before anything is written: it must be new, empty or an earlier prepare output.
    """
    path = Path(data.path)
    out_dir = Path(out_dir)
    guarded = _protected_paths(data, protect)
    if _is_prepared_folder(path):
        return _reuse_prepared(data, path, out_dir, guarded)
    check_output_folder(out_dir, guarded)
    out_dir = _absolute(out_dir)  # "." or a symlinked folder: the rename below must move a real folder
    if measuring is not None:
        measuring = dataclasses.replace(measuring, template=_with_truncation(measuring.template, data,
                                                                             measuring.max_length),
                                        over_length=data.over_length)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        report = _prepare_into(data, method_kind, path, scratch, seed, measuring, show_progress)
        replace_folder(scratch, out_dir)  # check_output_folder allowed it: new, empty or an earlier output
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Prepared(out_dir, report)


def _protected_paths(data, protect: list[Path] | None) -> list[Path]:
    fixed = [Path(p) for p in (data.path, data.test_path, data.val_path, *data.extra_paths) if p is not None]
    return fixed + [Path(p) for p in protect or []]


def _absolute(path: Path) -> Path:
    return Path(os.path.realpath(path))  # realpath, unlike Path.resolve on Python 3.11, survives a symlink loop


def check_output_folder(out_dir: Path, protected: list[Path]) -> None:
    """Raise a DataError unless `out_dir` is safe to replace whole: new, empty or an earlier prepare output
    holding nothing else, and neither holding, nor inside, nor equal to any `protected` path."""
    target = _absolute(out_dir)
    for kept in protected:
        kept_at = _absolute(kept)
        if target == kept_at or target in kept_at.parents or kept_at in target.parents:
            where = "is" if target == kept_at else "holds" if target in kept_at.parents else "lies inside"
            raise DataError(f"output folder {out_dir} {where} {kept}: prepare replaces its output folder whole, so it "
                            "must not hold your config or data; nothing was written",
                            hint=f"choose a new folder, e.g. --out {target.parent / (target.name + '-prepared')}"
                            if where == "holds" else "choose a new folder outside your data")
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise DataError(f"output folder {out_dir} exists and is not a folder; nothing was written",
                        hint="choose a new folder")
    entries = sorted(entry.name for entry in target.iterdir())
    if not entries:
        return
    if not _is_prepared_folder(target):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise DataError(f"output folder {out_dir} is not empty ({shown}) and was not written by `specialist "
                        "prepare`; prepare replaces its output folder whole, so nothing was written",
                        hint="choose a new or empty folder")
    extra = sorted(set(entries) - PREPARED_FILES)
    if extra:
        raise DataError(f"output folder {out_dir} is an earlier prepare output but also holds {extra}, which "
                        "replacing it would delete; nothing was written",
                        hint="move those files elsewhere, or choose a new folder")


def _with_truncation(template, data, max_length: int):
    """The template that shortens inputs to fit, when data.over_length asks and the caller has not set it."""
    if data.over_length != "truncate" or getattr(template, "truncates", True):
        return template
    return dataclasses.replace(template, max_length=max_length, truncate_side=data.truncate_side)


def _sources(data, path: Path) -> list[Source]:
    hub = is_hub_dataset(path)
    if not hub and (data.split is not None or data.subset is not None):
        raise DataError(f"data.split and data.subset choose a part of a Hugging Face hub dataset; data.path {path} is "
                        "a local path", hint="remove data.split and data.subset, or name a hub dataset as org/name")
    fmt = HUB if hub else detect_format(path) if data.format == "auto" else data.format
    sources = [Source("data", path, fmt)]
    for name, part, fixed in (("val", Part.VAL, data.val_path), ("test", Part.TEST, data.test_path)):
        if fixed is not None:
            fixed = Path(fixed)
            sources.append(Source(name, fixed, detect_format(fixed) if data.format == "auto" else data.format, part))
    for extra in data.extra_paths:  # part 0: train, decided here, never by the split
        extra = Path(extra)
        sources.append(Source("extra", extra, detect_format(extra) if data.format == "auto" else data.format, 0))
    return sources


def _fixed_parts(data) -> set[Part]:
    """The splits whose rows the user fixed (val, test): never cut by length, max_examples or leakage."""
    if data.split_column:
        return {Part.VAL, Part.TEST}
    return {part for part, fixed in ((Part.VAL, data.val_path), (Part.TEST, data.test_path)) if fixed is not None}


def _prepare_into(data, method_kind: str, path: Path, scratch: Path, seed: int, measuring: Measuring | None,
                  show_progress: bool) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    spool_path = scratch / "spool.jsonl"
    ingested = ingest(data, method_kind, _sources(data, path), spool_path, show_progress)
    for read in ingested.sources:
        _stop_on_bad_input(read, data)
    rows, main = ingested.rows, ingested.sources[0]
    steps.append({"step": "read and validate", "rows_in": sum(r.read for r in ingested.sources),
                  "rows_out": len(rows)})
    alive = np.ones(len(rows), dtype=bool)
    parts = np.frombuffer(rows.parts, dtype=np.int8)
    fixed = _fixed_parts(data)
    keys = np.frombuffer(rows.keys, dtype=np.uint64)
    signatures = load_signatures(spool_path, rows)
    duplicates = _dedupe(data.dedupe, keys, signatures, alive, rows, fixed, steps)
    _cap_examples(data, alive, ~np.isin(parts, list(fixed)), seed, steps)
    lengths = None
    if measuring is not None:
        lengths = _measure_lengths(_Spool(spool_path, rows), alive, ~np.isin(parts, list(fixed)), measuring,
                                   method_kind, main.problems, steps)
    labels = np.frombuffer(rows.labels, dtype=np.int32)
    assignment = _assign_splits(data, alive, parts, labels, np.frombuffer(rows.groups, dtype=np.int64), seed)
    extra_step = _drop_extra_leakage(spool_path, assignment, keys, signatures, data.dedupe, rows, ingested.sources)
    if extra_step is not None:
        steps.append(extra_step)
    leakage = _handle_leakage(assignment, keys, signatures, data.dedupe, fixed, rows, steps)
    order = _shuffled_members(assignment, seed, _extra_mask(rows, ingested.sources))
    balance = _balance(data.balance, order, labels, rows.label_names, seed, steps)
    _refuse_empty_split(order, data)
    written = _write_outputs(spool_path, rows, order, scratch)
    lookup = _lookup_check(scratch, method_kind, written["train"]["rows"])
    spool_path.unlink()
    signature_path(spool_path).unlink(missing_ok=True)
    report = {
        "format": PREPARED_MARK,
        "source": _describe_source(main),
        "fixed_sources": {read.source.name: _describe_fixed_source(read) for read in ingested.sources[1:]},
        "split": _describe_split(data),
        "rows_read": main.read,
        "steps": steps,
        "dropped": main.problems.as_report(),
        "clean": {"normalize": data.clean.normalize, "rows_changed": sum(r.changed for r in ingested.sources),
                  "scrubbed": _sum_counters(r.scrubbed for r in ingested.sources)},
        "duplicates": duplicates,
        "leakage": leakage,
        "labels": _label_report(rows, labels, alive, balance, data),
        "lengths": lengths,
        "lookup": lookup,
        "splits": {name: written[name]["rows"] for name in SPLITS},
        "tokens_per_epoch": _tokens_per_epoch(lengths, order["train"]),
        "files": written,
        "seed": seed,
        "options": data.model_dump(mode="json"),
    }
    (scratch / "report.json").write_text(json.dumps(_without_private(report), indent=2), encoding="utf-8")
    manifest = {key: report[key] for key in ("format", "source", "fixed_sources", "split", "rows_read", "steps",
                                             "splits", "files", "seed", "options")}
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return _without_private(report)


def _lookup_check(folder: Path, method_kind: str, train_rows: int) -> dict[str, Any] | None:
    """core.baselines.lookup_check on the written split (None for plain text, which has no answers to look up;
    skipped, and said, on a training split too big to check in a few seconds)."""
    import xxhash

    from specialist.core.baselines import LOOKUP_INDEX_ROWS, LOOKUP_MAX_TRAIN, LOOKUP_ROWS, lookup_check
    from specialist.data.split import read_answers, read_examples

    if method_kind == "continued_pretraining":
        return None
    if train_rows > LOOKUP_MAX_TRAIN:
        return {"skipped": f"{train_rows:,} training rows, over {LOOKUP_MAX_TRAIN:,}: `specialist baselines CONFIG` "
                           "scores the nearest training row on the held-out rows"}
    # 64-bit hashes of every training answer, the text of the first rows only: memory stays flat on big data
    seen = np.sort(np.fromiter((xxhash.xxh64_intdigest(a.strip().encode())
                                for a in read_answers(folder / "train.jsonl")), dtype=np.uint64))

    def seen_in_train(answer: str) -> bool:
        key = np.uint64(xxhash.xxh64_intdigest(answer.encode()))
        at = int(np.searchsorted(seen, key))
        return at < seen.size and seen[at] == key

    held_out = {name: read_examples(folder / f"{name}.jsonl", LOOKUP_ROWS) for name in ("val", "test")}
    return lookup_check(read_examples(folder / "train.jsonl", LOOKUP_INDEX_ROWS), held_out, seen_in_train)


def _sum_counters(counters) -> dict[str, int]:
    total: dict[str, int] = {}
    for counter in counters:
        for kind, n in counter.items():
            total[kind] = total.get(kind, 0) + n
    return total


def _stop_on_bad_input(read: SourceRead, data) -> None:
    path, problems = read.source.path, read.problems
    if read.read == 0:
        raise DataError(f"{path} is empty: no rows to train on" if read.source.name == "data" else
                        f"{path} (data.{read.source.name}_path) is empty: no rows to evaluate on",
                        hint="add rows, or point the config at the right file")
    if problems.counts.get("unknown_label"):
        found = sorted({r.value for r in problems.first["unknown_label"]})
        lines = ", ".join(f"{r.file or path}:{r.line}" for r in problems.first["unknown_label"])
        raise DataError(
            f"{problems.counts['unknown_label']} row(s) carry labels outside data.labels {data.labels}, e.g. {found} "
            f"at {lines}",
            hint="add the missing labels to data.labels, fix the rows, or remove data.labels to accept every label",
        )
    bad, total = read.bad_lines, max(read.lines, 1)
    unit = "lines" if read.source.fmt in ("csv", "tsv") else "rows"
    if read.good == 0 or bad / total > data.max_bad_fraction:
        listing = "\n  ".join(f"{r.file or path}:{r.line}: {r.message}" for kind in problems.counts
                              for r in problems.first[kind][:2])
        raise DataError(
            f"{bad} of {read.lines} {unit} in {path} are unusable ({100 * bad / total:.1f}% > data.max_bad_fraction "
            f"{100 * data.max_bad_fraction:.0f}%); nothing was written. First problems:\n  {listing}",
            hint=("fix the rows listed"
                  + (f"; rows were read as {read.shape.describe()}" if read.shape else "")
                  + ", or raise data.max_bad_fraction to skip them"),
        )


def _cap_examples(data, alive: np.ndarray, cuttable: np.ndarray, seed: int, steps: list[dict[str, Any]]) -> None:
    """data.max_examples: keep a random N of the rows whose split is not fixed (a fixed val/test set stays whole)."""
    pool = np.flatnonzero(alive & cuttable)
    if data.max_examples is None or pool.size <= data.max_examples:
        return
    before = int(alive.sum())
    drop = np.random.default_rng(seed).permutation(pool)[data.max_examples :]
    alive[drop] = False
    steps.append({"step": f"max_examples ({data.max_examples})", "rows_in": before, "rows_out": int(alive.sum())})


def _dedupe(options, keys: np.ndarray, signatures: np.ndarray | None, alive: np.ndarray, rows: Rows,
            fixed: set[int], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact, then near-duplicate removal, the first row of each cluster kept. Rows of a fixed split are compared
    among themselves only (a copy across splits is leakage, handled after the split) and never removed: a fixed
    val or test set is someone's benchmark, so its duplicates are reported under `fixed_kept` and stay."""
    lines = np.frombuffer(rows.lines, dtype=np.int64)
    parts = np.frombuffer(rows.parts, dtype=np.int8)
    removable = ~np.isin(parts, list(fixed))
    result: dict[str, Any] = {"exact": 0, "near": 0, "largest_clusters": [], "fixed_kept": {"exact": 0, "near": 0}}
    clusters: list[dict[str, Any]] = []
    copies = np.zeros(len(keys), dtype=bool)  # exact copies: a kept one (fixed split) is not counted again as near
    if options.exact and len(keys):
        before = int(alive.sum())
        for part in np.unique(parts).tolist():
            members = np.flatnonzero(parts == part)
            _, first, inverse = np.unique(keys[members], return_index=True, return_inverse=True)
            copies[np.setdiff1d(members, members[first])] = True
            clusters += _largest_clusters(members, members[first][inverse.ravel()], lines, "exact", part in fixed)
        result["fixed_kept"]["exact"] = int((copies & alive & ~removable).sum())
        alive &= ~(copies & removable)
        result["exact"] = before - int(alive.sum())
        steps.append({"step": "exact dedupe", "rows_in": before, "rows_out": int(alive.sum())})
    if options.near and signatures is not None and len(keys):
        before = int(alive.sum())
        active = alive.copy()
        roots = near_duplicate_roots(signatures, options.threshold, active, parts.astype(np.int64))
        near = active & (roots != np.arange(len(roots))) & ~copies
        result["fixed_kept"]["near"] = int((near & ~removable).sum())
        alive &= ~(near & removable)
        result["near"] = before - int(alive.sum())
        for part in np.unique(parts[active]).tolist():
            members = np.flatnonzero(active & (parts == part))
            clusters += _largest_clusters(members, roots[members], lines, "near", part in fixed)
        steps.append({"step": "near dedupe", "rows_in": before, "rows_out": int(alive.sum())})
    result["largest_clusters"] = sorted(clusters, key=lambda c: -c["size"])[:5]
    return result


def _largest_clusters(members: np.ndarray, root_of: np.ndarray, lines: np.ndarray, kind: str,
                      fixed: bool = False) -> list[dict]:
    """The five biggest clusters among `members` (`root_of`: each member's first row), with their lines; a fixed
    split's clusters are reported with `kept_in_fixed_split`, their duplicates under `duplicate_lines`."""
    roots, sizes = np.unique(root_of, return_counts=True)
    biggest = np.argsort(-sizes, kind="stable")[:5]
    others = "duplicate_lines" if fixed else "dropped_lines"
    found = [{"kind": kind, "size": int(sizes[k]), "kept_line": int(lines[roots[k]]),
              others: lines[members[(root_of == roots[k]) & (members != roots[k])]][:10].tolist()}
             for k in biggest.tolist() if sizes[k] > 1]
    for cluster in found if fixed else ():
        cluster["kept_in_fixed_split"] = True
    return found


def _measure_lengths(spool: _Spool, alive: np.ndarray, cuttable: np.ndarray, measuring: Measuring, method_kind: str,
                     problems: Problems, steps) -> dict[str, Any]:
    """Token lengths of the surviving rows; rows over max_length are dropped, or (truncate) have their input
    shortened to fit, dropped only when instruction + completion alone exceed max_length. Rows of a fixed split
    are measured but never dropped (evaluation shortens their inputs itself)."""
    max_length, over_length = measuring.max_length, measuring.over_length
    index = np.flatnonzero(alive)
    plain_text = method_kind == "continued_pretraining"
    prompt_tokens, completion_tokens = _token_counts(spool, index, measuring, plain_text)
    total = prompt_tokens + completion_tokens
    lines = np.frombuffer(spool.rows.lines, dtype=np.int64)
    before = int(alive.sum())
    summary: dict[str, Any] = {"max_length": max_length, "over_length": over_length}
    for name, values in (("prompt", prompt_tokens), ("completion", completion_tokens), ("total", total)):
        summary[name] = _percentiles(values[index])
    if plain_text:  # packed into blocks: nothing is cut away
        summary["over_max_length"] = 0
        summary["train_tokens"] = total
        return summary
    over = alive & (total > max_length)
    unfit = over
    if over_length == "truncate":
        unfit, shortened, cut = _shorten_inputs(spool, over, prompt_tokens, completion_tokens, measuring)
        summary.update(truncated=shortened, tokens_cut=cut, truncate_side=measuring.template.truncate_side)
    else:
        summary["truncated"] = 0
    drop = unfit & cuttable
    kind = "answer_over_max_length" if over_length == "truncate" else "over_max_length"
    for i in np.flatnonzero(drop).tolist():
        problems.add(Rejection(kind, int(lines[i]), f"{total[i]} tokens (prompt {prompt_tokens[i]}, completion "
                               f"{completion_tokens[i]}) > max_length {max_length}"
                               + ("; even an empty input leaves no room for the completion"
                                  if over_length == "truncate" else "")))
    alive &= ~drop
    summary["over_max_length"] = int(over.sum())
    summary["fixed_over_max_length"] = int((unfit & ~cuttable).sum())
    kept = np.minimum(completion_tokens, np.maximum(max_length - prompt_tokens, 0))
    summary["completion_tokens_kept"] = int(kept[alive].sum())
    if summary["completion_tokens_kept"] == 0:
        raise DataError(
            f"no completion tokens remain within max_length={max_length}: training would learn nothing",
            hint="raise training.max_length, or shorten the completions and data.instruction",
        )
    summary["train_tokens"] = np.minimum(prompt_tokens + completion_tokens, max_length)
    steps.append({"step": f"length ({over_length} over {max_length} tokens)", "rows_in": before,
                  "rows_out": int(alive.sum())})
    return summary


def _token_counts(spool: _Spool, index: np.ndarray, measuring: Measuring,
                  plain_text: bool) -> tuple[np.ndarray, np.ndarray]:
    tokenizer, template = measuring.tokenizer, measuring.template
    prompt_tokens = np.zeros(len(spool.rows), dtype=np.int64)
    completion_tokens = np.zeros(len(spool.rows), dtype=np.int64)
    with spool.path.open("rb") as handle:
        for start in range(0, len(index), 1024):
            chunk = index[start : start + 1024]
            records = [spool.record(handle, i) for i in chunk]
            completions = [template.render_completion(r["completion"]) for r in records]
            completion_tokens[chunk] = [len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
            if not plain_text:
                prompts = [template.render_prompt(r["prompt"], tokenizer) for r in records]
                encoded = tokenizer(prompts, add_special_tokens=not template.prompt_has_special_tokens)["input_ids"]
                prompt_tokens[chunk] = [len(ids) for ids in encoded]
    return prompt_tokens, completion_tokens


def _shorten_inputs(spool: _Spool, over: np.ndarray, prompt_tokens: np.ndarray, completion_tokens: np.ndarray,
                    measuring: Measuring) -> tuple[np.ndarray, int, int]:
    """Fit each over-long row's prompt into max_length - its completion, as training will (prompt_tokens updated
    in place). Returns (rows that cannot fit even with an empty input, rows shortened, prompt tokens cut)."""
    unfit = np.zeros(len(over), dtype=bool)
    shortened = cut = 0
    with spool.path.open("rb") as handle:
        for i in np.flatnonzero(over).tolist():
            record = spool.record(handle, i)
            fitted = measuring.template.fit_prompt(record["prompt"], measuring.tokenizer,
                                                   budget=measuring.max_length - int(completion_tokens[i]))
            if fitted.fits:
                shortened, cut = shortened + 1, cut + fitted.tokens_cut
                prompt_tokens[i] = len(fitted.ids)
            else:
                unfit[i] = True
    return unfit, shortened, cut


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {"p50": 0, "p95": 0, "max": 0}
    return {"p50": int(np.percentile(values, 50)), "p95": int(np.percentile(values, 95)), "max": int(values.max())}


def _assign_splits(data, alive: np.ndarray, parts: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                   seed: int) -> np.ndarray:
    """Each row's Part (DROPPED: not used); rows of a fixed split keep it; deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    assignment = np.full(len(alive), Part.DROPPED, dtype=np.int8)
    fixed = alive & (parts != UNSPLIT)
    assignment[fixed] = parts[fixed]
    members = np.flatnonzero(alive & (parts == UNSPLIT))
    fractions = (0.0 if data.val_path else data.val_fraction, 0.0 if data.test_path else data.test_fraction)
    if data.split_by == "grouped":
        _assign_groups(assignment, members, groups, data, fractions, rng)
    elif data.split_by == "stratified":
        for label in np.unique(labels[members]):
            _cut(assignment, rng.permutation(members[labels[members] == label]), fractions)
    else:
        _cut(assignment, rng.permutation(members), fractions)
    return assignment


def _cut(assignment: np.ndarray, shuffled: np.ndarray, fractions: tuple[float, float]) -> None:
    val_fraction, test_fraction = fractions
    n_test = max(1, round(len(shuffled) * test_fraction)) if len(shuffled) > 2 and test_fraction else 0
    n_val = round(len(shuffled) * val_fraction)
    assignment[shuffled[:n_test]] = Part.TEST
    assignment[shuffled[n_test : n_test + n_val]] = Part.VAL
    assignment[shuffled[n_test + n_val :]] = Part.TRAIN


def _assign_groups(assignment: np.ndarray, members: np.ndarray, groups: np.ndarray, data,
                   fractions: tuple[float, float], rng) -> None:
    if members.size == 0:
        return
    if (groups[members] < 0).any():
        missing = int((groups[members] < 0).sum())
        raise DataError(f"{missing} row(s) have no {data.group_column!r} value to group by",
                        hint=f"give every row a {data.group_column!r} value, or use data.split_by random")
    ids, sizes = np.unique(groups[members], return_counts=True)
    order = rng.permutation(len(ids))
    targets = {Part.TEST: len(members) * fractions[1], Part.VAL: len(members) * fractions[0]}
    filled = {Part.TEST: 0, Part.VAL: 0}
    split_of_group = {}
    for g in order.tolist():
        part = next((p for p in (Part.TEST, Part.VAL) if filled[p] < targets[p]), Part.TRAIN)
        split_of_group[int(ids[g])] = part
        filled[part] = filled.get(part, 0) + int(sizes[g])
    lookup = np.full(int(ids.max()) + 1, Part.TRAIN, dtype=np.int8)
    for group_id, part in split_of_group.items():
        lookup[group_id] = part
    assignment[members] = lookup[groups[members]]


def _handle_leakage(assignment: np.ndarray, keys: np.ndarray, signatures: np.ndarray | None, options,
                    fixed: set[int], rows: Rows, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Val/test rows equal or near-equal to a training row. A random split drops them from val/test; a fixed
    split keeps them and drops the training rows they copy instead (dedupe.fixed_split_leakage decides)."""
    lines = np.frombuffer(rows.lines, dtype=np.int64)
    report: dict[str, Any] = {}
    before = int((assignment != Part.DROPPED).sum())
    for part in (Part.VAL, Part.TEST):
        name = part.file_name
        train, probe = np.flatnonzero(assignment == Part.TRAIN), np.flatnonzero(assignment == part)
        leaked = _near_or_equal(keys, signatures, options.threshold, reference=train, probe=probe)
        entry = {"rows": int(leaked.size), "lines": lines[leaked][:10].tolist(), "fixed": part in fixed}
        if part not in fixed or options.fixed_split_leakage == "drop_from_fixed":
            assignment[leaked] = Part.DROPPED
            entry["action"] = f"removed from {name}"
        elif options.fixed_split_leakage == "drop_from_train":
            copies = _near_or_equal(keys, signatures, options.threshold, reference=leaked, probe=train)
            assignment[copies] = Part.DROPPED
            entry.update(action="training rows removed", train_rows=int(copies.size),
                         train_lines=lines[copies][:10].tolist())
        else:
            entry["action"] = "kept (dedupe.fixed_split_leakage: keep)"
        report[name] = entry
    steps.append({"step": "leakage (val/test rows near a train row)", "rows_in": before,
                  "rows_out": int((assignment != Part.DROPPED).sum())})
    return report


def _drop_extra_leakage(spool_path: Path, assignment: np.ndarray, keys: np.ndarray, signatures: np.ndarray | None,
                        options, rows: Rows, sources: list[SourceRead]) -> dict[str, Any] | None:
    """Extra rows (data.extra_paths) equal or near-equal to a val/test row, or asking its very input (a corrected
    answer to a held-out question is still its answer), leave train: the held-out rows stay as the split made them,
    so the old and the new model are compared on the same test set. Returns the step for the report, None when
    there are no extra rows."""
    mask = _extra_mask(rows, sources)
    if mask is None:
        return None
    extra = np.flatnonzero((assignment == Part.TRAIN) & mask)
    held_out = np.flatnonzero(assignment > 0)
    leaked = _near_or_equal(keys, signatures, options.threshold, reference=held_out, probe=extra)
    with spool_path.open("rb") as handle:
        def prompt(i: int) -> str:
            return json.loads(_spool_record(handle, rows, i)).get("prompt", "")

        asked = {prompt(i) for i in held_out.tolist()}
        leaked = np.union1d(leaked, [i for i in extra.tolist() if prompt(i) in asked]).astype(np.int64)
    assignment[leaked] = Part.DROPPED
    return {"step": "extra rows copying a val/test row", "rows_in": int(extra.size),
            "rows_out": int(extra.size - leaked.size)}


def _extra_mask(rows: Rows, sources: list[SourceRead]) -> np.ndarray | None:
    """Which rows came from data.extra_paths; None when none did."""
    extra_sources = [n for n, read in enumerate(sources) if read.source.name == "extra"]
    if not extra_sources:
        return None
    return np.isin(np.frombuffer(rows.sources, dtype=np.int8), extra_sources)


def _near_or_equal(keys: np.ndarray, signatures: np.ndarray | None, threshold: float, reference: np.ndarray,
                   probe: np.ndarray) -> np.ndarray:
    """The rows of `probe` that equal (exact key) or nearly equal (MinHash, when computed) a `reference` row."""
    found = probe[np.isin(keys[probe], keys[reference])]
    if signatures is not None:
        found = np.union1d(found, leaking_rows(signatures, threshold, reference, probe))
    return found


def _shuffled_members(assignment: np.ndarray, seed: int, extra: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each split's rows in a seeded order. Extra rows (`extra`, a mask) are shuffled into train with a generator of
    their own afterwards, so val and test come out in the order they would have without them."""
    rng = np.random.default_rng(seed + 1)
    extra = np.zeros(len(assignment), dtype=bool) if extra is None else extra
    order = {part.file_name: rng.permutation(np.flatnonzero((assignment == part) & ~extra)) for part in Part.splits()}
    if extra.any():
        added = np.flatnonzero((assignment == Part.TRAIN) & extra)
        order["train"] = np.random.default_rng(seed + 2).permutation(np.concatenate([order["train"], added]))
    return order


def _balance(options, order: dict[str, np.ndarray], labels: np.ndarray, label_names: dict[str, int], seed: int,
             steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Cap and/or upsample training rows per label; val and test keep the natural distribution."""
    if options.mode == "none" or not label_names:
        return None
    names = {i: name for name, i in label_names.items()}
    train = order["train"]
    before = _count_labels(labels[train], names)
    if options.mode in ("cap", "upsample", "cap_and_upsample"):
        rng = np.random.default_rng(seed + 2)
        kept = []
        for label in np.unique(labels[train]):
            rows = train[labels[train] == label]
            if "cap" in options.mode and len(rows) > options.max_per_class:
                rows = rng.choice(rows, options.max_per_class, replace=False)
            if "upsample" in options.mode and len(rows) < options.min_per_class:
                rows = np.concatenate([rows, rng.choice(rows, options.min_per_class - len(rows), replace=True)])
            kept.append(rows)
        order["train"] = rng.permutation(np.concatenate(kept)) if kept else train
        steps.append({"step": f"balance ({options.mode})", "rows_in": int(train.size),
                      "rows_out": int(order["train"].size)})
    return {"mode": options.mode, "train_before": before, "train_after": _count_labels(labels[order["train"]], names)}


def _count_labels(ids: np.ndarray, names: dict[int, str]) -> dict[str, int]:
    values, counts = np.unique(ids, return_counts=True)
    return {names.get(int(v), "(none)"): int(c) for v, c in sorted(zip(values, counts, strict=True), key=lambda x: -x[1])}


def _label_report(rows: Rows, labels: np.ndarray, alive: np.ndarray, balance, data) -> dict[str, Any] | None:
    if not rows.label_names:
        return None
    names = {i: name for name, i in rows.label_names.items()}
    report = {"all": _count_labels(labels[alive], names), "balance": balance}
    if data.labels is not None:
        report["declared_without_rows"] = [label for label in data.labels if label not in rows.label_names]
    return report


def _refuse_empty_split(order: dict[str, np.ndarray], data) -> None:
    if order["train"].size and order["test"].size:
        return
    if order["test"].size == 0 and (data.test_path or data.split_column):
        where = f"the test set {data.test_path}" if data.test_path else f"rows with {data.split_column} = test"
        raise DataError(f"no test rows remain: {where} gave none after validation and dedupe",
                        hint="give test rows, or see report.json for why they were dropped")
    raise DataError(
        f"after cleaning and dedupe {order['train'].size} train / {order['test'].size} test rows remain: too few "
        "to split", hint="add examples, or lower data.val_fraction / data.test_fraction")


def _write_outputs(spool_path: Path, rows: Rows, order: dict[str, np.ndarray], folder: Path) -> dict[str, Any]:
    written = {}
    with spool_path.open("rb") as handle:
        for name in SPLITS:
            digest = hashlib.sha256()
            path = folder / f"{name}.jsonl"
            with path.open("wb", buffering=1 << 20) as out:
                for i in order[name].tolist():
                    line = _spool_record(handle, rows, i)
                    digest.update(line)
                    out.write(line)
            written[name] = {"rows": int(order[name].size), "sha256": digest.hexdigest(), "file": path.name}
    return written


def _spool_record(handle, rows: Rows, i: int) -> bytes:
    """Row `i` of the spool, read at its offset (pread: no mapping of the whole file into memory)."""
    return os.pread(handle.fileno(), rows.offsets[i + 1] - rows.offsets[i], rows.offsets[i])


def _tokens_per_epoch(lengths: dict[str, Any] | None, train: np.ndarray) -> int | None:
    if lengths is None:
        return None
    return int(lengths["train_tokens"][train].sum())


def _without_private(report: dict[str, Any]) -> dict[str, Any]:
    if report.get("lengths"):
        report["lengths"] = {k: v for k, v in report["lengths"].items() if k != "train_tokens"}
    return report


def _describe_source(read: SourceRead) -> dict[str, Any]:
    shape = read.shape
    described = {"path": str(read.source.path), "format": read.source.fmt, "shape": shape.name if shape else None,
                 "columns": shape.columns if shape else None, "sha256": sha256_of(read.source.path)}
    if shape is not None and shape.prompt_fields:
        described["prompt_template_columns"] = list(shape.prompt_fields)
    if read.lines != read.read:
        described["lines_read"] = read.lines
    return described


def _describe_fixed_source(read: SourceRead) -> dict[str, Any]:
    return {**_describe_source(read), "rows_read": read.read, "rows_kept": read.good,
            "dropped": read.problems.as_report()}


def _describe_split(data) -> dict[str, Any]:
    """How the split was made, and which options it did not use (set or not)."""
    if data.split_column:
        return {"by": f"column {data.split_column!r}", "ignored": ["val_fraction", "test_fraction", "split_by"]}
    fixed = [name for name in ("val", "test") if getattr(data, f"{name}_path") is not None]
    return {"by": data.split_by, "fixed": fixed, "ignored": [f"{name}_fraction" for name in fixed],
            "extra_paths": [str(p) for p in data.extra_paths]}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest.json `prepare` wrote into `folder` (split files with rows and hashes, sources, options)."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"{path} cannot be read ({exc.__class__.__name__}: {exc})",
                        hint="point at a folder written by `specialist prepare/run/train`, or prepare it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_MARK:
        raise DataError(f"{path} is not a manifest written by `specialist prepare`",
                        hint="prepare the data again into a new folder")
    return manifest


def _is_prepared_folder(path: Path) -> bool:
    try:
        return path.is_dir() and (path / "manifest.json").is_file() and bool(read_manifest(path))
    except (DataError, OSError):
        return False


def _reuse_prepared(data, path: Path, out_dir: Path, protected: list[Path]) -> Prepared:
    """A folder `specialist prepare` wrote: use its split as it is (copied, so the run folder stays whole)."""
    if data.test_path or data.val_path or data.split_column or data.extra_paths:
        raise DataError(f"data.path {path} is a prepared folder, whose split is already fixed",
                        hint="remove data.test_path / data.val_path / data.split_column / data.extra_paths, or point data.path at "
                        "the raw data")
    if _absolute(out_dir) != _absolute(path):
        check_output_folder(out_dir, protected)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(PREPARED_FILES):
            if (path / name).is_file():
                shutil.copy2(path / name, out_dir / name)
    report_path = out_dir / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    return Prepared(out_dir, report)
