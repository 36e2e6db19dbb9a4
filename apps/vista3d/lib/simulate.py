"""The simulated annotator: where a person clicks next, and clicks-to-Dice through the server's own path.

The promotion gate, the learning-curve and zero-shot benchmarks all score a model the same way: a
first positive click at the object's deepest voxel, then a click at the centre of the largest
error region (positive for missed foreground, negative for a false positive), each answered by
:func:`lib.inference.segment.segment_points` exactly as a click from OHIF or Slicer is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.nets.vista3d import VISTA3D
from scipy import ndimage

from .inference.engine import Engine, pad_to_patch
from .inference.segment import segment_points
from .labels import LabelDictionary
from .model import LoadedModel, patch_size_for
from .prompts import PointPrompt
from .sessions import ImageState

__all__ = [
    "challenge_click",
    "clicks_to_dice",
    "deepest_voxel",
    "deepest_voxel_depth",
    "dice",
    "evaluate_clicks",
    "largest_error",
    "mean_at",
    "model_grid_state",
    "next_click",
    "organ_auto_dice",
    "scoring_engine",
]

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every voxel of ``mask`` (the whole array when it is empty).

    The annotator's transforms run on this box: a distance transform or a component labelling of a
    mask gives the same answer inside its bounding box as on the whole volume (ties fall the same
    way, C order is kept), at a fraction of the cost on a volume much larger than the object.
    """
    axes = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    if any(len(a) == 0 for a in axes):
        return tuple(slice(None) for _ in range(mask.ndim))
    return tuple(slice(int(a[0]), int(a[-1]) + 1) for a in axes)


def deepest_voxel(mask: np.ndarray) -> np.ndarray:
    """The voxel farthest from the mask's boundary: where an annotator clicks."""
    return deepest_voxel_depth(mask)[0]


def deepest_voxel_depth(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`deepest_voxel` and its distance in voxels to the nearest voxel outside ``mask``."""
    box = _bounding_box(mask)
    sub = mask[box]
    dist = ndimage.distance_transform_edt(np.pad(sub, 1))[1:-1, 1:-1, 1:-1]
    offset = np.asarray([s.start or 0 for s in box])
    k = int(np.argmax(dist))
    return np.asarray(np.unravel_index(k, sub.shape)) + offset, float(dist.flat[k])


def largest_error(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The largest connected error region and whether it is missed foreground (else a false positive).

    None when the prediction is perfect.
    """
    box = _bounding_box(prediction | truth)
    pred, true = prediction[box], truth[box]
    best: tuple[int, np.ndarray, bool] | None = None
    for region, positive in ((true & ~pred, True), (pred & ~true, False)):
        labelled, n = ndimage.label(region, structure=STRUCTURE_26)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), labelled == k + 1, positive)
    if best is None:
        return None
    region = np.zeros(truth.shape, dtype=bool)
    region[box] = best[1]
    return region, best[2]


