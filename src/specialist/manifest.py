"""The run manifest: what produced this run, so it can be audited and repeated."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from specialist.config import RunConfig
from specialist.ranks import is_main_process

PACKAGES = ("specialist", "torch", "transformers", "trl", "peft", "accelerate", "datasets")


def start_manifest(config: RunConfig, path: Path) -> dict[str, Any]:
    """Write the run's manifest at `path` at the start (so even a killed run has one); a resumed run appends its
    session."""
    previous = json.loads(path.read_text()) if path.is_file() else {}
    now = _now()
    manifest = {
        "started": previous.get("started", now),
        "sessions": previous.get("sessions", []) + [now],
        "finished": None,
        "config": config.model_dump(mode="json"),
        "seed": config.training.seed,
        "data_file": {"path": str(config.data.path), "sha256": sha256_of(config.data.path)},
        "packages": {name: _version(name) for name in PACKAGES},
        "hardware": hardware(),
        "git_commit": git_commit(Path.cwd()),
        "launch": {k: os.environ[k] for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ},
    }
    if is_main_process():
        path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def finish_manifest(manifest: dict[str, Any], path: Path, split: dict[str, Any]) -> Path:
    manifest = {**manifest, "split": split, "finished": _now()}
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def sha256_of(path: Path) -> str | None:
    """SHA-256 of a file, or of every file in a folder in name order; None when nothing is there."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
