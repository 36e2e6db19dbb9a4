"""Editing a label map with clicks: the VISTA3D paper's Algorithm 1.

A new prediction never overwrites a result wholesale. Only the connected components of the
difference between the new and the previous mask that a click touches change: a positive click
adds the component of ``new & ~previous`` it lies in (or, when it lies inside the previous mask,
the whole component of ``new`` around it, as MONAI's ``connected_components_combine`` does); a
negative click removes the component of ``previous & ~new`` it lies in. Every other voxel keeps
its value, labels of other classes included.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["apply_clicks"]

# 26-connectivity: thin and oblique structures (vessels, ribs) stay one component.
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def _component_at(mask: np.ndarray, point: tuple[int, ...]) -> np.ndarray | None:
    """The connected component of ``mask`` containing ``point``, None when ``point`` is off the mask."""
    if not mask[point]:
        return None
    labelled, _ = ndimage.label(mask, structure=_STRUCTURE)
    return labelled == labelled[point]


def apply_clicks(
    previous: np.ndarray,
    prediction: np.ndarray,
    computed: np.ndarray,
    points: np.ndarray,
    positive: np.ndarray,
    class_id: int,
) -> np.ndarray:
    """Edit ``previous`` with the part of ``prediction`` that the clicks select.

    Args:
        previous: [H, W, D] label map of global ids (any other classes are left alone).
        prediction: [H, W, D] bool, the new binary mask of ``class_id``.
        computed: [H, W, D] bool, where ``prediction`` was computed; elsewhere nothing changes.
        points: [N, 3] integer voxel indices of the clicks on this grid (points off the grid are ignored).
        positive: [N] True for positive clicks.
        class_id: the id written into added voxels.

    Returns:
        A new label map; ``previous`` is not modified.
    """
    out = previous.copy()
    old = previous == class_id
    new = prediction & computed
    add_diff = new & ~old
    remove_diff = old & ~new & computed
    shape = np.asarray(previous.shape)
    for p, pos in zip(np.asarray(points, dtype=np.int64), np.asarray(positive, dtype=bool), strict=False):
        if np.any(p < 0) or np.any(p >= shape):
            continue
        idx = tuple(int(c) for c in p)
        if pos:
            component = _component_at(new if old[idx] else add_diff, idx)
            if component is not None:
                out[component] = class_id
        else:
            component = _component_at(remove_diff, idx)
            if component is not None:
                out[component & (out == class_id)] = 0
    return out
