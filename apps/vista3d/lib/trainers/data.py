"""Training data: the inference preprocessing as dictionary transforms, label-id mapping to VISTA3D's
global ids, an in-memory cache of preprocessed volumes, and random object-centred crops.

The image ops are :func:`lib.inference.preprocess.preprocess_transforms`, the server's own, so a network trained
here sees what the server feeds it; labels and supervoxels follow with nearest-neighbour resampling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from ..inference.engine import pad_to_patch
from ..inference.preprocess import preprocess_transforms
from ..labels import ZERO_SHOT_FIRST, LabelDictionary, Preprocessing
from .supervoxel_objects import SupervoxelSampling, add_supervoxel_objects

__all__ = [
    "SARCOMA_ID",
    "TOTALSEG_V2_NAMES",
    "CachedVolume",
    "Crop",
    "VolumeSampler",
    "load_transforms",
    "load_volume",
    "remap_lookup",
    "sts_pair",
    "totalseg_lookup",
]

logger = logging.getLogger(__name__)

# Soft-tissue sarcoma is no VISTA3D class: it is trained as the first zero-shot id.
SARCOMA_ID = ZERO_SHOT_FIRST

# TotalSegmentator v2 class id -> VISTA3D class name, for the classes both know (the others are dropped).
TOTALSEG_V2_NAMES: dict[int, str] = {
    1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "liver", 6: "stomach",
    7: "pancreas", 8: "right adrenal gland", 9: "left adrenal gland", 10: "left lung upper lobe",
    11: "left lung lower lobe", 12: "right lung upper lobe", 13: "right lung middle lobe",
    14: "right lung lower lobe", 15: "esophagus", 16: "trachea", 18: "small bowel", 19: "duodenum",
    20: "colon", 21: "bladder", 22: "prostate", 25: "sacrum", 26: "vertebrae s1", 27: "vertebrae l5",
    28: "vertebrae l4", 29: "vertebrae l3", 30: "vertebrae l2", 31: "vertebrae l1", 32: "vertebrae t12",
    33: "vertebrae t11", 51: "heart", 52: "aorta", 63: "inferior vena cava",
    64: "portal vein and splenic vein", 65: "left iliac artery", 66: "right iliac artery",
    67: "left iliac vena", 68: "right iliac vena", 75: "left femur", 76: "right femur", 77: "left hip",
    78: "right hip", 79: "spinal cord", 80: "left gluteus maximus", 81: "right gluteus maximus",
    82: "left gluteus medius", 83: "right gluteus medius", 84: "left gluteus minimus",
    85: "right gluteus minimus", 86: "left autochthon", 87: "right autochthon", 88: "left iliopsoas",
    89: "right iliopsoas",
    **{91 + i: f"left rib {i}" for i in range(1, 13)},
    **{103 + i: f"right rib {i}" for i in range(1, 13)},
    117: "costal cartilages",
}  # fmt: skip


@dataclass
class CachedVolume:
    """A preprocessed case held in memory.

    Attributes:
        image: [1, h, w, d] float32 in [0, 1].
        label: [1, h, w, d] int16 global ids (all 0 for a CT that only contributes supervoxels).
        label_set: the ids present in ``label``.
        supervoxels: [1, h, w, d] int32 supervoxel ids, or None.
    """

    name: str
    image: torch.Tensor
    label: torch.Tensor
    label_set: list[int] = field(default_factory=list)
    supervoxels: torch.Tensor | None = None


def load_transforms(pre: Preprocessing, label_keys: Sequence[str] = ("label",)) -> Compose:
    """Load image and label maps, and apply the inference preprocessing (label maps resampled with nearest)."""
    keys = ["image", *label_keys]
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            *preprocess_transforms(pre, label_keys=label_keys),
        ]
    )


def remap_lookup(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A lookup table source id -> global id; ids not in ``mapping`` become background (0)."""
    table = np.zeros(size, dtype=np.int16)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def totalseg_lookup(labels: LabelDictionary) -> np.ndarray:
    """TotalSegmentator v2 ids -> VISTA3D ids, matched by class name."""
    mapping: dict[int, int] = {}
    for src, name in TOTALSEG_V2_NAMES.items():
        dst = labels.id_for_name(name)
        if dst is None:
            logger.warning("TotalSegmentator class %d (%s) has no VISTA3D id; dropped", src, name)
            continue
        mapping[src] = dst
    return remap_lookup(mapping)


