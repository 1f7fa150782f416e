"""The one exception type a user can act on: the CLI prints it without a traceback."""


class SpecialistError(Exception):
    """A problem the user can fix (bad config, bad data, missing model).

    `exit_code` is 2 for usage errors and 1 for a run that failed on its own terms.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(SpecialistError):
    """The run config does not validate; the message lists every problem with its key path."""


class DataError(SpecialistError):
    """The data file cannot be used; the message names the file and line."""


class ModelError(SpecialistError):
    """The base model cannot be found, converted or loaded."""


class StorageError(SpecialistError):
    """A file could not be written: the disk is full, the folder is read-only or not ours to write."""

    exit_code = 1


def storage_error(exc: OSError) -> StorageError | None:
    """A full disk, a read-only file system or a folder without write permission as an error naming the path
    and the free space there; None for any other OSError (a bug, shown with its traceback)."""
    import errno

    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
    if exc.errno not in reasons:
        return None
    path = exc.filename if exc.filename is not None else "(a file)"
    return StorageError(f"cannot write {path}: {reasons[exc.errno]}; {_free_space(path)}",
                        hint="free some space or choose another output folder (output.dir, --out), then run again")


def _free_space(path: object) -> str:
    """'N MiB free in FOLDER', measured at the nearest folder of `path` that exists."""
    import os
    import shutil

    folder = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else os.getcwd()
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {folder}"
    except OSError:
        return f"free space in {folder} unknown"
