"""Model-space inference: class-prompted sliding window and click-prompted windows with cached features.

Inputs and outputs here are on the preprocessed (model) grid; :mod:`.interactive` and the infer
task map them to and from the original image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets.vista3d import VISTA3D, PointMappingSAM

from ..cores import available_cores
from ..model import LoadedModel
from ..sessions import ImageState
from .auto_infer import OnWindow, auto_segment, window_workers
from .point_head import HeadFeatures, predict, prepare
from .precision import RESOLVED, autocast_dtype

__all__ = ["Engine", "WindowLogits", "choose_window", "pad_to_patch", "point_labels"]

logger = logging.getLogger(__name__)

Box3 = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def pad_to_patch(image: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Pad [1, h, w, d] at the far end of each axis up to ``patch``: voxel indices (and the affine) stay valid."""
    pad: list[int] = []
    for size, p in reversed(list(zip(image.shape[1:], patch, strict=True))):
        pad.extend([0, max(p - size, 0)])
    return F.pad(image, pad) if any(pad) else image


def window_start(point: np.ndarray, size: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """Start of the window centred on ``point``, shifted to lie inside the volume (as MONAI's point inferer)."""
    return tuple(int(np.clip(round(float(c)) - p // 2, 0, s - p)) for c, s, p in zip(point, size, patch, strict=True))  # type: ignore[return-value]


def can_reuse(point: np.ndarray, start: Sequence[int], size: Sequence[int], patch: Sequence[int]) -> bool:
    """Whether the window at ``start`` may answer a click at ``point`` instead of a window centred on it.

    It may when it contains the click and lies within a quarter window of the centred one (which
    is clamped to the volume): the click then has nearly the context it would have had anyway.
    """
    centred = window_start(point, size, patch)
    for c, s0, s1, p in zip(point, start, centred, patch, strict=True):
        if not s0 <= round(float(c)) < s0 + p or abs(s0 - s1) > p // 4:
            return False
    return True


def choose_window(
    point: np.ndarray, size: Sequence[int], patch: Sequence[int], earlier: Sequence[tuple[int, int, int]]
) -> tuple[int, int, int]:
    """The window for a click: the newest of ``earlier`` that :func:`can_reuse` allows, else one centred on it."""
    for start in reversed(earlier):
        if can_reuse(point, start, size, patch):
            return start
    return window_start(point, size, patch)


def point_labels(positive: np.ndarray, class_id: int, special: frozenset[int]) -> torch.Tensor:
    """0/1 clicks -> the point head's labels (2/3 for the special classes)."""
    labels = torch.as_tensor(np.asarray(positive, dtype=np.int64))
    return labels + 2 if class_id in special else labels


class WindowLogits:
    """Point-head logits stitched over the windows of one request.

    Attributes:
        box: (start, stop) per axis of the model grid that the windows cover.
        logits: [h, w, d] mean logits over the box (NaN where no window was computed).
    """

    def __init__(self, box: Box3, logits: torch.Tensor) -> None:
        self.box = box
        self.logits = logits

    @property
    def computed(self) -> torch.Tensor:
        return ~torch.isnan(self.logits)

    @property
    def foreground(self) -> torch.Tensor:
        return torch.nan_to_num(self.logits, nan=-1.0) > 0


class Engine:
    """Runs the served network. Thread-safe: the network is only read; per-image state has its own lock.

    With ``precision="bf16"`` (or ``"fp16"``) the click path (window encoder and point head) runs
    convolutions and matrix products under autocast to that precision (softmax and normalisation
    statistics stay float32): about 1.6x faster later clicks and 2x faster first clicks on a CPU
    with AVX512-BF16, and far slower on one without (:mod:`.precision` decides on the machine).
    The automatic path (:mod:`.auto_infer`) runs only some of its stages in reduced precision,
    chosen so that its label maps agree with MONAI's float32 reference per class (see
    :mod:`.auto_forward`).
    """

    def __init__(
        self,
        model: LoadedModel,
        patch: tuple[int, int, int],
        overlap: float,
        special: frozenset[int],
        precision: str = "fp32",
        auto_memory_mb: int = 2048,
        auto_precision: str | None = None,
    ) -> None:
        for name, value in (("precision", precision), ("auto_precision", auto_precision or precision)):
            if value not in RESOLVED:
                raise ValueError(f"{name} must be one of {RESOLVED}, got {value!r}")
        self.model = model
        self.patch = patch
        self.overlap = overlap
        self.special = special
        self.precision = precision
        self.auto_precision = auto_precision or precision
        self.auto_memory_mb = auto_memory_mb
        self._pos: dict[str, torch.Tensor] = {}  # positional encoding of a window, per weights version

    @property
    def network(self) -> VISTA3D:
        return self.model.network

    @property
    def point_head(self) -> PointMappingSAM:
        return cast(PointMappingSAM, self.network.point_head)

    @property
    def weights_version(self) -> str:
        return self.model.version

    def _autocast(self) -> torch.autocast:
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.model.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def auto(
        self,
        image: torch.Tensor,
        class_ids: Sequence[int],
        on_window: OnWindow | None = None,
        threads: Callable[[], int] | None = None,
    ) -> torch.Tensor:
        """[1, h, w, d] preprocessed image -> [h, w, d] int16 global ids (0 where no class is positive).

        MONAI's sliding-window answer (see :mod:`.auto_infer`); ``on_window(i, n)`` is called before
        window pass ``i`` of ``n`` and between its stages, and may block, or raise to cancel the request.
        ``threads()`` is how many torch threads it may use now (asked before every window pass);
        by default the caller's.
        """
        most = available_cores() if threads is not None else torch.get_num_threads()
        return auto_segment(
            self.network,
            image,
            class_ids,
            self.patch,
            self.overlap,
            dtype=autocast_dtype(self.auto_precision),
            budget_bytes=self.auto_memory_mb * 2**20,
            on_window=on_window,
            workers=window_workers(self.patch, most, self.model.device),
            threads=threads,
        )

    def _windows_for(self, state: ImageState, points: np.ndarray) -> list[tuple[int, int, int]]:
        """Windows for clicks: one already chosen or cached that :func:`can_reuse` allows, else one centred on it.

        Reusing windows is what makes later clicks cheap: nearby clicks share one encoder pass.
        """
        size = tuple(state.image.shape[1:])
        chosen: list[tuple[int, int, int]] = []
        for point in points:
            start = choose_window(point, size, self.patch, [*state.features_for(self.weights_version), *chosen])
            if start not in chosen:
                chosen.append(start)
        return chosen

    def _features(self, state: ImageState, start: tuple[int, int, int]) -> HeadFeatures:
        """Click-independent point-head features of the window at ``start`` (cached per image)."""
        cache = state.features_for(self.weights_version)
        feats = cache.get(start)
        if feats is not None:
            cache.move_to_end(start)
            return feats
        sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))
        window = state.image[(slice(None), *sl)].unsqueeze(0).to(self.model.device)
        with self._autocast():
            encoded, _ = self.network.image_encoder(window, with_point=True, with_label=False)
            feats = prepare(self.point_head, encoded, self._pos.get(self.weights_version))
        self._pos = {self.weights_version: feats.pos}
        cache[start] = feats
        return feats

    @torch.inference_mode()
    def points(
        self,
        state: ImageState,
        points: np.ndarray,
        positive: np.ndarray,
        class_id: int,
        window_points: np.ndarray,
    ) -> WindowLogits:
        """Point-head logits around clicks.

        Args:
            state: the image's state; ``state.image`` is padded to at least one patch.
            points: [N, 3] click coordinates on the model grid (all clicks of the object).
            positive: [N] True for positive clicks.
            class_id: global id; above 132 the head's zero-shot token is used.
            window_points: [M] indices of the clicks whose windows are computed (the new ones).
        """
        coords = np.round(points).astype(np.int64)
        labels = point_labels(positive, class_id, self.special)
        starts = self._windows_for(state, coords[window_points])
        lo = np.min(starts, axis=0)
        hi = np.max(starts, axis=0) + np.asarray(self.patch)
        total = torch.zeros(tuple(hi - lo))
        count = torch.zeros(tuple(hi - lo))
        device = self.model.device
        for start in starts:
            local = coords - np.asarray(start)
            inside = np.all((local >= 0) & (local < np.asarray(self.patch)), axis=1)
            with self._autocast():
                logits = predict(
                    self.point_head,
                    self._features(state, start),
                    torch.as_tensor(local[inside], dtype=torch.float32, device=device).unsqueeze(0),
                    labels[inside].unsqueeze(0).to(device),
                    class_id,
                )[0, 0]
            logits = logits.float().cpu()
            sl = tuple(slice(s - a, s - a + p) for s, a, p in zip(start, lo, self.patch, strict=True))
            total[sl] += logits
            count[sl] += 1
        box = tuple((int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        return WindowLogits(box, total / count)  # type: ignore[arg-type]
