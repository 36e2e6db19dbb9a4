"""Sessions: one user's result and clicks on one image, over what every session on that image shares.

An :class:`ImageState` is what the segmentation flows work on. What does not depend on the user
(the preprocessed image, the affines, the cached encoder features of the click windows) is shared
by every session on the image; the result and the clicks already answered are the session's own.
So user B's click never edits user A's result, and A's automatic segmentation never replaces B's.

The store keys images by file, size and modification time (an edited file is a new image) and
sessions by (user, image). It is bounded by a memory budget (least recently used features go
first, then sessions, then images nobody has a session on) and sessions expire after ``idle_s``
without a request. An evicted or expired session starts again from what the caller provides.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .inference.point_head import HeadFeatures

__all__ = ["FeatureCache", "ImageState", "SessionStore", "state_key"]

logger = logging.getLogger(__name__)

ClickKey = tuple[int, int, int, bool]
Window = tuple[int, int, int]


def state_key(image_path: str) -> str:
    """Identity of an image as served now: path, size and mtime (so a changed file is a new image)."""
    try:
        st = os.stat(image_path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "?"
    return f"{image_path}|{stamp}"


class FeatureCache(OrderedDict[Window, HeadFeatures]):
    """Window start -> click-independent point-head features of one image, for one weights ``version``.

    Shared by every session on the image; ``lock`` serialises the clicks that read and fill it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.version = ""
        self.lock = threading.RLock()

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.values())


@dataclass(eq=False)
class ImageState:
    """One session on one image: the shared image data plus this session's result and clicks.

    Attributes:
        image: [1, h, w, d] preprocessed image on the model grid, padded to at least one patch (shared).
        model_affine: [4, 4] voxel -> RAS world of the model grid (shared).
        original_affine: [4, 4] voxel -> RAS world of the original image (shared).
        original_shape: spatial shape of the original image (shared).
        result: [H, W, D] int16 global ids on the original grid, or None before the first result.
        clicks: class id -> clicks (i, j, k, positive) already answered, to find the new ones.
        features: the image's encoder-feature cache (shared, see :class:`FeatureCache`).
        lock: held while a request edits this session.
    """

    image: torch.Tensor
    model_affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    result: np.ndarray | None = None
    clicks: dict[int, list[ClickKey]] = field(default_factory=dict)
    features: FeatureCache = field(default_factory=FeatureCache)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def session(self) -> ImageState:
        """A new, empty session on the same image, sharing the image data and the feature cache."""
        return ImageState(
            self.image, self.model_affine, self.original_affine, self.original_shape, features=self.features
        )

    @property
    def weights_version(self) -> str:
        return self.features.version

    def shared_nbytes(self) -> int:
        return self.image.element_size() * self.image.nelement() + self.features.nbytes()

    def own_nbytes(self) -> int:
        return self.result.nbytes if self.result is not None else 0

    def nbytes(self) -> int:
        return self.shared_nbytes() + self.own_nbytes()

    def features_for(self, weights_version: str) -> FeatureCache:
        """The feature cache, emptied first when the served weights changed."""
        cache = self.features
        if cache.version != weights_version:
            if cache:
                logger.info(
                    "Served weights changed (%s -> %s): dropping cached features", cache.version, weights_version
                )
            cache.clear()
            cache.version = weights_version
        return cache


SessionKey = tuple[str, str]


class SessionStore:
    """Images (shared state) and per-(user, image) sessions, bounded by ``budget_bytes``, sessions by ``idle_s``."""

    def __init__(self, budget_bytes: int, idle_s: float = 3600.0) -> None:
        self.budget_bytes = budget_bytes
        self.idle_s = idle_s
        self._images: OrderedDict[str, ImageState] = OrderedDict()
        self._sessions: OrderedDict[SessionKey, ImageState] = OrderedDict()
        self._used: dict[SessionKey, float] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, create: Callable[[], ImageState]) -> ImageState:
        """The shared state of image ``key``, created with ``create`` (outside the store lock) when absent."""
        with self._lock:
            state = self._images.get(key)
            if state is not None:
                self._images.move_to_end(key)
                return state
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one loader per image; other images proceed in parallel
            with self._lock:
                state = self._images.get(key)
            if state is None:
                state = create()
                with self._lock:
                    self._images[key] = state
                    self._loading.pop(key, None)
        self.enforce_budget()
        return state

    def session(self, user: str, key: str, create: Callable[[], ImageState]) -> tuple[ImageState, bool]:
        """``user``'s session on image ``key``; True when it is new (never made, evicted or expired)."""
        image = self.get(key, create)
        self.expire()
        with self._lock:
            session = self._sessions.get((user, key))
            fresh = session is None
            if session is None:
                session = self._sessions[(user, key)] = image.session()
            self._sessions.move_to_end((user, key))
            self._used[(user, key)] = time.monotonic()
            self._images.move_to_end(key)
        return session, fresh

    def expire(self) -> None:
        """Drop sessions idle for longer than ``idle_s`` (not one a request is editing)."""
        now = time.monotonic()
        with self._lock:
            for skey, used in list(self._used.items()):
                if now - used > self.idle_s:
                    self._drop_session(skey, "idle for %.0f s" % (now - used))

    def _drop_session(self, skey: SessionKey, why: str) -> bool:
        session = self._sessions.get(skey)
        if session is None or not session.lock.acquire(blocking=False):
            return False
        try:
            del self._sessions[skey]
            self._used.pop(skey, None)
        finally:
            session.lock.release()
        logger.info("Session of %s on %s dropped: %s", skey[0], os.path.basename(skey[1].split("|")[0]), why)
        return True

    def _total(self) -> int:
        return sum(s.shared_nbytes() for s in self._images.values()) + sum(
            s.own_nbytes() for s in self._sessions.values()
        )

    def enforce_budget(self) -> None:
        """Drop least recently used features, then sessions, then unused images, until the budget holds."""
        with self._lock:
            total = self._total()
            for state in list(self._images.values()):
                if total <= self.budget_bytes:
                    return
                if not state.features.lock.acquire(blocking=False):  # in use: its request evicts later
                    continue
                try:
                    while total > self.budget_bytes and state.features:
                        _, f = state.features.popitem(last=False)
                        total -= f.nbytes()
                finally:
                    state.features.lock.release()
            for skey in list(self._sessions):
                if total <= self.budget_bytes:
                    return
                own = self._sessions[skey].own_nbytes()
                if self._drop_session(skey, "session memory over budget"):
                    total -= own
            in_use = {key for _, key in self._sessions}
            for key in list(self._images):
                if total <= self.budget_bytes or len(self._images) <= 1:
                    return
                if key not in in_use:
                    total -= self._images.pop(key).shared_nbytes()
                    logger.info("Session cache over budget: dropped %s", key)

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._sessions.clear()
            self._used.clear()

    def sessions(self) -> int:
        return len(self._sessions)

    def __len__(self) -> int:
        return len(self._images)
