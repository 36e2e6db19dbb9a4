"""Names of structures outside VISTA3D's classes, each mapped to a stable zero-shot id (133..254).

The mapping lives in the state store (:mod:`lib.state`) that every server replica shares, so that a
name has one id across processes and restarts; the trainers use the same ids for the labels a team
submits. There are only 122 ids, so a request creating a new name only *reserves* an id while it
runs: the name is registered once the request has succeeded, and a failed request gives its id
back. The database decides: one row per id (``UNIQUE(name)``, id as primary key), written inside the
store's write lock, so two processes creating one new name at once get one id and two new names
never share one. A reservation row carries its holder and an expiry, so a killed process's
reservation frees itself.

Each user may create ``names_per_hour`` new names per hour, counted from the store, so the cap holds
across replicas and restarts. The JSON file of earlier versions (``zero_shot_labels.json``) is
read once, on the first open of a store that has not imported it, keeping its ids; it is never
written again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST
from .state import STATE_DB, StateStore, Tx, process_holder
from .state.sqlite import SQLiteStore

__all__ = ["RESERVATION_TTL_S", "ZeroShotNamesExhausted", "ZeroShotRateLimited", "ZeroShotRegistry"]

logger = logging.getLogger(__name__)

HOUR_S = 3600.0
RESERVATION_TTL_S = 1800.0  # as the server's run_limit_s default: longer than any request runs
LEGACY_IMPORTED = "zero_shot_json_imported"


class ZeroShotNamesExhausted(ValueError):
    """Every zero-shot id is taken (HTTP 409): reuse a name or an id."""


class ZeroShotRateLimited(ValueError):
    """A user created too many new names in the last hour (HTTP 429); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _key(name: str) -> str:
    return name.strip().lower()


def _exhausted() -> ZeroShotNamesExhausted:
    return ZeroShotNamesExhausted(
        f"all zero-shot ids {ZERO_SHOT_FIRST}..{ZERO_SHOT_LAST} are taken: click with an existing name or id"
    )


