"""The dashboard's figures and page without a server: a small real datastore, a manifest, the scheduler's records.

The server path (real labels by two users, a promoted round, the page in Chromium as a reviewer and
an annotator) is tests/e2e/test_dashboard.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from lib.activelearning.uncertainty import UNCERTAINTY_KEY
from lib.dashboard.figures import ServerState, Viewer, dashboard_data
from lib.dashboard.learning import click_curve, learning_figures, round_progress
from lib.dashboard.next_up import ANOTHER_USER
from lib.dashboard.page import content_security_policy, render_page
from lib.data.datastore import SafeLocalDatastore
from lib.model_store import ModelStore
from lib.server.scheduler import Kind, Scheduler

REVIEWER = Viewer("rita", "reviewer", sees_everyone=True, may_rollback=False)
ALICE = Viewer("alice", "annotator", sees_everyone=False, may_rollback=False)
ADMIN = Viewer("ada", "admin", sees_everyone=True, may_rollback=True)
LOOP = {"trigger": 5, "debounce_s": 30, "pending_labels": 2}
EMPTY_QUEUE = {"length": 0, "running": [], "queued": [], "recent_seconds": {}}

GATE = {
    "promote": True,
    "reason": "too few objects for a confidence bound; not worse beyond the tolerance",
    "validation": None,
    "held_back": None,
    "pooled": {"objects": 2, "mean": 0.012, "upper": 0.03, "better": 2, "worse": 0},
}
MANIFEST: dict[str, Any] = {
    "served": 1,
    "versions": [
        {"version": 0, "file": None, "validation": {"images": ["b"], "objects": 1, "score": 0.4, "dice_1": 0.3,
                                                    "dice_5": 0.45}},
        {"version": 1, "file": "v1.pt", "trained_on": ["a@1"], "created": "2026-12-04 06:00:00",
         "validation": {"images": ["b"], "objects": 1, "score": 0.42, "dice_1": 0.31, "dice_5": 0.5}},
        {"version": 2, "file": "v2.pt", "trained_on": ["a@1", "c@2"], "created": "2026-12-04 06:10:00"},
    ],
    "rounds": [
        {"kind": "point", "from_version": 0, "finished": "2026-12-04 06:00:00", "promoted": 1, "reason": GATE["reason"],
         "gate": GATE, "served_validation": {"score": 0.4}, "candidate_validation": {"score": 0.42}, "steps": 2},
        {"kind": "point", "from_version": 1, "finished": "2026-12-04 06:10:00", "promoted": 2, "reason": "ok"},
    ],
    "rollbacks": [{"at": "2026-12-04 06:20:00", "from": 2, "to": 1}],
}  # fmt: skip


def test_learning_figures_follow_the_manifest() -> None:
    learning = learning_figures(MANIFEST, None)
    assert learning["served_version"] == 1 and learning["rollback_to"] == 0
    assert [(e["version"], e["event"]) for e in learning["served_history"]] == [
        (1, "promoted"), (2, "promoted"), (1, "rolled back")
    ]  # fmt: skip
    v1 = learning["versions"][1]
    assert v1["served"] and v1["dice_after_clicks"] == {"1": 0.31, "5": 0.5} and v1["validation_score"] == 0.42
    assert learning["versions"][2]["validation_score"] is None
    first = learning["rounds"][0]
    assert first["gate"]["pooled"]["objects"] == 2 and (first["served_score"], first["candidate_score"]) == (0.4, 0.42)
    assert click_curve({"dice_1": 0.2, "dice_10": 0.4, "dice_3": 0.3, "score": 1}) == {"1": 0.2, "3": 0.3, "10": 0.4}


def test_the_running_round_is_read_from_the_training_processes_lines() -> None:
    # lib.trainers.schedule.run_steps's line as a learning-curve run logged it, and MONAI Label's task keeps it
    line = "2026-12-04 06:04:24,562 INFO lib.trainers.schedule: point[rank 0]: step 50/200 "
    task = {"status": "RUNNING", "start_ts": "2026-12-04 05:59:00", "request": {"model": "point"},
            "details": ["loading", line + "loss(avg20) 0.8125, 3.10 s/step", "Early stop check"]}  # fmt: skip
    progress = round_progress(task)
    assert progress is not None
    assert (progress["step"], progress["steps"], progress["loss"], progress["s_per_step"]) == (50, 200, 0.8125, 3.1)
    assert progress["seconds_left"] == 465 and progress["kind"] == "point"
    assert round_progress({**task, "details": ["loading"]})["step"] is None  # type: ignore[index]
    assert round_progress({**task, "status": "DONE"}) is None and round_progress(None) is None


def _volume(path: Path, value: int = 0) -> None:
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, dtype=np.int16), np.eye(4)), str(path))


@pytest.fixture
def datastore(tmp_path: Path) -> SafeLocalDatastore:
    """Four images: ``a`` labelled by alice and scored by the dice method, ``b`` by bob, ``c`` and ``d`` not."""
    for name in "abcd":
        _volume(tmp_path / f"{name}.nii.gz")
    store = SafeLocalDatastore(str(tmp_path), extensions=("*.nii.gz",), auto_reload=False)
    _volume(tmp_path / "label.nii.gz", 1)
    store.save_label("a", str(tmp_path / "label.nii.gz"), "final", {"user": "alice"})
    store.save_label("b", str(tmp_path / "label.nii.gz"), "final", {"user": "bob"})
    store.update_image_info("a", {"dice": 0.8, "corrected_fraction": 0.25})
    store.update_image_info("c", {UNCERTAINTY_KEY: {"score": 0.5, "version": "small:v1"}})
    store.update_image_info("d", {"strategy": {"uncertainty": {"ts": int(time.time()), "client_id": "bob"}}})
    return store


def _data(viewer: Viewer, datastore: SafeLocalDatastore, recent: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    state = ServerState(MANIFEST, LOOP, None, EMPTY_QUEUE, recent or [])
    return dashboard_data(viewer, datastore, state)


def test_a_reviewer_sees_the_team_and_an_annotator_only_their_own_work(datastore: SafeLocalDatastore) -> None:
    team = _data(REVIEWER, datastore)["work"]
    assert team["annotators"] == ["alice", "bob"] and team["images"] == {"total": 4, "labelled": 2, "remaining": 2}
    assert {(s["image"], s["user"], s["corrected_fraction"]) for s in team["submissions"]} == {
        ("a", "alice", 0.25), ("b", "bob", None)
    }  # fmt: skip
    assert sum(r["labels"] for r in team["labels_per_day"]) == 2
    own = _data(ALICE, datastore)
    assert own["work"]["annotators"] == ["alice"] and [s["image"] for s in own["work"]["submissions"]] == ["a"]
    assert own["work"]["images"] == team["images"], "the team's totals are everybody's"
    assert "bob" not in str(own["work"]) and "bob" not in str(own["next"])


def test_the_active_learning_queue_is_the_strategys_order_with_who_got_what(datastore: SafeLocalDatastore) -> None:
    queue = _data(REVIEWER, datastore)["next"]["active_learning"]
    # c is scored, d unscored but just handed to bob: c first (uncertainty's order), d last
    assert [(q["image"], q["uncertainty"], q["handed_to"]) for q in queue] == [("c", 0.5, None), ("d", None, "bob")]
    assert _data(ALICE, datastore)["next"]["active_learning"][1]["handed_to"] == ANOTHER_USER


def _page(data: dict[str, Any]) -> tuple[str, str]:
    page, nonce = render_page(data)
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts == [f'<script nonce="{nonce}">'], "one script, the nonced one the policy allows"
    assert "src=" not in page.replace('href="/', "") and "http" not in re.sub(r'xmlns(:\w+)?="[^"]+"', "", page)
    assert f"'nonce-{nonce}'" in content_security_policy(nonce)
    return page, nonce


def test_the_page_draws_the_figures_with_units(datastore: SafeLocalDatastore) -> None:
    recent = [{"kind": "click", "finished": time.time(), "seconds": 0.4, "waited_s": 0.01}]
    page, _ = _page(_data(ADMIN, datastore, recent))
    for ident in ("plot-served", "plot-validation", "plot-labels", "plot-corrections", "plot-latency"):
        assert f'<figure id="{ident}"><svg' in page, ident
    for unit in ("served version", "validation Dice (0-1)", "labels submitted", "labelled voxels corrected (%)",
                 "latency (s, request to result)", "time (server time)"):  # fmt: skip
        assert unit in page, unit
    assert 'id="rollback"' in page and "Roll back to v0" in page
    assert 'id="rollback"' not in _page(_data(REVIEWER, datastore, recent))[0], "only admins may roll back"


def test_an_empty_datastore_says_what_will_appear_and_when(tmp_path: Path) -> None:
    datastore = SafeLocalDatastore(str(tmp_path), extensions=("*.nii.gz",), auto_reload=False)
    empty = ServerState(ModelStore(tmp_path / "models").manifest(), LOOP, None, EMPTY_QUEUE, [])
    data = dashboard_data(ALICE, datastore, empty)
    assert data["work"]["images"] == {"total": 0, "labelled": 0, "remaining": 0}
    page, _ = _page(data)
    assert "<svg" not in page
    for ident in ("plot-served", "plot-validation", "plot-labels", "plot-corrections", "plot-latency", "rounds"):
        assert f'id="{ident}-empty"' in page, ident
    assert "The next starts when 5 submitted labels are pending (2 now)" in page


def test_rollbacks_are_kept_in_the_manifest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.manifest_path.write_text(
        '{"served": 1, "versions": [{"version": 0, "file": null}, {"version": 1, "file": "v1.pt"}], "rounds": []}'
    )
    store.rollback()
    rollbacks = store.manifest()["rollbacks"]
    assert [(r["from"], r["to"]) for r in rollbacks] == [(1, 0)]
    assert learning_figures(store.manifest(), None)["served_history"][0]["event"] == "rolled back"


def test_the_scheduler_keeps_recent_latencies() -> None:
    scheduler = Scheduler(4, 10)
    _, future = scheduler.submit(Kind.CLICK, "alice", "a", lambda job: time.sleep(0.05))
    future.result(timeout=10)
    deadline = time.time() + 5
    while not scheduler.recent() and time.time() < deadline:
        time.sleep(0.01)
    (job,) = scheduler.recent()
    assert job["kind"] == "click" and job["seconds"] >= 0.05 and "alice" not in str(job)
