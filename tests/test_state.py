"""The shared state store on both backends: migrations at open, leases, the training lease."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lib.labels import load_label_dictionary
from lib.model_store import ModelStore
from lib.settings import Settings
from lib.state import open_state_store, process_holder
from lib.state.lease import TRAINING, LeaseHeld, check_free
from lib.state.migrations import MIGRATIONS
from lib.trainers.tasks import PointTrainTask

from .postgres import open_backend
from .state_workers import hold_forever, open_at_once

SPAWN = mp.get_context("spawn")


def test_migrations_are_applied_once_and_reopening_changes_nothing(state_url: str) -> None:
    store = open_backend(state_url)
    latest = MIGRATIONS[-1][0]
    assert store.migrate() == latest, "a second migrate finds nothing to do"
    store.acquire("x", "a", 30)
    again = open_backend(state_url)  # a second opener (another replica) on the migrated store
    with again.transaction(write=False) as tx:
        versions = tx.execute("SELECT version FROM schema_version ORDER BY version")
    assert [v for (v,) in versions] == [m[0] for m in MIGRATIONS]
    assert again.holder("x") is not None and again.holder("x").holder == "a", "reopening kept the data"  # type: ignore[union-attr]


def test_concurrent_openers_migrate_safely(state_url: str) -> None:
    with SPAWN.Manager() as manager:
        start = manager.Barrier(3)
        with SPAWN.Pool(3) as pool:
            versions = pool.starmap(open_at_once, [(state_url, start)] * 3)
    assert versions == [MIGRATIONS[-1][0]] * 3


def test_a_lease_is_exclusive_until_released_or_expired(state_url: str) -> None:
    store = open_backend(state_url)
    assert store.acquire("job", "a:1", ttl_s=30)
    assert not store.acquire("job", "b:2", ttl_s=30), "held by a:1"
    assert store.acquire("job", "a:1", ttl_s=30), "the holder may take it again"
    info = store.holder("job")
    assert info is not None and info.holder == "a:1" and info.expires > store.now()
    assert not store.renew("job", "b:2", 30)
    store.release("job", "b:2")  # not b's: nothing happens
    assert store.holder("job") is not None
    store.release("job", "a:1")
    assert store.holder("job") is None and store.acquire("job", "b:2", ttl_s=0.5)
    time.sleep(0.7)
    assert store.holder("job") is None, "expired"
    assert store.acquire("job", "c:3", ttl_s=30) and store.holder("job").holder == "c:3"  # type: ignore[union-attr]


def test_a_killed_holders_lease_is_taken_over(state_url: str) -> None:
    store = open_backend(state_url)
    held = SPAWN.Event()
    child = SPAWN.Process(target=hold_forever, args=(state_url, held), daemon=True)
    child.start()
    try:
        assert held.wait(timeout=60)
        time.sleep(2.5)  # longer than the ttl: only the renewals keep it
        info = store.holder("job")
        assert info is not None and info.holder.endswith(f":{child.pid}")
        assert not store.acquire("job", process_holder(), ttl_s=30)
    finally:
        child.kill()
        child.join()
    # On this machine (same hostname and PID namespace) a gone holder frees its lease at once.
    assert store.holder("job") is None and store.acquire("job", process_holder(), ttl_s=30)
    assert store.holder("job").holder == process_holder()  # type: ignore[union-attr]


def test_a_gone_pid_in_another_namespace_waits_for_the_expiry(state_url: str) -> None:
    """A pid of another container (its own PID namespace, same hostname) says nothing about its process here."""
    store = open_backend(state_url)
    gone = f"{socket.gethostname()}:{2**22 + 1}"  # above Linux's pid_max: no such process here
    assert store.acquire("job", gone, ttl_s=0.8)
    with store.transaction() as tx:
        tx.execute("UPDATE leases SET holder_ns = ? WHERE name = ?", ("pid:[1]", "job"))
    assert not store.acquire("job", process_holder(), ttl_s=30) and store.holder("job") is not None
    time.sleep(1.0)
    assert store.acquire("job", process_holder(), ttl_s=30), "taken over after the expiry"


class _Round(PointTrainTask):
    """A point task whose round only notes who held the training lease while it ran."""

    def _round(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        assert self.state is not None
        info = self.state.holder(TRAINING)
        self.ran_holding = info.holder if info else None
        if request.get("fail"):
            raise RuntimeError("the round failed")
        return {"kind": self.kind, "promoted": 2}


def _task(tmp_path: Path, url: str) -> _Round:
    model = SimpleNamespace(preset="small")
    store = ModelStore(tmp_path / "models")
    return _Round(Settings(), model, store, load_label_dictionary(), None, state=open_backend(url))  # type: ignore[arg-type]


def test_the_training_lease_refuses_a_second_round(tmp_path: Path, state_url: str) -> None:
    task = _task(tmp_path, state_url)
    other = open_backend(state_url)
    assert other.acquire(TRAINING, "replica-2:4242", ttl_s=30)  # a round on another replica
    with pytest.raises(LeaseHeld, match="replica-2:4242"):
        check_free(task.state)  # type: ignore[arg-type]  (what the loop and POST /train check: 409)
    result = task({}, None)
    assert result["promoted"] is None and result["holder"] == "replica-2:4242"
    assert "replica-2:4242" in result["refused"] and not hasattr(task, "ran_holding"), "nothing ran"
    other.release(TRAINING, "replica-2:4242")
    assert task({}, None)["promoted"] == 2 and task.ran_holding == process_holder()
    assert other.holder(TRAINING) is None, "released at the end"
    with pytest.raises(RuntimeError, match="the round failed"):
        task({"fail": True}, None)
    assert other.holder(TRAINING) is None, "released on an exception too"


def test_open_state_store_defaults_to_sqlite_in_the_state_folder(tmp_path: Path) -> None:
    store = open_state_store("", tmp_path)
    assert (tmp_path / "state.db").exists() and store.description.startswith("SQLite")
    with pytest.raises(ValueError, match="postgresql://"):
        open_state_store("mysql://x", tmp_path)