def next_click(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """A click at the centre of the largest error region: positive on missed foreground, else negative."""
    error = largest_error(prediction, truth)
    return None if error is None else (deepest_voxel(error[0]), error[1])


# CVPR25_iter_eval.py calls np.random.seed(42) before each tie-break among the error centre's voxels.
CHALLENGE_SEED = 42


def challenge_click(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The next click of the CVPR 2025 interactive 3D segmentation challenge (its ``CVPR25_iter_eval.py``).

    Missed foreground and false positives form one error mask (``prediction != truth``); its largest
    26-connected component is clicked at its maximum Euclidean distance transform (voxel units, the
    volume's border counting as outside), the tie among equal maxima drawn as the challenge draws it
    (a NumPy RandomState seeded 42, candidates in the challenge's (z, y, x) array order, from
    ``prediction``/``truth`` in (x, y, z) NIfTI order). The click is positive when ``truth`` is
    foreground at that voxel. From an empty prediction this is the first click (the challenge's cases
    without a box). None when the prediction is perfect.

    Unlike :func:`next_click`, which labels missed foreground and false positives apart and signs the
    click by the kind of the larger, adjacent errors of both kinds here form one component. Two equally
    large largest components may be told apart differently (the challenge labels with cc3d).
    """
    error = prediction != truth
    outer = _bounding_box(error)
    labelled, n = ndimage.label(error[outer], structure=STRUCTURE_26)
    if n == 0:
        return None
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    k = int(np.argmax(sizes))
    box = ndimage.find_objects(labelled, max_label=k)[k - 1]
    dist = ndimage.distance_transform_edt(np.pad(labelled[box] == k, 1))[1:-1, 1:-1, 1:-1]
    ties = np.argwhere(dist.transpose(2, 1, 0) == dist.max())[:, ::-1]  # (z, y, x) order, back to (x, y, z)
    offset = [(a.start or 0) + b.start for a, b in zip(outer, box, strict=True)]
    voxel = ties[np.random.RandomState(CHALLENGE_SEED).choice(len(ties))] + offset
    return voxel, bool(truth[tuple(voxel)])


def scoring_engine(
    network: VISTA3D, preset: str, labels: LabelDictionary, precision: str = "fp32", auto_precision: str | None = None
) -> Engine:
    """An engine answering with ``network`` as the server would (the preset's window, the server's
    precisions, which :mod:`.inference.precision` chose): what validation and the benchmarks score a
    network that is not the served one through."""
    model = LoadedModel(network.eval(), preset, None, next(network.parameters()).device)
    return Engine(
        model, patch_size_for(preset), labels.sw_overlap, labels.special, precision, auto_precision=auto_precision
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def model_grid_state(image: torch.Tensor, patch: Sequence[int]) -> ImageState:
    """A session state whose "original" grid is the model grid: clicks then map one to one."""
    eye = np.eye(4)
    return ImageState(
        image=pad_to_patch(image, patch),
        model_affine=eye,
        original_affine=eye,
        original_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
    )


def clicks_to_dice(engine: Engine, state: ImageState, truth: np.ndarray, class_id: int, clicks: int) -> list[float]:
    """Dice of the object after each of ``clicks`` simulated clicks (a fresh session per call)."""
    result = np.zeros(state.original_shape, dtype=np.int16)
    state.clicks.pop(class_id, None)
    points: list[np.ndarray] = [deepest_voxel(truth)]
    positive: list[bool] = [True]
    scores: list[float] = []
    for _ in range(clicks):
        prompt = PointPrompt(np.stack(points).astype(np.int64), np.asarray(positive), class_id)
        result = segment_points(engine, state, prompt, result).label
        prediction = result == class_id
        scores.append(dice(prediction, truth))
        click = next_click(prediction, truth)
        if click is None:  # perfect: later clicks change nothing
            scores.extend([scores[-1]] * (clicks - len(scores)))
            break
        points.append(click[0])
        positive.append(click[1])
    return scores


def evaluate_clicks(
    engine: Engine, cases: Sequence[tuple[str, torch.Tensor, np.ndarray]], class_id: int, clicks: int
) -> dict[str, list[float]]:
    """Clicks-to-Dice per case: ``cases`` are (name, preprocessed image [1,h,w,d], truth [h,w,d] bool)."""
    return {
        name: clicks_to_dice(engine, model_grid_state(image, engine.patch), truth, class_id, clicks)
        for name, image, truth in cases
    }


def mean_at(per_case: dict[str, list[float]], clicks: Sequence[int]) -> dict[str, float]:
    """Mean Dice over cases after each of ``clicks`` (1-based), as ``{"dice_1": ...}``."""
    return {f"dice_{k}": round(float(np.mean([v[k - 1] for v in per_case.values()])), 4) for k in clicks}


ORGANS = ("liver", "spleen", "right kidney", "left kidney", "stomach", "aorta", "inferior vena cava", "pancreas")


def organ_auto_dice(
    engine: Engine, labels: LabelDictionary, image: torch.Tensor, truth: np.ndarray
) -> dict[str, float]:
    """Auto Dice per abdominal organ on a preprocessed scan: the check that learning clicks kept the class head."""
    ids = [labels.id_for_name(n) for n in ORGANS]
    pred = engine.auto(image, [i for i in ids if i is not None]).numpy()
    return {n: round(dice(pred == i, truth == i), 4) for n, i in zip(ORGANS, ids, strict=True) if i is not None}
