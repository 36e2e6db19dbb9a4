"""The validation split of a team's final labels: chosen once, persisted, grown, never reshuffled.

MONAI Label's sample trainers re-split the datastore on every run, so an image validated on
yesterday is trained on today and the promotion decision measures memorisation. Here each
image is assigned the first time its final label is seen and keeps that assignment for good;
a new image goes to validation while validation holds fewer than ``fraction`` of all images
(at least one once there are two), in the order the labels arrived.

Each round also holds back, from the training images, its newest labels that the served version
has not learned from (:func:`hold_back`): the gate scores served and candidate on them before any
round trains on them, and the next round trains on them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from ..atomic import write_json

if TYPE_CHECKING:
    from .labelled import FinalLabel

__all__ = ["RoundLabels", "Split", "ValidationSplit", "hold_back", "round_labels"]

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Scoring and rounds in several processes may add ids at once.
        with FileLock(str(self.path.with_name(f".{self.path.name}.lock"))):
            split = self.load()
            train, validation = list(split.train), list(split.validation)
            known = set(train) | set(validation)
            added = [i for i in image_ids if i not in known]
            for image_id in added:
                total = len(train) + len(validation) + 1
                (validation if len(validation) < self._target(total) else train).append(image_id)
            if added:
                write_json(self.path, {"train": train, "validation": validation})
                logger.info("Split: %d train, %d validation (+%d new)", len(train), len(validation), len(added))
        return Split(train, validation)


def hold_back(items: Sequence[FinalLabel], learned: set[str], count: int) -> tuple[list[FinalLabel], list[FinalLabel]]:
    """(held back, to train on): the ``count`` newest labels (by save time) whose stamps are not in ``learned``.

    ``learned`` holds the stamps the served version trained on, so a held-back label (which no
    version has trained on) is new again in the next round, which trains on it unless it is again
    among the newest. Labels to train on keep the order of ``items``.
    """
    if count < 1:
        raise ValueError(f"hold back at least 1 label, got {count}")
    new = sorted((f for f in items if f.stamp not in learned), key=lambda f: (f.mtime_ns, f.image_id))
    held = new[-count:]
    stamps = {f.stamp for f in held}
    return held, [f for f in items if f.stamp not in stamps]


@dataclass(frozen=True)
class RoundLabels:
    """A round's final labels, split.

    Attributes:
        train: labels the round trains on (the held-back ones excluded).
        validation: the persisted validation split's labels.
        held_back: the newest labels the served version has not learned from, kept out of training.
        new: image ids in ``train`` the served version has not learned from.
        learned: how many labels the served version has learned from.
    """

    train: list[FinalLabel]
    validation: list[FinalLabel]
    held_back: list[FinalLabel]
    new: set[str]
    learned: int


def round_labels(
    split: ValidationSplit, labelled: Sequence[FinalLabel], trained_on: Sequence[str], holdback: int
) -> RoundLabels:
    """Update the validation split with ``labelled`` and hold back the newest unlearned training labels.

    ``trained_on``: the stamps the served version learned from. Raises ValueError when the training
    split has no label yet.
    """
    assigned = split.update(f.image_id for f in labelled)
    by_id = {f.image_id: f for f in labelled}
    training = [by_id[i] for i in assigned.train if i in by_id]
    if not training:
        raise ValueError("no final labels in the training split yet: submit a label first")
    learned = set(trained_on)
    held, train = hold_back(training, learned, holdback)
    new = {f.image_id for f in train if f.stamp not in learned}
    validation = [by_id[i] for i in assigned.validation if i in by_id]
    return RoundLabels(train, validation, held, new, len(learned))
