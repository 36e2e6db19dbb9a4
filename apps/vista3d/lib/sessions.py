"""Per-image session state: the preprocessed image, the current result, click history, encoder features.

Keyed by image file, with its size and modification time so that an edited file is a new image.
The store is bounded by a memory budget and drops the least recently used state; each state has
its own lock so that two users on different images never wait on each other.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .point_head import HeadFeatures

__all__ = ["ImageState", "SessionStore", "state_key"]

logger = logging.getLogger(__name__)


def state_key(image_path: str) -> str:
    """Identity of an image as served now: path, size and mtime (so a changed file is a new image).

    MONAI Label sessions need no extra key: each session serves its own copy of the image.
    """
    try:
        st = os.stat(image_path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "?"
    return f"{image_path}|{stamp}"


@dataclass
class ImageState:
    """What the server remembers about one image between requests.

    Attributes:
        image: [1, h, w, d] preprocessed image on the model grid, padded to at least one patch.
        model_affine: [4, 4] voxel -> RAS world of the model grid.
        original_affine: [4, 4] voxel -> RAS world of the original image.
        original_shape: spatial shape of the original image.
        result: [H, W, D] int16 global ids on the original grid, or None before the first result.
        clicks: class id -> clicks (i, j, k, positive) already answered, to find the new ones.
        features: window start -> cached click-independent point-head features (see :mod:`.point_head`).
        weights_version: the served weights the features were computed with.
    """

    image: torch.Tensor
    model_affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    result: np.ndarray | None = None
    clicks: dict[int, list[tuple[int, int, int, bool]]] = field(default_factory=dict)
    features: OrderedDict[tuple[int, int, int], HeadFeatures] = field(default_factory=OrderedDict)
    weights_version: str = ""
    lock: threading.RLock = field(default_factory=threading.RLock)

    def nbytes(self) -> int:
        n = self.image.element_size() * self.image.nelement()
        n += sum(f.nbytes() for f in self.features.values())
        if self.result is not None:
            n += self.result.nbytes
        return n

    def features_for(self, weights_version: str) -> OrderedDict[tuple[int, int, int], HeadFeatures]:
        """The feature cache, emptied first when the served weights changed."""
        if self.weights_version != weights_version:
            if self.features:
                logger.info(
                    "Served weights changed (%s -> %s): dropping cached features", self.weights_version, weights_version
                )
            self.features.clear()
            self.weights_version = weights_version
        return self.features


class SessionStore:
    """LRU map of :class:`ImageState` bounded by ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._states: OrderedDict[str, ImageState] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, create: Callable[[], ImageState]) -> ImageState:
        """The state of ``key``, created with ``create`` (outside the store lock) when absent."""
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
                return state
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one loader per image; other images proceed in parallel
            with self._lock:
                state = self._states.get(key)
            if state is None:
                state = create()
                with self._lock:
                    self._states[key] = state
                    self._loading.pop(key, None)
        self.enforce_budget()
        return state

    def enforce_budget(self) -> None:
        """Drop least recently used features, then whole states, until the budget holds."""
        with self._lock:
            total = sum(s.nbytes() for s in self._states.values())
            for state in list(self._states.values()):
                if total <= self.budget_bytes:
                    break
                if not state.lock.acquire(blocking=False):  # in use: its request evicts later
                    continue
                try:
                    while total > self.budget_bytes and state.features:
                        _, f = state.features.popitem(last=False)
                        total -= f.nbytes()
                finally:
                    state.lock.release()
            while total > self.budget_bytes and len(self._states) > 1:
                key, state = self._states.popitem(last=False)
                total -= state.nbytes()
                logger.info("Session cache over budget: dropped %s", key)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

    def __len__(self) -> int:
        return len(self._states)
