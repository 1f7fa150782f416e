"""Between the HTTP handlers and the engines: the router that picks a request's arm (by name, or by the split,
sticky per user), each arm's bounded queue and the worker that drains it in batches on a generation thread of its
own, and the counters /metrics reads. A batch that fails is retried request by request, so one request cannot fail
another."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from specialist.deploy.api_errors import busy_error
from specialist.deploy.arms import ServedArm
from specialist.deploy.serve_settings import ServeSettings
from specialist.generation import Generation, Request as GenerationRequest, Sampling

ROUTER = "specialist"  # the model name that routes by the split (the first entry of /v1/models)


class Router:
    def __init__(self, arms: dict[str, Any], split: dict[str, float]) -> None:
        self.arms, self.split = arms, split

    def pick(self, requested: str | None, user: str | None) -> str | None:
        """The arm for a request: named directly, or drawn from the split (sticky per user)."""
        if requested in self.arms:
            return requested
        if requested not in (None, "", ROUTER):
            return None
        draw = _user_fraction(user) if user else random.random()
        cumulative = 0.0
        for name, weight in self.split.items():
            cumulative += weight
            if draw < cumulative:
                return name
        return next(iter(self.split))


def _user_fraction(user: str) -> float:
    return int.from_bytes(hashlib.sha256(user.encode("utf-8")).digest()[:8], "big") / 2**64


class Metrics:
    """Counters for /metrics: requests per arm, errors per status and kind, latency quantiles per arm."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.errors: dict[tuple[int, str], int] = defaultdict(int)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.format_failures: dict[str, int] = defaultdict(int)  # format checks that raised or timed out, by kind
        self.lock = threading.Lock()

    def count_request(self, arm: str, latency: float) -> None:
        with self.lock:
            self.requests[arm] += 1
            self.latencies[arm] = self.latencies[arm][-999:] + [latency]

    def count_error(self, status: int, kind: str) -> None:
        with self.lock:
            self.errors[(status, kind)] += 1

    def count_format_failure(self, kind: str) -> None:
        with self.lock:
            self.format_failures[kind] += 1

    def render(self, workers: dict[str, ArmWorker]) -> str:
        with self.lock:
            lines = ["# TYPE specialist_requests_total counter"]
            lines += [f'specialist_requests_total{{arm="{arm}"}} {n}' for arm, n in sorted(self.requests.items())]
            lines.append("# TYPE specialist_errors_total counter")
            lines += [f'specialist_errors_total{{status="{status}",kind="{kind}"}} {n}'
                      for (status, kind), n in sorted(self.errors.items())]
            lines.append("# TYPE specialist_format_check_failures_total counter")
            lines += [f'specialist_format_check_failures_total{{kind="{kind}"}} {n}'
                      for kind, n in sorted(self.format_failures.items())]
            lines.append("# TYPE specialist_latency_seconds summary")
            for arm, values in sorted(self.latencies.items()):
                ordered = sorted(values)
                for q in (0.5, 0.95):
                    value = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
                    lines.append(f'specialist_latency_seconds{{arm="{arm}",quantile="{q}"}} {value:.4f}')
        lines.append("# TYPE specialist_queue_depth gauge")
        for name, worker in workers.items():
            lines.append(f'specialist_queue_depth{{arm="{name}"}} {worker.queue.qsize()}')
            lines.append(f'specialist_batches_total{{arm="{name}"}} {worker.batches}')
            lines.append(f'specialist_generating{{arm="{name}"}} {int(worker.arm.engine.busy)}')
        return "\n".join(lines) + "\n"


@dataclass(eq=False)
class Job:
    """One request waiting for, or in, a batch. A streamed job hands its pieces to `events` as they come."""

    request: GenerationRequest
    sampling: Sampling
    future: asyncio.Future
    events: asyncio.Queue | None = None
    streamed_any: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    arm: ServedArm | None = None  # the arm it was encoded for: a swap lets queued jobs finish on it

    def finish(self, result: Generation | BaseException) -> None:
        if self.events is not None:
            self.events.put_nowait(("error", result) if isinstance(result, BaseException) else ("done", result))
        if not self.future.done():
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)


class ArmWorker:
    """One arm's bounded queue and the batching loop that drains it, on a generation thread of its own."""

    def __init__(self, arm: ServedArm, settings: ServeSettings, on_submit: Callable[[], None] | None = None) -> None:
        self.arm, self.settings = arm, settings
        self.on_submit = on_submit  # a live request arrived: shadows yield
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.queue_size)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"arm-{arm.name}")
        self.in_flight: set[Job] = set()
        self.batches = 0
        self.batched_requests = 0
        self.closing = False

    def submit(self, job: Job) -> None:
        if self.closing:
            raise busy_error(self.settings, "server is shutting down")
        job.arm = job.arm or self.arm
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise busy_error(self.settings) from None
        if self.on_submit is not None:
            self.on_submit()

    async def run(self) -> None:
        while True:
            batch = await self._next_batch()
            groups: dict[tuple[int, Sampling], list[Job]] = defaultdict(list)
            for job in batch:  # after a swap a batch may hold jobs for the old arm and the new: one call each
                groups[(id(job.arm), job.sampling)].append(job)
            for (_, sampling), jobs in groups.items():
                await self._generate(jobs, sampling)

    async def _next_batch(self) -> list[Job]:
        batch = [await self.queue.get()]
        deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            batch.append(job)
        return batch

    async def _generate(self, jobs: list[Job], sampling: Sampling) -> None:
        live = [job for job in jobs if not job.request.cancelled.is_set()]
        for job in set(jobs) - set(live):
            job.finish(asyncio.CancelledError("the client went away"))
        if not live:
            return
        self.in_flight.update(live)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, live[0].arm.engine.run, [job.request for job in live], sampling)
        except Exception as exc:  # noqa: BLE001 - one request must not fail another: retry each alone
            await self._retry_alone(live, sampling, exc)
            return
        finally:
            self.in_flight.difference_update(live)
        self.batches += 1
        self.batched_requests += len(live)
        for job, result in zip(live, results, strict=True):
            job.finish(result)

    async def _retry_alone(self, jobs: list[Job], sampling: Sampling, error: Exception) -> None:
        if len(jobs) == 1:
            jobs[0].finish(error)
            return
        for job in jobs:
            if job.streamed_any:  # its client already has part of an answer: a second one would garble it
                job.finish(error)
            else:
                await self._generate([job], sampling)

    def cancel_all(self) -> None:
        """Shutdown: queued jobs answer 503, running rows end at their next token."""
        self.closing = True
        while not self.queue.empty():
            job = self.queue.get_nowait()
            job.request.cancelled.set()
            job.finish(busy_error(self.settings, "server is shutting down"))
        for job in list(self.in_flight):
            job.request.cancelled.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
