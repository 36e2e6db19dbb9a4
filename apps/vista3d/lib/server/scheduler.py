"""Inference off the event loop, one at a time, clicks first.

MONAI Label ran every inference on the event loop: while one automatic segmentation ran, ``/info``
and every click waited for it. Here each request is a :class:`Job` run in a worker thread, and a
job computes only while it holds the one compute slot (the device, and the cores it is given).
Waiting jobs are ordered clicks before automatic segmentations, then by arrival. A running
automatic segmentation calls :meth:`Scheduler.checkpoint` before each window pass and between
its stages: it hands the slot to waiting clicks and takes it back after them, and stops there if
its client has gone. A job hands the slot on as soon as its result is computed
(:meth:`Scheduler.computed`): writing the answer file does not hold up the next job.

A job that cannot start within ``max_wait_s``, or one more than ``max_jobs`` queued or running,
gets :class:`Busy` (HTTP 503 with ``Retry-After``, estimated from the recent durations of the jobs
ahead) rather than a hang; so does a job still running ``max_run_s`` after it started, at its next
checkpoint (clicks have none: one click is a window or two).

When the server stops (:meth:`Scheduler.shutdown`, on SIGTERM), new jobs get :class:`Busy`, queued
ones are dropped and running ones stop at their next checkpoint, each with a 503 that says so:
the requests end within a window pass and the server's graceful shutdown, which waits for them,
takes seconds rather than the rest of an automatic segmentation.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

__all__ = ["Busy", "ClientGone", "Job", "Kind", "Scheduler"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

STOPPING_RETRY_S = 30  # Retry-After of the answers of a stopping server: about a restart
RECENT_JOBS = 200  # finished jobs kept for the dashboard's latency plot


class Kind(IntEnum):
    """A job's priority: lower runs first."""

    CLICK = 0
    AUTO = 1


class Busy(Exception):
    """The request cannot be served in time (HTTP 503); ``retry_after`` is an estimate in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client went away: a queued job is dropped, a running one stopped at its next window."""


@dataclass(eq=False)
class Job:
    """One inference request as the scheduler sees it."""

    id: int
    user: str
    kind: Kind
    image: str
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    computed: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def order(self) -> tuple[int, int]:
        return (int(self.kind), self.id)


