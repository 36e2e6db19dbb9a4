"""The Work figures: labels submitted per annotator and day, images labelled vs remaining, correction effort.

A submitted label is an image's ``final`` label; who saved it and when are in its info (``user``,
``ts``: every label saved through the server records them). The datastore keeps one final label per
image, so a label saved again counts once, on the day of its last save. Correction effort is what
the ``dice`` scoring method (:mod:`lib.activelearning.dice`) stored in the image's info: the Dice of
the model's ``original`` label against the submitted one and the fraction of labelled voxels the
annotator changed; images nobody scored, or without an ``original`` label, have none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

__all__ = ["Submission", "submissions", "work_figures"]

FINAL = DefaultLabelTag.FINAL.value
UNKNOWN_USER = "unknown"  # labels put in the datastore folder by hand record nobody


@dataclass(frozen=True)
class Submission:
    """An image's submitted label.

    Attributes:
        image: the image id.
        user: who saved it (``unknown`` for labels not saved through the server).
        submitted: when (ISO 8601, server time).
        dice: the model's label against the submitted one (1: unchanged), when scored.
        corrected_fraction: labelled voxels the annotator changed, 0..1, when scored.
    """

    image: str
    user: str
    submitted: str
    dice: float | None
    corrected_fraction: float | None

    @property
    def day(self) -> str:
        return self.submitted[:10]


def _submission(datastore: Datastore, image_id: str) -> Submission | None:
    label_id = datastore.get_label_by_image_id(image_id, FINAL)
    if not label_id:
        return None
    info = datastore.get_label_info(label_id, FINAL) or {}
    scores = datastore.get_image_info(image_id) or {}
    fraction = scores.get("corrected_fraction")
    return Submission(
        image=image_id,
        user=str(info.get("user") or UNKNOWN_USER),
        submitted=datetime.fromtimestamp(int(info.get("ts", 0))).isoformat(),
        dice=float(scores["dice"]) if isinstance(scores.get("dice"), int | float) else None,
        corrected_fraction=float(fraction) if isinstance(fraction, int | float) else None,
    )


def submissions(datastore: Datastore, images: Iterable[str]) -> list[Submission]:
    """The submitted labels of ``images``, oldest first."""
    found = [s for s in (_submission(datastore, image_id) for image_id in images) if s is not None]
    return sorted(found, key=lambda s: (s.submitted, s.image))


def work_figures(all_submissions: list[Submission], images: int, viewer: str | None) -> dict[str, Any]:
    """The Work section; ``viewer`` None: everybody's work, else only that user's (``images`` is the team's).

    Args:
        all_submissions: every submitted label (:func:`submissions`).
        images: how many images the datastore holds.
        viewer: the user whose work alone is shown, or None for a reviewer or admin.
    """
    mine = [s for s in all_submissions if viewer is None or s.user == viewer]
    per_day = Counter((s.day, s.user) for s in mine)
    return {
        "annotators": sorted({s.user for s in mine}),
        "labels_per_day": [{"day": d, "user": u, "labels": n} for (d, u), n in sorted(per_day.items())],
        "images": {"total": images, "labelled": len(all_submissions), "remaining": images - len(all_submissions)},
        "submissions": [asdict(s) for s in mine],
    }
