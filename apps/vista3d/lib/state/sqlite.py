"""SQLite backend: the default, a ``state.db`` file in the state folder, no server to run.

WAL lets readers go on while one process writes; every write transaction starts with ``BEGIN
IMMEDIATE`` (the database's write lock, waited for up to the busy timeout), so processes on one
machine take turns. SQLite over a network filesystem is not safe: replicas on several machines
need PostgreSQL (:mod:`.postgres`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .store import StateStore, Tx

__all__ = ["SQLiteStore"]

BUSY_TIMEOUT_S = 30.0


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())


class SQLiteStore(StateStore):
    """The store in one SQLite file (``":memory:"``: private to this object, for tests and tools)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.description = f"SQLite {self.path}"
        # One connection per store, used by one thread at a time (the lock); autocommit mode, so
        # that transactions are exactly the BEGIN ... COMMIT below.
        self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _while_locked(self._open)

    def _open(self) -> None:
        """WAL, then migrations. Several processes opening a new file at once can be answered
        "database is locked" without the busy timeout (SQLite does so where waiting could deadlock,
        as when switching to WAL), so the caller retries."""
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
        self.migrate()

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _SQLiteTx(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT (disk full) leaves it open: never reuse it so
                    self._conn.execute("ROLLBACK")
                raise

    def now(self) -> float:
        return time.time()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _while_locked(step: Callable[[], None]) -> None:
    """Run ``step`` again while SQLite answers "locked" without waiting, for up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
