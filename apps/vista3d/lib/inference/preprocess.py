"""Image preprocessing of the published VISTA3D bundle, as MONAI dictionary transforms.

Order as in the bundle: HU window scaled to [0, 1], RAS orientation, 1.5 mm spacing, crop to the
foreground with a margin. The result is a MetaTensor whose affine maps model voxels to RAS world
coordinates; :mod:`.geometry` maps clicks and results through it. The trainers build on
:func:`preprocess_transforms` too, so a network trains on exactly what the server feeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Orientationd, ScaleIntensityRanged, Spacingd

from ..labels import Preprocessing

__all__ = ["preprocess", "preprocess_transforms"]

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def preprocess_transforms(pre: Preprocessing, label_keys: Sequence[str] = ()) -> list[Any]:
    """The bundle's preprocessing of ``image`` (channel first, in HU); label maps follow with nearest resampling."""
    keys = ["image", *label_keys]
    modes = ["bilinear"] + ["nearest"] * len(label_keys)
    lo, hi = pre.hu_window
    return [
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        Orientationd(keys=keys, axcodes=pre.orientation, labels=RAS_LABELS),
        Spacingd(keys=keys, pixdim=pre.spacing_mm, mode=modes),
        CropForegroundd(keys=keys, source_key="image", margin=pre.crop_margin, allow_smaller=True),
    ]


def preprocess(image: MetaTensor, pre: Preprocessing) -> MetaTensor:
    """[1, H, W, D] CT in HU -> [1, h, w, d] float32 in [0, 1] on the model grid."""
    x = Compose(preprocess_transforms(pre))({"image": image})["image"]
    if not isinstance(x, MetaTensor):  # pragma: no cover - MONAI keeps MetaTensors
        raise TypeError("preprocessing lost the image affine")
    # The transform history is not needed (geometry goes through affines) and costs memory.
    x.applied_operations = []
    return cast(MetaTensor, x.float().contiguous())
