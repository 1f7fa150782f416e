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
