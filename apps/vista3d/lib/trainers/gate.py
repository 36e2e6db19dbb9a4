"""The promotion gate: paired per-object evidence that a candidate is worse, not a mean over one label.

A team's first rounds have one to four validation labels. A mean over so few objects swings by
more than any tolerance from one case to the next: the gate that compared two means refused, on one
validation label, a candidate that lifted held-out Dice@1 from 0.19 to 0.55. So:

* both models are scored object by object (the same objects, the same simulated clicks), and the
  gate looks at the paired differences (candidate - served);
* it refuses on validation only with enough objects (``min_objects``) and when the candidate is
  worse with confidence: the one-sided bootstrap upper bound of the mean difference is below 0
  and the mean drop exceeds the tolerance;
* with fewer validation objects it weighs in the round's new training labels, which the served
  model has never learned from: the candidate is refused when it is worse by more than the
  tolerance on the validation and new-label objects pooled. The candidate trained on those labels,
  so this check cannot show that it generalises; it catches a round that broke the model (worse
  even on what it was taught), which is what a refusal on scant evidence should be for.

Every decision carries its evidence (objects, mean difference, bound, wins and losses), which the
round records and ``/info`` shows as ``learning.last_round``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Decision", "Evidence", "GateConfig", "decide", "paired_evidence"]


@dataclass(frozen=True)
class GateConfig:
    """How sure the gate must be before it refuses.

    Attributes:
        tolerance: a mean drop at most this large never refuses.
        min_objects: validation objects needed before validation alone may refuse (or promote).
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
    promote: bool
    reason: str
    validation: Evidence | None
    new_labels: Evidence | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "validation": self.validation.as_dict() if self.validation else None,
            "new_labels": self.new_labels.as_dict() if self.new_labels else None,
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


def decide(
    validation: tuple[Mapping[str, float], Mapping[str, float]],
    new_labels: tuple[Mapping[str, float], Mapping[str, float]],
    config: GateConfig,
) -> Decision:
    """Promote or not from (served, candidate) per-object scores on validation and on the new labels."""
    val_diffs = _differences(*validation)
    new_diffs = _differences(*new_labels)
    val, new = _evidence(val_diffs, config), _evidence(new_diffs, config)
    tol = config.tolerance
    if val is not None and val.objects >= config.min_objects:
        if val.upper < 0 and val.mean < -tol:
            reason = (
                f"worse on {val.objects} validation objects with confidence: mean {val.mean:+.4f}, "
                f"{config.confidence:.0%} upper bound {val.upper:+.4f} ({val.worse} worse, {val.better} better)"
            )
            return Decision(False, reason, val, new)
        reason = (
            f"not worse with confidence on {val.objects} validation objects: "
            f"mean {val.mean:+.4f}, upper bound {val.upper:+.4f}"
        )
        return Decision(True, reason, val, new)
    pooled = _evidence(np.concatenate([val_diffs, new_diffs]), config)
    if pooled is None:
        return Decision(False, "no labelled objects to compare on yet", val, new)
    where = f"{len(val_diffs)} validation + {len(new_diffs)} new-label objects"
    if pooled.mean < -tol:
        return Decision(False, f"worse on {where}: mean {pooled.mean:+.4f} (tolerance {tol})", val, new)
    return Decision(True, f"too few validation objects to refuse; on {where}: mean {pooled.mean:+.4f}", val, new)