class ZeroShotRegistry:
    """Name -> zero-shot id map in the shared state store, with reservations for running requests.

    ``store`` is the shared store; a path is the legacy JSON file, with a SQLite store (``state.db``)
    beside it (tools and tests); None is a private in-memory store.
    """

    def __init__(
        self, store: StateStore | str | Path | None, names_per_hour: int = 20, legacy_json: str | Path | None = None
    ) -> None:
        if store is None:
            store = SQLiteStore(":memory:")
        elif not isinstance(store, StateStore):
            legacy_json = Path(store)
            store = SQLiteStore(legacy_json.parent / STATE_DB)
        self.store = store
        self.names_per_hour = names_per_hour
        self._holder = process_holder()
        if legacy_json is not None:
            self._import_legacy(Path(legacy_json))

    def as_dict(self) -> dict[str, int]:
        with self.store.transaction(write=False) as tx:
            rows = tx.execute("SELECT name, class_id FROM zero_shot_ids WHERE registered = 1 ORDER BY name")
        return {str(name): int(i) for name, i in rows}

    def lookup(self, name: str) -> int | None:
        with self.store.transaction(write=False) as tx:
            rows = tx.execute("SELECT class_id FROM zero_shot_ids WHERE name = ? AND registered = 1", (_key(name),))
        return int(rows[0][0]) if rows else None

    def peek(self, name: str) -> int:
        """The id ``name`` has, or would get if created now (nothing is reserved or written)."""
        now = self.store.now()
        with self.store.transaction(write=False) as tx:
            rows = tx.execute(
                "SELECT class_id FROM zero_shot_ids WHERE name = ? AND (registered = 1 OR expires > ?)",
                (_key(name), now),
            )
            return int(rows[0][0]) if rows else _free_id(tx, now)

    def _check_rate(self, tx: Tx, user: str, now: float) -> None:
        rows = tx.execute(
            "SELECT COUNT(*), MIN(created_at) FROM zero_shot_ids"
            " WHERE registered = 1 AND created_by = ? AND created_at > ?",
            (user, now - HOUR_S),
        )
        count, first = int(rows[0][0]), rows[0][1]
        if count >= self.names_per_hour:
            retry = int(HOUR_S - (now - float(first))) + 1
            raise ZeroShotRateLimited(
                f"{user} created {count} new zero-shot names in the last hour (at most {self.names_per_hour}): "
                f"reuse a name, or try again in {retry} s",
                retry,
            )

    @contextmanager
    def reserve(self, name: str, user: str) -> Iterator[int]:
        """Hold an id for a new ``name`` while a request runs; register it only if the request succeeds.

        Raises:
            ZeroShotNamesExhausted: no id is free.
            ZeroShotRateLimited: ``user`` created ``names_per_hour`` names in the last hour.
        """
        key, now = _key(name), self.store.now()
        with self.store.transaction() as tx:
            _purge_expired(tx, now)
            rows = tx.execute("SELECT class_id, registered FROM zero_shot_ids WHERE name = ?", (key,))
            if rows and rows[0][1] == 1:
                existing: int | None = int(rows[0][0])
            else:
                existing = None
                if rows:
                    class_id = int(rows[0][0])
                    tx.execute(
                        "UPDATE zero_shot_ids SET holders = holders + 1, holder = ?, expires = ? WHERE name = ?",
                        (self._holder, now + RESERVATION_TTL_S, key),
                    )
                else:
                    self._check_rate(tx, user, now)
                    class_id = _free_id(tx, now)
                    tx.execute(
                        "INSERT INTO zero_shot_ids (class_id, name, registered, holder, holders, expires)"
                        " VALUES (?, ?, 0, ?, 1, ?)",
                        (class_id, key, self._holder, now + RESERVATION_TTL_S),
                    )
        if existing is not None:
            yield existing
            return
        try:
            yield class_id
        except BaseException:
            self._release(key)
            raise
        self._commit(key, class_id, user)

    def _release(self, key: str) -> None:
        with self.store.transaction() as tx:
            tx.execute("UPDATE zero_shot_ids SET holders = holders - 1 WHERE name = ? AND registered = 0", (key,))
            tx.execute("DELETE FROM zero_shot_ids WHERE name = ? AND registered = 0 AND holders <= 0", (key,))

    def _commit(self, key: str, class_id: int, user: str) -> None:
        now = self.store.now()
        with self.store.transaction() as tx:
            rows = tx.execute("SELECT class_id, registered FROM zero_shot_ids WHERE name = ?", (key,))
            if rows and rows[0][1] == 1:
                return  # another request of the same name registered it first
            if not rows:  # the reservation expired and was purged: register it again if its id is still free
                if tx.execute("SELECT 1 FROM zero_shot_ids WHERE class_id = ?", (class_id,)):
                    logger.error(
                        "Zero-shot label %r: reservation of id %d expired and the id went elsewhere", key, class_id
                    )
                    return
                tx.execute("INSERT INTO zero_shot_ids (class_id, name, registered) VALUES (?, ?, 0)", (class_id, key))
            tx.execute(
                "UPDATE zero_shot_ids SET registered = 1, holder = NULL, holders = 0, expires = NULL,"
                " created_by = ?, created_at = ? WHERE name = ?",
                (user, now, key),
            )
        logger.info("Zero-shot label %r mapped to id %d (created by %s)", key, class_id, user)

    def assign(self, name: str) -> int:
        """The id of ``name``, registered at once (for tools and tests; requests use :meth:`reserve`)."""
        key, now = _key(name), self.store.now()
        with self.store.transaction() as tx:
            _purge_expired(tx, now)
            rows = tx.execute("SELECT class_id, registered FROM zero_shot_ids WHERE name = ?", (key,))
            if rows and rows[0][1] == 1:
                return int(rows[0][0])
            class_id = int(rows[0][0]) if rows else _free_id(tx, now)
            if not rows:
                tx.execute("INSERT INTO zero_shot_ids (class_id, name, registered) VALUES (?, ?, 0)", (class_id, key))
            tx.execute(
                "UPDATE zero_shot_ids SET registered = 1, holders = 0, expires = NULL, created_at = ? WHERE name = ?",
                (now, key),
            )
        logger.info("Zero-shot label %r mapped to id %d", key, class_id)
        return class_id

    def _import_legacy(self, path: Path) -> None:
        """Copy the names of an earlier version's JSON file into the store, ids kept, once per store."""
        with self.store.transaction() as tx:
            if tx.execute("SELECT 1 FROM meta WHERE key = ?", (LEGACY_IMPORTED,)) or not path.exists():
                return
            with open(path) as f:
                names = {_key(str(k)): int(v) for k, v in json.load(f).items()}
            for name, class_id in sorted(names.items()):
                taken = tx.execute("SELECT name FROM zero_shot_ids WHERE class_id = ? OR name = ?", (class_id, name))
                if taken:
                    logger.warning(
                        "Zero-shot names file %s: %r -> %d conflicts with the store; skipped", path, name, class_id
                    )
                    continue
                tx.execute("INSERT INTO zero_shot_ids (class_id, name, registered) VALUES (?, ?, 1)", (class_id, name))
            tx.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (LEGACY_IMPORTED, str(path)))
        logger.info("Zero-shot names: %d imported from %s into %s", len(names), path, self.store.description)


def _purge_expired(tx: Tx, now: float) -> None:
    """Drop reservations whose holder stopped renewing them (a killed process)."""
    tx.execute("DELETE FROM zero_shot_ids WHERE registered = 0 AND expires <= ?", (now,))


def _free_id(tx: Tx, now: float) -> int:
    """The lowest id neither registered nor held by a live reservation."""
    rows = tx.execute("SELECT class_id FROM zero_shot_ids WHERE registered = 1 OR expires > ?", (now,))
    taken = {int(r[0]) for r in rows}
    for i in range(ZERO_SHOT_FIRST, ZERO_SHOT_LAST + 1):
        if i not in taken:
            return i
    raise _exhausted()