class Scheduler:
    """One compute slot (see the module docstring); ``on_start(job)`` runs in the job's thread when it gets the slot."""

    def __init__(
        self,
        max_jobs: int,
        max_wait_s: float,
        on_start: Callable[[Job], Any] | None = None,
        max_run_s: float = math.inf,
    ) -> None:
        self.max_jobs = max_jobs
        self.max_wait_s = max_wait_s
        self.max_run_s = max_run_s
        self._on_start = on_start
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._jobs: list[Job] = []  # queued and running, in arrival order
        self._waiting: list[Job] = []  # for the slot, in priority order
        self._holder: Job | None = None
        self._stopping: str | None = None  # why the scheduler takes no more work (see shutdown)
        self._seconds: dict[Kind, float] = {Kind.CLICK: 1.0, Kind.AUTO: 60.0}  # recent durations (moving average)
        self._finished: deque[dict[str, Any]] = deque(maxlen=RECENT_JOBS)
        self._executor = ThreadPoolExecutor(max_workers=max_jobs, thread_name_prefix="infer")

    def submit(self, kind: Kind, user: str, image: str, work: Callable[[Job], T]) -> tuple[Job, Future[T]]:
        """Queue ``work(job)``; :class:`Busy` at once when ``max_jobs`` are queued or running, or when stopping."""
        with self._cond:
            if self._stopping is not None:
                raise Busy(self._stopping, STOPPING_RETRY_S)
            if len(self._jobs) >= self.max_jobs:
                raise Busy(f"the server is busy: {len(self._jobs)} requests queued or running", self._eta(None))
            job = Job(next(self._ids), user, kind, image)
            self._jobs.append(job)
        return job, self._executor.submit(self._run, job, work)

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job if queued; a running automatic one stops at its next window."""
        with self._cond:
            job.cancelled.set()
            self._cond.notify_all()

    def shutdown(self, reason: str) -> int:
        """Take no more work: refuse new jobs, drop queued ones, stop running ones at their next checkpoint.

        Each of them ends with :class:`Busy` carrying ``reason`` (a 503 its client reads), so that
        every request finishes quickly. Safe to call twice, and from a signal handler (the lock is
        reentrant and nothing here waits). Returns how many jobs it cancelled.
        """
        with self._cond:
            first = self._stopping is None
            if first:
                self._stopping = reason
            jobs = list(self._jobs)
            for job in jobs:
                job.cancelled.set()
            self._cond.notify_all()
        if first:
            logger.info("Scheduler stopping (%s): %d jobs cancelled", reason, len(jobs))
        return len(jobs)

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    def _stop_if_cancelled(self, job: Job, gone: str) -> None:
        """Raise for a cancelled ``job``: :class:`Busy` when the server stops, else :class:`ClientGone` (``gone``)."""
        if not job.cancelled.is_set():
            return
        if self._stopping is not None:
            raise Busy(self._stopping, STOPPING_RETRY_S)
        raise ClientGone(f"job {job.id}: {gone}")

    def checkpoint(self, job: Job) -> None:
        """Between two stages of ``job``: stop if cancelled or over ``max_run_s``; let waiting clicks run first."""
        self._stop_if_cancelled(job, "the client has gone")
        if job.started is not None and time.monotonic() - job.started > self.max_run_s:
            raise Busy(
                f"the {job.kind.name.lower()} ran longer than the server's limit of {self.max_run_s:.0f} s "
                "(run_limit_s) and was stopped; ask for fewer classes, or try again when the server is quieter",
                max(1, math.ceil(self._seconds[Kind.AUTO])),
            )
        with self._cond:
            ahead = sum(w.kind < job.kind for w in self._waiting)
            if not ahead:
                return
            logger.info("Job %d (%s by %s) lets %d waiting clicks run", job.id, job.kind.name.lower(), job.user, ahead)
            self._release(job)
        self._acquire(job, deadline=math.inf)

    def computed(self, job: Job) -> None:
        """``job`` has computed its result and only writes it now: the next job may compute meanwhile."""
        job.computed = True
        self._release(job)

    def _run(self, job: Job, work: Callable[[Job], T]) -> T:
        try:
            self._acquire(job, deadline=job.submitted + self.max_wait_s)
            job.started = time.monotonic()
            try:
                result = work(job)
            finally:
                self._release(job)
            self._record(job)
            return result
        finally:
            with self._cond:
                self._jobs.remove(job)

    def _acquire(self, job: Job, deadline: float) -> None:
        with self._cond:
            self._waiting.append(job)
            self._waiting.sort(key=lambda j: j.order)
            try:
                while not (self._holder is None and self._waiting[0] is job):
                    self._stop_if_cancelled(job, "the client went away while it waited")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Busy(
                            f"the request waited {self.max_wait_s:.0f} s without starting; try again later",
                            self._eta(job),
                        )
                    self._cond.wait(timeout=min(left, 1.0))
            finally:
                self._waiting.remove(job)
                self._cond.notify_all()  # the head of the queue may have changed
            self._holder = job
        if self._on_start is not None:
            self._on_start(job)

    def _release(self, job: Job) -> None:
        with self._cond:
            if self._holder is job:
                self._holder = None
                self._cond.notify_all()

    def _record(self, job: Job) -> None:
        """Fold the job's time (wall clock since it first started, pauses included) into its kind's average, and
        keep the job among the recently finished (:meth:`recent`)."""
        if job.started is not None:
            with self._cond:
                now = time.monotonic()
                seconds = now - job.started
                self._seconds[job.kind] = 0.7 * self._seconds[job.kind] + 0.3 * seconds
                waited, latency = job.started - job.submitted, now - job.submitted
                kind = job.kind.name.lower()
                self._finished.append({"kind": kind, "finished": time.time(), "waited_s": waited, "seconds": latency})

    def recent(self) -> list[dict[str, Any]]:
        """The last finished jobs, oldest first: kind, when (epoch s), queued time and latency (submitted to done, s).

        Users are left out: the dashboard shows latencies to everybody who may see the queue.
        """
        with self._cond:
            return [dict(job) for job in self._finished]

    def _eta(self, job: Job | None) -> int:
        """Seconds until ``job`` (or a new auto) could start: the estimated rest of the jobs ahead of it."""
        order = job.order if job is not None else (int(Kind.AUTO), 1 << 62)
        ahead = [j for j in self._jobs if j is not job and (j.started is not None or j.order < order)]
        now = time.monotonic()
        total = sum(
            max(self._seconds[j.kind] - (now - j.started if j.started is not None else 0.0), 1.0) for j in ahead
        )
        return max(1, math.ceil(total))

    def _stage(self, job: Job) -> str:
        if job.computed:
            return "writing"
        return "computing" if job is self._holder else "paused"

    def status(self, viewer: str | None, show_names: bool) -> dict[str, Any]:
        """The queue as a client may see it: every job's kind and position, ``mine`` for the viewer's own.

        Names of other users are shown only when ``show_names`` (to admins).
        """
        now = time.monotonic()
        with self._cond:
            running = [j for j in self._jobs if j.started is not None]
            queued = sorted((j for j in self._jobs if j.started is None), key=lambda j: j.order)

            def describe(j: Job) -> dict[str, Any]:
                out: dict[str, Any] = {"kind": j.kind.name.lower(), "mine": j.user == viewer}
                if show_names or j.user == viewer:
                    out["user"] = j.user
                return out

            return {
                "length": len(queued),
                "running": [
                    {**describe(j), "seconds": round(now - (j.started or now), 1), "stage": self._stage(j)}
                    for j in running
                ],
                "queued": [
                    {**describe(j), "position": n + 1, "waiting_s": round(now - j.submitted, 1)}
                    for n, j in enumerate(queued)
                ],
                "recent_seconds": {k.name.lower(): round(v, 2) for k, v in self._seconds.items()},
            }
