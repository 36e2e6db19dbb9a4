"""Loading CT volumes and previous labels, with errors a client can act on."""

from __future__ import annotations

import logging
from typing import Any, cast

import nibabel as nib
import nrrd
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

__all__ = ["ImageError", "check_volume_header", "label_ids", "load_image", "load_label", "to_tensor"]

logger = logging.getLogger(__name__)


class ImageError(ValueError):
    """The image or label file cannot be used; the message says why."""


def _load(path: str, what: str) -> MetaTensor:
    try:
        img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as e:  # readers raise many types for corrupt files; all mean "unreadable"
        raise ImageError(f"{what} {path!r} cannot be read as a medical image: {type(e).__name__}: {e}") from e
    if not isinstance(img, MetaTensor):
        img = MetaTensor(img)
    return img


def load_image(path: str) -> MetaTensor:
    """A 3D CT as a [1, H, W, D] float32 MetaTensor with its RAS affine."""
    img = _load(path, "image")
    spatial = tuple(img.shape[1:])
    if img.shape[0] != 1 or len(spatial) != 3 or min(spatial) < 2:
        raise ImageError(f"image {path!r} must be a single-channel 3D volume, got shape {tuple(img.shape)}")
    return cast(MetaTensor, img.float())


def check_volume_header(path: str, what: str) -> None:
    """A NIfTI or NRRD file whose header describes one 3D volume; no voxels are read, so it is cheap.

    Args:
        path: the file (``.nii``, ``.nii.gz`` or ``.nrrd``).
        what: how the file is named in the error (``"the uploaded image"``).
    """
    try:
        if path.endswith(".nrrd"):
            header: Any = nrrd.read_header(path)
            shape = tuple(int(s) for s in header["sizes"])
        else:
            shape = tuple(int(s) for s in cast(nib.Nifti1Image, nib.load(path)).shape)
    except Exception as e:  # readers raise many types for corrupt files; all mean "unreadable"
        raise ImageError(f"{what} cannot be read as a medical image: {type(e).__name__}: {e}") from e
    if len(shape) < 3 or any(s != 1 for s in shape[3:]) or min(shape[:3]) < 2:
        raise ImageError(f"{what} must be a single-channel 3D volume, got shape {list(shape)}")


def load_label(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A saved label map on the image's grid, as int16 global ids."""
    lab = _load(path, "label")
    arr = lab[0].numpy() if lab.shape[0] == 1 else lab.numpy()
    if tuple(arr.shape) != tuple(shape):
        raise ImageError(f"label {path!r} has shape {list(arr.shape)}, the image has {list(shape)}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
        raise ImageError(f"label {path!r} must hold class ids 0..255")
    return np.asarray(arr, dtype=np.int16)


def label_ids(label: np.ndarray) -> list[int]:
    """The non-zero values of a label map, ascending.

    A count per value (linear) rather than ``np.unique``, which sorts the whole volume: on a
    219x216x83 label that sort took 0.23 s of a 0.6 s click answer, the count 0.01 s. Label maps
    of floats or with negative values (which no writer here makes) fall back to ``np.unique``.
    """
    flat = label.reshape(-1)
    if flat.size == 0:
        return []
    if flat.dtype.kind in "iub" and flat.dtype.itemsize <= 2 and flat.min() >= 0:
        counts = np.bincount(flat.view(np.uint8 if flat.dtype.itemsize == 1 else np.uint16))
        return [int(v) for v in np.flatnonzero(counts) if v]
    return [int(v) for v in np.unique(flat) if v]


def to_tensor(arr: np.ndarray, affine: torch.Tensor) -> MetaTensor:
    """A MetaTensor of ``arr`` (no channel axis, as MONAI Label's writer expects) on the grid of ``affine``."""
    return MetaTensor(torch.as_tensor(arr), affine=affine)


def warm_up_writer() -> None:
    """Write one tiny NRRD through MONAI Label's ITK writer at start-up.

    ITK loads its IO modules lazily: without this the first result of a server took 1.5 s longer to write.
    """
    import tempfile

    from monailabel.transform.writer import write_itk

    with tempfile.TemporaryDirectory() as tmp:
        write_itk(np.zeros((2, 2, 2), np.uint8), f"{tmp}/warm.nrrd", np.eye(4), np.uint8, False)
