"""`specialist prepare`: read, validate, clean, dedupe, split, balance and measure a dataset; write it atomically.

Rows stream from the file into a spool (one JSON line each, in a scratch folder beside the output), and only
small per-row arrays stay in memory (offset, exact-duplicate key, label and group ids, MinHash signature), so
a million-row file costs tens of megabytes, not its size in Python objects. Every later step works on row
indices; the output files are written at the end by copying spool lines, then the scratch folder is renamed
into place, so a run that stops on bad data writes nothing.

Output folder: train.jsonl, val.jsonl, test.jsonl, manifest.json (source hashes, rows per step, seed,
options) and report.json (what was dropped and why, with line numbers; lengths, labels, duplicates, leakage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specialist.data.dedupe import leaking_rows, near_duplicate_roots
from specialist.data.ingest import Problems, Rows, ingest, load_signatures, signature_path
from specialist.data.readers import detect_format
from specialist.data.shapes import Shape
from specialist.data.split import Split, read_split
from specialist.errors import DataError
from specialist.manifest import sha256_of

PREPARED_MARK = "specialist-prepared/1"
SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    folder: Path
    report: dict[str, Any]

    @property
    def split(self) -> Split:
        return read_split(self.folder)


def prepare(data, method_kind: str, out_dir: Path, seed: int, *, tokenizer=None, template=None,
            max_length: int | None = None, show_progress: bool = True) -> Prepared:
    """Prepare `data` (a DataConfig) for `method_kind` into `out_dir`; with a tokenizer, lengths are measured too."""
    path = Path(data.path)
    if _is_prepared_folder(path):
        return _reuse_prepared(path, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        report = _prepare_into(data, method_kind, path, scratch, seed, tokenizer, template, max_length, show_progress)
        _replace_folder(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Prepared(out_dir, report)


def _prepare_into(data, method_kind: str, path: Path, scratch: Path, seed: int, tokenizer, template,
                  max_length: int | None, show_progress: bool) -> dict[str, Any]:
    fmt = detect_format(path) if data.format == "auto" else data.format
    steps: list[dict[str, Any]] = []
    spool_path = scratch / "spool.jsonl"
    ingested = ingest(data, method_kind, path, fmt, spool_path, show_progress)
    rows, shape, read_count, problems = ingested.rows, ingested.shape, ingested.read, ingested.problems
    _stop_on_bad_input(path, read_count, len(rows), problems, data, shape)
    steps.append({"step": "read and validate", "rows_in": read_count, "rows_out": len(rows)})
    alive = np.ones(len(rows), dtype=bool)
    keys = np.frombuffer(rows.keys, dtype=np.uint64)
    signatures = load_signatures(spool_path, rows)
    duplicates = _dedupe(data.dedupe, keys, signatures, alive, rows, steps)
    if data.max_examples is not None and alive.sum() > data.max_examples:
        before = int(alive.sum())
        keep = np.random.default_rng(seed).permutation(np.flatnonzero(alive))[: data.max_examples]
        alive[:] = False
        alive[keep] = True
        steps.append({"step": f"max_examples ({data.max_examples})", "rows_in": before, "rows_out": len(keep)})
    lengths = None
    if tokenizer is not None and template is not None and max_length is not None:
        lengths = _measure_lengths(spool_path, rows, alive, tokenizer, template, max_length, data.over_length,
                                   method_kind, problems, steps)
    labels = np.frombuffer(rows.labels, dtype=np.int32)
    assignment = _assign_splits(data, alive, labels, np.frombuffer(rows.groups, dtype=np.int64), seed)
    leakage = _remove_leakage(assignment, keys, signatures, data.dedupe.threshold, rows, steps)
    order = _shuffled_members(assignment, seed)
    balance = _balance(data.balance, order, labels, rows.label_names, seed, steps)
    _refuse_empty_split(order, data)
    written = _write_outputs(spool_path, rows, order, scratch)
    spool_path.unlink()
    signature_path(spool_path).unlink(missing_ok=True)
    report = {
        "format": PREPARED_MARK,
        "source": _describe_source(path, fmt, shape),
        "rows_read": read_count,
        "steps": steps,
        "dropped": problems.as_report(),
        "clean": {"normalize": data.clean.normalize, "rows_changed": ingested.changed,
                  "scrubbed": dict(ingested.scrubbed)},
        "duplicates": duplicates,
        "leakage": leakage,
        "labels": _label_report(rows, labels, alive, balance, data),
        "lengths": lengths,
        "splits": {name: written[name]["rows"] for name in SPLITS},
        "tokens_per_epoch": _tokens_per_epoch(lengths, order["train"]),
        "files": written,
        "seed": seed,
        "options": data.model_dump(mode="json"),
    }
    (scratch / "report.json").write_text(json.dumps(_without_private(report), indent=2), encoding="utf-8")
    manifest = {key: report[key] for key in ("format", "source", "rows_read", "steps", "splits", "files", "seed",
                                             "options")}
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return _without_private(report)


def _stop_on_bad_input(path: Path, read_count: int, good: int, problems: Problems, data, shape: Shape | None) -> None:
    if read_count == 0:
        raise DataError(f"{path} is empty: no rows to train on", hint="add rows, or point data.path at the right file")
    if problems.counts.get("unknown_label"):
        found = sorted({p["problem"].split("'")[1] for p in problems.first["unknown_label"]})
        lines = ", ".join(f"{path}:{p['line']}" for p in problems.first["unknown_label"])
        raise DataError(
            f"{problems.counts['unknown_label']} row(s) carry labels outside data.labels {data.labels}, e.g. {found} "
            f"at {lines}",
            hint="add the missing labels to data.labels, fix the rows, or remove data.labels to accept every label",
        )
    bad = read_count - good
    if good == 0 or bad / read_count > data.max_bad_fraction:
        listing = "\n  ".join(f"{path}:{p['line']}: {p['problem']}" for kind in problems.counts
                              for p in problems.first[kind][:2])
        raise DataError(
            f"{bad} of {read_count} rows in {path} are unusable ({100 * bad / read_count:.1f}% > data.max_bad_fraction "
            f"{100 * data.max_bad_fraction:.0f}%); nothing was written. First problems:\n  {listing}",
            hint=("fix the rows listed"
                  + (f"; rows were read as {shape.describe()}" if shape else "")
                  + ", or raise data.max_bad_fraction to skip them"),
        )


def _dedupe(options, keys: np.ndarray, signatures: np.ndarray | None, alive: np.ndarray, rows: Rows,
            steps: list[dict[str, Any]]) -> dict[str, Any]:
    lines = np.frombuffer(rows.lines, dtype=np.int64)
    result: dict[str, Any] = {"exact": 0, "near": 0, "largest_clusters": []}
    clusters: list[dict[str, Any]] = []
    if options.exact and len(keys):
        before = int(alive.sum())
        unique_keys, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True,
                                                        return_counts=True)
        alive &= np.isin(np.arange(len(keys)), first)
        result["exact"] = before - int(alive.sum())
        clusters += _largest_clusters(first[inverse], counts[inverse], lines, "exact")
        steps.append({"step": "exact dedupe", "rows_in": before, "rows_out": int(alive.sum())})
    if options.near and signatures is not None and len(keys):
        before = int(alive.sum())
        roots = near_duplicate_roots(signatures, options.threshold, alive)
        alive &= roots == np.arange(len(roots))
        result["near"] = before - int(alive.sum())
        sizes = np.bincount(roots, minlength=len(roots))
        clusters += _largest_clusters(roots, sizes[roots], lines, "near")
        steps.append({"step": "near dedupe", "rows_in": before, "rows_out": int(alive.sum())})
    result["largest_clusters"] = sorted(clusters, key=lambda c: -c["size"])[:5]
    return result


def _largest_clusters(root_of: np.ndarray, size_of: np.ndarray, lines: np.ndarray, kind: str) -> list[dict]:
    roots = np.unique(root_of[size_of > 1])
    biggest = roots[np.argsort(-size_of[roots], kind="stable")][:5]
    return [{"kind": kind, "size": int(size_of[r]), "kept_line": int(lines[r]),
             "dropped_lines": lines[(root_of == r) & (np.arange(len(root_of)) != r)][:10].tolist()}
            for r in biggest]


def _measure_lengths(spool_path: Path, rows: Rows, alive: np.ndarray, tokenizer, template, max_length: int,
                     over_length: str, method_kind: str, problems: Problems, steps) -> dict[str, Any]:
    """Token lengths of the surviving rows; rows over max_length are dropped or truncated (never left silent)."""
    index = np.flatnonzero(alive)
    prompt_tokens = np.zeros(len(rows), dtype=np.int64)
    completion_tokens = np.zeros(len(rows), dtype=np.int64)
    plain_text = method_kind == "continued_pretraining"
    with spool_path.open("rb") as handle:
        for start in range(0, len(index), 1024):
            chunk = index[start : start + 1024]
            records = [json.loads(_spool_record(handle, rows, i)) for i in chunk]
            completions = [template.render_completion(r["completion"]) for r in records]
            completion_tokens[chunk] = [len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
            if not plain_text:
                prompts = [template.render_prompt(r["prompt"], tokenizer) for r in records]
                encoded = tokenizer(prompts, add_special_tokens=not template.prompt_has_special_tokens)["input_ids"]
                prompt_tokens[chunk] = [len(ids) for ids in encoded]
    total = prompt_tokens + completion_tokens
    lines = np.frombuffer(rows.lines, dtype=np.int64)
    before = int(alive.sum())
    summary: dict[str, Any] = {"max_length": max_length, "over_length": over_length}
    for name, values in (("prompt", prompt_tokens), ("completion", completion_tokens), ("total", total)):
        summary[name] = _percentiles(values[index])
    if plain_text:  # packed into blocks: nothing is cut away
        summary["over_max_length"] = 0
        summary["train_tokens"] = total
        return summary
    over = alive & (total > max_length)
    cut_away = alive & (prompt_tokens >= max_length)
    for i in np.flatnonzero(cut_away if over_length == "truncate" else over)[:].tolist():
        kind = "completion_cut_away" if over_length == "truncate" else "over_max_length"
        problems.add(kind, int(lines[i]), f"{total[i]} tokens (prompt {prompt_tokens[i]}) > max_length {max_length}")
    alive &= ~(cut_away if over_length == "truncate" else over)
    summary["over_max_length"] = int(over.sum())
    summary["truncated"] = int((over & alive).sum()) if over_length == "truncate" else 0
    summary["completion_tokens_kept"] = int(np.minimum(completion_tokens, np.maximum(max_length - prompt_tokens, 0))[alive].sum())
    if summary["completion_tokens_kept"] == 0:
        raise DataError(
            f"no completion tokens remain within max_length={max_length}: training would learn nothing",
            hint="raise training.max_length or shorten the prompts",
        )
    summary["train_tokens"] = np.minimum(total, max_length)
    steps.append({"step": f"length ({over_length} over {max_length} tokens)", "rows_in": before,
                  "rows_out": int(alive.sum())})
    return summary


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {"p50": 0, "p95": 0, "max": 0}
    return {"p50": int(np.percentile(values, 50)), "p95": int(np.percentile(values, 95)), "max": int(values.max())}


def _assign_splits(data, alive: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """0 train, 1 val, 2 test, -1 not used; deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    assignment = np.full(len(alive), -1, dtype=np.int8)
    members = np.flatnonzero(alive)
    if data.split_by == "grouped":
        _assign_groups(assignment, members, groups, data, rng)
    elif data.split_by == "stratified":
        for label in np.unique(labels[members]):
            _cut(assignment, rng.permutation(members[labels[members] == label]), data)
    else:
        _cut(assignment, rng.permutation(members), data)
    return assignment


