"""The promotion gate's measurement: clicks-to-Dice (and auto Dice) per object of a set of final labels.

Validation runs the server's own inference code (:mod:`lib.inference.segment`) on the original images, so a
promoted model is better at exactly what annotators use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from monai.networks.nets.vista3d import VISTA3D

from ..data.imageio import load_label
from ..inference.segment import new_state, segment_auto
from ..labels import LabelDictionary
from ..model import patch_size_for
from ..prompts import AutoPrompt
from ..sessions import ImageState
from ..simulate import clicks_to_dice, dice, scoring_engine

if TYPE_CHECKING:  # a type only: the benchmarks and the GPU session import this without MONAI Label
    from .labelled import FinalLabel

__all__ = [
    "MAX_OBJECTS_PER_IMAGE",
    "ClickScorer",
    "auto_dice",
    "click_dice",
    "largest_objects",
    "object_key",
    "summarise",
]

logger = logging.getLogger(__name__)

MAX_OBJECTS_PER_IMAGE = 3
LAST_CLASS = 132


def largest_objects(label: np.ndarray, limit: int) -> list[int]:
    """The ids of the ``limit`` largest objects of a label map: the ones validation scores."""
    ids, counts = np.unique(label[label > 0], return_counts=True)
    return [int(i) for i in ids[np.argsort(-counts)][:limit]]


def object_key(image_id: str, class_id: int) -> str:
    return f"{image_id}#{class_id}"


class ClickScorer:
    """Clicks-to-Dice of a network on the objects of some final labels, each image preprocessed once.

    The gate and a round's early stop score the same objects many times (served, then candidates
    every few steps): loading and preprocessing is paid once per image.
    """

    def __init__(
        self, preset: str, labels: LabelDictionary, items: Sequence[FinalLabel], clicks: int, precision: str = "fp32"
    ) -> None:
        self.preset = preset
        self.precision = precision
        self.labels = labels
        self.clicks = clicks
        self._cases: list[tuple[str, ImageState, np.ndarray, list[int]]] = []
        patch = patch_size_for(preset)
        for item in items:
            state = new_state(item.image, labels.preprocessing, patch)
            truth = np.asarray(load_label(item.label, state.original_shape))
            self._cases.append((item.image_id, state, truth, largest_objects(truth, MAX_OBJECTS_PER_IMAGE)))

    @property
    def images(self) -> list[str]:
        return sorted(image_id for image_id, *_ in self._cases)

    def curves(self, network: VISTA3D) -> dict[str, list[float]]:
        """Object key -> Dice after each simulated click."""
        engine = scoring_engine(network, self.preset, self.labels, self.precision)
        out = {}
        for image_id, state, truth, objects in self._cases:
            state.features.clear()  # features of another network
            for class_id in objects:
                out[object_key(image_id, class_id)] = clicks_to_dice(
                    engine, state, truth == class_id, class_id, self.clicks
                )
        return out

    def score(self, network: VISTA3D) -> dict[str, Any]:
        """Summary figures and per-object scores (mean Dice over the clicks), as the gate compares them."""
        start = time.perf_counter()
        curves = self.curves(network)
        logger.info("Scored %d objects, %d clicks each, %.1f s", len(curves), self.clicks, time.perf_counter() - start)
        return summarise(self.images, curves)


def summarise(images: list[str], curves: dict[str, list[float]]) -> dict[str, Any]:
    """``score`` (mean over objects of the mean over clicks), Dice at the first and last click, per object."""
    if not curves:
        return {"images": images, "objects": 0, "per_object": {}}
    mean = np.mean(np.asarray(list(curves.values())), axis=0)
    return {
        "images": images,
        "objects": len(curves),
        "score": round(float(mean.mean()), 4),
        "dice_1": round(float(mean[0]), 4),
        f"dice_{len(mean)}": round(float(mean[-1]), 4),
        "per_object": {k: round(float(np.mean(v)), 4) for k, v in sorted(curves.items())},
    }


def click_dice(
    network: VISTA3D,
    preset: str,
    labels: LabelDictionary,
    items: Sequence[FinalLabel],
    clicks: int,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Mean Dice after each simulated click over the objects of ``items``, and per object."""
    return ClickScorer(preset, labels, items, clicks, precision).score(network)


def auto_dice(
    network: VISTA3D, preset: str, labels: LabelDictionary, items: Sequence[FinalLabel], precision: str = "fp32"
) -> dict[str, Any]:
    """Automatic-branch Dice of each class (<= 132) each label holds; ``score`` is their mean."""
    engine = scoring_engine(network, preset, labels, auto_precision=precision)
    scores: dict[str, float] = {}
    for item in items:
        state = new_state(item.image, labels.preprocessing, engine.patch)
        truth = np.asarray(load_label(item.label, state.original_shape))
        classes = [c for c in largest_objects(truth, 127) if c <= LAST_CLASS]
        if not classes:
            continue
        pred = segment_auto(engine, state, AutoPrompt(class_ids=tuple(classes)))
        scores.update({object_key(item.image_id, c): round(dice(pred == c, truth == c), 4) for c in classes})
    images = sorted(i.image_id for i in items)
    if not scores:
        return {"images": images, "objects": 0, "per_object": {}}
    return {"images": images, "objects": len(scores), "score": round(float(np.mean(list(scores.values()))), 4),
            "per_object": scores}  # fmt: skip
