"""The Next figures: the images uncertainty sampling hands out next, and the server's inference queue.

The order is :func:`lib.activelearning.uncertainty.ranked`, the one ``/activelearning/uncertainty``
uses; who an image was last handed to, and when, is what MONAI Label recorded in the image's info
(``strategy.uncertainty``). A viewer who may not see the team's work sees their own name and
"another user" for the rest, as ``/queue`` shows other users' requests without names.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from monailabel.interfaces.datastore import Datastore

from ..activelearning.uncertainty import COOLDOWN_S, UNCERTAINTY_KEY, ranked

__all__ = ["ANOTHER_USER", "STRATEGY", "active_learning_queue", "latencies"]

STRATEGY = "uncertainty"
ANOTHER_USER = "another user"
SHOWN = 10  # images of the queue shown


def _shown_name(name: str | None, viewer: str | None) -> str | None:
    if name is None or viewer is None or name == viewer:
        return name
    return ANOTHER_USER


def active_learning_queue(datastore: Datastore, unlabelled: list[str], viewer: str | None) -> list[dict[str, Any]]:
    """The next :data:`SHOWN` images uncertainty sampling hands out, with their score and last hand-out.

    ``viewer`` None shows every name; else names other than the viewer's read :data:`ANOTHER_USER`.
    """
    out = []
    for image_id in ranked(datastore, unlabelled, STRATEGY, COOLDOWN_S)[:SHOWN]:
        info = datastore.get_image_info(image_id) or {}
        score = info.get(UNCERTAINTY_KEY) or {}
        handed = (info.get("strategy") or {}).get(STRATEGY) or {}
        ts = handed.get("ts")
        out.append(
            {
                "image": image_id,
                "uncertainty": score.get("score"),
                "scored_with": score.get("version"),
                "handed_to": _shown_name(handed.get("client_id"), viewer) if ts else None,
                "handed_at": datetime.fromtimestamp(int(ts)).isoformat() if ts else None,
            }
        )
    return out


def latencies(recent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scheduler's recently finished requests (:meth:`lib.server.scheduler.Scheduler.recent`) for the page."""
    return [
        {
            "kind": job["kind"],
            "finished": datetime.fromtimestamp(job["finished"]).isoformat(timespec="seconds"),
            "seconds": round(float(job["seconds"]), 3),
            "waited_s": round(float(job["waited_s"]), 3),
        }
        for job in recent
    ]
