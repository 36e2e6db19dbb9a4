"""PostgreSQL backend (``--conf state postgresql://user@host:port/db``): replicas on several machines.

psycopg 3 is imported when this backend is opened, so the SQLite default needs neither the driver
nor a database server. Every write transaction takes one transaction-scoped advisory lock first
(``pg_advisory_xact_lock``), which serializes the store's read-then-write decisions across every
replica exactly as SQLite's ``BEGIN IMMEDIATE`` does on one machine; the lock ends with the
transaction, also when a client dies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..settings import redact_url
from .store import StateStore, Tx

__all__ = ["ADVISORY_LOCK_KEY", "PostgresStore"]

ADVISORY_LOCK_KEY = 0x5649535441  # "VISTA": the one advisory lock this store uses
CONNECT_TIMEOUT_S = 10


class _PostgresTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._conn.execute(sql.replace("?", "%s"), tuple(params))
        return list(cursor.fetchall()) if cursor.description is not None else []


class PostgresStore(StateStore):
    """The store in a PostgreSQL database; the URL is libpq's (``postgresql://user@host:port/db``)."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: F401  (lazily: the SQLite default never needs it)
        except ImportError as e:
            raise RuntimeError("--conf state postgresql://... needs psycopg: pip install 'psycopg[binary]'") from e
        self.url = url
        self.description = f"PostgreSQL {redact_url(url)}"
        self._lock = threading.RLock()
        self._conn = self._connect()
        self.migrate()

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)

    def _connection(self) -> Any:
        """The connection, opened again when the server closed it (a restart, an idle timeout)."""
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                if write:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
                yield _PostgresTx(conn)

    def now(self) -> float:
        with self._lock:
            row = self._connection().execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
        return float(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
