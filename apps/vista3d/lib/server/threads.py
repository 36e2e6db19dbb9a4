"""Threads that add up: background work (a training round, scoring) yields the cores to serving.

MONAI Label runs training rounds, scoring and batch inference as subprocesses. Each of them runs
with ``train_threads`` torch threads (the app sets that share when it is built; only the server
process raises its own count to ``threads``) and yields the CPU to serving
(:func:`yield_to_serving`), so that the operating system hands a core to a serving thread as soon
as one is ready: the round yields while clicks run, and takes every cycle they leave.

Nice 19 alone does not do that where the kernel has autogroups (``kernel.sched_autogroup_enabled``,
on in many distributions): every session is a scheduling group with an equal share of the CPU,
and nice ranks a process only against the others of its own session (a nice-19 scoring process
took 55-60 % of a core against tests in another session). So a background process takes a
session of its own (``setsid``) and gives that group the lowest weight (autogroup nice 19), runs
under ``SCHED_IDLE`` (a core only when no other thread wants one; torch's threads inherit it),
keeps nice 19 where either is refused, and dies with the server that started it
(``PR_SET_PDEATHSIG``: out of the server's process group, a signal to that group misses it).

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

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monailabel.utils.async_tasks.task import AsyncTask

from .scheduler import Job, Kind

__all__ = [
    "BACKGROUND_AUTOGROUP_NICE",
    "BACKGROUND_NICE",
    "BACKGROUND_TASKS",
    "ThreadBudget",
    "background_policy",
    "background_running",
    "in_background_process",
    "yield_to_serving",
]

logger = logging.getLogger(__name__)

BACKGROUND_TASKS = ("train", "scoring", "batch_infer")
BACKGROUND_NICE = 19  # the lowest nice: what still holds where SCHED_IDLE is refused
BACKGROUND_AUTOGROUP_NICE = 19  # the lowest weight, for the background process's whole session
_BACKGROUND_MAIN = "monailabel.interfaces.utils.app"  # the module MONAI Label runs its subprocesses as
_AUTOGROUP = Path("/proc/self/autogroup")
_AUTOGROUPS_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")
_TASKS = Path("/proc/self/task")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _NotApplied(Exception):
    """A step of :func:`yield_to_serving` that does not apply here; the message says why."""


def background_running() -> list[str]:
    """MONAI Label's background tasks with a process running now."""
    return [m for m in BACKGROUND_TASKS if AsyncTask.status(m, check_if_running=True)[0] is not None]


