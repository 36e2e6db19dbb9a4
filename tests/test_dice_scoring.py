"""The multi-class Dice scorer counts a class only where both labels carry that class."""

from __future__ import annotations

import numpy as np

from lib.activelearning.dice import label_agreement


def test_swapped_classes_score_zero_not_one() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1
    b[:2] = 3  # same voxels, another class: a binary product would call this perfect
    scores = label_agreement(a, b)
    assert scores["dice_per_class"] == {"1": 0.0, "3": 0.0}
    assert scores["dice"] == 0.0 and scores["corrected_fraction"] == 1.0


def test_partial_correction() -> None:
    predicted = np.zeros((10, 1, 1), np.uint8)
    corrected = np.zeros((10, 1, 1), np.uint8)
    predicted[0:4] = 1  # 4 voxels of class 1
    corrected[0:3] = 1  # the annotator removed one
    predicted[6:8] = 2
    corrected[6:8] = 2
    scores = label_agreement(predicted, corrected)
    assert scores["dice_per_class"] == {"1": round(2 * 3 / 7, 5), "2": 1.0}
    assert scores["corrected_fraction"] == round(1 / 6, 5)


def test_both_empty_is_perfect() -> None:
    empty = np.zeros((3, 3, 3), np.uint8)
    assert label_agreement(empty, empty) == {"dice": 1.0, "dice_per_class": {}, "corrected_fraction": 0.0}
