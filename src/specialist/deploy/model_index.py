"""The model card header's structured evaluation: `model-index` (the Hub's format for results, the one its
evaluation widget, leaderboards and `huggingface_hub.ModelCard` read) and `datasets:` where the training data is a
Hub dataset.

Every arm of eval.json goes in, the exported model's own arm (tuned) first; each figure carries its arm and, where
the evaluation computed one, its 95% interval in `args`, and is marked unverified (self-reported). Like the rest of
the header it is built from checked names only: an arm, metric or folder name that is not a plain identifier is
left out rather than put into YAML the Hub parses.
"""

from __future__ import annotations

import math
import re
from typing import Any

from specialist.run_folder import RunFolder, read_json

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # a model or dataset id
# what a local file is to `datasets.load_dataset` (the dataset type Trainer's own cards write for such files)
_LOCAL_TYPES = {"jsonl": "json", "json": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet", "arrow": "arrow"}
OWN_ARM = "tuned"  # the arm an export of the run is


def evaluation_header(run: RunFolder | None, repo_id: str | None, task_type: str) -> dict[str, Any]:
    """`datasets` and `model-index` for the card's header; empty where the run, its data or its evaluation is
    missing."""
    if run is None:
        return {}
    dataset = training_dataset(run)
    header: dict[str, Any] = {"datasets": [dataset["type"]]} if dataset.get("hub") else {}
    report = read_json(run.eval_json) if run.eval_json.is_file() else None
    results = _eval_results(report, task_type, dataset) if isinstance(report, dict) else []
    if results:
        from huggingface_hub.repocard_data import eval_results_to_model_index

        header["model-index"] = eval_results_to_model_index(_model_name(run, repo_id), results)
    return header


def training_dataset(run: RunFolder) -> dict[str, Any]:
    """What the Hub calls the dataset: the Hub id when data.path named one (with its subset), else the file's
    `datasets` loader type; the held-out rows are prepare's test split of it."""
    manifest = read_json(run.data_manifest) if run.data_manifest.is_file() else {}
    source = manifest.get("source") if isinstance(manifest, dict) else None
    source = source if isinstance(source, dict) else {}
    path, fmt = str(source.get("path", "")), source.get("format")
    if fmt == "hub" and HUB_ID.match(path):  # data.readers.HUB, spelt out: deploy does not import the data stage
        subset = _subset(run)
        return {"type": path, "name": path, "hub": True, **({"config": subset} if subset else {})}
    return {"type": _LOCAL_TYPES.get(str(fmt), "custom"), "name": "held-out rows of the training data",
            "hub": False}


def _subset(run: RunFolder) -> str | None:
    try:
        subset = run.config().data.subset
    except Exception:  # a run whose config no longer validates still gets a card; the subset is a nicety
        return None
    return subset if isinstance(subset, str) and _SAFE.match(subset) else None


def _model_name(run: RunFolder, repo_id: str | None) -> str:
    if repo_id and HUB_ID.match(repo_id):
        return repo_id
    return run.path.name if _SAFE.match(run.path.name) else "specialist-model"


def arm_figures(arm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An arm's figures as interval cells ({mean, low, high, method, n}): a generation or classifier arm's `scores`,
    or a continued-pretraining arm's perplexities (plain numbers) and question accuracy (an interval)."""
    if isinstance(arm.get("scores"), dict):
        return {k: v for k, v in arm["scores"].items() if isinstance(v, dict)}
    cells = {}
    for key in ("doc_perplexity", "general_perplexity", "question_accuracy"):
        value = arm.get(key)
        cells[key] = value if isinstance(value, dict) else {"mean": value}
    return cells


def _eval_results(report: dict[str, Any], task_type: str, dataset: dict[str, Any]) -> list:
    from huggingface_hub.repocard_data import EvalResult

    arms = report.get("arms") if isinstance(report.get("arms"), dict) else {}
    ordered = sorted((name for name in arms if isinstance(name, str) and _SAFE.match(name)),
                     key=lambda name: name != OWN_ARM)  # stable: the export's own arm first, then eval.json's order
    results = []
    for arm in ordered:
        for metric, cell in arm_figures(arms[arm] if isinstance(arms[arm], dict) else {}).items():
            value = cell.get("mean")
            if not (_SAFE.match(str(metric)) and isinstance(value, (int, float)) and math.isfinite(value)):
                continue
            results.append(EvalResult(
                task_type=task_type, dataset_type=dataset["type"], dataset_name=dataset["name"],
                dataset_config=dataset.get("config"), dataset_split="test", metric_type=metric,
                metric_value=float(value), metric_name=f"{metric} ({arm})", metric_args=_figure_args(arm, cell),
                verified=False))
    return results


def _figure_args(arm: str, cell: dict[str, Any]) -> dict[str, Any]:
    """The arm, and the 95% interval where the evaluation has one (the Hub keeps `args` as written)."""
    args: dict[str, Any] = {"arm": arm}
    low, high = cell.get("low"), cell.get("high")
    if all(isinstance(b, (int, float)) and math.isfinite(b) for b in (low, high)):
        args["ci95"] = [float(low), float(high)]
        args["interval"] = str(cell.get("method", "")) if _SAFE.match(str(cell.get("method", ""))) else "unknown"
    if isinstance(cell.get("n"), int):
        args["n"] = cell["n"]
    return args

