"""Names of structures outside VISTA3D's classes, each mapped to a stable zero-shot id (133..254).

The mapping is persisted (atomically) so that a name keeps its id across restarts; the trainers use
the same ids for the labels a team submits.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from .atomic import write_json
from .labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST

__all__ = ["ZeroShotRegistry"]

logger = logging.getLogger(__name__)


class ZeroShotRegistry:
    """Thread-safe name -> zero-shot id map stored in a JSON file."""

    def __init__(self, path: str | Path | None) -> None:
        self._path = Path(path) if path else None
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        if self._path and self._path.exists():
            with open(self._path) as f:
                self._ids = {str(k): int(v) for k, v in json.load(f).items()}

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ids)

    def lookup(self, name: str) -> int | None:
        with self._lock:
            return self._ids.get(name.strip().lower())

    def assign(self, name: str) -> int:
        """The id of ``name``, assigning the lowest free zero-shot id the first time it is seen."""
        key = name.strip().lower()
        with self._lock:
            if key in self._ids:
                return self._ids[key]
            used = set(self._ids.values())
            free = [i for i in range(ZERO_SHOT_FIRST, ZERO_SHOT_LAST + 1) if i not in used]
            if not free:
                raise ValueError(f"all zero-shot ids {ZERO_SHOT_FIRST}..{ZERO_SHOT_LAST} are taken")
            self._ids[key] = free[0]
            self._save()
            logger.info("Zero-shot label %r mapped to id %d", key, free[0])
            return free[0]

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self._path, dict(sorted(self._ids.items())))
