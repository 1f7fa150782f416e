"""The run report: loss-curve PNG and a self-contained report.html (images embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training and validation loss against step, saved as PNG; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="#1f77b4")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#d62728", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def png_data_uri(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_report(path: Path, context: dict[str, Any]) -> Path:
    env = Environment(loader=PackageLoader("specialist", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["esc"] = html.escape
    path.write_text(env.get_template("report.html").render(**context), encoding="utf-8")
    return path
