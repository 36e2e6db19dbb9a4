"""Names of structures outside VISTA3D's classes, each mapped to a stable zero-shot id (133..254).

The mapping is persisted (atomically) so that a name keeps its id across restarts; the trainers use
the same ids for the labels a team submits. There are only 122 ids, so a request creating a new
name only *reserves* an id while it runs: the name is registered once the request has succeeded,
and a failed request gives its id back. Each user may create ``names_per_hour`` new names per hour.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import write_json
from .labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST

__all__ = ["ZeroShotNamesExhausted", "ZeroShotRateLimited", "ZeroShotRegistry"]

logger = logging.getLogger(__name__)

HOUR_S = 3600.0


class ZeroShotNamesExhausted(ValueError):
    """Every zero-shot id is taken (HTTP 409): reuse a name or an id."""


class ZeroShotRateLimited(ValueError):
    """A user created too many new names in the last hour (HTTP 429); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _key(name: str) -> str:
    return name.strip().lower()


class ZeroShotRegistry:
    """Thread-safe name -> zero-shot id map stored in a JSON file, with reservations for running requests."""

    def __init__(self, path: str | Path | None, names_per_hour: int = 20) -> None:
        self._path = Path(path) if path else None
        self.names_per_hour = names_per_hour
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._reserved: dict[str, tuple[int, int]] = {}  # name -> (id, requests holding it)
        self._created: dict[str, deque[float]] = {}  # user -> times of names created (last hour)
        if self._path and self._path.exists():
            with open(self._path) as f:
                self._ids = {str(k): int(v) for k, v in json.load(f).items()}

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ids)

    def lookup(self, name: str) -> int | None:
        with self._lock:
            return self._ids.get(_key(name))

    def _free_id(self) -> int:
        taken = set(self._ids.values()) | {i for i, _ in self._reserved.values()}
        for i in range(ZERO_SHOT_FIRST, ZERO_SHOT_LAST + 1):
            if i not in taken:
                return i
        raise ZeroShotNamesExhausted(
            f"all zero-shot ids {ZERO_SHOT_FIRST}..{ZERO_SHOT_LAST} are taken: click with an existing name or id"
        )

    def peek(self, name: str) -> int:
        """The id ``name`` has, or would get if created now (nothing is reserved or written)."""
        key = _key(name)
        with self._lock:
            if key in self._ids:
                return self._ids[key]
            if key in self._reserved:
                return self._reserved[key][0]
            return self._free_id()

    def _check_rate(self, user: str) -> None:
        now = time.monotonic()
        times = self._created.setdefault(user, deque())
        while times and now - times[0] > HOUR_S:
            times.popleft()
        if len(times) >= self.names_per_hour:
            retry = int(HOUR_S - (now - times[0])) + 1
            raise ZeroShotRateLimited(
                f"{user} created {len(times)} new zero-shot names in the last hour (at most {self.names_per_hour}): "
                f"reuse a name, or try again in {retry} s",
                retry,
            )

    @contextmanager
    def reserve(self, name: str, user: str) -> Iterator[int]:
        """Hold an id for a new ``name`` while a request runs; register it only if the request succeeds.

        Raises:
            ZeroShotNamesExhausted: no id is free.
            ZeroShotRateLimited: ``user`` created ``names_per_hour`` names in the last hour.
        """
        key = _key(name)
        with self._lock:
            if key in self._ids:
                existing: int | None = self._ids[key]
            else:
                existing = None
                if key in self._reserved:
                    class_id, holders = self._reserved[key]
                else:
                    self._check_rate(user)
                    class_id, holders = self._free_id(), 0
                self._reserved[key] = (class_id, holders + 1)
        if existing is not None:
            yield existing
            return
        try:
            yield class_id
        except BaseException:
            self._release(key)
            raise
        self._commit(key, class_id, user)

    def _release(self, key: str) -> None:
        with self._lock:
            class_id, holders = self._reserved[key]
            if holders > 1:
                self._reserved[key] = (class_id, holders - 1)
            else:
                del self._reserved[key]

    def _commit(self, key: str, class_id: int, user: str) -> None:
        with self._lock:
            if key not in self._ids:
                self._ids[key] = class_id
                self._created.setdefault(user, deque()).append(time.monotonic())
                self._save()
                logger.info("Zero-shot label %r mapped to id %d (created by %s)", key, class_id, user)
        self._release(key)

    def assign(self, name: str) -> int:
        """The id of ``name``, registered at once (for tools and tests; requests use :meth:`reserve`)."""
        key = _key(name)
        with self._lock:
            if key not in self._ids:
                self._ids[key] = self._free_id()
                self._save()
                logger.info("Zero-shot label %r mapped to id %d", key, self._ids[key])
            return self._ids[key]

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self._path, dict(sorted(self._ids.items())))
