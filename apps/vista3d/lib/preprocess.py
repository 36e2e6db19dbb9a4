"""Image preprocessing of the published VISTA3D bundle, as plain MONAI array transforms.

Order as in the bundle: HU window scaled to [0, 1], RAS orientation, 1.5 mm spacing, crop to the
foreground with a margin. The result is a MetaTensor whose affine maps model voxels to RAS world
coordinates; :mod:`.geometry` maps clicks and results through it.
"""

from __future__ import annotations

from typing import Any, cast

from monai.data import MetaTensor
from monai.transforms import CropForeground, Orientation, ScaleIntensityRange, Spacing

from .labels import Preprocessing

__all__ = ["preprocess"]


def preprocess(image: MetaTensor, pre: Preprocessing) -> MetaTensor:
    """[1, H, W, D] CT in HU -> [1, h, w, d] float32 in [0, 1] on the model grid."""
    lo, hi = pre.hu_window
    x: Any = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image)
    x = Orientation(axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
    x = Spacing(pixdim=pre.spacing_mm, mode="bilinear")(x)
    x = CropForeground(margin=pre.crop_margin, allow_smaller=True)(x)
    if not isinstance(x, MetaTensor):  # pragma: no cover - MONAI keeps MetaTensors
        raise TypeError("preprocessing lost the image affine")
    # The transform history is not needed (geometry goes through affines) and costs memory.
    x.applied_operations = []
    return cast(MetaTensor, x.float().contiguous())
