"""The validation split of a team's final labels: chosen once, persisted, grown, never reshuffled.

MONAI Label's sample trainers re-split the datastore on every run, so an image validated on
yesterday is trained on today and the promotion decision measures memorisation. Here each
image is assigned the first time its final label is seen and keeps that assignment for good;
a new image goes to validation while validation holds fewer than ``fraction`` of all images
(at least one once there are two), in the order the labels arrived.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json

__all__ = ["Split", "ValidationSplit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    train: list[str]
    validation: list[str]


class ValidationSplit:
    """``split.json`` in the model store: ``{"train": [...], "validation": [...]}`` image ids."""

    def __init__(self, path: str | Path, fraction: float = 0.2) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
        self.path = Path(path)
        self.fraction = fraction

    def load(self) -> Split:
        if not self.path.is_file():
            return Split([], [])
        data = json.loads(self.path.read_text())
        return Split(list(data["train"]), list(data["validation"]))

    def _target(self, total: int) -> int:
        return 0 if total < 2 else max(1, round(self.fraction * total))

    def update(self, image_ids: Iterable[str]) -> Split:
        """Assign the ids not seen before (in the given order) and persist; earlier ones never move."""
        split = self.load()
        train, validation = list(split.train), list(split.validation)
        known = set(train) | set(validation)
        added = [i for i in image_ids if i not in known]
        for image_id in added:
            total = len(train) + len(validation) + 1
            (validation if len(validation) < self._target(total) else train).append(image_id)
        if added:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"train": train, "validation": validation})
            logger.info("Split: %d train, %d validation (+%d new)", len(train), len(validation), len(added))
        return Split(train, validation)
