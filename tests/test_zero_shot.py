"""Zero-shot names: an id is reserved while a request runs and registered only when it succeeds; creation is capped;
ids are unique across processes on both state-store backends."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from lib.labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST
from lib.zero_shot import ZeroShotNamesExhausted, ZeroShotRateLimited, ZeroShotRegistry

from .postgres import open_backend
from .state_workers import create_name

SPAWN = mp.get_context("spawn")


def test_a_failed_request_gives_its_id_back(tmp_path: Path) -> None:
    registry = ZeroShotRegistry(tmp_path / "names.json")
    with pytest.raises(RuntimeError), registry.reserve("cyst", "alice") as class_id:
        assert class_id == ZERO_SHOT_FIRST
        assert registry.peek("other") == ZERO_SHOT_FIRST + 1, "a reserved id is not offered to another name"
        raise RuntimeError("the segmentation failed")
    assert registry.as_dict() == {} and not (tmp_path / "names.json").exists()
    assert registry.peek("other") == ZERO_SHOT_FIRST


def test_a_successful_request_registers_the_name_persistently(tmp_path: Path) -> None:
    registry = ZeroShotRegistry(tmp_path / "names.json")
    with registry.reserve("Sarcoma", "alice") as class_id:
        pass
    assert registry.as_dict() == {"sarcoma": class_id}
    assert ZeroShotRegistry(tmp_path / "names.json").as_dict() == {"sarcoma": class_id}
    with registry.reserve("sarcoma", "bob") as again:
        assert again == class_id


def test_two_requests_creating_one_name_share_its_id(tmp_path: Path) -> None:
    registry = ZeroShotRegistry(None)
    inside = threading.Barrier(2)
    ids: list[int] = []

    def create() -> None:
        with registry.reserve("cyst", "alice") as class_id:
            ids.append(class_id)
            inside.wait(timeout=10)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ids == [ZERO_SHOT_FIRST, ZERO_SHOT_FIRST] and registry.as_dict() == {"cyst": ZERO_SHOT_FIRST}


def test_new_names_per_user_and_hour_are_capped(tmp_path: Path) -> None:
    registry = ZeroShotRegistry(None, names_per_hour=2)
    for name in ("a", "b"):
        with registry.reserve(name, "alice"):
            pass
    with (
        pytest.raises(ZeroShotRateLimited, match="alice created 2 new zero-shot names") as err,
        registry.reserve("c", "alice"),
    ):
        pass
    assert 3500 < err.value.retry_after <= 3601
    with registry.reserve("a", "alice"):
        pass  # an existing name is not a new one
    with registry.reserve("c", "bob"):
        pass  # the cap is per user


def test_exhausted_ids_are_a_clear_error(tmp_path: Path) -> None:
    registry = ZeroShotRegistry(None)
    for n in range(ZERO_SHOT_LAST - ZERO_SHOT_FIRST + 1):
        registry.assign(f"name{n}")
    with pytest.raises(ZeroShotNamesExhausted, match="are taken"):
        registry.peek("one more")


def test_two_processes_creating_one_new_name_get_one_id_and_two_names_two(state_url: str) -> None:
    names = ["cyst", "cyst", "polyp", "polyp"]
    with SPAWN.Manager() as manager:
        start, inside = manager.Barrier(len(names)), manager.Barrier(len(names))
        with SPAWN.Pool(len(names)) as pool:
            ids = pool.starmap(create_name, [(state_url, name, start, inside) for name in names])
    assert ids[0] == ids[1] and ids[2] == ids[3], f"one name, one id across processes: {ids}"
    assert ids[0] != ids[2], f"two new names never share an id: {ids}"
    assert ZeroShotRegistry(open_backend(state_url)).as_dict() == {"cyst": ids[0], "polyp": ids[2]}


def test_a_killed_requests_reservation_frees_itself(state_url: str) -> None:
    store = open_backend(state_url)
    with store.transaction() as tx:  # what a process killed inside reserve() leaves: a live-looking row
        tx.execute(
            "INSERT INTO zero_shot_ids (class_id, name, registered, holder, holders, expires)"
            " VALUES (?, ?, 0, ?, 1, ?)",
            (ZERO_SHOT_FIRST, "cyst", "dead-host:1", store.now() + 0.5),
        )
    registry = ZeroShotRegistry(store)
    assert registry.peek("other") == ZERO_SHOT_FIRST + 1, "a live reservation's id is not offered"
    time.sleep(0.7)
    assert registry.peek("other") == ZERO_SHOT_FIRST, "an expired reservation's id is free again"
    with registry.reserve("other", "bob") as class_id:
        assert class_id == ZERO_SHOT_FIRST
    assert registry.as_dict() == {"other": ZERO_SHOT_FIRST}


def test_the_legacy_json_file_is_imported_once_with_its_ids(state_url: str, tmp_path: Path) -> None:
    legacy = tmp_path / "zero_shot_labels.json"
    legacy.write_text(json.dumps({"sarcoma": 140, "cyst": 133}))
    store = open_backend(state_url)
    registry = ZeroShotRegistry(store, legacy_json=legacy)
    assert registry.as_dict() == {"cyst": 133, "sarcoma": 140}
    assert registry.assign("polyp") == 134, "new names take the ids the file left free"
    legacy.write_text(json.dumps({"edited": 150}))
    assert ZeroShotRegistry(store, legacy_json=legacy).as_dict() == {"cyst": 133, "polyp": 134, "sarcoma": 140}
    assert json.loads(legacy.read_text()) == {"edited": 150}, "the file is read, never written"


def test_the_cap_counts_names_created_through_other_processes(state_url: str) -> None:
    first = ZeroShotRegistry(open_backend(state_url), names_per_hour=1)
    with first.reserve("a", "alice"):
        pass
    second = ZeroShotRegistry(open_backend(state_url), names_per_hour=1)  # another replica
    with pytest.raises(ZeroShotRateLimited), second.reserve("b", "alice"):
        pass
