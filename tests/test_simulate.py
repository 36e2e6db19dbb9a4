"""Where the simulated annotators click (lib/simulate.py): the project's next_click and the CVPR 2025 challenge's."""

from __future__ import annotations

import numpy as np

from lib.simulate import challenge_click, next_click


def _box(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


def test_challenge_first_click_is_the_centre_of_the_largest_object_component() -> None:
    truth = _box((40, 40, 40), (2, 2, 2), (13, 13, 13)) | _box((40, 40, 40), (20, 20, 20), (27, 27, 39))
    point, positive = challenge_click(np.zeros_like(truth), truth)  # type: ignore[misc]
    assert positive
    assert point.tolist() == [7, 7, 7]  # the 11³ cube's centre (1331 voxels against 7x7x19 = 931)


def test_challenge_joins_adjacent_errors_of_both_kinds() -> None:
    # Missed: a 10³ cube A and a 6x10x10 slab C; predicted: only a 6x10x10 slab B touching C.
    shape = (40, 20, 20)
    cube_a = _box(shape, (2, 5, 5), (12, 15, 15))
    slab_c = _box(shape, (20, 5, 5), (26, 15, 15))
    prediction = _box(shape, (26, 5, 5), (32, 15, 15))
    truth = cube_a | slab_c
    # next_click keeps the kinds apart: A (1000 voxels) beats C and B (600 each), a positive click in A.
    project = next_click(prediction, truth)
    assert project is not None and project[1] and cube_a[tuple(project[0])]
    # The challenge joins C and B (1200 voxels): deepest at x 24..27, signed by the truth at the voxel drawn.
    click = challenge_click(prediction, truth)
    assert click is not None
    point, positive = click
    assert 24 <= point[0] <= 27 and point[1:].tolist() in ([9, 9], [9, 10], [10, 9], [10, 10])
    assert positive == bool(truth[tuple(point)])


def test_challenge_tie_break_is_reproducible_and_perfect_is_none() -> None:
    truth = _box((20, 20, 20), (4, 4, 4), (12, 12, 12))  # even sides: 8 voxels share the maximum
    first = challenge_click(np.zeros_like(truth), truth)
    assert first is not None and first[1]
    assert set(first[0].tolist()) <= {7, 8}
    again = challenge_click(np.zeros_like(truth), truth)
    assert again is not None and again[0].tolist() == first[0].tolist()
    assert challenge_click(truth, truth) is None


def test_challenge_negative_click_on_a_false_positive() -> None:
    truth = _box((20, 20, 20), (2, 2, 2), (6, 6, 6))
    prediction = truth | _box((20, 20, 20), (10, 10, 10), (19, 19, 19))
    click = challenge_click(prediction, truth)
    assert click is not None
    assert click[0].tolist() == [14, 14, 14] and not click[1]
