"""The two segmentation flows on the original image grid, built from preprocessing, engine and Algorithm 1."""

from __future__ import annotations

import numpy as np
import torch

from .engine import Engine, pad_to_patch
from .geometry import box_in_target, map_points, resample_nearest, shifted_affine
from .imageio import load_image
from .labels import Preprocessing
from .preprocess import preprocess
from .prompts import AutoPrompt, PointPrompt
from .refine import apply_clicks
from .sessions import ImageState

__all__ = ["new_state", "segment_auto", "segment_points"]


def new_state(image_path: str, pre: Preprocessing, patch: tuple[int, int, int]) -> ImageState:
    """Load and preprocess an image once; later requests on it reuse the state."""
    original = load_image(image_path)
    model = preprocess(original, pre)
    return ImageState(
        image=pad_to_patch(model.as_tensor(), patch),
        model_affine=np.asarray(model.affine, dtype=np.float64),
        original_affine=np.asarray(original.affine, dtype=np.float64),
        original_shape=tuple(int(s) for s in original.shape[1:]),  # type: ignore[arg-type]
    )


def segment_auto(engine: Engine, state: ImageState, prompt: AutoPrompt) -> np.ndarray:
    """Class-prompted segmentation of the whole image -> [H, W, D] int16 ids on the original grid."""
    ids = engine.auto(state.image, prompt.class_ids)
    out = resample_nearest(ids[None], state.model_affine, state.original_affine, state.original_shape)[0]
    return out.astype(np.int16)


def _click_keys(prompt: PointPrompt) -> list[tuple[int, int, int, bool]]:
    return [(int(p[0]), int(p[1]), int(p[2]), bool(s)) for p, s in zip(prompt.points, prompt.positive, strict=True)]


def _new_click_indices(state: ImageState, prompt: PointPrompt) -> np.ndarray:
    """Clicks not answered before for this object; all of them when none is new (a repeated request)."""
    seen = state.clicks.get(prompt.class_id, set())
    keys = _click_keys(prompt)
    new = [i for i, k in enumerate(keys) if k not in seen]
    return np.asarray(new if new else range(len(keys)), dtype=np.int64)


def segment_points(
    engine: Engine, state: ImageState, prompt: PointPrompt, previous: np.ndarray
) -> tuple[np.ndarray, list[bool]]:
    """Edit ``previous`` ([H, W, D] ids, original grid) with the clicks of ``prompt`` (Algorithm 1).

    Returns:
        The edited label map, and for each click whether the new prediction covers it. A click
        the prediction does not cover changes nothing; clients can tell the user so.
    """
    model_points = map_points(prompt.points, state.original_affine, state.model_affine)
    size = np.asarray(state.image.shape[1:])
    model_points = np.clip(model_points, 0, size - 1)  # clicks in cropped-away air snap to the volume edge
    windows = engine.points(state, model_points, prompt.positive, prompt.class_id, _new_click_indices(state, prompt))
    box = box_in_target(windows.box, state.model_affine, state.original_affine, state.original_shape)
    state.clicks[prompt.class_id] = set(_click_keys(prompt))
    if box is None:
        return previous, [False] * len(prompt.points)
    start = [lo for lo, _ in box]
    shape = [hi - lo for lo, hi in box]
    mask = torch.stack([windows.foreground, windows.computed]).to(torch.uint8)
    model_start = [lo for lo, _ in windows.box]
    on_original = resample_nearest(
        mask,
        shifted_affine(state.model_affine, model_start),
        shifted_affine(state.original_affine, start),
        shape,
    ).astype(bool)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    local = prompt.points - np.asarray(start)
    edited = previous.copy()
    edited[sl] = apply_clicks(previous[sl], on_original[0], on_original[1], local, prompt.positive, prompt.class_id)
    inside = np.all((local >= 0) & (local < np.asarray(shape)), axis=1)
    covered = [bool(ok and on_original[0][tuple(p)]) for p, ok in zip(local, inside, strict=True)]
    return edited, covered
