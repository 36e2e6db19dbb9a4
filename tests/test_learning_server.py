"""The learning loop through the real server: submitted labels -> background round -> promoted, served.

And the fault the loop must survive: the training process SIGKILLed mid-round leaves the served model,
the store and the datastore intact, and the next round starts cleanly.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests

from .conftest import STS, Server, running_server
from .helpers import deepest_voxel, infer_json, nifti_bytes

CASES = ("STS_001", "STS_002", "STS_003")
SARCOMA = 133


def _studies(root: Path) -> Path:
    root.mkdir()
    for case in CASES:
        os.symlink(STS / f"{case}_ct.nii.gz", root / f"{case}.nii.gz")
    return root


def _submit(server: Server, case: str) -> None:
    """What OHIF's and Slicer's "submit label" sends: a final label for the image."""
    gtv = nib.load(str(STS / f"{case}_gtv.nii.gz"))
    label = (np.asarray(gtv.dataobj) > 0).astype(np.uint8) * SARCOMA
    response = requests.put(
        f"{server.url}/datastore/label",
        params={"image": case, "tag": "final"},
        files={"label": (f"{case}.nii.gz", nifti_bytes(label, gtv.affine))},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def _learning(server: Server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=30).json()["models"]["vista3d"]["learning"]


def _wait(predicate, timeout: float, what: str, server: Server) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n{server.log_text()[-5000:]}")


def _train_status(server: Server) -> str:
    response = requests.get(f"{server.url}/train/", timeout=30)
    return response.json().get("status", "") if response.status_code == 200 else ""


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture
def loop_server(tmp_path: Path, test_weights: Path) -> Iterator[Server]:
    conf = {
        "train_trigger": "3",
        "train_debounce_s": "1",
        "train_steps": "2",
        "promote_tolerance": "1.0",
        "train_threads": "1",
        "train_patience": "0",  # 2 steps on random weights: no early stop, the gate alone decides
    }
    with running_server(str(_studies(tmp_path / "studies")), tmp_path / "server.log", test_weights, conf) as s:
        yield s


def test_submitted_labels_train_and_the_promoted_version_is_served(loop_server: Server) -> None:
    info = requests.get(f"{loop_server.url}/info/", timeout=30).json()
    assert {"point", "auto"} <= set(info["trainers"])
    assert _learning(loop_server)["served_version"] == 0

    _submit(loop_server, "STS_001")
    time.sleep(3)
    assert "Learning loop: 1 of 3 final labels pending" in loop_server.log_text()
    _submit(loop_server, "STS_002")
    _submit(loop_server, "STS_003")
    _wait(lambda: _learning(loop_server)["served_version"] == 1, 400, "a promoted version", loop_server)

    learning = _learning(loop_server)
    assert learning["validation"]["images"] == ["STS_002"], "the second label is the first validation image"
    # STS_003, the newest training label, is held back: scored by both models, trained on next round.
    assert learning["trained_on_labels"] == 1 and learning["last_round"]["kind"] == "point"
    assert learning["last_round"]["gate"]["held_back"]["objects"] >= 1
    assert "Learning loop: started a point fine-tune" in loop_server.log_text()

    gtv = np.asarray(nib.load(str(STS / "STS_003_gtv.nii.gz")).dataobj) > 0
    response = infer_json(loop_server.url, "STS_003", {"label": "sarcoma", "foreground": [deepest_voxel(gtv)]})
    assert response.status_code == 200, response.text
    assert response.json()["weights_version"] == "small:v1"
    assert "Serving v1" in loop_server.log_text()


def _training_process(server: Server) -> psutil.Process | None:
    for child in psutil.Process(server.pid).children(recursive=True):
        cmd = " ".join(child.cmdline())
        if "monailabel.interfaces.utils.app" in cmd and "-m train" in cmd:
            return child
    return None


@pytest.fixture
def manual_server(tmp_path: Path, test_weights: Path) -> Iterator[Server]:
    conf = {
        "train_trigger": "0",
        "train_steps": "500",
        "promote_tolerance": "1.0",
        "train_threads": "1",
        "train_patience": "0",
    }
    with running_server(str(_studies(tmp_path / "studies")), tmp_path / "server.log", test_weights, conf) as s:
        yield s


def test_sigkill_mid_training_loses_nothing_and_the_next_round_runs(manual_server: Server) -> None:
    server = manual_server
    for case in CASES:
        _submit(server, case)
    labels = sorted((server.studies / "labels" / "final").glob("*.nii.gz"))
    before = _digest(labels)
    store = server.studies / ".vista3d" / "models"

    # Two clicks per scored object: the served model scores the held-back STS_003 before training starts.
    response = requests.post(f"{server.url}/train/point", json={"crop": 64, "clicks": 2}, timeout=60)
    assert response.status_code == 200, response.text
    # STS_001 is the round's one training label (STS_002 validates, STS_003 is held back): once it is
    # loaded, steps run.
    _wait(lambda: "point[rank 0]" in server.log_text() or "Cached STS_001" in server.log_text(), 300,
          "the round to start training", server)  # fmt: skip
    time.sleep(5)  # mid-round: steps are running
    proc = _training_process(server)
    assert proc is not None, "no training subprocess found"
    os.kill(proc.pid, signal.SIGKILL)
    _wait(lambda: _train_status(server) in ("ERROR", "DONE"), 60, "the killed task to end", server)
    assert _train_status(server) == "ERROR"

    assert _digest(labels) == before, "the datastore changed"
    assert not list(store.glob("v*.pt")) and _learning(server)["served_version"] == 0
    gtv = np.asarray(nib.load(str(STS / "STS_003_gtv.nii.gz")).dataobj) > 0
    response = infer_json(server.url, "STS_003", {"label": "sarcoma", "foreground": [deepest_voxel(gtv)]})
    assert response.status_code == 200 and response.json()["weights_version"].startswith("small:"), response.text

    # Two clicks per scored object: the round is scored and gated as any other, in fewer clicks.
    response = requests.post(f"{server.url}/train/point", json={"steps": 2, "crop": 64, "clicks": 2}, timeout=60)
    assert response.status_code == 200, response.text
    _wait(lambda: _train_status(server) in ("ERROR", "DONE"), 400, "the second round", server)
    assert _train_status(server) == "DONE", server.log_text()[-4000:]
    assert _learning(server)["served_version"] == 1
    assert not [p for p in store.iterdir() if p.name.endswith(".tmp")], "temp files left behind"
    assert _digest(labels) == before
