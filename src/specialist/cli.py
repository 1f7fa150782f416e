"""The `specialist` command: a thin Typer layer over the Python API. Heavy imports live inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from specialist.console import console
from specialist.errors import SpecialistError

app = typer.Typer(
    help="Turn a general pretrained LLM into a specialist for one job, with before/after proof.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set training.epochs=2 (repeatable)."),
]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
    model: Annotated[str | None, typer.Option(help="Base model (overrides model.name).")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Parent folder for the run (overrides output.dir).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides training.max_steps).")] = None,
) -> None:
    """Fine-tune the base model on CONFIG's data and compare it with the base model on held-out examples."""
    from specialist.config import load_config
    from specialist.pipeline import run as run_pipeline

    overrides = list(set_ or [])
    overrides += [f"model.name={model}"] if model else []
    overrides += [f"output.dir={output_dir}"] if output_dir else []
    overrides += [f"training.max_steps={max_steps}"] if max_steps is not None else []
    with _user_errors():
        cfg = load_config(config, overrides)
        summary = run_pipeline(cfg, config_name=_config_name(config))
    print_scores(summary.metrics)
    console.print(f"run folder: [bold]{summary.run_dir}[/]", soft_wrap=True)
    console.print(f"report:     [bold]{summary.report.resolve()}[/]", soft_wrap=True)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the newest run of CONFIG from its newest complete checkpoint.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides training.max_steps).")] = None,
) -> None:
    """Train only (no evaluation arms); runs the same under `accelerate launch` and `torchrun`."""
    from specialist.config import load_config
    from specialist.pipeline import train_only

    overrides = list(set_ or []) + ([f"training.max_steps={max_steps}"] if max_steps is not None else [])
    with _user_errors():
        cfg = load_config(config, overrides)
        summary = train_only(cfg, config_name=_config_name(config), resume=resume)
    from specialist.train.common import is_main_process

    if is_main_process():
        figures = summary.metrics["train"]
        console.print(f"trained {figures['steps']} steps: loss {figures['first_loss']} -> {figures['final_loss']}, "
                      f"validation {figures['final_val_loss']}", soft_wrap=True)
        console.print(f"run folder: [bold]{summary.run_dir}[/]", soft_wrap=True)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    set_: SetOption = None,
) -> None:
    """Check a config and its data without loading a model; exit 2 with every problem listed."""
    from specialist.config import load_config
    from specialist.data import Columns, load_examples
    from specialist.train import check_method_runs_here

    with _user_errors():
        cfg = load_config(config, list(set_ or []))
        check_method_runs_here(cfg.method)
        examples = load_examples(cfg.data.path, Columns.for_method(cfg.data, cfg.method.kind), cfg.data.format)
    console.print(f"[green]ok[/] {config}: {len(examples)} examples in {cfg.data.path}, model {cfg.model.name}")


@app.command()
def models() -> None:
    """List converted models in the cache ($SPECIALIST_HOME/models)."""
    from specialist.models import list_cached_models, models_dir

    cached = list_cached_models()
    if not cached:
        console.print(f"no cached models in {models_dir()}; `specialist run` converts the default on first use")
        return
    table = Table(title=f"cached models in {models_dir()}")
    for column in ("name", "parameters", "context", "dtype", "disk"):
        table.add_column(column, justify="right" if column in {"parameters", "context", "disk"} else "left")
    for m in cached:
        table.add_row(m.name, f"{m.parameters / 1e6:.1f}M", str(m.context_length or "?"), m.dtype,
                      f"{m.disk_bytes / 2**20:.0f} MiB")
    console.print(table)


def print_scores(metrics: dict) -> None:
    scores = metrics["scores"]
    arms = list(scores)
    table = Table(title=f"held-out results ({metrics['n_eval']} examples)")
    table.add_column("metric")
    for arm in arms:
        table.add_column(arm, justify="right")
    if len(arms) == 2:
        table.add_column("change", justify="right")
    if not arms:
        return
    for metric in [m for m in scores[arms[0]] if isinstance(scores[arms[0]][m], float)]:
        values = [scores[arm][metric] for arm in arms]
        cells = [f"{100 * v:.1f}%" for v in values]
        if len(arms) == 2:
            cells.append(f"{100 * (values[1] - values[0]):+.1f} pts")
        table.add_row(metric, *cells)
    console.print(table)
    if metrics.get("overfitting_warning"):
        console.print(f"[yellow]warning:[/] {metrics['overfitting_warning']}")


def _config_name(path: Path) -> str:
    return path.parent.name if path.stem == "config" else path.stem


class _user_errors:
    """Print a SpecialistError without a traceback and exit with its code."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, SpecialistError):
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(exc.exit_code)
        return False


if __name__ == "__main__":
    app()
