"""Clicks mapped from original voxel indices to the model grid through every preprocessing step.

A marker cube is placed at a known voxel, the image goes through the real preprocessing
(HU window, RAS orientation, 1.5 mm resampling, foreground crop), and the marker's centroid on the
model grid must be where :func:`map_points` sends the click. Flipped and oblique acquisitions are
the cases that naive index scaling gets wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.spatial.transform import Rotation

from lib.inference.geometry import box_in_target, map_points, resample_nearest, shifted_affine
from lib.inference.preprocess import preprocess
from lib.labels import load_label_dictionary

SHAPE = (64, 56, 24)
MARKER = (40, 20, 15)


def affine(
    spacing: tuple[float, float, float], rotation: np.ndarray | None = None, flip: tuple[int, ...] = ()
) -> np.ndarray:
    a = np.eye(4)
    m = np.diag(spacing).astype(float)
    for axis in flip:
        m[:, axis] *= -1
    if rotation is not None:
        m = rotation @ m
    a[:3, :3] = m
    a[:3, 3] = [12.0, -30.0, 55.0]
    return a


AFFINES = {
    "axis-aligned": affine((0.8, 0.9, 2.5)),
    "flipped (LPS-like)": affine((0.8, 0.9, 2.5), flip=(0, 1)),
    "flipped z": affine((1.1, 0.7, 3.0), flip=(2,)),
    "oblique": affine((0.8, 0.9, 2.5), rotation=Rotation.from_euler("zx", [25, 10], degrees=True).as_matrix()),
}


def phantom(a: np.ndarray) -> MetaTensor:
    """Air, a soft-tissue 'body' (cropped to by preprocessing), and a bright 3x3x3 marker."""
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[8:60, 6:50, 2:22] = 40.0
    hu[tuple(slice(c - 1, c + 2) for c in MARKER)] = 1000.0
    return MetaTensor(torch.from_numpy(hu)[None], affine=torch.as_tensor(a))


@pytest.mark.parametrize("name", list(AFFINES))
def test_click_lands_on_marker_in_model_space(name: str) -> None:
    a = AFFINES[name]
    model = preprocess(phantom(a), load_label_dictionary().preprocessing)
    bright = model[0].numpy() > 0.9
    assert bright.any()
    centroid = np.argwhere(bright).mean(axis=0)
    mapped = map_points(np.array([MARKER]), a, model.affine)[0]
    # Bilinear resampling of a 3-voxel cube to 1.5 mm moves its thresholded centroid by under a voxel.
    np.testing.assert_allclose(mapped, centroid, atol=0.75)


@pytest.mark.parametrize("name", list(AFFINES))
def test_mask_returns_to_the_original_voxels(name: str) -> None:
    a = AFFINES[name]
    model = preprocess(phantom(a), load_label_dictionary().preprocessing)
    mask = torch.from_numpy((model[0].numpy() > 0.9).astype(np.uint8))[None]
    back = resample_nearest(mask, model.affine, a, SHAPE)[0] > 0
    assert back[MARKER], "the marker's centre voxel is labelled after the round trip"
    far = np.argwhere(back) - np.asarray(MARKER)
    assert np.abs(far).max() <= 3, "nothing is labelled far from the marker"


def test_sub_box_resampling_matches_full_resampling() -> None:
    a = AFFINES["oblique"]
    model = preprocess(phantom(a), load_label_dictionary().preprocessing)
    mask = torch.from_numpy((model[0].numpy() > 0.9).astype(np.uint8))[None]
    full = resample_nearest(mask, model.affine, a, SHAPE)[0]
    model_box = tuple((0, s) for s in mask.shape[1:])
    box = box_in_target(model_box, model.affine, a, SHAPE)
    assert box is not None
    start = [lo for lo, _ in box]
    sub = resample_nearest(mask, model.affine, shifted_affine(a, start), [hi - lo for lo, hi in box])[0]
    assert np.array_equal(sub, full[tuple(slice(lo, hi) for lo, hi in box)])
    assert full.sum() == sub.sum(), "the box covers everything the model grid can reach"


def test_box_outside_target_is_none() -> None:
    a = np.eye(4)
    b = np.eye(4)
    b[:3, 3] = 1000.0
    assert box_in_target(((0, 4), (0, 4), (0, 4)), a, b, (10, 10, 10)) is None
