"""The data report in the terminal: what was read, what was dropped and why (with lines), lengths, labels."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from specialist.console import console


def print_prepare_report(report: dict[str, Any]) -> None:
    if not report.get("steps"):
        console.log("data: reusing a prepared folder")
        return
    source = report["source"]
    console.print(f"[bold]data[/] {source['path']} ({source['format']}, {source['shape']} rows), "
                  f"{report['rows_read']} rows read", soft_wrap=True)
    for name, fixed in report.get("fixed_sources", {}).items():
        console.print(f"[bold]fixed {name} set[/] {fixed['path']} ({fixed['format']}, {fixed['shape']} rows), "
                      f"{fixed['rows_read']} rows read, {fixed['rows_kept']} kept", soft_wrap=True)
    console.print(_steps_table(report))
    if report["dropped"]:
        console.print(_dropped_table(report["dropped"], source["path"]))
    for name, fixed in report.get("fixed_sources", {}).items():
        if fixed["dropped"]:
            console.print(_dropped_table(fixed["dropped"], fixed["path"], f"{name} rows dropped, and why"))
    if report.get("lengths"):
        console.print(_lengths_table(report["lengths"]))
    if report.get("labels"):
        console.print(_labels_table(report["labels"]))
    for line in _notes(report):
        console.print(line, soft_wrap=True)


def _steps_table(report: dict[str, Any]) -> Table:
    table = Table(title="rows per step")
    for column in ("step", "in", "out", "dropped"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step in report["steps"]:
        table.add_row(step["step"], str(step["rows_in"]), str(step["rows_out"]), str(step["rows_in"] - step["rows_out"]))
    splits = report["splits"]
    table.add_row("[bold]split[/]", "", f"{splits['train']} / {splits['val']} / {splits['test']}", "train/val/test")
    return table


def _dropped_table(dropped: dict[str, Any], path: str, title: str = "rows dropped, and why") -> Table:
    table = Table(title=title)
    table.add_column("reason")
    table.add_column("rows", justify="right")
    table.add_column("first lines")
    for kind, entry in dropped.items():
        first = entry["first"][0]
        lines = ", ".join(str(p["line"]) for p in entry["first"])
        table.add_row(kind, str(entry["count"]), f"{lines}  ({path}:{first['line']}: {first['problem']})")
    return table


def _lengths_table(lengths: dict[str, Any]) -> Table:
    table = Table(title=f"tokens per row (max_length {lengths['max_length']})")
    for column in ("part", "p50", "p95", "max"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part in ("prompt", "completion", "total"):
        figures = lengths[part]
        table.add_row(part, str(figures["p50"]), str(figures["p95"]), str(figures["max"]))
    return table


def _labels_table(labels: dict[str, Any]) -> Table:
    balance = labels.get("balance") or {}
    after = balance.get("train_after", {})
    table = Table(title="labels")
    table.add_column("label")
    table.add_column("rows", justify="right")
    if balance:
        table.add_column("train before", justify="right")
        table.add_column("train after", justify="right")
    for label, count in labels["all"].items():
        extra = [str(balance["train_before"].get(label, 0)), str(after.get(label, 0))] if balance else []
        table.add_row(label, str(count), *extra)
    return table


def _notes(report: dict[str, Any]) -> list[str]:
    notes = []
    duplicates = report["duplicates"]
    if duplicates["exact"] or duplicates["near"]:
        biggest = duplicates["largest_clusters"][0] if duplicates["largest_clusters"] else None
        where = f"; largest cluster {biggest['size']} rows, kept line {biggest['kept_line']}" if biggest else ""
        notes.append(f"duplicates: {duplicates['exact']} exact, {duplicates['near']} near removed{where}")
    kept = duplicates.get("fixed_kept") or {}
    if kept.get("exact") or kept.get("near"):
        notes.append(f"[yellow]duplicates in the fixed val/test set:[/] {kept['exact']} exact, {kept['near']} near, "
                     "kept (a fixed set is used as it is; see report.json duplicates.largest_clusters)")
    for name, entry in report["leakage"].items():
        if entry["rows"]:
            extra = f" ({entry['train_rows']} training rows, lines {entry['train_lines']})" \
                if "train_rows" in entry else ""
            kind = "fixed " if entry.get("fixed") else ""
            notes.append(f"[yellow]leakage:[/] {entry['rows']} {kind}{name} rows (lines {entry['lines']}) matched a "
                         f"training row: {entry.get('action', 'removed')}{extra}")
    lengths = report.get("lengths") or {}
    if lengths.get("truncated"):
        notes.append(f"truncated: {lengths['truncated']} rows had their input shortened ({lengths['truncate_side']}), "
                     f"{lengths['tokens_cut']:,} prompt tokens cut; answers kept whole")
    if lengths.get("fixed_over_max_length"):
        notes.append(f"[yellow]{lengths['fixed_over_max_length']} fixed val/test rows exceed max_length[/] "
                     "(kept as given)")
    split = report.get("split") or {}
    if split.get("ignored"):
        fixed = f", fixed {' and '.join(split['fixed'])} set" if split.get("fixed") else ""
        notes.append(f"split: by {split['by']}{fixed} ({', '.join(split['ignored'])} not used)")
    scrubbed = report["clean"]["scrubbed"]
    if scrubbed:
        notes.append("scrubbed: " + ", ".join(f"{n} {kind}" for kind, n in scrubbed.items()))
    if report.get("labels") and report["labels"].get("declared_without_rows"):
        notes.append(f"[yellow]labels with no rows:[/] {report['labels']['declared_without_rows']}")
    notes += _lookup_notes(report.get("lookup"))
    if report.get("tokens_per_epoch") is not None:
        notes.append(f"training tokens per epoch: about {report['tokens_per_epoch']:,}")
    return notes


def _lookup_notes(lookup: dict[str, Any] | None) -> list[str]:
    """What a lookup of the training rows already answers; a warning when the test set measures recall."""
    if lookup and lookup.get("skipped"):
        return [f"lookup check skipped: {lookup['skipped']}"]
    if not lookup or not lookup.get("splits"):
        return []
    shares = "; ".join(f"{name}: {100 * s['answer_seen_in_train']:.0f}% of answers seen in training, nearest "
                       f"training row exactly right on {100 * s['nearest_exact']:.0f}%"
                       for name, s in lookup["splits"].items())
    notes = [f"lookup: {shares}"]
    if lookup.get("warn"):
        notes.append("[yellow]the held-out rows are answered by lookup[/]: the test set measures recall of seen "
                     "answers, not the skill; split whole groups apart (data.split_by: grouped with a "
                     "data.group_column, e.g. the template or source each row came from)")
    return notes
