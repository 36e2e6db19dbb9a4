"""Zero-shot names: an id is reserved while a request runs and registered only when it succeeds; creation is capped."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lib.labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST
from lib.zero_shot import ZeroShotNamesExhausted, ZeroShotRateLimited, ZeroShotRegistry


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
