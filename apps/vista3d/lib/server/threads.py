"""Threads that add up: background work (a training round, scoring) yields the cores to serving.

MONAI Label runs training rounds, scoring and batch inference as subprocesses. Each of them runs
with ``train_threads`` torch threads (the app sets that share when it is built; only the server
process raises its own count to ``threads``) and at the lowest CPU priority
(:func:`yield_to_serving`), so that the operating system hands a core to a serving thread as soon
as one is ready: the round yields while clicks run, and takes every cycle they leave.

What a job that holds the scheduler's compute slot gets, while background work runs:

* a click: all of ``threads``. It runs for a fraction of a second; the background process
  waits for it on the same cores (``bench/threads_probe.py``, 2 cores, beside a 1-thread round: a
  window pass 0.30 s with 2 threads against a nice-19 round, 0.49 s with 1 thread as before,
  0.82 s with 2 threads against a round at normal priority; 0.25 s with nothing beside it).
* an automatic segmentation: ``threads`` minus the background's share. It runs for minutes, and
  a round should not stall behind every one; the cores still add up to ``threads``.

Before, a round took half the cores while inference took all of them at equal priority: more busy
threads than cores, and a click took minutes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from monailabel.utils.async_tasks.task import AsyncTask

from .scheduler import Job, Kind

__all__ = [
    "BACKGROUND_NICE",
    "BACKGROUND_TASKS",
    "ThreadBudget",
    "background_running",
    "in_background_process",
    "yield_to_serving",
]

logger = logging.getLogger(__name__)

BACKGROUND_TASKS = ("train", "scoring", "batch_infer")
BACKGROUND_NICE = 19  # the lowest priority: a background process runs on what serving leaves
_BACKGROUND_MAIN = "monailabel.interfaces.utils.app"  # the module MONAI Label runs its subprocesses as


def background_running() -> list[str]:
    """MONAI Label's background tasks with a process running now."""
    return [m for m in BACKGROUND_TASKS if AsyncTask.status(m, check_if_running=True)[0] is not None]


def in_background_process() -> bool:
    """Whether this process is one of MONAI Label's background tasks (``python -m monailabel.interfaces.utils.app``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == _BACKGROUND_MAIN


def yield_to_serving() -> None:
    """Lower this process's CPU priority to :data:`BACKGROUND_NICE` (it cannot be raised again)."""
    before = os.nice(0)
    if before < BACKGROUND_NICE:
        os.nice(BACKGROUND_NICE - before)
        logger.info("Background process %d runs at nice %d: serving goes first", os.getpid(), BACKGROUND_NICE)


class ThreadBudget:
    """``cores`` torch threads for serving; see the module docstring for what each kind of job gets.

    An automatic segmentation asks :meth:`serving` before every window pass, so its share follows
    what runs now (a scoring process that ends gives its core back at the next window), and at most
    ``window_workers`` of its windows run at once, each with an equal part of that share.
    """

    def __init__(
        self,
        cores: int,
        background_threads: int,
        window_workers: int = 1,
        running: Callable[[], list[str]] = background_running,
    ) -> None:
        self.cores = cores
        self.background_threads = background_threads
        self.window_workers = window_workers
        self._running = running
        self._last: dict[Kind, int] = {}

    def serving(self, kind: Kind = Kind.AUTO) -> int:
        """Threads for a job of ``kind`` now (logged when the answer changes)."""
        n = self.cores if kind == Kind.CLICK else self._auto_threads(len(self._running()))
        if self._last.get(kind) != n:
            self._last[kind] = n
            logger.info("Serving %ss with %d torch threads (%d cores)", kind.name.lower(), n, self.cores)
        return n

    def _auto_threads(self, background: int) -> int:
        """An automatic segmentation's threads while ``background`` subprocesses run (at least one)."""
        return max(1, self.cores - self.background_threads * background)

    def apply(self, job: Job) -> None:
        """Set this thread's torch threads for ``job`` (called each time a job gets the compute slot)."""
        n = self.serving(job.kind)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def status(self) -> dict[str, Any]:
        running = self._running()
        auto = self._auto_threads(len(running))
        at_once = min(self.window_workers, auto)
        return {
            "cores": self.cores,
            "serving": {"click": self.cores, "auto": auto},
            "auto_windows": {"at_once": at_once, "threads_each": max(1, auto // at_once)},
            "background": {m: self.background_threads for m in running},
            "background_nice": BACKGROUND_NICE,
        }
