"""Experiment trackers: the evaluation's figures go to the trackers training reported to (`training.report_to`).

transformers' Trainer logs training to them itself. The evaluation is specialist's own and often runs in a later
process (`specialist eval`), so training records which run each tracker opened (`record_tracker_runs`, from
train's TrackerRunsCallback, into the run folder's trackers.json) and `log_evaluation` logs into that same run:
wandb by run id, mlflow by run id and tracking URI, trackio by project and run name, comet_ml by experiment key.
TensorBoard needs no id: its events go into the run's tensorboard/ folder beside training's, which TensorBoard
shows as one run. Other trackers TrainingArguments knows (neptune, clearml, ...) get training's logs only.

Figures are scalars named `eval/<arm>/<metric>` (with `_low`/`_high` for the 95% interval), `eval/forgetting/..`,
`eval/overfitting/..` and `eval/gates_passed`. A tracker that cannot be reached is a warning: eval.json is written
before, and is the record.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

from specialist.console import console
from specialist.run_folder import RunFolder, read_json, write_json

_KEY = re.compile(r"[^\w./ -]")  # what mlflow accepts in a metric name (the strictest of them); arm names are free


def current_runs(args: Any) -> dict[str, dict[str, Any]]:
    """The tracker runs open in this process, read off modules the Trainer's callbacks already imported (nothing is
    imported here); `args` are the TrainingArguments (trackio's run is named by them)."""
    found: dict[str, dict[str, Any]] = {}
    wandb, mlflow, comet = (sys.modules.get(name) for name in ("wandb", "mlflow", "comet_ml"))
    if wandb is not None and getattr(wandb, "run", None) is not None:
        found["wandb"] = {"id": wandb.run.id, "project": wandb.run.project, "entity": wandb.run.entity}
    if mlflow is not None and mlflow.active_run() is not None:
        found["mlflow"] = {"run_id": mlflow.active_run().info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
    trackio = _trackio_run(sys.modules["trackio"], args) if "trackio" in sys.modules else None
    if trackio is not None:
        found["trackio"] = trackio
    running = getattr(comet, "get_running_experiment", None) if comet is not None else None
    if running is not None and running() is not None:
        found["comet_ml"] = {"experiment_key": running().get_key()}
    return found


def _trackio_run(trackio: Any, args: Any) -> dict[str, Any] | None:
    """trackio's open run: its own record where it keeps one (context_vars.current_run: a run left unnamed gets
    a generated name, which only it knows), else the names the Trainer gave it."""
    context = getattr(trackio, "context_vars", None)
    current = context.current_run.get() if hasattr(context, "current_run") else None
    project = getattr(current, "project", None) or getattr(args, "project", None)
    if not project:
        return None
    return {"project": project, "name": getattr(current, "name", None) or getattr(args, "run_name", None),
            "space_id": getattr(args, "trackio_space_id", None)}


def record_tracker_runs(path: Path, args: Any) -> None:
    """Write trackers.json when a tracker run is open (a run without trackers gets no file)."""
    try:
        runs = current_runs(args)
    except Exception as exc:  # a tracker's own API changed: training goes on, the evaluation logs locally only
        console.log(f"[yellow]could not record the tracker runs ({exc}); the evaluation will not reach them")
        return
    if runs:
        write_json(path, runs)


def evaluation_scalars(report: dict[str, Any]) -> dict[str, float]:
    """eval.json's figures as flat scalars: every arm's scores (or a continued-pretraining arm's figures), with
    their intervals, forgetting and overfitting figures, and how many gates passed."""
    scalars: dict[str, float] = {}
    for arm, data in (report.get("arms") or {}).items():
        cells = data.get("scores") if isinstance(data, dict) and isinstance(data.get("scores"), dict) else data
        for metric, cell in (cells.items() if isinstance(cells, dict) else ()):
            _add(scalars, f"eval/{arm}/{metric}", cell)
    for section in ("forgetting", "overfitting"):
        for key, value in (report.get(section) or {}).items():
            _add(scalars, f"eval/{section}/{key}", value)
    gates = report.get("gates") or []
    if gates:
        scalars["eval/gates_passed"] = float(sum(bool(g.get("passed")) for g in gates))
        scalars["eval/gates"] = float(len(gates))
    return {_KEY.sub("_", name): value for name, value in scalars.items()}


def _add(scalars: dict[str, float], name: str, cell: Any) -> None:
    """A number, or an interval's mean with its bounds; anything else (lists, text, NaN) is left out."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if number(cell):
        scalars[name] = float(cell)
    elif isinstance(cell, dict) and number(cell.get("mean")):
        scalars[name] = float(cell["mean"])
        for bound in ("low", "high"):
            if number(cell.get(bound)):
                scalars[f"{name}_{bound}"] = float(cell[bound])


def log_evaluation(run: RunFolder, report_to: list[str], report: dict[str, Any]) -> list[str]:
    """Log the evaluation's figures to each tracker in `report_to` that can take them; returns those logged to."""
    trackers = _resolved(report_to)
    if not trackers:
        return []
    scalars = evaluation_scalars(report)
    step = int((run.metrics_so_far().get("train") or {}).get("steps") or 0)  # beside training's last point
    recorded = read_json(run.tracker_runs) if run.tracker_runs.is_file() else {}
    logged = []
    for tracker in trackers:
        if tracker not in LOGGERS or (tracker != "tensorboard" and tracker not in recorded):
            # no way to find training's run: the figures stay in eval.json and the report
            console.log(f"evaluation figures not logged to {tracker}: " + ("training recorded no run of it"
                        if tracker in LOGGERS else f"specialist logs them to {', '.join(LOGGERS)} only"))
            continue
        try:
            LOGGERS[tracker](recorded.get(tracker) or {"folder": run.tensorboard}, scalars, step)
        except Exception as exc:  # offline, logged out, a changed API: the evaluation itself stands
            console.log(f"[yellow]evaluation figures not logged to {tracker}: {exc}")
            continue
        logged.append(tracker)
    return logged


def _resolved(report_to: list[str]) -> list[str]:
    if "all" not in report_to:
        return [name for name in report_to if name != "none"]
    from transformers.integrations import get_available_reporting_integrations

    return get_available_reporting_integrations()


def _tensorboard(record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(record["folder"]))
    try:
        for name, value in scalars.items():
            writer.add_scalar(name, value, global_step=step)
    finally:
        writer.close()


def _wandb(record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
    import wandb

    if wandb.run is not None and wandb.run.id == record["id"]:  # `specialist run`: training's run is still open
        wandb.run.log(scalars)
        return
    run = wandb.init(id=record["id"], project=record.get("project"), entity=record.get("entity"), resume="must")
    try:
        run.log(scalars)
    finally:
        run.finish()


def _mlflow(record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
    import mlflow

    if record.get("tracking_uri"):
        mlflow.set_tracking_uri(record["tracking_uri"])
    active = mlflow.active_run()
    if active is not None and active.info.run_id == record["run_id"]:  # still open (the Trainer did not end it)
        mlflow.log_metrics(scalars, step=step)
        return
    with mlflow.start_run(run_id=record["run_id"]):
        mlflow.log_metrics(scalars, step=step)


def _trackio(record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
    import trackio

    trackio.init(project=record["project"], name=record.get("name"), space_id=record.get("space_id"), resume="must")
    try:
        trackio.log(scalars)
    finally:
        trackio.finish()


def _comet(record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
    import comet_ml

    experiment = comet_ml.start(experiment_key=record["experiment_key"])
    try:
        experiment.log_metrics(scalars, step=step)
    finally:
        experiment.end()


LOGGERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio, "comet_ml": _comet}
