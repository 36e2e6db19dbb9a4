"""``/train`` request parameters, parsed and validated once (MONAI Label passes them through as a dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..settings import MAX_TRAIN_CLICKS, Settings

__all__ = ["TrainRequest"]


@dataclass(frozen=True)
class TrainRequest:
    """One fine-tuning round.

    Attributes:
        steps: optimiser steps at most (a point round stops early once its training labels stop improving).
        steps_per_label: steps per training label at most in a round that trains the shared encoder
            (0: no such cap); see :meth:`round_steps`.
        lr: base peak learning rate (linear warm-up over the first tenth, then cosine decay); a round
            runs at ``lr * sqrt(lr_half_life / (lr_half_life + labels already learned))``.
        crop: edge of the cubic training crops: by default the preset's inference window, which the
            point head's positional encoding is normalised by (see ``lib.model.patch_size_for``).
        rounds: click-simulation rounds per point step.
        click_weight: weight of the cross-entropy over each simulated correction's error region
            (``lib.trainers.point_trainer.click_region_loss``; 0: whole-mask DiceCE alone).
        train_encoder: whether the point trainer also updates the shared encoder levels (false: the point
            decoder and head only, so the automatic branch cannot change).
        cached: a point round trains the point head alone on click sessions played on the served
            path, the encoder frozen and its windows computed once (:mod:`.point_cached`); the
            automatic branch cannot change. One process only.
        replay_share: share of steps on labels learned in earlier rounds (the rest on new ones).
        tolerance: the promotion gate's allowed drop in validation score.
        clicks: simulated clicks per validation object.
        seed: seeds crops, prompts and clicks.
        world_size: training processes (torch.distributed: gloo on CPU, nccl on GPUs).
        max_minutes: stop early after this long (single process only; reported).
        lr_half_life: labels learned after which a round's rate is ``lr / sqrt(2)`` (0: constant rate).
        check_every: steps between early-stop checks on the training labels (point rounds, one process).
        patience: checks in a row without a better training-label score before a point round stops
            (0: no early stop; the round runs every step and the gate alone decides).
        holdback: the newest labels the served version has not learned from that the round keeps out of
            its training and the gate judges the candidate on (with validation); the next round trains on them.
    """

    steps: int = 300
    steps_per_label: int = 20
    lr: float = 1e-4
    crop: int = 64
    rounds: int = 3
    click_weight: float = 0.0
    train_encoder: bool = True
    cached: bool = False
    replay_share: float = 0.5
    tolerance: float = 0.01
    clicks: int = 5
    seed: int = 0
    world_size: int = 1
    max_minutes: float | None = None
    lr_half_life: int = 5
    check_every: int = 25
    patience: int = 3
    holdback: int = 1

    @classmethod
    def parse(cls, request: dict[str, Any], settings: Settings, window: int) -> TrainRequest:
        """Our keys of ``request`` (others belong to MONAI Label); a bad value raises ValueError naming it.

        ``window`` is the served preset's window edge, the default crop.
        """
        values: dict[str, Any] = {
            "steps": settings.train_steps,
            "steps_per_label": settings.train_steps_per_label,
            "lr": settings.train_lr,
            "tolerance": settings.promote_tolerance,
            "patience": settings.train_patience,
            "holdback": settings.train_holdback,
            "clicks": settings.train_clicks,
            "crop": window,
        }
        for f in fields(cls):
            if f.name not in request or request[f.name] is None:
                continue
            values[f.name] = _convert(f.name, request[f.name], cls.__dataclass_fields__[f.name].default)
        req = cls(**values)
        req.check()
        return req

    def check(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be at least 1, got {self.steps}")
        if self.steps_per_label < 0:
            problems.append(f"steps_per_label must be >= 0, got {self.steps_per_label}")
        if not 0 < self.lr < 1:
            problems.append(f"lr must be in (0, 1), got {self.lr}")
        if self.crop < 32 or self.crop % 16:
            problems.append(f"crop must be a multiple of 16 of at least 32, got {self.crop}")
        if not 1 <= self.rounds <= 10:
            problems.append(f"rounds must be in 1..10, got {self.rounds}")
        if self.click_weight < 0:
            problems.append(f"click_weight must be >= 0, got {self.click_weight}")
        if not 0 <= self.replay_share < 1:
            problems.append(f"replay_share must be in [0, 1), got {self.replay_share}")
        if self.tolerance < 0:
            problems.append(f"tolerance must be >= 0, got {self.tolerance}")
        if not 1 <= self.clicks <= MAX_TRAIN_CLICKS:
            problems.append(f"clicks must be in 1..{MAX_TRAIN_CLICKS}, got {self.clicks}")
        if self.world_size < 1:
            problems.append(f"world_size must be at least 1, got {self.world_size}")
        if self.cached and self.world_size > 1:
            problems.append("cached rounds run in one process: leave world_size at 1")
        if self.lr_half_life < 0:
            problems.append(f"lr_half_life must be >= 0, got {self.lr_half_life}")
        if self.check_every < 1:
            problems.append(f"check_every must be at least 1, got {self.check_every}")
        if self.patience < 0:
            problems.append(f"patience must be >= 0, got {self.patience}")
        if self.holdback < 1:
            problems.append(f"holdback must be at least 1, got {self.holdback}")
        if problems:
            raise ValueError("bad train request: " + "; ".join(problems))

    def round_steps(self, train_labels: int, trains_encoder: bool) -> int:
        """Steps of a round on ``train_labels`` labels: ``steps``, capped at ``steps_per_label`` per label
        when the round trains the shared encoder (the task knows whether it does).

        A full point round spends most of a fixed budget on learning a few labels by heart: from the
        starter, a round on 3 sarcoma labels raised Dice on 5 unseen ones most within 50 steps and gave
        part of it back by step 300, its clicks after the first adding less and less. Point rounds that
        leave the encoder alone (``train_encoder`` false, ``cached``) learn more slowly: capped, their
        learning curve ended 0.012 lower, so they run ``steps`` (docs/continual-learning.md), as
        automatic rounds do (their encoder is frozen; the cap was never measured on them).
        """
        if self.steps_per_label == 0 or not trains_encoder:
            return self.steps
        return max(1, min(self.steps, self.steps_per_label * train_labels))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _convert(name: str, value: Any, default: Any) -> Any:
    """Values arrive as JSON types or strings (Slicer sends strings)."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad train request: {name} must be a {type(default).__name__}, got {value!r}") from None
