"""Model-space inference on real CT: cached features are exact, state is bounded and invalidated."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.inference.engine import Engine, pad_to_patch, window_start
from lib.inference.segment import new_state
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, build_network
from lib.sessions import ImageState, SessionStore

from .conftest import STS

PATCH = (96, 96, 96)
LABELS = load_label_dictionary()


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    model = LoadedModel(build_network("small").eval(), "small", "test.pt", torch.device("cpu"))
    return Engine(model, PATCH, 0.3, LABELS.special)


@pytest.fixture(scope="module")
def sts_state() -> ImageState:
    return new_state(str(STS / "STS_001_ct.nii.gz"), LABELS.preprocessing, PATCH)


def test_state_is_padded_to_a_patch_and_keeps_geometry(sts_state: ImageState) -> None:
    assert all(s >= p for s, p in zip(sts_state.image.shape[1:], PATCH, strict=False))
    assert sts_state.original_shape == (198, 202, 59)
    assert float(sts_state.image.max()) <= 1.0 and float(sts_state.image.min()) >= 0.0


def test_window_start_is_clamped_inside() -> None:
    assert window_start(np.array([5, 50, 300]), (100, 100, 320), PATCH) == (0, 2, 224)


def test_pad_to_patch_pads_only_at_the_end() -> None:
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    y = pad_to_patch(x, (3, 2, 4))
    assert y.shape == (1, 3, 2, 4) and torch.equal(y[:, :2, :2, :2], x)


def test_cached_click_equals_uncached(engine: Engine, sts_state: ImageState) -> None:
    points = np.array([[40.0, 40.0, 30.0], [50.0, 45.0, 30.0]])
    positive = np.array([True, False])
    sts_state.features.clear()
    first = engine.points(sts_state, points, positive, 6, np.array([0, 1]))
    assert len(sts_state.features) >= 1
    cached = engine.points(sts_state, points, positive, 6, np.array([0, 1]))
    sts_state.features.clear()
    uncached = engine.points(sts_state, points, positive, 6, np.array([0, 1]))
    torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(first.logits, cached.logits, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_features_are_dropped_when_weights_change(engine: Engine, sts_state: ImageState) -> None:
    engine.points(sts_state, np.array([[40.0, 40.0, 30.0]]), np.array([True]), 6, np.array([0]))
    assert sts_state.features
    assert sts_state.features_for("another:version") == {}
    assert sts_state.weights_version == "another:version"


def _state(nbytes: int) -> ImageState:
    return ImageState(
        image=torch.zeros(nbytes // 4),
        model_affine=np.eye(4),
        original_affine=np.eye(4),
        original_shape=(1, 1, 1),
    )


def test_store_evicts_least_recently_used() -> None:
    store = SessionStore(budget_bytes=3 * 1000)
    for key in "abc":
        store.get(key, lambda: _state(1000))
    store.get("a", lambda: _state(1000))  # touch a: b is now the oldest
    store.get("d", lambda: _state(1000))
    assert len(store) == 3
    created: list[str] = []
    store.get("b", lambda: created.append("b") or _state(1000))  # type: ignore[func-returns-value]
    assert created == ["b"], "b was evicted and had to be rebuilt"


def test_store_loads_each_image_once_under_concurrency() -> None:
    store = SessionStore(budget_bytes=10**9)
    calls: list[str] = []
    barrier = threading.Barrier(4)

    def create(key: str) -> ImageState:
        calls.append(key)
        return _state(16)

    def worker(key: str) -> None:
        barrier.wait()
        store.get(key, lambda: create(key))

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("x", "x", "y", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == ["x", "y"]


def test_a_changed_image_file_is_a_new_state(tmp_path: Path) -> None:
    from lib.sessions import state_key

    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"first version")
    before = state_key(str(path))
    assert state_key(str(path)) == before
    path.write_bytes(b"second version, another size")
    assert state_key(str(path)) != before, "an edited file must not reuse cached features or results"


def test_users_share_an_image_and_its_features_but_not_results(engine: Engine) -> None:
    store = SessionStore(budget_bytes=10**9)
    loads: list[int] = []

    def create() -> ImageState:
        loads.append(1)
        return new_state(str(STS / "STS_001_ct.nii.gz"), LABELS.preprocessing, PATCH)

    alice, fresh_a = store.session("alice", "img", create)
    bob, fresh_b = store.session("bob", "img", create)
    assert fresh_a and fresh_b and loads == [1], "the image is loaded once for both"
    assert alice.image is bob.image and alice.features is bob.features
    engine.points(alice, np.array([[40.0, 40.0, 30.0]]), np.array([True]), 6, np.array([0]))
    assert len(bob.features) == 1, "bob's clicks reuse the window alice's click encoded"
    alice.result = np.ones(alice.original_shape, dtype=np.int16)
    alice.clicks[6] = [(40, 40, 30, True)]
    assert bob.result is None and bob.clicks == {}
    again, fresh = store.session("alice", "img", create)
    assert again is alice and not fresh


def test_idle_sessions_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SessionStore(budget_bytes=10**9, idle_s=60)
    clock = [1000.0]
    monkeypatch.setattr("lib.sessions.time.monotonic", lambda: clock[0])
    first, _ = store.session("alice", "a", lambda: _state(16))
    clock[0] += 30
    assert store.session("alice", "a", lambda: _state(16))[0] is first
    clock[0] += 61
    store.session("bob", "a", lambda: _state(16))  # any request sweeps
    again, fresh = store.session("alice", "a", lambda: _state(16))
    assert fresh and again is not first and store.sessions() == 2


def test_over_budget_results_go_before_an_image_in_use() -> None:
    store = SessionStore(budget_bytes=1500)
    alice, _ = store.session("alice", "a", lambda: _state(1000))
    alice.result = np.zeros(300, dtype=np.int16)  # 600 bytes: 1600 in all, over the budget
    editing, done = threading.Event(), threading.Event()

    def request() -> None:  # a request in another thread is editing the session: it stays
        with alice.lock:
            editing.set()
            done.wait(5)

    worker = threading.Thread(target=request)
    worker.start()
    editing.wait(5)
    store.enforce_budget()
    assert store.sessions() == 1
    done.set()
    worker.join()
    store.enforce_budget()
    assert store.sessions() == 0 and len(store) == 1, "the session went, the image stayed"
