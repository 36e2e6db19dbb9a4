"""The training loop every trainer shares: warm-up then cosine learning rate, progress with rates, seeds.

The server's ``/train`` tasks, the starter-weights script and the benchmarks all train through
:func:`run_steps`, so a figure measured by a benchmark is a figure of the code the server runs.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from .data import Crop, VolumeSampler

__all__ = ["StepTrainer", "TrainStats", "lr_factor", "run_steps", "seed_everything"]

logger = logging.getLogger(__name__)


class StepTrainer(Protocol):
    optimizer: torch.optim.Optimizer

    def step(self, crop: Crop) -> float | None: ...


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


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def run_steps(
    trainer: StepTrainer,
    sampler: VolumeSampler,
    steps: int,
    warmup: int = 0,
    desc: str = "train",
    max_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """``steps`` optimiser steps on crops from ``sampler`` (crops without an object are redrawn)."""
    sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: lr_factor(s, warmup, steps))
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, mininterval=10, disable=None)
    stopped = False
    redraws = 0
    while len(losses) < steps:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
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
        rate = (time.perf_counter() - start) / n
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", s_per_step=f"{rate:.2f}")
        bar.update(1)
        if n % 25 == 0 or n == steps:
            logger.info("%s: step %d/%d loss(avg20) %.4f, %.2f s/step", desc, n, steps, np.mean(losses[-20:]), rate)
        if on_step is not None:
            on_step(n, loss)
    bar.close()
    first = float(np.mean(losses[:20])) if losses else float("nan")
    last = float(np.mean(losses[-20:])) if losses else float("nan")
    return TrainStats(len(losses), time.perf_counter() - start, first, last, stopped)
