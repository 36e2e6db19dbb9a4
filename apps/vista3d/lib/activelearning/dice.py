"""How much each image needed correcting: multi-class Dice between the model's and the submitted label.

MONAI Label's own ``Dice`` scorer multiplies the two label maps voxel by voxel, which is only right
for binary labels: with ids such as 1 (liver) and 3 (spleen) a spleen labelled as liver still
"overlaps". Here every class present in either label is scored on its own.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from monai.transforms import LoadImage
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

__all__ = ["MultiClassDice", "label_agreement"]

logger = logging.getLogger(__name__)


def label_agreement(predicted: np.ndarray, corrected: np.ndarray) -> dict[str, Any]:
    """Per-class Dice, their mean, and the fraction of labelled voxels the annotator changed."""
    classes = sorted(int(c) for c in np.union1d(np.unique(predicted), np.unique(corrected)) if c != 0)
    per_class = {}
    for c in classes:
        p, t = predicted == c, corrected == c
        per_class[str(c)] = round(2.0 * float(np.sum(p & t)) / float(np.sum(p) + np.sum(t)), 5)
    labelled = (predicted > 0) | (corrected > 0)
    changed = int(np.sum((predicted != corrected) & labelled))
    return {
        "dice": round(float(np.mean(list(per_class.values()))), 5) if per_class else 1.0,
        "dice_per_class": per_class,
        "corrected_fraction": round(changed / int(labelled.sum()), 5) if labelled.any() else 0.0,
    }


class MultiClassDice(ScoringMethod):
    """Scores every image that has both an ``original`` (model) and a ``final`` (submitted) label."""

    def __init__(self) -> None:
        super().__init__("Multi-class Dice of the model's label against the submitted one, per image")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        tag_final = request.get("y", DefaultLabelTag.FINAL)
        tag_original = request.get("y_pred", DefaultLabelTag.ORIGINAL)
        loader = LoadImage(image_only=True)
        result: dict[str, Any] = {}
        for image_id in datastore.list_images():
            final = datastore.get_label_by_image_id(image_id, tag_final)
            original = datastore.get_label_by_image_id(image_id, tag_original)
            if not final or not original:
                continue
            y = np.asarray(loader(datastore.get_label_uri(final, tag_final)))
            y_pred = np.asarray(loader(datastore.get_label_uri(original, tag_original)))
            if y.shape != y_pred.shape:
                logger.warning("Dice: %s labels differ in shape %s vs %s; skipped", image_id, y.shape, y_pred.shape)
                continue
            scores = label_agreement(y_pred, y)
            datastore.update_image_info(image_id, scores)
            result[image_id] = scores
            logger.info(
                "Dice %s: %.4f (%.1f%% of labelled voxels corrected)",
                image_id,
                scores["dice"],
                100 * scores["corrected_fraction"],
            )
        return result
