"""Everything ``/dashboard/data`` answers, joined from the server's own records and scoped to the viewer.

Reviewers and admins see the whole team's work; anybody else sees their own work and the team's
totals, and other users' names in the queues read "another user". The learning figures are the
model's, the same for everybody (``/info`` shows them to every signed-in user).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from monailabel.interfaces.datastore import Datastore

from .learning import learning_figures, round_progress
from .next_up import active_learning_queue, latencies
from .work import submissions, work_figures

__all__ = ["ServerState", "Viewer", "dashboard_data"]


@dataclass(frozen=True)
class Viewer:
    """Who looks at the dashboard and what they may see.

    Attributes:
        name: the signed-in user (``anonymous`` with sign-in off).
        role: their role's name, None with sign-in off.
        sees_everyone: reviewers and admins (and everybody with sign-in off) see the team's work.
        may_rollback: admins get the rollback button.
    """

    name: str
    role: str | None
    sees_everyone: bool
    may_rollback: bool

    @property
    def scope(self) -> str | None:
        """Whose work is shown: None for everybody's, else the viewer's name."""
        return None if self.sees_everyone else self.name


@dataclass(frozen=True)
class ServerState:
    """What the dashboard reads besides the datastore, taken at one moment.

    Attributes:
        manifest: the model store's manifest.
        loop: the learning loop: ``trigger`` and ``debounce_s`` (its settings), ``pending_labels`` now.
        train_task: MONAI Label's running training task, or None.
        queue: the scheduler's status as this viewer may see it.
        recent_jobs: the scheduler's recently finished requests.
    """

    manifest: Mapping[str, Any]
    loop: Mapping[str, int | float]
    train_task: Mapping[str, Any] | None
    queue: Mapping[str, Any]
    recent_jobs: list[dict[str, Any]]


def dashboard_data(viewer: Viewer, datastore: Datastore, state: ServerState) -> dict[str, Any]:
    """The three sections (learning, work, next) for ``viewer``."""
    images = datastore.list_images()
    submitted = submissions(datastore, images)
    labelled = {s.image for s in submitted}
    unlabelled = [i for i in images if i not in labelled]
    return {
        "generated": datetime.now().isoformat(timespec="seconds"),
        "viewer": {"name": viewer.name, "role": viewer.role, "sees": "everyone" if viewer.sees_everyone else "own"},
        "learning": {
            **learning_figures(state.manifest, round_progress(state.train_task)),
            "loop": dict(state.loop),
            "may_rollback": viewer.may_rollback,
        },
        "work": work_figures(submitted, len(images), viewer.scope),
        "next": {
            "active_learning": active_learning_queue(datastore, unlabelled, viewer.scope),
            "queue": dict(state.queue),
            "latencies": latencies(state.recent_jobs),
        },
    }