def sts_pair(root: str | Path, case: str) -> dict[str, str]:
    """Image/label paths of one sarcoma case, e.g. ``STS_001``."""
    base = Path(root) / "sts"
    return {"image": str(base / f"{case}_ct.nii.gz"), "label": str(base / f"{case}_gtv.nii.gz")}


def _array(x: object) -> np.ndarray:
    return np.asarray(x.array if hasattr(x, "array") else x)


def load_volume(name: str, pair: Mapping[str, str], lookup: np.ndarray, pre: Preprocessing) -> CachedVolume:
    """Preprocess one case: ``pair`` has ``image`` and optionally ``label`` (mapped to global ids through
    ``lookup``) and ``supervoxels``."""
    label_keys = [k for k in ("label", "supervoxels") if k in pair]
    data = load_transforms(pre, label_keys)(dict(pair))
    image = torch.as_tensor(_array(data["image"]), dtype=torch.float32)
    if "label" in data:
        raw = np.rint(_array(data["label"])).astype(np.int64).clip(0, len(lookup) - 1)
        label = torch.from_numpy(lookup[raw])
    else:
        label = torch.zeros(image.shape, dtype=torch.int16)
    sv = torch.from_numpy(np.rint(_array(data["supervoxels"])).astype(np.int32)) if "supervoxels" in data else None
    ids = sorted(int(i) for i in torch.unique(label).tolist() if i != 0)
    logger.info(
        "Cached %s: %s, %d classes%s", name, tuple(image.shape[1:]), len(ids), ", supervoxels" * (sv is not None)
    )
    return CachedVolume(name, image.contiguous(), label.contiguous(), ids, sv)


@dataclass
class Crop:
    """One training crop: image [1,1,p,p,p], label [1,1,p,p,p] long global ids, the ids in the crop to
    prompt, and all ids the volume is labelled with (a class absent from the crop is known to be absent)."""

    volume: str
    image: torch.Tensor
    label: torch.Tensor
    label_set: list[int]
    volume_label_set: list[int]


class VolumeSampler:
    """Random object-centred crops of cached volumes, reproducible from a seed.

    A crop is centred on a random labelled voxel (a random supervoxel voxel in volumes without
    labels), moved by up to ``shift`` voxels along each axis, then shifted to lie inside the volume.
    With ``supervoxel_sampling`` the crop's label gets supervoxel objects (:mod:`.supervoxel_objects`).

    Why ``shift``: with every crop centred on its object, "the object is at the centre" answers
    every training click, and a point head trained so learns that prior instead of reading the
    click's place and sign (``docs/point-rounds.md``). The server centres a window on the click, but
    a correction's window holds earlier clicks and the object anywhere.
    """

    def __init__(
        self,
        volumes: Sequence[CachedVolume],
        patch: Sequence[int],
        seed: int,
        weights: Sequence[float] | None = None,
        supervoxel_sampling: SupervoxelSampling | None = None,
        shift: int = 0,
    ):
        self.volumes = list(volumes)
        self.shift = int(shift)
        self.patch = tuple(int(p) for p in patch)
        self.rng = np.random.default_rng(seed)
        w = np.ones(len(self.volumes)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.sv = supervoxel_sampling
        self._centres = [self._foreground(v) for v in self.volumes]

    def _foreground(self, vol: CachedVolume) -> np.ndarray:
        source = vol.label if vol.label_set or vol.supervoxels is None else vol.supervoxels
        voxels = np.argwhere(source[0].numpy() > 0)
        if len(voxels) == 0:
            raise ValueError(f"{vol.name}: nothing to train on (no labels and no supervoxels)")
        return voxels

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def sample(self) -> Crop:
        index = int(self.rng.choice(len(self.volumes), p=self.weights))
        vol, centres = self.volumes[index], self._centres[index]
        centre = centres[int(self.rng.integers(len(centres)))]
        if self.shift:
            centre = centre + self.rng.integers(-self.shift, self.shift + 1, size=3)
        image = pad_to_patch(vol.image, self.patch)
        size = image.shape[1:]
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, s, p in zip(centre, size, self.patch, strict=True)]
        sl = (slice(None), *(slice(a, a + p) for a, p in zip(start, self.patch, strict=True)))
        label = pad_to_patch(vol.label, self.patch)[sl].long()[None]
        label_set = [i for i in vol.label_set if (label == i).any()]
        if self.sv is not None and vol.supervoxels is not None:
            sv = pad_to_patch(vol.supervoxels, self.patch)[sl][None]
            label, label_set = add_supervoxel_objects(label, sv, label_set, self.sv, self.rng)
        return Crop(vol.name, image[sl][None].contiguous(), label.contiguous(), label_set, vol.label_set)
