"""Shadow arms: a candidate answers live requests in the background, its answer logged beside the live one and
never returned.

The live answer always comes first. A request is offered to the shadows only after its live answer is recorded,
into one bounded queue; a full queue drops the offer. The shadow worker starts a job only while no live arm has
work queued or generating, and a live request arriving meanwhile cancels the shadow row at its next token
(`preempt`), so on shared weights a live request waits at most one token step of a shadow. A job that waited past
`max_wait_s` is dropped as stale, a generation past `timeout_s` is abandoned, and while an abandoned one still
holds the shadow thread every new job is dropped: under load the shadow thins out, the live traffic never slows.
Every outcome (answered, queue_full, stale, preempted, timed_out, busy, error) is counted per arm for /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from specialist.deploy.arms import ServedArm
from specialist.deploy.records import RequestLog
from specialist.generation import Request as GenerationRequest, Sampling

OUTCOMES = ("answered", "queue_full", "stale", "preempted", "timed_out", "busy", "error")
IDLE_POLL_S = 0.02  # how often a waiting shadow job looks again for a gap in live traffic


@dataclass
class ShadowSettings:
    share: float = 1.0  # the fraction of live requests the shadows answer
    queue_size: int = 32
    max_wait_s: float = 30.0  # a job not started by then is dropped: its comparison would be of stale traffic
    timeout_s: float = 60.0  # a generation running longer is abandoned (its row cancelled)

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"shadow share must be between 0 and 1, got {self.share}")


@dataclass
class ShadowJob:
    request_id: str
    text: str
    live_output: str
    max_tokens: int
    sampling: Sampling
    enqueued: float = field(default_factory=time.monotonic)


def answers_agree(a: str, b: str) -> bool:
    """Two answers say the same: equal JSON values when both parse (key order and spacing aside), else equal text
    once the ends are stripped."""
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    try:
        return json.loads(a) == json.loads(b)
    except (ValueError, RecursionError):
        return False


class ShadowRunner:
    """The shadow arms, their bounded queue, the one thread they generate on, and their outcome counters."""

    def __init__(self, arms: dict[str, ServedArm], log: RequestLog, settings: ShadowSettings,
                 live_busy: Callable[[], bool], keep_text: bool) -> None:
        self.arms, self.log, self.settings, self.live_busy = arms, log, settings, live_busy
        self.keep_text = keep_text  # store the shadow's answer text (the server's --log-prompts)
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=settings.queue_size)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="shadow")
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.lock = threading.Lock()
        self.current: GenerationRequest | None = None
        self.abandoned: Future | None = None  # a timed-out generation still holding the shadow thread

    def count(self, arm: str, outcome: str) -> None:
        with self.lock:
            self.counts[(arm, outcome)] += 1

    def offer(self, job: ShadowJob) -> None:
        """Queue `job` for every shadow arm (a `share` of requests), or count it dropped; never waits."""
        if not self.arms or random.random() >= self.settings.share:
            return
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            for name in self.arms:
                self.count(name, "queue_full")

    def preempt(self) -> None:
        """A live request arrived: the shadow row in flight ends at its next token."""
        current = self.current
        if current is not None:
            current.cancelled.set()

    async def run(self) -> None:
        while True:
            job = await self.queue.get()
            for arm in list(self.arms.values()):
                try:
                    await self._answer(arm, job)
                except Exception:  # noqa: BLE001 - a shadow must never take the server down
                    logging.getLogger("specialist.serve").exception("shadow arm %s failed", arm.name)
                    self.count(arm.name, "error")

    async def _answer(self, arm: ServedArm, job: ShadowJob) -> None:
        if not await self._wait_for_gap(job):
            self.count(arm.name, "stale")
            return
        if self.abandoned is not None and not self.abandoned.done():
            self.count(arm.name, "busy")
            return
        request = GenerationRequest([], job.max_tokens)
        self.current = request
        started = time.perf_counter()
        future = self.executor.submit(_generate, arm, job, request)
        try:
            result, format_ok = await asyncio.wait_for(asyncio.wrap_future(future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            request.cancelled.set()
            self.abandoned = future
            self.count(arm.name, "timed_out")
            return
        finally:
            self.current = None
        if result.finish_reason == "cancelled":
            self.count(arm.name, "preempted")
            return
        self.log.add_shadow(request_id=job.request_id, arm=arm.name, latency_s=time.perf_counter() - started,
                            tokens_out=result.completion_tokens, format_ok=format_ok,
                            agrees=answers_agree(result.text, job.live_output),
                            output=result.text if self.keep_text else None)
        self.count(arm.name, "answered")

    async def _wait_for_gap(self, job: ShadowJob) -> bool:
        """Wait until no live arm has work; False when the job grew stale first."""
        while self.live_busy():
            if time.monotonic() - job.enqueued > self.settings.max_wait_s:
                return False
            await asyncio.sleep(IDLE_POLL_S)
        return time.monotonic() - job.enqueued <= self.settings.max_wait_s

    def render(self) -> list[str]:
        with self.lock:
            lines = ["# TYPE specialist_shadow_total counter"]
            lines += [f'specialist_shadow_total{{arm="{arm}",outcome="{outcome}"}} {n}'
                      for (arm, outcome), n in sorted(self.counts.items())]
        lines.append(f"specialist_shadow_queue_depth {self.queue.qsize()}")
        return lines

    def close(self) -> None:
        self.preempt()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _generate(arm: ServedArm, job: ShadowJob, request: GenerationRequest) -> tuple[Any, bool | None]:
    """On the shadow thread: encode in the arm's own prompt format, generate, judge the format."""
    request.prompt_ids = arm.engine.encode(job.text, max_new_tokens=job.max_tokens)
    result = arm.engine.run([request], job.sampling)[0]
    format_ok = None
    if arm.format_check is not None and result.finish_reason != "cancelled":
        try:
            format_ok = bool(arm.format_check(result.text))
        except Exception:  # noqa: BLE001 - a check that fails is a failed check, as for live answers
            format_ok = False
    return result, format_ok
