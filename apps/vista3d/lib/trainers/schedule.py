"""The training loop every trainer shares: warm-up then cosine learning rate, progress with rates, seeds,
and checkpoints to resume from.

The server's ``/train`` tasks, the starter-weights script and the benchmarks all train through
:func:`run_steps`, so a figure measured by a benchmark is a figure of the code the server runs.
A long run (the starter weights) can be done in pieces: with ``checkpoint`` set, the loop writes the
trainer, sampler, scheduler and every random generator there (atomically) and a later call picks up
at the step it reached, drawing the same crops and clicks an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

__all__ = [
    "Checkpoint",
    "Sampler",
    "StepTrainer",
    "TrainStats",
    "lr_factor",
    "rng_state",
    "run_steps",
    "seed_everything",
]

logger = logging.getLogger(__name__)


class Sampler(Protocol):
    """Draws what a step trains on (a crop, a click case), reproducibly from its state."""

    def sample(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StepTrainer(Protocol):
    optimizer: torch.optim.Optimizer

    def step(self, item: Any) -> float | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps its checkpoint, and every how many steps it writes it."""

    path: Path
    every: int = 50


@dataclass(frozen=True)
class TrainStats:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    stopped_early: bool

    @property
    def s_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs (MONAI's prompt sampler draws from ``random``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's global generators (MONAI's prompt sampler draws from ``random``),
    and every GPU's where CUDA is initialised (a run resumed on a GPU draws what it would have drawn)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file: a run killed mid-write keeps the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def run_steps(
    trainer: StepTrainer,
    sampler: Sampler,
    steps: int,
    warmup: int = 0,
    desc: str = "train",
    max_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint: Checkpoint | None = None,
    stop_when: Callable[[int], bool] | None = None,
    time_schedule: bool = False,
) -> TrainStats:
    """``steps`` optimiser steps on what ``sampler`` draws (redrawn when a step returns None: a crop without an object).

    With ``checkpoint``, resumes from its file when there is one and writes it every
    ``checkpoint.every`` steps and at the end. ``stop_when(step)`` returning True ends the run
    early (e.g. :class:`.early_stop.EarlyStop`). With ``time_schedule`` (and ``max_seconds``) the
    learning rate decays over whichever ends first, the steps or the time: a run on a machine of
    unknown speed ends annealed rather than cut off at a high rate.
    """
    losses: list[float] = []
    seconds_before = 0.0

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - start

    def factor(step: int) -> float:
        if time_schedule and max_seconds:
            step = max(step, int(steps * min(1.0, elapsed() / max_seconds)))
        return lr_factor(step, warmup, steps)

    start = time.perf_counter()
    sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, factor)
    if checkpoint is not None and checkpoint.path.is_file():
        state = torch.load(checkpoint.path, map_location="cpu", weights_only=False)
        trainer.load_state_dict(state["trainer"])
        sampler.load_state_dict(state["sampler"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        losses, seconds_before = list(state["losses"]), float(state["seconds"])
        logger.info("%s: resumed from %s at step %d of %d", desc, checkpoint.path, len(losses), steps)

    def save() -> None:
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint.path,
                {
                    "trainer": trainer.state_dict(),
                    "sampler": sampler.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "losses": losses,
                    "seconds": elapsed(),
                },
            )

    start = time.perf_counter()
    bar = tqdm(total=steps, initial=len(losses), desc=desc, unit="step", file=sys.stderr, mininterval=10, disable=None)
    stopped = False
    redraws = 0
    done_before = len(losses)
    while len(losses) < steps:
        if max_seconds is not None and (elapsed() if time_schedule else time.perf_counter() - start) > max_seconds:
            logger.warning("%s: time limit reached after %d of %d steps", desc, len(losses), steps)
            stopped = True
            break
        loss = trainer.step(sampler.sample())
        if loss is None:
            redraws += 1
            if redraws > 50 * steps + 100:
                raise RuntimeError(f"{desc}: the training crops hold no object to train on")
            continue
        sched.step()
        losses.append(loss)
        n = len(losses)
        rate = (time.perf_counter() - start) / (n - done_before)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", s_per_step=f"{rate:.2f}")
        bar.update(1)
        if n % 25 == 0 or n == steps:
            logger.info("%s: step %d/%d loss(avg20) %.4f, %.2f s/step", desc, n, steps, np.mean(losses[-20:]), rate)
        if checkpoint is not None and n % checkpoint.every == 0:
            save()
        if on_step is not None:
            on_step(n, loss)
        if stop_when is not None and stop_when(n):
            logger.info("%s: stopped early after %d of %d steps", desc, n, steps)
            stopped = True
            break
    bar.close()
    save()
    first = float(np.mean(losses[:20])) if losses else float("nan")
    last = float(np.mean(losses[-20:])) if losses else float("nan")
    return TrainStats(len(losses), elapsed(), first, last, stopped)
