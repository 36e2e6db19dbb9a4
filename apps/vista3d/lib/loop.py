"""The continual-learning loop: submitted labels schedule point-branch fine-tuning in the background.

Every saved label calls :meth:`LearningLoop.on_label_saved`. Once ``trigger`` final labels are
pending (saved, or saved again, since any round last saw them), a timer of ``debounce_s`` starts;
each further save restarts it, so a burst of submits makes one round. When it fires, the round is
started through MONAI Label's background training (a subprocess, one at a time); if one is still
running, the loop checks again a ``debounce_s`` later. Pending labels are computed from the
datastore and the model store's manifest, so nothing is lost across restarts or a killed round.

With several replicas the loop runs on one of them, and most labels are saved through the others:
it also counts pending labels every ``poll_s`` (a poll starts the debounce timer only when none is
running, so it never postpones a round the way a save does).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from monailabel.interfaces.datastore import Datastore

from .model_store import ModelStore
from .trainers.labelled import final_labels

__all__ = ["LearningLoop", "pending_labels"]

logger = logging.getLogger(__name__)


def pending_labels(datastore: Datastore, store: ModelStore) -> list[str]:
    """Stamps of final labels that no round has seen yet."""
    seen = set(store.manifest().get("seen", []))
    return [f.stamp for f in final_labels(datastore) if f.stamp not in seen]


class LearningLoop:
    """Debounced trigger of background training (see the module docstring)."""

    def __init__(
        self,
        trigger: int,
        debounce_s: float,
        pending: Callable[[], list[str]],
        start_training: Callable[[], bool],
        poll_s: float = 0.0,
    ) -> None:
        self.trigger = trigger
        self.debounce_s = debounce_s
        self._pending = pending
        self._start = start_training
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._last_count = -1
        if poll_s > 0 and self.enabled:
            threading.Thread(target=self._poll, args=(poll_s,), name="learning-loop-poll", daemon=True).start()

    @property
    def enabled(self) -> bool:
        return self.trigger > 0

    def on_label_saved(self) -> None:
        """(Re)start the debounce timer when enough final labels are pending."""
        if self.enabled:
            self._check(restart=True)

    def _check(self, restart: bool) -> None:
        n = len(self._pending())
        if n != self._last_count or restart:
            self._last_count = n
            if n < self.trigger:
                logger.info("Learning loop: %d of %d final labels pending before the next fine-tune", n, self.trigger)
        if n < self.trigger:
            return
        with self._lock:
            waiting = self._timer is not None and self._timer.is_alive()
        if restart or not waiting:
            self._schedule(self.debounce_s)

    def _poll(self, every_s: float) -> None:
        while not self._stopped.wait(every_s):
            try:
                self._check(restart=False)
            except Exception:  # a datastore hiccup must not end the loop's polling for the server's life
                logger.exception("Learning loop: counting pending labels failed; trying again in %.0f s", every_s)

    def _schedule(self, delay: float) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(delay, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        pending = self._pending()
        if len(pending) < self.trigger:
            return
        if self._start():
            logger.info("Learning loop: started a point fine-tune on %d new final labels", len(pending))
        else:
            logger.info("Learning loop: a training is running; checking again in %.0f s", self.debounce_s)
            self._schedule(self.debounce_s)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
