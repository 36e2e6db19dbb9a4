"""The store's schema as an ordered list of migrations, applied at open inside one locked transaction.

A migration is never edited once released: a change is a new entry at the end. The SQL is what
SQLite and PostgreSQL both accept (``DOUBLE PRECISION`` epoch seconds, ``INTEGER`` flags).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Tx

__all__ = ["MIGRATIONS", "apply_migrations"]

logger = logging.getLogger(__name__)

# (version, what it adds, statements), in order.
MIGRATIONS: tuple[tuple[int, str, Sequence[str]], ...] = (
    (
        1,
        "leases, zero-shot ids (registered names and running requests' reservations), import markers",
        (
            "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
            " since DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL)",
            # One row per id: a registered name (registered = 1) or a running request's reservation
            # (registered = 0, with the holder and an expiry, so a killed process's reservation frees itself).
            "CREATE TABLE zero_shot_ids (class_id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
            " registered INTEGER NOT NULL, holder TEXT, holders INTEGER NOT NULL DEFAULT 0,"
            " expires DOUBLE PRECISION, created_by TEXT, created_at DOUBLE PRECISION)",
            "CREATE INDEX zero_shot_ids_created ON zero_shot_ids (created_by, created_at)",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ),
    ),
    (
        2,
        "the lease holder's PID namespace, so that a holder seen dead on this machine frees its lease at once",
        ("ALTER TABLE leases ADD COLUMN holder_ns TEXT",),
    ),
)


def apply_migrations(tx: Tx) -> int:
    """Apply the migrations ``tx``'s database lacks (the caller holds the store's write lock); the version after."""
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION)")
    rows = tx.execute("SELECT MAX(version) FROM schema_version")
    current = int(rows[0][0]) if rows and rows[0][0] is not None else 0
    for version, what, statements in MIGRATIONS:
        if version <= current:
            continue
        for statement in statements:
            tx.execute(statement)
        tx.execute("INSERT INTO schema_version (version, applied) VALUES (?, 0)", (version,))
        logger.info("State store: migration %d applied (%s)", version, what)
        current = version
    return current
