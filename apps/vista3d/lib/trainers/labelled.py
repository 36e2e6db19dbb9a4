"""A team's submitted (``final``) labels in the datastore, as stamps and as cached training volumes.

Only ``final`` labels are ever trained on: ``original`` is the model's own output, and learning from
it would only teach the model its own mistakes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from ..labels import Preprocessing
from .data import CachedVolume, load_volume

__all__ = ["FinalLabel", "final_labels", "identity_lookup", "load_final_volumes", "supervoxel_path"]

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value


class FinalLabel:
    """An image with a final label; ``stamp`` changes whenever the label is saved again."""

    def __init__(self, image_id: str, image: str, label: str) -> None:
        self.image_id = image_id
        self.image = image
        self.label = label
        self.mtime_ns = os.stat(label).st_mtime_ns
        self.stamp = f"{image_id}@{self.mtime_ns}"


def final_labels(datastore: Datastore) -> list[FinalLabel]:
    """Images with a final label, oldest label first (the order the split assigns them in)."""
    found = []
    for image_id in datastore.get_labeled_images(FINAL):
        label_id = datastore.get_label_by_image_id(image_id, FINAL)
        label = datastore.get_label_uri(label_id, FINAL) if label_id else ""
        image = datastore.get_image_uri(image_id)
        if not label or not os.path.isfile(label) or not image:
            logger.warning("Final label of %s is not readable; skipped", image_id)
            continue
        found.append(FinalLabel(image_id, image, label))
    return sorted(found, key=lambda f: (f.mtime_ns, f.image_id))


def identity_lookup() -> np.ndarray:
    """Labels in the datastore already hold global ids (0..254)."""
    return np.arange(256, dtype=np.int16)


def supervoxel_path(studies: str | Path, image_id: str) -> Path:
    """Where :mod:`lib.supervoxels.generate` writes an image's supervoxels."""
    return Path(studies) / ".vista3d" / "supervoxels" / f"{image_id}.nii.gz"


def load_final_volumes(labels: list[FinalLabel], pre: Preprocessing, studies: str | None) -> list[CachedVolume]:
    """Preprocessed training volumes; supervoxels are added where they were generated."""
    volumes = []
    for f in labels:
        pair = {"image": f.image, "label": f.label}
        sv = supervoxel_path(studies, f.image_id) if studies else None
        if sv is not None and sv.is_file():
            pair["supervoxels"] = str(sv)
        volumes.append(load_volume(f.image_id, pair, identity_lookup(), pre))
    return volumes
