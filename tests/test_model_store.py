"""The model store's manifest shared by several processes (server replicas and their rounds).

Every change of the manifest is a read, a change and a rename; without the store's lock, two
processes changing it at once each wrote their own copy and one change was lost.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from lib.model_store import KEEP_ROUNDS, ModelStore

ROUNDS_EACH = 20


def _record_rounds(root: str, who: str, start: Any) -> None:
    store = ModelStore(root)
    start.wait()
    for i in range(ROUNDS_EACH):
        store.record_round({"who": who, "i": i}, seen=[f"{who}-{i}"])


@pytest.mark.timeout(120)
def test_processes_recording_rounds_at_once_lose_none(tmp_path: Path) -> None:
    assert 2 * ROUNDS_EACH <= KEEP_ROUNDS
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    writers = [ctx.Process(target=_record_rounds, args=(str(tmp_path), who, start)) for who in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(90)
        assert w.exitcode == 0

    manifest = ModelStore(tmp_path).manifest()
    assert sorted((r["who"], r["i"]) for r in manifest["rounds"]) == [
        (who, i) for who in ("a", "b") for i in range(ROUNDS_EACH)
    ]
    assert len(manifest["seen"]) == 2 * ROUNDS_EACH
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_refused_rollback_changes_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.record_round({"why": "first"}, seen=[])
    before = store.manifest_path.read_bytes(), store.stamp()
    with pytest.raises(ValueError, match="no version older than v0"):
        store.rollback()
    assert (store.manifest_path.read_bytes(), store.stamp()) == before
