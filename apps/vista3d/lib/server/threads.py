"""Threads that add up: serving takes the cores that background work (a training round, scoring) leaves.

MONAI Label runs training rounds, scoring and batch inference as subprocesses; each of them runs
with ``train_threads`` torch threads (the app sets that share when it is built, and only the
server process raises its own count to ``threads``). While any of them runs, the inference that
holds the scheduler's slot gets ``threads`` minus their share; when none runs, all of ``threads``.
Before, a round took half the cores while inference took all of them: more busy threads than
cores, and a click took minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from monailabel.utils.async_tasks.task import AsyncTask

__all__ = ["BACKGROUND_TASKS", "ThreadBudget", "background_running"]

logger = logging.getLogger(__name__)

BACKGROUND_TASKS = ("train", "scoring", "batch_infer")


def background_running() -> list[str]:
    """MONAI Label's background tasks with a process running now."""
    return [m for m in BACKGROUND_TASKS if AsyncTask.status(m, check_if_running=True)[0] is not None]


class ThreadBudget:
    """``cores`` torch threads in all; each running background task holds ``background_threads`` of them."""

    def __init__(
        self, cores: int, background_threads: int, running: Callable[[], list[str]] = background_running
    ) -> None:
        self.cores = cores
        self.background_threads = background_threads
        self._running = running

    def serving(self) -> int:
        return max(1, self.cores - self.background_threads * len(self._running()))

    def apply(self) -> None:
        """Set this process's torch threads to the serving share (called when a job gets the compute slot)."""
        n = self.serving()
        if torch.get_num_threads() != n:
            logger.info("Serving with %d torch threads (%d cores, background: %s)", n, self.cores, self._running())
            torch.set_num_threads(n)

    def status(self) -> dict[str, Any]:
        running = self._running()
        return {
            "cores": self.cores,
            "serving": max(1, self.cores - self.background_threads * len(running)),
            "background": {m: self.background_threads for m in running},
        }
