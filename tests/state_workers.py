"""What the state tests' spawned processes run: importable without torch, so that each starts in a second."""

from __future__ import annotations

import time
from typing import Any

from lib.state.lease import holding
from lib.zero_shot import ZeroShotRegistry

from .postgres import open_backend

__all__ = ["create_name", "hold_forever", "open_at_once"]


def open_at_once(url: str, start: Any) -> int:
    """Open (and migrate) the store at the same moment as the other processes; the schema version."""
    start.wait(timeout=60)
    return open_backend(url).migrate()


def hold_forever(url: str, held: Any) -> None:
    """Hold lease ``job`` (ttl 2 s, renewed) until killed."""
    with holding(open_backend(url), "job", ttl_s=2.0, renew_s=0.3):
        held.set()
        time.sleep(600)


def create_name(url: str, name: str, start: Any, inside: Any) -> int:
    """Create zero-shot ``name`` as a request does, all processes inside their reservation at once."""
    registry = ZeroShotRegistry(open_backend(url))
    start.wait(timeout=60)
    with registry.reserve(name, "alice") as class_id:
        inside.wait(timeout=60)
    return class_id
