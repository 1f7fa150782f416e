"""The evaluation report: plots as PNG, one self-contained report.html (images as data URIs) and report.md."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape

from specialist.core.scorers import score_exact_match
from specialist.data import Example
from specialist.evaluate.baseline_arms import versus_best_lines
from specialist.evaluate.likelihood import plot_reliability
from specialist.run_folder import RunFolder

if TYPE_CHECKING:
    from specialist.evaluate.results import EvalReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training and validation loss against step, saved as PNG; None when nothing was logged. With
    training.select_by, its validation score on a second axis (the figure the best checkpoint was picked by)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="#1f77b4")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#d62728", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    selection = selection_points(log_history)
    if selection is not None:
        name, points = selection
        right = ax.twinx()
        right.plot(*zip(*points), label=f"validation {name} (select_by)", color="#2ca02c", marker="s")
        right.set_ylabel(name)
        if all(0.0 <= value <= 1.0 for _, value in points):
            right.set_ylim(-0.02, 1.02)  # a share of rows: its whole range, so a flat line reads as flat
        more_handles, more_names = right.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    ax.legend(handles, names)
    return _save(fig, path)


def selection_points(log_history: list[dict[str, Any]]) -> tuple[str, list[tuple[int, float]]] | None:
    """(scorer, [(step, value)]) of the training.select_by scores in a log history, or None without any."""
    rows = [e for e in log_history if isinstance(e.get("select_by"), str) and "step" in e]
    if not rows:
        return None
    name = rows[-1]["select_by"]
    return name, [(e["step"], e[f"eval_{name}"]) for e in rows if f"eval_{name}" in e]


def plot_scores(report: EvalReport, path: Path) -> Path | None:
    """Grouped bars: each 0-1 metric per arm, with its 95% interval as error bars."""
    arms = list(report.arms)
    metrics = [m for m in (report.arms[arms[0]].scores if arms else {}) if m != "length"]
    if not arms or not metrics:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * len(arms) / 2), 3.8), dpi=110)
    width = 0.8 / len(arms)
    for n, arm in enumerate(arms):
        scores = report.arms[arm].scores
        means = [scores[m].mean for m in metrics]
        errors = [[scores[m].mean - scores[m].low for m in metrics],
                  [scores[m].high - scores[m].mean for m in metrics]]
        positions = [i + (n - (len(arms) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(positions, means, width, yerr=errors, capsize=3, label=arm)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% interval)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_confusion(labels: dict[str, Any], title: str, path: Path) -> Path:
    plt = _pyplot()
    matrix = labels["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(labels["predicted_labels"]), 1.2 + 0.5 * len(labels["labels"])),
                           dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels["predicted_labels"])), labels["predicted_labels"], rotation=45, ha="right")
    ax.set_yticks(range(len(labels["labels"])), labels["labels"])
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(title)
    return _save(fig, path)


def plot_lengths(outputs: dict[str, list[str]], expected: list[str], path: Path) -> Path | None:
    if not outputs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    series = {"expected": expected, **outputs}
    ax.hist([[len(t.split()) for t in texts] for texts in series.values()], bins=20, label=list(series))
    ax.set_xlabel("words in the answer")
    ax.set_ylabel("rows")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def png_data_uri(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _plot(draw: Callable[..., Path | None], *args: Any) -> Path | None:
    """One figure, drawn with its text taken literally; a figure that cannot be drawn is left out with a warning,
    never the reason report.html and report.md are missing.

    Labels are model answers and config names: `$\\boxed{42}$` is a label, not math text for matplotlib to parse
    (which raises on it)."""
    import matplotlib

    try:
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return draw(*args)
    except Exception as exc:  # noqa: BLE001 - a figure is an illustration: the numbers are in the tables
        from specialist.console import console

        _pyplot().close("all")
        console.print(f"[yellow]warning:[/] the report leaves out a figure ({getattr(draw, '__name__', draw)}: "
                      f"{type(exc).__name__}: {str(exc)[:200]})")
        return None


def write_eval_report(run: RunFolder, config, report: EvalReport, test: list[Example],
                      outputs: dict[str, list[str]]) -> None:
    run.figures.mkdir(exist_ok=True)
    expected = [ex.completion for ex in test]
    images = {
        "scores": _plot(plot_scores, report, run.figures / "scores.png"),
        "loss": run.loss_plot,  # written by training; a run evaluated before training has none
        "lengths": _plot(plot_lengths, outputs, expected, run.figures / "lengths.png"),
    }
    confusions = {name: _plot(plot_confusion, arm.labels, name, run.figures / f"confusion-{name}.png")
                  for name, arm in report.arms.items() if arm.labels is not None}
    calibrations = {name: arm.calibration for name, arm in report.arms.items() if arm.calibration is not None}
    images["reliability"] = _plot(plot_reliability, calibrations, run.figures / "reliability.png")
    context = report_context(run, config, report, test, outputs)
    context["images"] = {name: png_data_uri(path) for name, path in images.items()}
    context["confusions"] = {arm: png_data_uri(path) for arm, path in confusions.items() if path is not None}
    env = Environment(loader=PackageLoader("specialist", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    run.report_html.write_text(env.get_template("eval_report.html").render(**context), encoding="utf-8")
    run.report_md.write_text(render_markdown(context), encoding="utf-8")


def report_context(run: RunFolder, config, report: EvalReport, test: list[Example],
                   outputs: dict[str, list[str]]) -> dict[str, Any]:
    arms = list(report.arms)
    metrics = run.metrics_so_far()
    return {
        "run_name": run.path.name,
        "model_name": config.model.name,
        "method": config.method.kind,
        "n_eval": report.n_eval,
        "max_new_tokens": report.max_new_tokens,
        "decoding": report.decoding,
        "train": metrics.get("train", {}),
        "arms": arms,
        "score_rows": score_table(report, arms),
        "key_rows": key_table(report, arms),
        "label_rows": label_table(report, arms),
        "calibration_rows": calibration_table(report, arms),
        "threshold_rows": threshold_rows(report, arms),
        "refusal_rows": [{"arm": name, **arm.refusals} for name, arm in report.arms.items() if arm.refusals],
        "costs": {name: arm for name, arm in report.arms.items()},
        "overfitting": report.overfitting,
        "forgetting": report.forgetting,
        "forgetting_rows": forgetting_rows(report.forgetting) if report.forgetting is not None else [],
        "gates": report.gates,
        "versus_best": report.versus_best_baseline(),
        "versus_best_lines": versus_best_lines(report),
        "regressions": worst_regressions(test, outputs),
        "samples": samples(test, outputs, config.evaluation.samples_in_report),
        "overfit_warning": metrics.get("overfitting_warning"),
    }


def score_table(report: EvalReport, arms: list[str]) -> list[dict[str, Any]]:
    rows = []
    for metric in report.arms[arms[0]].scores if arms else []:
        cells = [report.arms[arm].scores[metric] for arm in arms]
        rows.append({"metric": metric, "cells": cells, "versus_base": report.comparison("tuned", "base", metric)})
    return rows


def label_table(report: EvalReport, arms: list[str]) -> list[dict[str, Any]]:
    """Per arm: accuracy, macro-F1 and, with an escalation label, its recall and the in-scope accuracy."""
    rows = []
    for arm in arms:
        labels = report.arms[arm].labels
        if labels:
            escalation = labels.get("escalation") or {}
            rows.append({"arm": arm, "accuracy": labels["accuracy"], "macro_f1": labels["macro_f1"],
                         "in_scope_accuracy": escalation.get("in_scope_accuracy"),
                         "escalation_recall": escalation.get("recall"),
                         "false_escalation_rate": escalation.get("false_escalation_rate")})
    return rows


def calibration_table(report: EvalReport, arms: list[str]) -> list[dict[str, Any]]:
    """Per arm with class probabilities: ECE, mean confidence and accuracy of the top label, rows."""
    return [{"arm": arm, **{k: report.arms[arm].calibration[k] for k in ("ece", "mean_confidence", "accuracy", "rows")}}
            for arm in arms if report.arms[arm].calibration is not None]


def threshold_rows(report: EvalReport, arms: list[str]) -> list[dict[str, Any]]:
    """Per escalation threshold: each arm's escalation recall and false escalation rate at it."""
    tables = {arm: report.arms[arm].calibration["escalation"]["thresholds"] for arm in arms
              if (report.arms[arm].calibration or {}).get("escalation")}
    if not tables:
        return []
    first = next(iter(tables.values()))
    return [{"threshold": row["threshold"], "cells": [(arm, table[n]["recall"], table[n]["false_escalation_rate"])
                                                      for arm, table in tables.items()]}
            for n, row in enumerate(first)]


