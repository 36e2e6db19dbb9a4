"""Rounds that build on each other: a learning rate that falls as the model has learned more labels, and
an early stop that keeps the best state a round reached on its own training labels.

A fine-tuning round that runs its full schedule at the same learning rate as the one before can
undo it: in the learning curve from earlier start weights, rounds 3 and 4 each fine-tuned again at lr
2e-3 and held-out Dice@1 fell from 0.55 to 0.45. Two guards:

* :func:`round_lr`: the base rate scaled by ``sqrt(k / (k + learned))``, ``learned`` being the labels
  the served version has already learned from (``k`` = 5: the second round of five labels runs at
  0.71x, the fifth at 0.45x);
* :class:`EarlyStop`: every ``every`` steps the candidate answers the simulated annotator on (some of)
  its training labels, exactly as validation does (never on the labels the round holds back for the
  gate: those are not training labels); the round stops once ``patience`` checks in a row
  did not beat the best score so far (the served model's to begin with), and the best checked state
  becomes the candidate. Whether it beat the served model on its own labels is recorded, but the
  gate decides: in the first learning curve a veto on that score refused all four rounds, among them
  one whose candidate was better on the held-out cases.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.nets.vista3d import VISTA3D

from .labelled import FinalLabel
from .validation import ClickScorer

__all__ = ["EarlyStop", "monitored_labels", "round_lr"]

logger = logging.getLogger(__name__)

# Training labels scored at each check, at most (new ones first): about 8 s per check for `small`.
MAX_MONITORED = 8


def round_lr(base: float, learned: int, half_life: int) -> float:
    """The round's peak learning rate: ``base * sqrt(k / (k + learned))`` (``half_life`` = k; 0 = constant)."""
    if half_life <= 0:
        return base
    return base * math.sqrt(half_life / (half_life + learned))


def monitored_labels(train: Sequence[FinalLabel], new: set[str]) -> list[FinalLabel]:
    """The training labels an early stop scores: every new one, then the most recent older ones."""
    fresh = [f for f in train if f.image_id in new]
    older = [f for f in reversed(train) if f.image_id not in new]
    return (fresh + older)[:MAX_MONITORED]


class EarlyStop:
    """Scores a training network every ``every`` steps and keeps its best state (see the module docstring).

    Use as ``run_steps(..., stop_when=early_stop)`` after :meth:`baseline`, then :meth:`restore_best`.
    """

    def __init__(
        self, network: VISTA3D, scorer: ClickScorer, steps: int, every: int, patience: int, min_gain: float = 0.002
    ) -> None:
        self.network = network
        self.steps = steps
        self.scorer = scorer
        self.every = every
        self.patience = patience
        self.min_gain = min_gain
        self.baseline_scores: dict[str, float] = {}
        self.best_scores: dict[str, float] = {}  # of the best checked state
        self.best_step = 0
        self.history: list[tuple[int, float]] = []
        self._best_state: dict[str, torch.Tensor] | None = None
        self._mark = 0.0  # the score a check must beat to reset the patience
        self._misses = 0

    def _scores(self) -> dict[str, float]:
        was_training = self.network.training
        curves = self.scorer.curves(self.network)
        self.network.train(was_training)
        return {k: float(np.mean(v)) for k, v in curves.items()}

    @staticmethod
    def _mean(scores: dict[str, float]) -> float:
        return float(np.mean(list(scores.values()))) if scores else 0.0

    def baseline(self) -> float:
        """Score the network before training (the served model's state): the mark a step must beat."""
        self.baseline_scores = self._scores()
        self._mark = self._mean(self.baseline_scores)
        self.history = [(0, self._mark)]
        logger.info("Early stop: %d training objects, baseline %.4f", len(self.baseline_scores), self.history[0][1])
        return self.history[0][1]

    def __call__(self, step: int) -> bool:
        """After ``step``: True when the round should stop. Checks every ``every`` steps and at the last one."""
        if step % self.every and step != self.steps:
            return False
        scores = self._scores()
        mean = self._mean(scores)
        self.history.append((step, mean))
        if self._best_state is None or mean > self._mean(self.best_scores):
            self.best_scores, self.best_step = scores, step
            # On the CPU: a GPU round's peak memory must not hold a second copy of the weights.
            self._best_state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        if mean > self._mark + self.min_gain:
            self._mark, self._misses = mean, 0
        else:
            self._misses += 1
        logger.info("Early stop: step %d training-label score %.4f (best %.4f at step %d)", step, mean,
                    self._mean(self.best_scores), self.best_step)  # fmt: skip
        return self._misses >= self.patience

    @property
    def improved(self) -> bool:
        """Whether the best checked state beat the served model on the training labels."""
        return self._best_state is not None and self._mean(self.best_scores) > self.history[0][1] + self.min_gain

    def restore_best(self) -> None:
        """Load the best state checked."""
        if self._best_state is not None:
            self.network.load_state_dict(self._best_state)

    def summary(self) -> dict[str, object]:
        """The images scored, the baseline, the best check and every check as ``[step, score]``."""
        return {
            "images": sorted({key.split("#")[0] for key in self.baseline_scores}),
            "best_step": self.best_step,
            "baseline": round(self.history[0][1], 4) if self.history else None,
            "best": round(self._mean(self.best_scores), 4),
            "improved": self.improved,
            "checks": [[s, round(m, 4)] for s, m in self.history],
        }