def in_background_process() -> bool:
    """Whether this process is one of MONAI Label's background tasks (``python -m monailabel.interfaces.utils.app``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == _BACKGROUND_MAIN


def _autogroups_enabled() -> bool:
    """Whether the kernel gives every session a scheduling group of its own (``kernel.sched_autogroup_enabled``)."""
    try:
        return _AUTOGROUPS_ENABLED.read_text().strip() == "1" and _AUTOGROUP.exists()
    except OSError:
        return False


def background_policy() -> dict[str, Any]:
    """What this server's background processes apply to themselves (:func:`yield_to_serving`), for ``/queue``.

    ``autogroup_nice`` is None where the kernel has no autogroups (nice and SCHED_IDLE then rank
    every process of the machine together, and suffice).
    """
    return {
        "policy": "SCHED_IDLE" if hasattr(os, "SCHED_IDLE") else "nice",
        "own_session": True,
        "autogroup_nice": BACKGROUND_AUTOGROUP_NICE if _autogroups_enabled() else None,
        "nice": BACKGROUND_NICE,
        "dies_with_server": sys.platform.startswith("linux"),
    }


def _die_with_parent() -> str:
    """SIGKILL this process when the server that started it dies (it leaves the server's process group).

    The kernel ties the signal to the parent *thread* that forked: MONAI Label forks from a task
    executor's worker thread, which lives as long as the server.
    """
    if not sys.platform.startswith("linux"):
        raise _NotApplied("PR_SET_PDEATHSIG is Linux only")
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), *args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:  # the parent died before the request took effect: nobody would send it
        os.kill(os.getpid(), signal.SIGKILL)
    return "dies with the server"


def _on_every_thread(apply: Callable[[int], None]) -> int:
    """``apply(tid)`` to each thread of this process (priority and policy are per thread on Linux); how many."""
    try:
        tids = [int(t) for t in os.listdir(_TASKS)]
    except OSError:
        tids = [0]  # no /proc: this thread only
    done = 0
    for tid in tids:
        try:
            apply(tid)
            done += 1
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return done


def _nice() -> str:
    def lower(tid: int) -> None:
        if os.getpriority(os.PRIO_PROCESS, tid) < BACKGROUND_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)

    return f"nice {BACKGROUND_NICE} ({_on_every_thread(lower)} threads)"


def _idle_policy() -> str:
    """SCHED_IDLE: a core only when no other thread wants it. Threads started later (torch's) inherit it."""
    if not hasattr(os, "SCHED_IDLE"):
        raise _NotApplied("this platform has no SCHED_IDLE")
    idle, param = os.SCHED_IDLE, os.sched_param(0)
    return f"SCHED_IDLE ({_on_every_thread(lambda tid: os.sched_setscheduler(tid, idle, param))} threads)"


def _own_session() -> str:
    """A session, hence an autogroup, of its own; MONAI Label's Popen leaves it in the server's."""
    try:
        os.setsid()
    except PermissionError:  # already a process group leader
        if os.getsid(0) != os.getpid():
            raise _NotApplied(f"leads its process group inside session {os.getsid(0)}: cannot leave it") from None
    return f"own session {os.getsid(0)}"


def _autogroup_nice(attempts: int = 5) -> str:
    """Give this session's autogroup the lowest weight against every other session (the server's included)."""
    if not _autogroups_enabled():
        raise _NotApplied("the kernel has no autogroups (kernel.sched_autogroup_enabled)")
    if os.getsid(0) != os.getpid():  # the autogroup is the whole session's: never lower someone else's
        raise _NotApplied(f"not its session's leader (session {os.getsid(0)})")
    for _ in range(attempts - 1):
        try:
            _AUTOGROUP.write_text(f"{BACKGROUND_AUTOGROUP_NICE}\n")
            return f"autogroup nice {BACKGROUND_AUTOGROUP_NICE}"
        except BlockingIOError:  # EAGAIN: without CAP_SYS_ADMIN, one write per 100 ms on the whole machine
            time.sleep(0.15)
    _AUTOGROUP.write_text(f"{BACKGROUND_AUTOGROUP_NICE}\n")  # the last attempt raises
    return f"autogroup nice {BACKGROUND_AUTOGROUP_NICE}"


def yield_to_serving() -> dict[str, str]:
    """Make this background process yield the CPU to serving, whatever session the server runs in.

    Dies with its parent, nice 19 and SCHED_IDLE on every thread, then a session of its own with
    autogroup nice 19 (see the module docstring for why each). Each step is best effort: one that
    fails leaves the others in place. Logs one line; returns each step's outcome, what was
    applied or why not. Call it before torch starts its thread pool (threads inherit the policy);
    threads already running get it too. None of it can be undone by this process.
    """
    steps: dict[str, Callable[[], str]] = {
        "parent death signal": _die_with_parent,
        "nice": _nice,
        "SCHED_IDLE": _idle_policy,
        "own session": _own_session,
        "autogroup nice": _autogroup_nice,
    }
    applied: list[str] = []
    refused: list[str] = []
    outcome: dict[str, str] = {}
    for name, step in steps.items():
        try:
            outcome[name] = step()
            applied.append(outcome[name])
        except (OSError, _NotApplied) as e:
            outcome[name] = f"not applied: {e}"
            refused.append(f"{name} ({e})")
    logger.info(
        "Background process %d yields to serving: %s%s",
        os.getpid(),
        ", ".join(applied) or "nothing applied",
        f"; not applied: {', '.join(refused)}" if refused else "",
    )
    return outcome


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
            "background_yields": background_policy(),
        }