def _cut(assignment: np.ndarray, shuffled: np.ndarray, data) -> None:
    n_test = max(1, round(len(shuffled) * data.test_fraction)) if len(shuffled) > 2 else 0
    n_val = round(len(shuffled) * data.val_fraction)
    assignment[shuffled[:n_test]] = 2
    assignment[shuffled[n_test : n_test + n_val]] = 1
    assignment[shuffled[n_test + n_val :]] = 0


def _assign_groups(assignment: np.ndarray, members: np.ndarray, groups: np.ndarray, data, rng) -> None:
    if (groups[members] < 0).any():
        missing = int((groups[members] < 0).sum())
        raise DataError(f"{missing} row(s) have no {data.group_column!r} value to group by",
                        hint=f"give every row a {data.group_column!r} value, or use data.split_by random")
    ids, sizes = np.unique(groups[members], return_counts=True)
    order = rng.permutation(len(ids))
    targets = {2: len(members) * data.test_fraction, 1: len(members) * data.val_fraction}
    filled = {2: 0, 1: 0}
    split_of_group = {}
    for g in order.tolist():
        part = next((p for p in (2, 1) if filled[p] < targets[p]), 0)
        split_of_group[int(ids[g])] = part
        filled[part] = filled.get(part, 0) + int(sizes[g])
    lookup = np.zeros(int(ids.max()) + 1, dtype=np.int8)
    for group_id, part in split_of_group.items():
        lookup[group_id] = part
    assignment[members] = lookup[groups[members]]


