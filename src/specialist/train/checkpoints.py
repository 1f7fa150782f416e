"""Checkpoints that survive a kill at any instant.

The Trainer writes a checkpoint folder file by file and then deletes older ones, so a SIGKILL can leave a folder
that looks like a checkpoint but is not whole, or none at all. Here a checkpoint counts only when it carries the
completion mark, and the order of operations keeps at least one whole, marked checkpoint on disk at every instant:

1. a stale folder of the same name (from a killed session) is discarded first;
2. the Trainer writes every file (model or adapter, optimizer, scheduler, RNG state per rank, trainer_state.json);
3. all ranks meet; rank 0 fsyncs every file, then writes the mark atomically (temporary file, fsync, rename);
4. only then are older checkpoints rotated out, each renamed out of the `checkpoint-*` namespace in one atomic
   step before it is removed, so a half-deleted folder is never taken for a checkpoint.

The mark lists every file with its size, so `is_complete` also refuses a folder that lost files after it was
marked. The best checkpoint (by validation loss) is never rotated out, as in the Trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMPLETE_MARK = "specialist-complete.json"
CHECKPOINT_PREFIX = "checkpoint-"
DISCARDED_PREFIX = ".discarded-"  # outside the checkpoint-* namespace that the Trainer and we look in
LEGACY = object()


def checkpoint_step(folder: Path) -> int | None:
    """The step in a `checkpoint-<step>` folder name, or None for any other name."""
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_folders(parent: Path) -> list[Path]:
    """`checkpoint-<step>` folders under `parent`, by step."""
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def fsync_tree(folder: Path) -> list[Path]:
    """fsync every file under `folder` and every folder in it; returns the files, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    for directory in sorted({p.parent for p in files} | {folder}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)
    return files


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (names created, renamed, removed in it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_mark(folder: Path, step: int, files: list[Path]) -> None:
    """The completion mark, written whole or not at all: a temporary file, fsync'd, renamed into place."""
    listing = {str(p.relative_to(folder)): p.stat().st_size for p in files if p.name != COMPLETE_MARK}
    body = json.dumps({"step": step, "time": time.time(), "files": listing}, indent=1)
    temporary = folder / f".{COMPLETE_MARK}.tmp"
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / COMPLETE_MARK)
    fsync_dir(folder)


def seal(folder: Path, step: int) -> None:
    """Make a fully written checkpoint durable, then mark it complete."""
    write_mark(folder, step, fsync_tree(folder))


def is_complete(folder: Path) -> bool:
    """Marked complete, and every file the mark lists is still there with the size it had."""
    try:
        mark = json.loads((folder / COMPLETE_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(mark, dict):
        return False
    listing = mark.get("files", LEGACY)
    if listing is LEGACY:
        return True  # marked by an earlier version, once the Trainer had written everything (no file list)
    if not isinstance(listing, dict) or not listing:
        return False
    for name, size in listing.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return False  # a mark only speaks for files inside its own folder
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The highest-step checkpoint folder that is complete, or None."""
    complete = [p for p in checkpoint_folders(checkpoints) if is_complete(p)]
    return complete[-1] if complete else None


def discard(folder: Path) -> None:
    """Rename out of the checkpoint namespace (one atomic step), make the rename durable, then remove."""
    trash = folder.parent / f"{DISCARDED_PREFIX}{folder.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)  # left by a kill during an earlier removal
    os.rename(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clear_discarded(parent: Path) -> None:
    """Finish removals a kill interrupted."""
    for trash in parent.glob(f"{DISCARDED_PREFIX}*"):
        shutil.rmtree(trash, ignore_errors=True)


def rotate(parent: Path, newest: Path, keep: int | None, best: Path | None) -> list[Path]:
    """Discard what is not worth keeping once `newest` is sealed; returns the discarded folders.

    Kept: `newest`, `best`, and the most recent other complete checkpoints up to `keep` folders in all (no limit
    when `keep` is None). Discarded: older complete ones beyond that, any incomplete folder (the remains of a killed
    save), and any checkpoint of a higher step than `newest` (from a run that went further before this one
    restarted it: resuming must find this run's newest checkpoint, not one of another trajectory).
    """
    newest_step = checkpoint_step(newest)
    protected = {newest.resolve()} | ({best.resolve()} if best is not None and best.is_dir() else set())
    others = [p for p in checkpoint_folders(parent) if p.resolve() not in protected]
    junk = [p for p in others if not is_complete(p) or checkpoint_step(p) > newest_step]
    complete = [p for p in others if p not in junk]
    room = max(0, (keep - len(protected)) if keep else len(complete))
    junk += complete[: max(0, len(complete) - room)]
    for folder in junk:
        discard(folder)
    clear_discarded(parent)
    return junk


def barrier() -> None:
    """All ranks meet (nothing in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class DurableCheckpoints:
    """Trainer mixin: the save order above, in place of the Trainer's own rotation.

    Put it before the Trainer class in the bases: `class MyTrainer(DurableCheckpoints, SFTTrainer)`. The Trainer's
    `save_total_limit` rotation and its end-of-training clean-up are held off while they run, and done here after
    the new checkpoint is sealed.
    """

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        if self.args.should_save and folder.exists():
            discard(folder)  # the remains of a save that a kill interrupted, never mixed with the new files
        barrier()  # no rank writes into the folder before the stale one is gone
        self._name_best_checkpoint(trial)
        with self._rotation_held():
            super()._save_checkpoint(model, trial)
        barrier()  # every rank's files (RNG state, FSDP shards) are written
        if self.args.should_save:
            seal(folder, self.state.global_step)
            best = self.state.best_model_checkpoint
            rotate(folder.parent, folder, self.args.save_total_limit, Path(best) if best else None)

    def _finalize_training(self, *args, **kwargs):
        with self._rotation_held():
            output = super()._finalize_training(*args, **kwargs)
        best = self.state.best_model_checkpoint
        # As the Trainer does with save_total_limit=1: once the best model is loaded, only its checkpoint stays.
        if self.args.should_save and best and self.args.save_total_limit == 1:
            for folder in checkpoint_folders(Path(best).parent):
                if folder.resolve() != Path(best).resolve():
                    discard(folder)
        return output

    def _name_best_checkpoint(self, trial) -> None:
        """The same best checkpoint on every rank, and in the trainer_state.json this save writes.

        transformers 5.24 names the best checkpoint only if its folder exists when a rank looks, right after the
        model is saved. Under FSDP with sharded state dicts that save writes nothing; the folder appears later,
        made by whichever rank gets there first, so ranks disagreed, and at the end only some of them joined the
        collective load of the best model: a hang. The best step is known before the save, so name it here.
        """
        step = self.state.best_global_step
        if not step:
            return
        best = os.path.join(self._get_output_dir(trial=trial), f"{CHECKPOINT_PREFIX}{step}")
        if step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best

    @contextmanager
    def _rotation_held(self) -> Iterator[None]:
        """`args.save_total_limit` is None inside the block, so the Trainer deletes no checkpoint itself."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            yield
        finally:
            self.args.save_total_limit = limit
