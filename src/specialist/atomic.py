"""Replacing a file or a folder so that a kill at any instant leaves the old one or the new one, never half of one.

Both write beside the target (same folder, so the same file system) and rename into place. Imports nothing of
specialist: any layer may use it, the core included.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` (UTF-8) beside `path` and rename it into place: readers see the old file or the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def replace_folder(finished: Path, target: Path) -> None:
    """Move the finished folder `finished` to `target` in one rename; an existing `target` is renamed aside first
    and removed after (a folder cannot be renamed over a non-empty one). `finished` must lie beside `target`.

    A kill between the two renames leaves `target` missing and the old folder aside (`.NAME.replaced-PID`), which
    the next replacement of `target` clears; never a folder that is half old, half new. The caller decides whether
    `target` may be replaced at all."""
    finished, target = Path(finished), Path(target)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    if target.exists():
        target.rename(aside)
    finished.rename(target)
    shutil.rmtree(aside, ignore_errors=True)
