"""Training data for the point branch: the inference preprocessing as dictionary transforms, label-id
mapping to VISTA3D's global ids, an in-memory cache of preprocessed volumes, and random 96³ crops.

The image ops are :func:`lib.preprocess.preprocess_transforms`, the server's own, so a network trained
here sees what the server feeds it; the label follows the image with nearest-neighbour resampling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandCropByPosNegLabeld, SpatialPadd

from ..labels import ZERO_SHOT_FIRST, LabelDictionary, Preprocessing
from ..preprocess import preprocess_transforms

__all__ = [
    "SARCOMA_ID",
    "TOTALSEG_V2_NAMES",
    "CachedVolume",
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
    """A preprocessed case held in memory: image [1,h,w,d] float32 in [0,1], label [1,h,w,d] global ids."""

    name: str
    image: torch.Tensor
    label: torch.Tensor
    label_set: list[int] = field(default_factory=list)


def load_transforms(pre: Preprocessing) -> Compose:
    """Load image+label and apply the inference preprocessing (label resampled with nearest)."""
    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            *preprocess_transforms(pre, label_key="label"),
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


def load_volume(name: str, pair: Mapping[str, str], lookup: np.ndarray, pre: Preprocessing) -> CachedVolume:
    """Preprocess one case and map its labels to global ids through ``lookup``."""
    data = load_transforms(pre)(dict(pair))
    raw = np.asarray(data["label"].array if hasattr(data["label"], "array") else data["label"])
    label = torch.from_numpy(lookup[np.rint(raw).astype(np.int64).clip(0, len(lookup) - 1)])
    image = torch.as_tensor(np.asarray(data["image"].array), dtype=torch.float32)
    ids = sorted(int(i) for i in torch.unique(label).tolist() if i != 0)
    logger.info("Cached %s: %s, %d classes", name, tuple(image.shape[1:]), len(ids))
    return CachedVolume(name=name, image=image.contiguous(), label=label.contiguous(), label_set=ids)


class VolumeSampler:
    """Random foreground-centred crops of cached volumes, reproducible from a seed."""

    def __init__(self, volumes: Sequence[CachedVolume], patch: Sequence[int], seed: int, weights: Sequence[float]):
        self.volumes = list(volumes)
        self.rng = np.random.default_rng(seed)
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.pad = SpatialPadd(keys=["image", "label"], spatial_size=tuple(patch))
        self.crop = RandCropByPosNegLabeld(
            keys=["image", "label"], label_key="label", spatial_size=tuple(patch), pos=1.0, neg=0.0, num_samples=1
        )
        self.crop.set_random_state(seed=seed)

    def sample(self) -> tuple[CachedVolume, torch.Tensor, torch.Tensor]:
        """(volume, image [1,1,p,p,p], label [1,1,p,p,p] long) of one random crop."""
        vol = self.volumes[int(self.rng.choice(len(self.volumes), p=self.weights))]
        data = self.pad({"image": vol.image, "label": vol.label})
        out = self.crop(data)[0]
        image = torch.as_tensor(out["image"]).float().unsqueeze(0)
        label = torch.as_tensor(out["label"]).long().unsqueeze(0)
        return vol, image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
