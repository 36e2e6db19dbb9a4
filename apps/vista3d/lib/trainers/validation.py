"""The promotion gate's measurement: clicks-to-Dice (and auto Dice) on the persisted validation split.

Validation runs the server's own inference code (:mod:`lib.segment`) on the original images, so a
promoted model is better at exactly what annotators use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.networks.nets.vista3d import VISTA3D

from ..imageio import load_label
from ..labels import LabelDictionary
from ..prompts import AutoPrompt
from ..segment import new_state, segment_auto
from ..simulate import clicks_to_dice, dice, scoring_engine
from .labelled import FinalLabel

__all__ = ["auto_dice", "click_dice", "gate"]

logger = logging.getLogger(__name__)

MAX_OBJECTS_PER_IMAGE = 3
LAST_CLASS = 132


def _objects(label: np.ndarray, limit: int) -> list[int]:
    """The largest ``limit`` objects of a label map."""
    ids, counts = np.unique(label[label > 0], return_counts=True)
    return [int(i) for i in ids[np.argsort(-counts)][:limit]]


def click_dice(
    network: VISTA3D, preset: str, labels: LabelDictionary, items: Sequence[FinalLabel], clicks: int
) -> dict[str, Any]:
    """Mean Dice after each simulated click over the objects of ``items``; ``score`` = mean over clicks."""
    engine = scoring_engine(network, preset, labels)
    curves = []
    start = time.perf_counter()
    for item in items:
        state = new_state(item.image, labels.preprocessing, engine.patch)
        truth_map = np.asarray(load_label(item.label, state.original_shape))
        for class_id in _objects(truth_map, MAX_OBJECTS_PER_IMAGE):
            curves.append(clicks_to_dice(engine, state, truth_map == class_id, class_id, clicks))
    if not curves:
        return {"images": [], "objects": 0}
    mean = np.mean(np.asarray(curves), axis=0)
    logger.info("Validation: %d objects, %d clicks each, %.1f s", len(curves), clicks, time.perf_counter() - start)
    return {
        "images": sorted(i.image_id for i in items),
        "objects": len(curves),
        "score": round(float(mean.mean()), 4),
        "dice_1": round(float(mean[0]), 4),
        f"dice_{clicks}": round(float(mean[-1]), 4),
    }


def auto_dice(network: VISTA3D, preset: str, labels: LabelDictionary, items: Sequence[FinalLabel]) -> dict[str, Any]:
    """Mean per-class Dice of the automatic branch on the classes (<= 132) each label holds."""
    engine = scoring_engine(network, preset, labels)
    scores: list[float] = []
    for item in items:
        state = new_state(item.image, labels.preprocessing, engine.patch)
        truth = np.asarray(load_label(item.label, state.original_shape))
        classes = [c for c in _objects(truth, 127) if c <= LAST_CLASS]
        if not classes:
            continue
        pred = segment_auto(engine, state, AutoPrompt(class_ids=tuple(classes)))
        scores.extend(dice(pred == c, truth == c) for c in classes)
    if not scores:
        return {"images": [], "objects": 0}
    return {
        "images": sorted(i.image_id for i in items),
        "objects": len(scores),
        "score": round(float(np.mean(scores)), 4),
    }


def gate(served: dict[str, Any], candidate: dict[str, Any], tolerance: float) -> tuple[bool, str]:
    """Promote unless the candidate is worse than the served model by more than ``tolerance``."""
    if "score" not in candidate or "score" not in served:
        return False, "no validation labels yet: nothing to compare on (the split needs two final labels)"
    drop = served["score"] - candidate["score"]
    if drop > tolerance:
        return False, f"candidate {candidate['score']:.4f} is worse than served {served['score']:.4f} by {drop:.4f}"
    return True, f"candidate {candidate['score']:.4f} vs served {served['score']:.4f} (tolerance {tolerance})"
