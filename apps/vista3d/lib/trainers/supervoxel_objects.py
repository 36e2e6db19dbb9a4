"""Supervoxels as extra training objects for the point branch: what gives VISTA3D its zero-shot ability.

A crop's label map gets objects that no annotator drew, each under a zero-shot id (ids above 132
read the point head's zero-shot token, as an unseen structure does at inference):

* a new object: a supervoxel lying mostly on unlabelled voxels, merged with up to ``max_merge - 1``
  adjacent supervoxels so objects come in many sizes (our crops are small, so one supervoxel of
  the default 400 per volume is much smaller than, say, a sarcoma);
* an edited object: a labelled structure plus or minus one supervoxel touching it, so the head
  learns to follow where the clicks say the boundary is rather than what the class usually covers.

The VISTA sampler augments masks with supervoxels in the same spirit; the probabilities are knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST

__all__ = ["SupervoxelSampling", "add_supervoxel_objects"]

STRUCTURE_6 = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class SupervoxelSampling:
    """How often a crop gets supervoxel objects.

    Attributes:
        new_object_prob: chance per crop of adding ``max_new`` unlabelled supervoxel objects (always
            when the volume has no labels at all, e.g. CT without annotations).
        edit_object_prob: chance per crop of replacing a labelled structure by itself +/- a supervoxel.
        max_new: new objects added at most per crop.
        max_merge: supervoxels merged into one new object at most.
        min_voxels: smallest object (in crop voxels) worth a click.
        max_labelled_fraction: a new object may overlap labelled voxels by at most this fraction.
    """

    new_object_prob: float = 0.5
    edit_object_prob: float = 0.2
    max_new: int = 2
    max_merge: int = 4
    min_voxels: int = 200
    max_labelled_fraction: float = 0.2


def _neighbours(sv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Supervoxel ids touching ``mask`` from outside (6-connectivity)."""
    ring = ndimage.binary_dilation(mask, STRUCTURE_6) & ~mask
    ids = np.unique(sv[ring])
    return ids[ids > 0]


def _new_object(
    sv: np.ndarray, label: np.ndarray, cfg: SupervoxelSampling, rng: np.random.Generator
) -> np.ndarray | None:
    ids, counts = np.unique(sv[sv > 0], return_counts=True)
    ok = counts >= cfg.min_voxels // 2
    if not ok.any():
        return None
    for seed_id in rng.permutation(ids[ok])[:8]:
        mask = sv == seed_id
        for _ in range(int(rng.integers(0, cfg.max_merge))):
            around = np.setdiff1d(_neighbours(sv, mask), [0])
            if len(around) == 0:
                break
            mask |= sv == int(rng.choice(around))
        if mask.sum() >= cfg.min_voxels and (label[mask] > 0).mean() <= cfg.max_labelled_fraction:
            return mask
    return None


def _plus(sv: np.ndarray, organ: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    around = _neighbours(sv, organ)
    return organ | (sv == int(rng.choice(around))) if len(around) else None


def _minus(sv: np.ndarray, organ: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    inside, counts = np.unique(sv[organ], return_counts=True)
    keep = (inside > 0) & (counts < organ.sum() * 0.7)  # never remove (almost) all of it
    return organ & (sv != int(rng.choice(inside[keep]))) if keep.any() else None


def _edited_object(sv: np.ndarray, organ: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """``organ`` plus an adjacent supervoxel or minus one inside it (whichever is possible, else either)."""
    ways = [_plus, _minus] if rng.random() < 0.5 else [_minus, _plus]
    for way in ways:
        edited = way(sv, organ, rng)
        if edited is not None:
            return edited
    return None


def add_supervoxel_objects(
    label: torch.Tensor,
    supervoxels: torch.Tensor,
    label_set: list[int],
    cfg: SupervoxelSampling,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, list[int]]:
    """A crop's label [1,1,p,p,p] with supervoxel objects added, and the ids to prompt.

    Returns a new tensor; new objects take zero-shot ids counted down from 254, so they never clash
    with a team's zero-shot labels (counted up from 133).
    """
    lab = label[0, 0].numpy().copy()
    sv = supervoxels[0, 0].numpy()
    ids = [i for i in label_set if (lab == i).any()]
    next_id = ZERO_SHOT_LAST
    if ids and rng.random() < cfg.edit_object_prob:
        target = int(rng.choice(ids))
        edited = _edited_object(sv, lab == target, rng)
        if edited is not None and edited.sum() >= cfg.min_voxels:
            lab[lab == target] = 0
            lab[edited] = next_id
            ids = [i for i in ids if i != target] + [next_id]
            next_id -= 1
    if not ids or rng.random() < cfg.new_object_prob:
        for _ in range(int(rng.integers(1, cfg.max_new + 1))):
            mask = _new_object(sv, lab, cfg, rng)
            if mask is None or next_id < ZERO_SHOT_FIRST:
                break
            lab[mask] = next_id
            ids.append(next_id)
            next_id -= 1
    ids = [i for i in ids if (lab == i).any()]
    return torch.from_numpy(lab)[None, None].to(label.dtype), ids
