"""Algorithm 1 on small constructed masks, with exact expected outputs."""

from __future__ import annotations

import numpy as np

from lib.inference.refine import apply_clicks

ALL = np.ones((8, 8, 8), dtype=bool)


def blank() -> np.ndarray:
    return np.zeros((8, 8, 8), dtype=np.int16)


def test_first_positive_click_keeps_only_the_touched_component() -> None:
    prediction = np.zeros((8, 8, 8), bool)
    prediction[1:3, 1:3, 1:3] = True  # touched
    prediction[5:7, 5:7, 5:7] = True  # not touched
    out, _ = apply_clicks(blank(), prediction, ALL, np.array([[1, 1, 1]]), np.array([True]), 7)
    expected = blank()
    expected[1:3, 1:3, 1:3] = 7
    assert np.array_equal(out, expected)


def test_positive_click_inside_previous_mask_adds_the_whole_new_component() -> None:
    previous = blank()
    previous[1:3, 1:3, 1:3] = 7
    prediction = np.zeros((8, 8, 8), bool)
    prediction[1:5, 1:3, 1:3] = True  # grows the object
    out, _ = apply_clicks(previous, prediction, ALL, np.array([[1, 1, 1]]), np.array([True]), 7)
    expected = blank()
    expected[1:5, 1:3, 1:3] = 7
    assert np.array_equal(out, expected)


def test_positive_click_outside_previous_adds_only_its_difference_component() -> None:
    previous = blank()
    previous[0:2, 0:2, 0:2] = 7
    prediction = np.zeros((8, 8, 8), bool)
    prediction[4:6, 4:6, 4:6] = True  # the clicked new part
    prediction[0:2, 6:8, 6:8] = True  # an unrelated new part: must not be added
    out, _ = apply_clicks(previous, prediction, ALL, np.array([[4, 4, 4]]), np.array([True]), 7)
    expected = previous.copy()
    expected[4:6, 4:6, 4:6] = 7
    assert np.array_equal(out, expected), "the old mask stays although the prediction dropped it"


def test_negative_click_removes_only_its_component() -> None:
    previous = blank()
    previous[0:2, 0:2, 0:2] = 7  # component A (clicked)
    previous[5:7, 5:7, 5:7] = 7  # component B
    previous[0:2, 6:8, 0:2] = 3  # another class
    prediction = np.zeros((8, 8, 8), bool)  # the model now predicts nothing
    out, _ = apply_clicks(previous, prediction, ALL, np.array([[0, 0, 0]]), np.array([False]), 7)
    expected = previous.copy()
    expected[0:2, 0:2, 0:2] = 0
    assert np.array_equal(out, expected)


def test_negative_click_on_still_predicted_voxel_changes_nothing() -> None:
    previous = blank()
    previous[0:3, 0:3, 0:3] = 7
    prediction = previous == 7
    out, _ = apply_clicks(previous, prediction, ALL, np.array([[1, 1, 1]]), np.array([False]), 7)
    assert np.array_equal(out, previous)


def test_voxels_outside_the_computed_region_never_change() -> None:
    previous = blank()
    previous[0:8, 0:2, 0:2] = 7
    computed = np.zeros((8, 8, 8), bool)
    computed[0:4] = True
    prediction = np.zeros((8, 8, 8), bool)
    out, _ = apply_clicks(previous, prediction, computed, np.array([[1, 1, 1]]), np.array([False]), 7)
    expected = previous.copy()
    expected[0:4, 0:2, 0:2] = 0  # removed only where the new prediction exists
    assert np.array_equal(out, expected)


def test_positive_click_overwrites_other_class_in_its_component_and_input_is_untouched() -> None:
    previous = blank()
    previous[2, 2, 2] = 3
    prediction = np.zeros((8, 8, 8), bool)
    prediction[1:4, 1:4, 1:4] = True
    before = previous.copy()
    out, _ = apply_clicks(previous, prediction, ALL, np.array([[2, 2, 2]]), np.array([True]), 7)
    expected = blank()
    expected[1:4, 1:4, 1:4] = 7
    assert np.array_equal(out, expected)
    assert np.array_equal(previous, before)


def test_diagonal_voxels_are_one_component_and_points_off_grid_are_ignored() -> None:
    prediction = np.zeros((8, 8, 8), bool)
    prediction[1, 1, 1] = prediction[2, 2, 2] = True  # 26-connected
    out, _ = apply_clicks(blank(), prediction, ALL, np.array([[1, 1, 1], [9, 9, 9]]), np.array([True, True]), 7)
    assert out[1, 1, 1] == 7 and out[2, 2, 2] == 7 and (out > 0).sum() == 2


def test_positive_click_near_the_prediction_picks_it_up_within_the_margin() -> None:
    prediction = np.zeros((8, 8, 8), bool)
    prediction[1:3, 1:3, 1:3] = True
    out, applied = apply_clicks(blank(), prediction, ALL, np.array([[4, 2, 2]]), np.array([True]), 7)
    expected = blank()
    expected[1:3, 1:3, 1:3] = 7  # 2 voxels from the click: taken
    assert np.array_equal(out, expected) and applied == [True]
    out, applied = apply_clicks(blank(), prediction, ALL, np.array([[5, 2, 2]]), np.array([True]), 7)
    assert not out.any() and applied == [False], "3 voxels away is another object"


def test_negative_click_next_to_a_dropped_component_removes_nothing() -> None:
    previous = blank()
    previous[0:6, 0:6, 0:6] = 7
    prediction = previous == 7
    prediction[0:2, 0:2, 0:2] = False  # the new prediction drops a corner, one voxel from the click
    out, applied = apply_clicks(previous, prediction, ALL, np.array([[3, 3, 3]]), np.array([False]), 7)
    assert np.array_equal(out, previous) and applied == [False]


def test_only_editing_clicks_edit_so_a_negative_click_never_adds() -> None:
    previous = blank()
    previous[1:3, 1:3, 1:3] = 7  # the result of an earlier positive click at (1, 1, 1)
    prediction = np.zeros((8, 8, 8), bool)
    prediction[1:7, 1:3, 1:3] = True  # the new prediction grows although the new click is negative
    points, positive = np.array([[1, 1, 1], [5, 2, 2]]), np.array([True, False])
    out, applied = apply_clicks(previous, prediction, ALL, points, positive, 7, editing=np.array([False, True]))
    assert np.array_equal(out, previous), "the earlier positive click is not applied again"
    assert applied == [False, False], "the old click does not edit; the new negative one finds nothing dropped"
    grown, _ = apply_clicks(previous, prediction, ALL, points, positive, 7)
    assert (grown == 7).sum() > (previous == 7).sum(), "applying every click again would have grown the result"
