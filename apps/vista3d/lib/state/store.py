"""The state store's interface: serialized transactions, migrations at open, and leases.

Several server replicas (and their training processes) share one store, so anything two of them
could decide differently (a zero-shot id, who trains) is decided inside one of its transactions.
Backends (:mod:`.sqlite`, :mod:`.postgres`) only provide a connection and a lock; the SQL here and
in the users of the store is plain enough for both (``?`` placeholders, epoch seconds as floats).
"""

from __future__ import annotations

import logging
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from .migrations import apply_migrations

__all__ = ["LeaseInfo", "StateStore", "Tx", "dead_here", "pid_namespace", "process_holder"]

logger = logging.getLogger(__name__)


def process_holder() -> str:
    """``<hostname>:<pid>``: who holds a lease or a reservation, readable in a log or a 409."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_namespace() -> str:
    """This process's PID namespace (Linux), stored with a lease: a pid means this machine's process
    only within the same namespace (containers sharing a hostname have their own)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def dead_here(holder: str, namespace: str | None) -> bool:
    """True when ``holder`` is a process of this machine and PID namespace that no longer runs (killed):
    its lease need not wait for its expiry. Anything else (another machine) is left to the expiry."""
    host, _, pid = holder.rpartition(":")
    if not namespace or namespace != pid_namespace() or host != socket.gethostname() or not pid.isdigit():
        return False
    import psutil

    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Tx(Protocol):
    """An open transaction: statements with ``?`` placeholders; rows as tuples (empty for writes)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease, since when and until when (epoch seconds on the store's clock)."""

    name: str
    holder: str
    since: float
    expires: float

    def describe(self, now: float) -> str:
        return f"{self.holder} (for {now - self.since:.0f} s, expires in {self.expires - now:.0f} s)"


class StateStore(ABC):
    """One store shared by every server process: transactions, migrations and leases.

    ``transaction(write=True)`` holds the store's write lock from its start (SQLite ``BEGIN
    IMMEDIATE``, PostgreSQL ``pg_advisory_xact_lock``), so read-then-write decisions made inside it
    are never interleaved with another process's; unique constraints back them up.
    """

    description = ""

    @abstractmethod
    def transaction(self, write: bool = True) -> AbstractContextManager[Tx]:
        """A transaction, committed on a normal exit and rolled back on an exception."""

    @abstractmethod
    def now(self) -> float:
        """Epoch seconds on the store's clock (the database server's for PostgreSQL), so that
        replicas on machines whose clocks differ still agree on when a lease expires."""

    @abstractmethod
    def close(self) -> None: ...

    def migrate(self) -> int:
        """Apply missing migrations in one locked transaction; the schema version after."""
        with self.transaction() as tx:
            return apply_migrations(tx)

    def acquire(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take lease ``name`` for ``ttl_s`` seconds if it is free, expired, held by a process of this
        machine that is gone (:func:`dead_here`), or already ``holder``'s."""
        now, namespace = self.now(), pid_namespace()
        with self.transaction() as tx:
            rows = tx.execute("SELECT holder, expires, holder_ns FROM leases WHERE name = ?", (name,))
            if rows and rows[0][0] != holder and rows[0][1] > now and not dead_here(rows[0][0], rows[0][2]):
                return False
            if rows and rows[0][0] == holder:
                tx.execute("UPDATE leases SET expires = ? WHERE name = ?", (now + ttl_s, name))
            elif rows:
                tx.execute(
                    "UPDATE leases SET holder = ?, since = ?, expires = ?, holder_ns = ? WHERE name = ?",
                    (holder, now, now + ttl_s, namespace, name),
                )
                logger.warning("Lease %r taken over from %s (expired, or its process is gone)", name, rows[0][0])
            else:
                tx.execute(
                    "INSERT INTO leases (name, holder, since, expires, holder_ns) VALUES (?, ?, ?, ?, ?)",
                    (name, holder, now, now + ttl_s, namespace),
                )
        return True

    def renew(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend ``holder``'s lease; False when it is no longer theirs (expired and taken over)."""
        now = self.now()
        with self.transaction() as tx:
            rows = tx.execute("SELECT holder FROM leases WHERE name = ?", (name,))
            if not rows or rows[0][0] != holder:
                return False
            tx.execute("UPDATE leases SET expires = ? WHERE name = ?", (now + ttl_s, name))
        return True

    def release(self, name: str, holder: str) -> None:
        """Give the lease back (nothing happens when ``holder`` no longer holds it)."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def holder(self, name: str) -> LeaseInfo | None:
        """The lease's current holder, or None when it is free, expired or its holder is gone."""
        now = self.now()
        with self.transaction(write=False) as tx:
            rows = tx.execute("SELECT holder, since, expires, holder_ns FROM leases WHERE name = ?", (name,))
        if not rows or rows[0][2] <= now or dead_here(rows[0][0], rows[0][3]):
            return None
        return LeaseInfo(name, str(rows[0][0]), float(rows[0][1]), float(rows[0][2]))
