"""The click flow on the original grid: which clicks of a request edit, and that they edit as they should."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lib.inference.engine import Engine
from lib.inference.segment import new_click_mask, new_state, segment_points
from lib.labels import load_label_dictionary
from lib.model import load_model, patch_size_for
from lib.prompts import PointPrompt
from lib.simulate import deepest_voxel

from .conftest import STS
from .helpers import MACHINE_PRECISION

A, B, C = (1, 2, 3, True), (4, 5, 6, False), (7, 8, 9, True)


def test_clicks_added_to_those_answered_are_new() -> None:
    assert new_click_mask([A], [A, B]).tolist() == [False, True]
    assert new_click_mask([A, B], [A, C, B]).tolist() == [False, True, False], "inserted (Slicer: fg before bg)"


def test_a_repeated_click_on_the_same_voxel_is_new() -> None:
    assert new_click_mask([A, B], [A, B, B]).tolist() == [False, False, True]


def test_a_repeated_request_adds_nothing_and_a_removed_click_restarts() -> None:
    assert not new_click_mask([A, B], [A, B]).any()
    assert new_click_mask([A, B], [A]).all(), "the client dropped a click: a new interaction"
    assert new_click_mask([], [A]).all()


def test_negative_clicks_never_grow_the_result_on_real_ct() -> None:
    """STS_029 with the shipped starter: re-applying the first (positive) click with the prediction of
    a window centred on a later negative click added 126k false-positive voxels before the fix."""
    labels = load_label_dictionary()
    model = load_model("small", "starter", Path("/nonexistent"), torch.device("cpu"))
    engine = Engine(model, patch_size_for("small"), labels.sw_overlap, labels.special, MACHINE_PRECISION)
    state = new_state(str(STS / "STS_029_ct.nii.gz"), labels.preprocessing, engine.patch)
    truth = np.asarray(nib.load(str(STS / "STS_029_gtv.nii.gz")).dataobj) > 0
    points, positive = [deepest_voxel(truth)], [True]
    result = np.zeros(state.original_shape, dtype=np.int16)
    result = segment_points(engine, state, PointPrompt(np.stack(points), np.asarray(positive), 133), result).label
    assert (result == 133).any()
    for _ in range(2):  # the same false-positive voxel twice, as an annotator whose click changed nothing
        points.append(np.array([52, 114, 35]))
        positive.append(False)
        before = result == 133
        edit = segment_points(engine, state, PointPrompt(np.stack(points), np.asarray(positive), 133), result)
        result, after = edit.label, edit.label == 133
        assert not (after & ~before).any(), "a negative click added voxels"
        assert edit.new == [False] * (len(points) - 1) + [True]
        assert edit.applied[-1] == bool((before & ~after).any()), "applied says whether the click removed anything"