def key_table(report: EvalReport, arms: list[str]) -> list[dict[str, Any]]:
    keys = (report.arms[arms[-1]].field_accuracy_per_key or {}) if arms else {}
    return [{"key": key, "values": [(report.arms[a].field_accuracy_per_key or {}).get(key, 0.0) for a in arms]}
            for key in keys]


def forgetting_rows(forgetting) -> list[tuple[str, str, str, str]]:
    """(figure, before, after, change) rows of the forgetting report, for report.md and report.html."""
    return forgetting.table()


def worst_regressions(test: list[Example], outputs: dict[str, list[str]], limit: int = 10) -> list[dict[str, Any]]:
    """Rows the base got exactly right and the tuned model gets wrong: what fine-tuning broke."""
    if "tuned" not in outputs or "base" not in outputs:
        return []
    rows = []
    for i, ex in enumerate(test):
        base_ok = score_exact_match(outputs["base"][i], ex.completion)
        tuned_ok = score_exact_match(outputs["tuned"][i], ex.completion)
        if base_ok > tuned_ok:
            rows.append({"input": ex.prompt, "expected": ex.completion, "base": outputs["base"][i],
                         "tuned": outputs["tuned"][i]})
    return rows[:limit]


def samples(test: list[Example], outputs: dict[str, list[str]], limit: int) -> list[dict[str, Any]]:
    return [
        {"input": ex.prompt, "expected": ex.completion,
         "outputs": [{"text": out[i], "match": score_exact_match(out[i], ex.completion)} for out in outputs.values()]}
        for i, ex in enumerate(test[:limit])
    ]


