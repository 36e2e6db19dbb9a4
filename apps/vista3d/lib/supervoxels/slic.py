"""3D supervoxels by SLIC over a per-voxel feature volume, as in VISTA3D's supervoxel pipeline.

VISTA3D's zero-shot ability comes from training the point branch on supervoxels as extra objects.
The public script (VISTA repository, ``vista3d/scripts/slic_process_sam.py``) builds a feature volume
from SAM (see :mod:`.sam_features`), runs ``skimage.segmentation.slic`` on it and zeroes the air
outside the body. This module holds what both feature sources share: the SLIC call, the air removal,
and the low-level features used when no SAM checkpoint is configured (the paper's graph-cut-style
baseline scored 0.38 zero-shot Dice against SAM's 0.57 and no supervoxels' 0.30).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import slic

__all__ = ["LOWLEVEL_CONFIG", "SlicConfig", "lowlevel_features", "outside_air", "supervoxels_from_features"]

AIR_HU = -800.0


@dataclass(frozen=True)
class SlicConfig:
    """SLIC settings; the defaults are the public script's.

    Attributes:
        n_segments: approximate number of supervoxels per volume (the paper says 100, the script 400).
        compactness: balance of feature distance against spatial distance; SAM features are large in
            magnitude, hence the script's 0.01. The low-level features live in [0, 1] and use 0.1.
        sigma: Gaussian smoothing of the features before clustering, in voxels.
        air_closing: voxels of binary closing applied to the air mask before taking its largest part.
    """

    n_segments: int = 400
    compactness: float = 0.01
    sigma: float = 3.0
    air_closing: int = 3


LOWLEVEL_CONFIG = SlicConfig(compactness=0.1)


def lowlevel_features(hu: np.ndarray) -> np.ndarray:
    """[2, X, Y, Z] float32 features of a CT in HU: the -1000..1000 HU window and its gradient magnitude.

    Intensity separates tissues; the gradient makes SLIC snap to edges between tissues of similar HU,
    which is what graph-cut style low-level supervoxels capture.
    """
    window = np.clip((hu.astype(np.float32) + 1000.0) / 2000.0, 0.0, 1.0)
    grad = ndimage.gaussian_gradient_magnitude(window, sigma=1.0)
    grad /= max(float(np.percentile(grad, 99.5)), 1e-6)
    return np.stack([window, np.clip(grad, 0.0, 1.0, out=grad)]).astype(np.float32)


def outside_air(hu: np.ndarray, closing: int = 3) -> np.ndarray:
    """The largest connected air region (< -800 HU, closed by ``closing`` voxels): the air around the body."""
    air = hu < AIR_HU
    if closing > 0:
        air = ndimage.binary_closing(air, structure=np.ones((3, 3, 3), bool), iterations=closing, border_value=1)
    comp, n = ndimage.label(air)
    if n == 0:
        return air
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    sizes[0] = 0
    return comp == int(np.argmax(sizes))


def supervoxels_from_features(features: np.ndarray, hu: np.ndarray, config: SlicConfig) -> np.ndarray:
    """uint16 supervoxel ids (1..K, 0 = air outside the body) of ``features`` [C, X, Y, Z] on the grid of ``hu``."""
    if features.shape[1:] != hu.shape:
        raise ValueError(f"features {features.shape[1:]} and image {hu.shape} are on different grids")
    segments = slic(
        features,
        n_segments=config.n_segments,
        compactness=config.compactness,
        sigma=config.sigma,
        channel_axis=0,
        start_label=1,
        enforce_connectivity=True,
    ).astype(np.uint16)
    segments[outside_air(hu, config.air_closing)] = 0
    return segments
