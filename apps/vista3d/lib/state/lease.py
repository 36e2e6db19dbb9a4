"""Holding a lease for the length of a piece of work, renewed in the background.

The training lease (:data:`TRAINING`) makes one training round at a time across every replica: a
round holds it for its whole run, a daemon thread renews it every ``renew_s`` seconds, and it is
released when the round ends, also on an exception. A process killed mid-round stops renewing: on
its own machine (same hostname and PID namespace) its lease is free as soon as the process is gone,
elsewhere ``ttl_s`` seconds later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .store import LeaseInfo, StateStore, process_holder

__all__ = ["RENEW_S", "TRAINING", "TTL_S", "LeaseHeld", "check_free", "holding"]

logger = logging.getLogger(__name__)

TRAINING = "training"
TTL_S = 30.0
RENEW_S = 10.0


class LeaseHeld(RuntimeError):
    """Another process holds the lease (HTTP 409); the message names it."""

    def __init__(self, info: LeaseInfo, now: float) -> None:
        super().__init__(f"the {info.name!r} lease is held by {info.describe(now)}; try again later")
        self.info = info


def check_free(store: StateStore, name: str = TRAINING) -> None:
    """Raise :class:`LeaseHeld` when somebody holds ``name`` (a check before starting work; the work
    itself still takes the lease, so two processes checking at once cannot both run)."""
    info = store.holder(name)
    if info is not None:
        raise LeaseHeld(info, store.now())


@contextmanager
def holding(
    store: StateStore, name: str = TRAINING, ttl_s: float = TTL_S, renew_s: float = RENEW_S, holder: str | None = None
) -> Iterator[str]:
    """Hold lease ``name`` while the block runs; yields the holder string.

    Raises:
        LeaseHeld: another holder has it (nothing has run).
    """
    who = holder or process_holder()
    if not store.acquire(name, who, ttl_s):
        info = store.holder(name)
        if info is None:  # released between the two calls: one more try
            if not store.acquire(name, who, ttl_s):
                raise RuntimeError(f"lease {name!r} changed hands twice while {who} tried to take it")
        else:
            raise LeaseHeld(info, store.now())
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(store, name, who, ttl_s, renew_s, stop), name=f"lease-{name}", daemon=True
    )
    renewer.start()
    logger.info("Lease %r taken by %s (ttl %.0f s, renewed every %.0f s)", name, who, ttl_s, renew_s)
    try:
        yield who
    finally:
        stop.set()
        renewer.join(timeout=renew_s + 5)
        store.release(name, who)
        logger.info("Lease %r released by %s", name, who)


def _renew(store: StateStore, name: str, holder: str, ttl_s: float, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            if not store.renew(name, holder, ttl_s):
                logger.error("Lease %r lost by %s: it expired and another holder took it", name, holder)
                return
        except Exception:  # a store hiccup: the lease lives ttl_s, the next renewal may succeed
            logger.exception("Renewing lease %r failed; retrying in %.0f s", name, every_s)
