"""Many annotators on one server (issue 12), through the real server: own sessions, clicks first, no hangs.

Users are told apart by the ``client_id`` that 3D Slicer's module sends (sign-in is off on the
session server); with sign-in on they are the signed-in names (test_auth.py).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

from .conftest import STS, Server, running_server
from .helpers import deepest_voxel, load_nifti, nifti_bytes


def infer(server: Server, image: str, params: dict[str, Any], user: str, timeout: float = 300) -> requests.Response:
    return requests.post(
        f"{server.url}/infer/vista3d",
        params={"image": image, "output": "all"},
        files={"params": (None, json.dumps({**params, "client_id": user}))},
        timeout=timeout,
    )


def result(response: requests.Response) -> tuple[dict[str, Any], np.ndarray]:
    """The answer's JSON and label map (MONAI Label's multipart answer)."""
    assert response.status_code == 200, response.text[:500]
    parts = MultipartDecoder.from_response(response).parts
    body = json.loads(parts[0].content)
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
        f.write(parts[1].content)
        f.flush()
        label = np.asarray(nib.load(f.name).dataobj)
    return body, label


def click_on(case: str) -> dict[str, Any]:
    gtv, _ = load_nifti(STS / f"{case}_gtv.nii.gz")
    return {"points": [deepest_voxel(gtv > 0)], "point_labels": [1], "label_prompt": [3]}


def test_two_users_on_one_image_keep_their_own_results(server: Server) -> None:
    click = click_on("STS_003")
    bob_body, bob_first = result(infer(server, "STS_003_ct", click, "bob"))
    assert bob_body["previous"] in ("empty", "saved label")
    alice_body, alice_auto = result(infer(server, "STS_003_ct", {"label_prompt": [1, 3]}, "alice"))
    again_body, bob_again = result(infer(server, "STS_003_ct", click, "bob"))  # nothing new: bob's result as it was
    assert again_body["previous"] == "session" and again_body["clicks"][0]["new"] is False
    assert np.array_equal(bob_again, bob_first), "alice's auto did not touch bob's result"
    other = {**click, "points": [*click["points"], [c + 2 for c in click["points"][0]]], "point_labels": [1, 1]}
    alice_click, alice_edited = result(infer(server, "STS_003_ct", other, "alice"))
    assert alice_click["previous"] == "session", "alice's clicks edit her own auto result"
    assert np.mean(alice_edited == alice_auto) > 0.9 and alice_body["label_prompt"] == [1, 3]


def start_auto(server: Server, image: str, user: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        begin = time.time()
        response = infer(server, image, {"label_prompt": [1, 3]}, user)
        out.update(status=response.status_code, seconds=time.time() - begin, ended=time.time())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def running_auto(server: Server) -> bool:
    status = requests.get(f"{server.url}/queue", timeout=10).json()
    return any(job["kind"] == "auto" for job in status["running"])


def wait_for(check: Any, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_clicks_and_reads_do_not_wait_behind_an_auto_and_a_gone_clients_auto_is_dropped(server: Server) -> None:
    click = click_on("STS_001")
    begin = time.time()
    infer(server, "STS_001_ct", click, "erin")  # warm: image loaded, window encoded
    idle = time.time() - begin
    auto: dict[str, Any] = {}
    thread = start_auto(server, "STS_007_ct", "carol", auto)
    wait_for(lambda: running_auto(server))

    with pytest.raises(requests.exceptions.ReadTimeout):  # dave gives up while his auto is still queued
        infer(server, "STS_002_ct", {"label_prompt": [1]}, "dave", timeout=1.5)
    reads = []
    for path in ("/info/", "/datastore/?output=stats", "/queue", "/auth/"):
        begin = time.time()
        assert requests.get(f"{server.url}{path}", timeout=30).status_code == 200
        reads.append(time.time() - begin)
    begin = time.time()
    more = {**click, "points": [*click["points"], [click["points"][0][0] + 3, *click["points"][0][1:]]]}
    more["point_labels"] = [1, 1]
    response = infer(server, "STS_001_ct", more, "erin")
    clicked, click_s = time.time(), time.time() - begin
    assert response.status_code == 200
    thread.join(timeout=600)
    assert auto["status"] == 200
    assert clicked < auto["ended"], "the click returned before the auto"
    assert click_s < max(5 * idle, 5.0), f"click {click_s:.1f} s during the auto, {idle:.1f} s idle"
    assert max(reads) < 0.5, f"reads during the auto took {reads}"
    log = server.log_text()
    assert "(auto by client:dave): the client has gone" in log
    assert "vista3d auto by client:dave" not in log, "the gone client's auto never ran"
    assert "(auto by client:carol) lets 1 waiting clicks run" in log
    assert requests.get(f"{server.url}/queue", timeout=10).json()["length"] == 0


@pytest.fixture(scope="module")
def tight_server(test_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two requests at most, 3 s to start, a session cache too small to keep any session."""
    root = tmp_path_factory.mktemp("tight-studies")
    for case in ("STS_001", "STS_002"):
        (root / f"{case}_ct.nii.gz").symlink_to(STS / f"{case}_ct.nii.gz")
    conf = {"train_trigger": "0", "queue_max": "2", "queue_wait_s": "3", "session_cache_mb": "1"}
    with running_server(str(root), tmp_path_factory.mktemp("tight") / "server.log", test_weights, conf) as s:
        yield s


def test_requests_that_cannot_be_served_in_time_get_503_with_retry_after(tight_server: Server) -> None:
    auto: dict[str, Any] = {}
    thread = start_auto(tight_server, "STS_001_ct", "alice", auto)
    wait_for(lambda: running_auto(tight_server))
    queued: dict[str, Any] = {}
    second = threading.Thread(target=lambda: queued.update(r=infer(tight_server, "STS_002_ct", {}, "bob")))
    second.start()
    wait_for(lambda: requests.get(f"{tight_server.url}/queue", timeout=10).json()["length"] == 1, 10)
    full = infer(tight_server, "STS_002_ct", click_on("STS_002"), "carol")
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert "queued or running" in full.json()["detail"]
    second.join(timeout=60)
    late = queued["r"]
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1
    assert "without starting" in late.json()["detail"]
    thread.join(timeout=600)
    assert auto["status"] == 200


def test_a_lost_session_starts_from_the_users_saved_label_and_says_so(tight_server: Server) -> None:
    image, affine = load_nifti(STS / "STS_002_ct.nii.gz")
    saved = np.zeros(image.shape, dtype=np.uint8)
    saved[5:15, 5:15, 1:4] = 5  # far from the click: it survives the click's edit
    response = requests.put(
        f"{tight_server.url}/datastore/label",
        params={"image": "STS_002_ct", "tag": "final"},
        files={"label": ("STS_002_ct.nii.gz", nifti_bytes(saved, affine)), "params": (None, '{"client_id": "fay"}')},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    click = click_on("STS_002")
    body, label = result(infer(tight_server, "STS_002_ct", click, "fay"))
    assert body["previous"] == "saved label"
    assert np.all(label[5:15, 5:15, 1:4] == 5)
    more = {**click, "points": [*click["points"], [20, 20, 2]], "point_labels": [1, 0]}
    body, _ = result(infer(tight_server, "STS_002_ct", more, "fay"))
    assert body["previous"] == "saved label", "the 1 MB cache evicted fay's session after her first click"
    assert "session memory over budget" in tight_server.log_text()
    body, label = result(infer(tight_server, "STS_002_ct", click, "gus"))
    assert body["previous"] == "empty" and not np.any(label == 5), "another user's saved label is not gus's"
