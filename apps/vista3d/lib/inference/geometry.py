"""Coordinate mapping between the original image and model space.

Preprocessing (orientation to RAS, 1.5 mm resampling, foreground crop) changes the voxel grid but
MONAI keeps the grid's affine (voxel -> RAS world) up to date, so every mapping goes through world
coordinates: ``model_ijk = inv(A_model) @ A_original @ original_ijk``. This holds for flipped and
oblique acquisitions alike, which naive scaling of indices does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import SpatialResample

__all__ = ["Box", "box_in_target", "map_points", "resample_nearest"]

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _as_np(affine: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)


def map_points(
    points: np.ndarray, src_affine: torch.Tensor | np.ndarray, dst_affine: torch.Tensor | np.ndarray
) -> np.ndarray:
    """Voxel coordinates [N, 3] on the ``src`` grid -> (float) voxel coordinates on the ``dst`` grid."""
    src2dst = np.linalg.inv(_as_np(dst_affine)) @ _as_np(src_affine)
    homog = np.concatenate([np.asarray(points, dtype=np.float64), np.ones((len(points), 1))], axis=1)
    return (homog @ src2dst.T)[:, :3]


def box_in_target(
    box: Box, src_affine: torch.Tensor | np.ndarray, dst_affine: torch.Tensor | np.ndarray, dst_shape: Sequence[int]
) -> Box | None:
    """Bounding box (start, stop) on the ``dst`` grid covering a box of the ``src`` grid, one voxel of slack.

    Returns None when the box does not meet the ``dst`` grid.
    """
    corners = np.array(list(itertools.product(*[(lo - 0.5, hi - 0.5) for lo, hi in box])))
    mapped = map_points(corners, src_affine, dst_affine)
    lo = np.floor(mapped.min(0)).astype(int) - 1
    hi = np.ceil(mapped.max(0)).astype(int) + 2
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(dst_shape))
    if np.any(hi <= lo):
        return None
    return tuple((int(a), int(b)) for a, b in zip(lo, hi, strict=False))  # type: ignore[return-value]


def shifted_affine(affine: torch.Tensor | np.ndarray, start: Sequence[int]) -> np.ndarray:
    """Affine of a sub-grid that starts at voxel ``start`` of the grid with ``affine``."""
    a = _as_np(affine)
    out = a.copy()
    out[:3, 3] = a[:3, :3] @ np.asarray(start, dtype=np.float64) + a[:3, 3]
    return out


def resample_nearest(
    src: torch.Tensor,
    src_affine: torch.Tensor | np.ndarray,
    dst_affine: torch.Tensor | np.ndarray,
    dst_shape: Sequence[int],
) -> np.ndarray:
    """Nearest-neighbour resampling of a [C, ...] label-like tensor onto another grid; zeros outside ``src``."""
    from monai.data import MetaTensor

    img = MetaTensor(src.float(), affine=torch.as_tensor(_as_np(src_affine)))
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=np.float32)(
        img, dst_affine=torch.as_tensor(_as_np(dst_affine)), spatial_size=tuple(int(s) for s in dst_shape)
    )
    return np.asarray(out.detach().cpu().numpy())