def _remove_leakage(assignment: np.ndarray, keys: np.ndarray, signatures: np.ndarray | None, threshold: float,
                    rows: Rows, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Val/test rows equal or near-equal to a training row are dropped from val/test and reported."""
    lines = np.frombuffer(rows.lines, dtype=np.int64)
    train = np.flatnonzero(assignment == 0)
    report: dict[str, Any] = {}
    before = int((assignment >= 0).sum())
    for part, name in ((1, "val"), (2, "test")):
        probe = np.flatnonzero(assignment == part)
        leaked = probe[np.isin(keys[probe], keys[train])]
        if signatures is not None:
            leaked = np.union1d(leaked, leaking_rows(signatures, threshold, train, probe))
        assignment[leaked] = -1
        report[name] = {"rows": int(leaked.size), "lines": lines[leaked][:10].tolist()}
    steps.append({"step": "leakage (val/test rows near a train row)", "rows_in": before,
                  "rows_out": int((assignment >= 0).sum())})
    return report


def _shuffled_members(assignment: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {name: rng.permutation(np.flatnonzero(assignment == part)) for part, name in enumerate(SPLITS)}


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
    if order["train"].size == 0 or order["test"].size == 0:
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


def _describe_source(path: Path, fmt: str, shape: Shape | None) -> dict[str, Any]:
    return {"path": str(path), "format": fmt, "shape": shape.name if shape else None,
            "columns": shape.columns if shape else None, "sha256": sha256_of(path)}


def _is_prepared_folder(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not (path.is_dir() and manifest.is_file()):
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == PREPARED_MARK
    except (json.JSONDecodeError, OSError):
        return False


def _reuse_prepared(path: Path, out_dir: Path) -> Prepared:
    """A folder `specialist prepare` wrote: use its split as it is (copied, so the run folder stays whole)."""
    if out_dir.resolve() != path.resolve():
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json", "report.json"):
            if (path / name).is_file():
                shutil.copy2(path / name, out_dir / name)
    report_path = out_dir / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    return Prepared(out_dir, report)


def _replace_folder(scratch: Path, target: Path) -> None:
    """Move the finished scratch folder to `target` in one rename (the old folder, if any, goes after)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    scratch.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
