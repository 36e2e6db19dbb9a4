"""The promotion gate: paired per-object evidence on labels the candidate has never trained on.

A team's first rounds have one to four validation labels. A mean over so few objects swings by
more than any tolerance from one case to the next: the gate that compared two means refused, on one
validation label, a candidate that lifted held-out Dice@1 from 0.19 to 0.55. The gate that then
pooled in the round's new training labels judged the candidate on labels it had just trained on,
and promoted two candidates that were worse on the held-out cases (two of the learning curve's four
decisions wrong). So "test, then train":

* every round holds back its newest final label(s) from its training (:func:`.split.hold_back`);
  they join the next round's training. Served and candidate are scored on them and on the
  persisted validation split, object by object (the same objects, the same simulated clicks):
  objects neither model has trained on;
* the gate looks at the paired differences (candidate - served) over those objects pooled. A mean
  drop beyond the tolerance refuses, however many objects there are; with at least
  ``min_objects``, so does a candidate worse with confidence (the one-sided bootstrap upper bound
  of the mean difference below 0) even within the tolerance. An earlier rule refused on enough
  objects only when both held, so more evidence made it more lenient: it promoted a candidate
  whose mean was -0.044 on four objects (upper bound +0.056) that was 0.029 worse on the held-out
  cases (learning curve of 2026-12-04).

Every decision carries its evidence on validation, on the held-back labels and pooled (objects,
mean difference, bound, wins and losses), which the round records and ``/info`` shows as
``learning.last_round.gate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Decision", "Evidence", "GateConfig", "decide", "paired_evidence"]

Scores = tuple[Mapping[str, float], Mapping[str, float]]


@dataclass(frozen=True)
class GateConfig:
    """How sure the gate must be before it refuses.

    Attributes:
        tolerance: a mean drop at most this large never refuses.
        min_objects: unseen objects (validation and held back) needed before the confidence bound decides.
        confidence: one-sided level of the bootstrap bound.
        resamples: bootstrap resamples (seeded: the same scores give the same decision).
    """

    tolerance: float = 0.01
    min_objects: int = 4
    confidence: float = 0.95
    resamples: int = 2000


@dataclass(frozen=True)
class Evidence:
    """Paired differences (candidate - served) of per-object scores on one set of objects.

    Attributes:
        objects: objects scored by both models.
        mean: mean difference.
        upper: one-sided bootstrap upper bound of the mean difference at the configured confidence.
        better: objects on which the candidate scored higher; ``worse``: lower.
    """

    objects: int
    mean: float
    upper: float
    better: int
    worse: int

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decision:
    """The gate's answer and its evidence.

    Attributes:
        promote: whether the candidate replaces the served model.
        reason: why, in a sentence with the figures.
        validation: evidence on the validation split's objects.
        held_back: evidence on the objects of the labels the round held back from its training.
        pooled: both together: what the decision rests on.
    """

    promote: bool
    reason: str
    validation: Evidence | None
    held_back: Evidence | None
    pooled: Evidence | None

    def as_dict(self) -> dict[str, Any]:
        def plain(e: Evidence | None) -> dict[str, Any] | None:
            return e.as_dict() if e is not None else None

        return {
            "promote": self.promote,
            "reason": self.reason,
            "validation": plain(self.validation),
            "held_back": plain(self.held_back),
            "pooled": plain(self.pooled),
        }


def _differences(served: Mapping[str, float], candidate: Mapping[str, float]) -> np.ndarray:
    return np.asarray([candidate[k] - served[k] for k in sorted(served) if k in candidate], dtype=np.float64)


def _evidence(diffs: np.ndarray, config: GateConfig) -> Evidence | None:
    if len(diffs) == 0:
        return None
    rng = np.random.default_rng(0)
    means = diffs[rng.integers(0, len(diffs), size=(config.resamples, len(diffs)))].mean(axis=1)
    return Evidence(
        objects=len(diffs),
        mean=float(diffs.mean()),
        upper=float(np.quantile(means, config.confidence)),
        better=int((diffs > 0).sum()),
        worse=int((diffs < 0).sum()),
    )


def paired_evidence(served: Mapping[str, float], candidate: Mapping[str, float], config: GateConfig) -> Evidence | None:
    """Evidence over the objects both score maps hold (object key -> score); None when there are none."""
    return _evidence(_differences(served, candidate), config)


def decide(validation: Scores, held_back: Scores, config: GateConfig) -> Decision:
    """Promote or not from (served, candidate) per-object scores on validation and on the held-back labels.

    Both sets must be unseen by the candidate: scores on labels it trained on do not belong here.
    """
    val_diffs, held_diffs = _differences(*validation), _differences(*held_back)
    val, held = _evidence(val_diffs, config), _evidence(held_diffs, config)
    pooled = _evidence(np.concatenate([val_diffs, held_diffs]), config)
    if pooled is None:
        return Decision(False, "no unseen labelled objects to compare on yet", val, held, pooled)
    where = f"{len(val_diffs)} validation + {len(held_diffs)} held-back objects"
    tol = config.tolerance
    bounded = pooled.objects >= config.min_objects
    if bounded and pooled.upper < 0:
        within = " (within the tolerance)" if pooled.mean >= -tol else ""
        reason = (
            f"worse with confidence on {where}: mean {pooled.mean:+.4f}{within}, {config.confidence:.0%} upper "
            f"bound {pooled.upper:+.4f} ({pooled.worse} worse, {pooled.better} better)"
        )
        return Decision(False, reason, val, held, pooled)
    if pooled.mean < -tol:
        reason = (
            f"worse on {where}: mean {pooled.mean:+.4f} (tolerance {tol}; {pooled.worse} worse, {pooled.better} better)"
        )
        return Decision(False, reason, val, held, pooled)
    if bounded:
        reason = f"not worse on {where}: mean {pooled.mean:+.4f}, upper bound {pooled.upper:+.4f}"
        return Decision(True, reason, val, held, pooled)
    reason = (
        f"too few objects for a confidence bound; not worse beyond the tolerance on {where}: mean {pooled.mean:+.4f}"
    )
    return Decision(True, reason, val, held, pooled)
