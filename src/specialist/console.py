"""One Rich console for the whole package, and the progress helpers built on it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for a step whose length we cannot count; in a log file, where no spinner renders, a line when
    the step starts as well as when it is done."""
    if not console.is_terminal:
        console.log(message)
    with console.status(message):
        yield
    console.log(f"[green]done[/] {message}")


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


class QuietLineClock:
    """Into a log file (where no live bar renders) a progress writer's line before `every` seconds pass without
    one: a daemon thread checks `since_line()` (seconds since the writer's last line, on the writer's own clock)
    every second and calls `write()` two checks early, so a late check or a busy core still keeps the gap under
    `every` (checked every every/4 = 7.5 s and written at 30, the one-core demo's log had gaps of 36 s). A line
    written only when a step or a batch ends leaves a log silent for up to one more step or batch; this does not.
    `stop()` ends the thread (and may be called again)."""

    def __init__(self, every: float, since_line: Callable[[], float], write: Callable[[], None], name: str) -> None:
        self.every, self.since_line, self.write = every, since_line, write
        self._check_every = min(1.0, every / 4)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> QuietLineClock:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self._check_every):
            if self.since_line() >= self.every - 2 * self._check_every:
                self.write()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
