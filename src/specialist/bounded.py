"""Work on user-influenced text with a time bound: schema `pattern` checks and chat-template rendering.

A model's answer, a request's text or a downloaded chat template can make ordinary code run for minutes: a common
e-mail `pattern` backtracks exponentially in Python `re` (60 characters: about 12 minutes), a template with
nested loops renders forever. Both run here under a deadline and raise `TimedOut` when they pass it, so the
caller records "timed out" instead of freezing a server or a run.

- Patterns run in the `regex` engine (a dependency of transformers) with its `timeout`, and `concurrent=True` so
  the matching releases the GIL: the server's event loop keeps answering while a check runs in a thread.
- Templates are Jinja code, plain Python: a trace function on the rendering thread checks the deadline at every
  line the template executes and raises there.

`time_limit(seconds)` sets one deadline for everything inside it on the current thread (one answer's whole format
check, however many patterns its schema holds).
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import regex

from specialist.errors import SpecialistError

PATTERN_SECONDS = 1.0  # one answer's format check: a real schema's patterns take microseconds
TEMPLATE_SECONDS = 2.0  # one prompt's rendering: a real chat template takes about a millisecond
_TEMPLATE_FILES = ("<template>",)  # what Jinja names the code it compiles from a template string

_local = threading.local()


class TimedOut(SpecialistError):
    """Bounded work ran past its deadline; the message says which work (the pattern, the template)."""

    exit_code = 1


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """One deadline for the bounded work inside, on this thread; an outer, earlier deadline still holds."""
    outer = getattr(_local, "deadline", None)
    deadline = time.monotonic() + seconds
    _local.deadline = deadline if outer is None else min(outer, deadline)
    try:
        yield
    finally:
        _local.deadline = outer


def seconds_left(default: float) -> float:
    """Seconds to the current deadline, or `default` outside any `time_limit`."""
    deadline = getattr(_local, "deadline", None)
    return default if deadline is None else deadline - time.monotonic()


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern)


def search(pattern: str, text: str) -> bool:
    """Whether `pattern` matches somewhere in `text` (re.search), raising TimedOut past the deadline."""
    left = seconds_left(PATTERN_SECONDS)
    if left <= 0:
        raise TimedOut(f"pattern {_short(pattern)} timed out")
    try:
        return _compiled(pattern).search(text, timeout=left, concurrent=True) is not None
    except TimeoutError:
        raise TimedOut(f"pattern {_short(pattern)} timed out on a {len(text)}-character string") from None


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _BoundedRe:
    """Stands in for the `re` module inside jsonschema: its searches go through `search`; the rest is `re`."""

    def search(self, pattern: str, string: str) -> bool:
        return search(pattern, string)

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)


def bound_jsonschema_patterns() -> None:
    """Make every pattern jsonschema checks (pattern, patternProperties, additional/unevaluatedProperties) bounded.

    jsonschema calls `re.search` from these modules; overriding single keywords would leave the properties that
    match patternProperties unbounded, so the module's `re` is replaced. Idempotent."""
    from jsonschema import _keywords, _legacy_keywords, _utils

    for module in (_keywords, _legacy_keywords, _utils):
        if getattr(module, "re", None) is re:
            module.re = _BoundedRe()


YIELD_EVERY_LINES = 64  # template lines between two hand-overs of the GIL while a template renders


@contextmanager
def template_deadline(seconds: float = TEMPLATE_SECONDS) -> Iterator[None]:
    """Run a chat-template rendering on this thread with a deadline: TimedOut at the first template line past it.

    A trace function sees each call; only frames of Jinja-compiled template code get the line check, so the
    tokenizer and library code run at full speed. The thread's previous trace function (a debugger, coverage)
    comes back afterwards."""
    deadline = time.monotonic() + min(seconds, seconds_left(seconds))
    lines = itertools.count()

    def on_line(frame, event, arg):
        if event == "line":
            if time.monotonic() > deadline:
                raise TimedOut(f"the chat template took over {seconds:g} s to render")
            if next(lines) % YIELD_EVERY_LINES == 0:
                # A looping template holds the GIL for a whole switch interval at a time, and a generation on
                # another thread needs it between every small tensor op: without yielding, a 2 s render slowed
                # a concurrent answer from 0.05 s to 1.8 s. sleep(0) hands the GIL to whoever waits for it.
                time.sleep(0)
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename in _TEMPLATE_FILES else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)
