"""Editing a label map with clicks: the VISTA3D paper's Algorithm 1.

A new prediction never overwrites a result wholesale. Only the connected components of the
difference between the new and the previous mask that a click touches change: a positive click
adds the component of ``new & ~previous`` it lies in (or, when it lies inside the previous mask,
the whole component of ``new`` around it, as MONAI's ``connected_components_combine`` does); a
negative click removes the component of ``previous & ~new`` it lies in. Every other voxel keeps
its value, labels of other classes included. Only the clicks new in a request edit: a positive click
only ever adds and a negative one only ever removes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["apply_clicks"]

# 26-connectivity: thin and oblique structures (vessels, ribs) stay one component.
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)

# A positive click picks a predicted component up to 2 voxels away, as MONAI's
# ``keep_merge_components_with_points`` does: clicks land on an object's boundary, and a network may
# leave the clicked voxel itself out (the starter did on 3 of 5 abdominal organs, adding nothing
# where MONAI's reference added Dice 0.23-0.36). A negative click removes only the component it lies
# in: looking 2 voxels around it cost 0.005-0.012 mean Dice on the held-out sarcoma cases, since
# the nearby component is then often a shell of true foreground the new prediction dropped.
POSITIVE_MARGIN = 2


def _component_near(mask: np.ndarray, point: tuple[int, ...], margin: int) -> np.ndarray | None:
    """The connected component of ``mask`` at ``point``, else one within ``margin`` voxels of it.

    Searches boxes of growing half-width 0..``margin`` around the point and takes the component
    with most voxels in the first box that meets ``mask``. None when no voxel of ``mask`` is that close.
    """
    for m in range(margin + 1):
        box = tuple(slice(max(c - m, 0), c + m + 1) for c in point)
        if mask[box].any():
            break
    else:
        return None
    labelled, _ = ndimage.label(mask, structure=_STRUCTURE)
    ids, counts = np.unique(labelled[box][labelled[box] > 0], return_counts=True)
    return labelled == int(ids[np.argmax(counts)])


def apply_clicks(
    previous: np.ndarray,
    prediction: np.ndarray,
    computed: np.ndarray,
    points: np.ndarray,
    positive: np.ndarray,
    class_id: int,
    editing: np.ndarray | None = None,
) -> tuple[np.ndarray, list[bool]]:
    """Edit ``previous`` with the part of ``prediction`` that the clicks select.

    Args:
        previous: [H, W, D] label map of global ids (any other classes are left alone).
        prediction: [H, W, D] bool, the new binary mask of ``class_id``.
        computed: [H, W, D] bool, where ``prediction`` was computed; elsewhere nothing changes.
        points: [N, 3] integer voxel indices of the clicks on this grid (points off the grid are ignored).
        positive: [N] True for positive clicks.
        class_id: the id written into added voxels.
        editing: [N] True for the clicks that edit (the new ones); all of them when None. The
            others only shaped the prediction.

    Returns:
        A new label map (``previous`` is not modified), and per click whether it edited: for a
        positive click, the prediction covers it or comes within ``POSITIVE_MARGIN`` voxels; for a
        negative one, it lies in a component the prediction dropped. Clicks that do not edit: False.
    """
    out = previous.copy()
    old = previous == class_id
    new = prediction & computed
    add_diff = new & ~old
    remove_diff = old & ~new & computed
    shape = np.asarray(previous.shape)
    edits = np.ones(len(points), dtype=bool) if editing is None else np.asarray(editing, dtype=bool)
    applied: list[bool] = []
    for p, pos, edit in zip(np.asarray(points, dtype=np.int64), np.asarray(positive, dtype=bool), edits, strict=True):
        if not edit or np.any(p < 0) or np.any(p >= shape):
            applied.append(False)
            continue
        idx = tuple(int(c) for c in p)
        if pos:
            component = _component_near(new if old[idx] else add_diff, idx, POSITIVE_MARGIN)
            if component is not None:
                out[component] = class_id
        else:
            component = _component_near(remove_diff, idx, 0)
            if component is not None:
                out[component & (out == class_id)] = 0
        applied.append(component is not None)
    return out, applied
