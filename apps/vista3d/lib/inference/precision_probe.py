"""One window pass each way: how much faster a reduced precision runs the served network here, and whether it agrees.

The pass is the server's own code on a synthetic abdomen-like CT window (no patient data ships
with the app): the click path's first click (:meth:`.engine.Engine.points`: encoder and point
head) and the automatic path's window (:func:`.auto_forward.window_features` with its stage
policy, then the labels of the "everything" classes). Each way runs twice when a pass is short
(the first call builds oneDNN's kernels) and once when it is long, and the fastest pass counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
from monai.networks.nets.vista3d import ClassMappingClassify

from ..model import LoadedModel
from ..sessions import ImageState
from .auto_forward import reduced_stages, window_features
from .auto_infer import class_embeddings
from .engine import Engine
from .precision import Trial

__all__ = ["auto_trial", "click_trial", "phantom"]

REPEAT_BELOW_S = 2.0  # a pass shorter than this is repeated: its first run pays for building kernels
CLICK_CLASS = 1  # liver: the click lands in the phantom's liver


def _ellipsoid(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float] | np.ndarray) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return cast(np.ndarray, sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0)


def phantom(patch: Sequence[int], hu_window: tuple[float, float]) -> torch.Tensor:
    """[1, 1, *patch] a seeded abdomen-like CT window (air, fat, muscle, liver, kidneys, aorta, spine),
    scaled to [0, 1] with the bundle's HU window, as the server's preprocessing leaves a CT."""
    p = np.asarray(patch, dtype=float)
    hu = np.full(tuple(int(s) for s in patch), -1000.0)
    body = (p[0] / 2, p[1] / 2, p[2] / 2)
    hu[_ellipsoid(patch, body, (p[0] * 0.46, p[1] * 0.36, p[2] * 4))] = -100.0  # fat
    hu[_ellipsoid(patch, body, (p[0] * 0.42, p[1] * 0.32, p[2] * 4))] = 45.0  # muscle and bowel
    hu[_ellipsoid(patch, (p[0] * 0.35, p[1] * 0.45, p[2] * 0.5), p * (0.2, 0.18, 0.3))] = 60.0  # liver
    for x in (0.32, 0.68):
        hu[_ellipsoid(patch, (p[0] * x, p[1] * 0.66, p[2] * 0.5), p * (0.07, 0.05, 0.12))] = 30.0  # kidneys
    hu[_ellipsoid(patch, (p[0] * 0.52, p[1] * 0.58, p[2] * 0.5), (p[0] * 0.04, p[1] * 0.04, p[2] * 4))] = 160.0
    hu[_ellipsoid(patch, (p[0] * 0.5, p[1] * 0.75, p[2] * 0.5), (p[0] * 0.07, p[1] * 0.07, p[2] * 4))] = 700.0
    hu += np.random.default_rng(0).normal(0.0, 15.0, hu.shape)
    lo, hi = hu_window
    scaled = np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(scaled)[None, None]


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _label_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two label maps over all foreground classes at once (a voxel counts where both give it one id)."""
    total = int((a > 0).sum()) + int((b > 0).sum())
    return 1.0 if total == 0 else 2.0 * int(((a == b) & (a > 0)).sum()) / total


def _fastest(run: Callable[[], torch.Tensor], warm_up: bool = False) -> tuple[float, torch.Tensor]:
    """The faster of two passes (one when the first is slow). ``warm_up`` first runs one untimed pass:
    on a GPU the first pass of each precision autotunes cuDNN, which made an H200's first trial rate
    bfloat16 at 0.02x float32's speed (``docs/gpu.md``)."""
    if warm_up:
        run()
    best, out = np.inf, None
    for n in range(2):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
        if n == 0 and best >= REPEAT_BELOW_S:
            break
    assert out is not None
    return float(best), out


def click_trial(model: LoadedModel, patch: tuple[int, int, int], window: torch.Tensor, precision: str) -> Trial:
    """A first click (encoder and point head, nothing cached) at the phantom's liver, float32 and ``precision``."""
    image = window[0]
    point = np.asarray([[int(patch[0] * 0.35), int(patch[1] * 0.45), int(patch[2] * 0.5)]])

    def run(p: str) -> Callable[[], torch.Tensor]:
        engine = Engine(model, patch, 0.0, frozenset(), precision=p, auto_precision="fp32")

        def once() -> torch.Tensor:
            eye = np.eye(4)
            state = ImageState(image=image, model_affine=eye, original_affine=eye, original_shape=patch)
            return engine.points(state, point, np.asarray([True]), CLICK_CLASS, np.asarray([0])).foreground

        return once

    gpu = model.device.type == "cuda"
    fp32_s, a = _fastest(run("fp32"), gpu)
    reduced_s, b = _fastest(run(precision), gpu)
    return Trial(fp32_s, reduced_s, _dice(a, b))


def auto_trial(model: LoadedModel, window: torch.Tensor, class_ids: Sequence[int], dtype: torch.dtype) -> Trial:
    """One automatic window (its stage policy under ``dtype``) against float32: the labels of ``class_ids``."""
    network = model.network
    window = window.to(model.device)
    emb = class_embeddings(cast(ClassMappingClassify, network.class_head), class_ids, model.device)
    ids = torch.tensor(list(class_ids), device=model.device)

    def run(stages: frozenset[str], run_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        @torch.inference_mode()
        def once() -> torch.Tensor:
            features = window_features(network, window, stages, dtype=run_dtype)
            best, arg = (emb @ features.reshape(features.shape[0], -1)).max(0)
            return torch.where(best > 0, ids[arg], 0).cpu()

        return once

    gpu = model.device.type == "cuda"
    fp32_s, a = _fastest(run(frozenset(), dtype), gpu)
    reduced_s, b = _fastest(run(reduced_stages(network, True), dtype), gpu)
    return Trial(fp32_s, reduced_s, _label_agreement(a, b))
