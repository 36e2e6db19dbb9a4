"""Label ids of a result: the count that replaced a sort of the whole volume agrees with np.unique."""

from __future__ import annotations

import numpy as np
import pytest

from lib.data.imageio import label_ids


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32])
def test_label_ids_are_the_nonzero_values_of_any_label_map(dtype: type) -> None:
    rng = np.random.default_rng(0)
    label = np.zeros((40, 30, 20), dtype=dtype)
    label[rng.integers(0, 40, 50), rng.integers(0, 30, 50), rng.integers(0, 20, 50)] = rng.choice([3, 133, 255], 50)
    assert label_ids(label) == [3, 133, 255] == [int(v) for v in np.unique(label) if v]


def test_label_ids_of_an_empty_or_negative_label() -> None:
    assert label_ids(np.zeros((4, 4, 4), np.int16)) == []
    assert label_ids(np.zeros((0,), np.int16)) == []
    assert label_ids(np.array([[-1, 0, 2]], np.int16)) == [-1, 2], "negative values fall back to np.unique"
