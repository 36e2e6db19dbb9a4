"""One state store shared by every server process (issue #25: replicas behind a load balancer).

What lives here: zero-shot names and their ids (:mod:`lib.zero_shot`) and leases, such as the one
that lets a single training round run at a time across replicas (:mod:`.lease`). SQLite by
default (``state.db`` in the state folder); PostgreSQL when ``--conf state`` is a
``postgresql://`` URL.
"""

from __future__ import annotations

from pathlib import Path

from .store import LeaseInfo, StateStore, Tx, process_holder

__all__ = ["STATE_DB", "LeaseInfo", "StateStore", "Tx", "open_state_store", "process_holder"]

STATE_DB = "state.db"  # in the state folder (lib.settings.state_dir), beside users.json


def open_state_store(url: str, state_folder: str | Path) -> StateStore:
    """The store ``--conf state`` names: empty for SQLite in ``state_folder``, else a PostgreSQL URL."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    if url:
        raise ValueError(f"--conf state must be empty (SQLite) or a postgresql:// URL, got {url!r}")
    from .sqlite import SQLiteStore

    return SQLiteStore(Path(state_folder) / STATE_DB)
