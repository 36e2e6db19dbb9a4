"""One state store shared by every server process (issue #25: replicas behind a load balancer).

What lives here: zero-shot names and their ids (:mod:`lib.zero_shot`) and leases, such as the one
that lets a single training round run at a time across replicas (:mod:`.lease`). SQLite by
default (``state.db`` in the state folder); PostgreSQL when ``--conf state`` is a
``postgresql://`` URL.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..settings import redact_url
from .store import LeaseInfo, StateStore, Tx, process_holder

__all__ = ["STATE_DB", "LeaseInfo", "StateStore", "Tx", "open_state_store", "process_holder"]

logger = logging.getLogger(__name__)

STATE_DB = "state.db"  # in the state folder (lib.settings.state_dir), beside users.json


def open_state_store(url: str, state_folder: str | Path) -> StateStore:
    """The store ``--conf state`` names: empty for SQLite in ``state_folder``, else a PostgreSQL URL."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        logger.info("State store: PostgreSQL at %s", redact_url(url))
        return PostgresStore(url)
    if url:
        raise ValueError(f"--conf state must be empty (SQLite) or a postgresql:// URL, got {redact_url(url)!r}")
    from .sqlite import SQLiteStore

    logger.info("State store: SQLite in %s", Path(state_folder) / STATE_DB)
    return SQLiteStore(Path(state_folder) / STATE_DB)
