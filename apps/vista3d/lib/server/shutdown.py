"""SIGTERM and SIGINT stop the server within seconds, its running jobs and background processes with it.

uvicorn (0.55) takes SIGTERM and SIGINT with ``signal.signal`` before the application starts, and
on the first one shuts down gracefully: it stops accepting, then waits for every request in flight
to be answered, without a time limit, before the lifespan ends. An automatic segmentation in
flight runs for minutes, so the server did not stop. MONAI Label's background subprocesses
(training rounds, scoring) were not stopped either, and outlived it.

:func:`stop_on_signals` (entered from the lifespan, after uvicorn's handlers are in place) puts a
handler in front of uvicorn's: it stops the :class:`~.scheduler.Scheduler` (queued jobs dropped,
running ones stop at their next checkpoint with a 503), kills MONAI Label's background
subprocesses, then hands the signal to uvicorn, whose graceful shutdown then waits for a window
pass at most. Should something still hold it (a job between two checkpoints that never comes),
the process exits after :data:`GRACE_S`. uvicorn puts its own predecessors back when it is done
and re-raises the signal, so the process ends with the signal's status, as before.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import psutil
from monailabel.utils.async_tasks import utils as async_tasks

from .scheduler import Scheduler

__all__ = ["GRACE_S", "SIGNALS", "GracefulStop", "stop_background_processes", "stop_on_signals"]

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_S = 10.0  # after the first signal, time for the requests in flight (a window pass, a click) to end

Handler = Callable[[int, FrameType | None], Any] | int | None


def stop_background_processes() -> list[int]:
    """Kill MONAI Label's running background subprocesses (and theirs); their pids.

    They run in sessions of their own (:func:`.threads.yield_to_serving`), where a signal to the
    server's process group does not reach them. MONAI Label's ``stop_background_task`` kills one
    task's process tree and marks the task STOPPED; it runs at most one process per task kind.
    """
    pids = []
    for method, running in list(async_tasks.background_processes.items()):
        for process in list(running.values()):
            try:
                async_tasks.stop_background_task(method)
                pids.append(process.pid)
            except (psutil.Error, OSError) as e:  # it ended meanwhile
                logger.info("Background %s process %d: %s", method, process.pid, e)
    if pids:
        logger.info("Stopped background processes %s", pids)
    return pids


class GracefulStop:
    """The handler of :data:`SIGNALS` put in front of uvicorn's (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, grace_s: float = GRACE_S) -> None:
        self.scheduler = scheduler
        self.grace_s = grace_s
        self._previous: dict[int, Handler] = {}
        self._deadline: threading.Timer | None = None

    def install(self) -> None:
        """Take :data:`SIGNALS` (main thread only, as for every Python handler), keeping what was there."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self.handle)

    def uninstall(self) -> None:
        """Put the previous handlers back where ours is still the one installed."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self.handle:
                signal.signal(sig, previous)
        self._previous.clear()

    def stop(self, reason: str) -> None:
        """Cancel every job, kill the background processes (quick: nothing here waits)."""
        self.scheduler.shutdown(reason)
        stop_background_processes()

    def handle(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self._deadline is None:
            logger.info("%s: stopping the server (running jobs cancelled, background processes killed)", name)
            self.stop(f"the server is stopping ({name}); try again when it is back")
            self._deadline = threading.Timer(self.grace_s, self._exit_now, args=(sig,))
            self._deadline.daemon = True
            if math.isfinite(self.grace_s):  # inf: wait for as long as the requests take
                self._deadline.start()
        self._chain(sig, frame)

    def _chain(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(sig, frame)
        elif previous in (signal.SIG_DFL, None):  # nobody took it: its default action (termination)
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    def _exit_now(self, sig: int) -> None:
        """The graceful shutdown is still held after ``grace_s``: exit without it."""
        name = signal.Signals(sig).name
        logger.error("Still running %.0f s after %s: exiting without waiting further", self.grace_s, name)
        stop_background_processes()
        logging.shutdown()
        os._exit(128 + sig)


@contextmanager
def stop_on_signals(scheduler: Scheduler, grace_s: float = GRACE_S) -> Iterator[GracefulStop]:
    """While the server runs, SIGTERM and SIGINT stop it promptly; when it stops, jobs and background
    processes stop with it, whatever stopped it."""
    stopper = GracefulStop(scheduler, grace_s)
    stopper.install()
    try:
        yield stopper
    finally:
        stopper.uninstall()
        stopper.stop("the server has stopped")
        # a deadline already running stays: the process may still be held after the lifespan (threads joined at exit)