def render_markdown(context: dict[str, Any]) -> str:
    arms = context["arms"]
    # run and model names are the user's text: escaped, so a name holding HTML stays text in a rendered report.md
    lines = [f"# specialist report: {html.escape(context['run_name'])}", "",
             f"Base model `{html.escape(context['model_name'])}`, method `{context['method']}`, "
             f"{context['n_eval']} held-out rows, "
             f"decoding {context['decoding']}, at most {context['max_new_tokens']} new tokens.", "",
             "Each cell: mean and 95% interval (Wilson for shares of rows, bootstrap for other means); last column: "
             "tuned minus base on the same rows, with its paired interval and test.", "",
             *_budget_md(context),
             *_versus_best_md(context),
             "| metric | " + " | ".join(arms) + " | tuned vs base |", "|---|" + "---|" * (len(arms) + 1)]
    for row in context["score_rows"]:
        cells = [c.format() for c in row["cells"]]
        lines.append(f"| {html.escape(row['metric'])} | " + " | ".join(cells)
                     + f" | {_versus_text(row['versus_base'])} |")
    for section in (_costs_md, _labels_md, _calibration_md, _refusals_md, _forgetting_md, _overfitting_md, _gates_md):
        lines += section(context)
    return "\n".join(lines) + "\n"


def _budget_md(context: dict[str, Any]) -> list[str]:
    cut = (context.get("train") or {}).get("cut_by_budget")
    return [f"**Time budget:** {cut}. Every score below is that of the shortened run.", ""] if cut else []


def _versus_best_md(context: dict[str, Any]) -> list[str]:
    if not context["versus_best_lines"]:
        return []
    return ["## Tuned against the best baseline", "",
            *[f"- {html.escape(line)}" for line in context["versus_best_lines"]], ""]


def _versus_text(comparison) -> str:
    if comparison is None:
        return ""
    return f"{comparison.difference.format('+.3f')}, p={comparison.p_value:.3f}"


def _costs_md(context: dict[str, Any]) -> list[str]:
    lines = ["", "| arm | generation on these rows (s) | weights on disk |", "|---|---|---|"]
    for name, arm in context["costs"].items():
        size = f"{arm.weights_bytes / 2**20:.0f} MiB" if arm.weights_bytes else ""
        lines.append(f"| {name} | {arm.generation_seconds:.1f} | {size} |")
    return lines if context["costs"] else []


def _labels_md(context: dict[str, Any]) -> list[str]:
    if not context.get("label_rows"):
        return []
    lines = ["", "| arm | label accuracy | macro-F1 | in-scope accuracy | escalation recall | false escalations |",
             "|---|---|---|---|---|---|"]
    for row in context["label_rows"]:
        cells = [row[k] for k in ("accuracy", "macro_f1", "in_scope_accuracy", "escalation_recall",
                                  "false_escalation_rate")]
        lines.append(f"| {row['arm']} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return lines


def _calibration_md(context: dict[str, Any]) -> list[str]:
    if not context.get("calibration_rows"):
        return []
    lines = ["", "Calibration of the class probabilities (ECE over 15 confidence bins; lower is better):", "",
             "| arm | ECE | mean confidence | accuracy | rows |", "|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['ece']:.3f} | {r['mean_confidence']:.3f} | {r['accuracy']:.3f} | {r['rows']} |"
              for r in context["calibration_rows"]]
    if context.get("threshold_rows"):
        arms = [cell[0] for cell in context["threshold_rows"][0]["cells"]]
        lines += ["", "Escalate when P(escalation) >= threshold: recall / false escalations per arm", "",
                  "| threshold | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        lines += [f"| {row['threshold']:.1f} | " + " | ".join(f"{_share(r)} / {_share(f)}" for _, r, f in row["cells"])
                  + " |" for row in context["threshold_rows"]]
    return lines


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _refusals_md(context: dict[str, Any]) -> list[str]:
    if not context.get("refusal_rows"):
        return []
    first = context["refusal_rows"][0]
    lines = ["", f"| arm | refused when it should ({first['should_refuse']} rows) | "
             f"refused when it should not ({first['should_answer']} rows) |", "|---|---|---|"]
    return lines + [f"| {r['arm']} | " + " | ".join("" if r[k] is None else f"{100 * r[k]:.1f}%"
                                                   for k in ("refused_when_should", "refused_when_should_not")) + " |"
                    for r in context["refusal_rows"]]


def _forgetting_md(context: dict[str, Any]) -> list[str]:
    if not context["forgetting_rows"]:
        return []
    lines = ["", "| forgetting | before | after | change |", "|---|---|---|---|"]
    return lines + [f"| {' | '.join(row)} |" for row in context["forgetting_rows"]]


def _overfitting_md(context: dict[str, Any]) -> list[str]:
    over = context["overfitting"]
    if over is None:
        return []
    gap = ", ".join(f"{metric} {value:+.3f}" for metric, value in over.gap.items()) or "not measured"
    return ["", f"Overfitting: memorisation rate {over.memorisation_rate:.3f}; train-minus-test gap: {gap}"]


def _gates_md(context: dict[str, Any]) -> list[str]:
    if not context["gates"]:
        return []
    return ["", "Gates:", ""] + [f"- {gate.describe()}" for gate in context["gates"]]
