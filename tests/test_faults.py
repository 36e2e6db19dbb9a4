"""Faults a hospital server meets, each through the real server: kills, a full disk, an image server down or slow.

A kill lands where it hurts most through the server's fail points (:mod:`lib.failpoints`): the
test arms one, waits until the server holds there, and SIGKILLs the server with every process it
started, as a power cut or the OOM killer would. After a restart on the same folders nothing is
half there: the served model is a complete version, a label is the old one or the new one, no
temporary file is left, and labels no round has seen start one, whose promoted version answers
the next click. docs/faults.md has the table.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
import pydicom
import pytest
import requests
import torch
from dicomweb_client import DICOMwebClient

from bench.common import free_port
from lib.failpoints import ENV as FAILPOINT_ENV
from tools import add_study
from tools.orthanc import start_orthanc, stop_orthanc

from .conftest import DATA, STS, Server, running_server
from .helpers import deepest_voxel, nifti_bytes
from .holding_proxy import HoldingProxy, holding_proxy
from .loop_helpers import (
    CASES,
    digest,
    learning,
    local_studies,
    put_label,
    sarcoma_label,
    submit,
    train_status,
    training_process,
    wait,
)
from .orthanc import TEST_SERIES, require_orthanc, series_uid

ROUND = {"promote_tolerance": "1.0", "train_threads": "1", "train_patience": "0"}
MANUAL = {**ROUND, "train_trigger": "0", "train_steps": "500", "train_steps_per_label": "0"}
A_CLICK = {"label": "liver", "foreground": [[60, 60, 10]]}  # inside every test series; a known class


def _crash(server: Server) -> None:
    """SIGKILL the server and every process it started (nothing gets to clean up)."""
    tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)


@contextmanager
def _armed(folder: Path, point: str) -> Iterator[Path]:
    """Arm fail point ``point``; yields the file the server writes when it holds there."""
    (folder / point).touch()
    try:
        yield folder / f"{point}.reached"
    finally:
        (folder / point).unlink()
        (folder / f"{point}.reached").unlink(missing_ok=True)


def _in_background(call: Callable[[], Any]) -> Future[Any]:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def _half_label(case: str) -> tuple[np.ndarray, np.ndarray]:
    """A correction of the case's label: its upper half removed."""
    label, affine = sarcoma_label(case)
    label = label.copy()
    label[:, :, label.shape[2] // 2 :] = 0
    return label, affine


def _infer(url: str, image: str, params: dict[str, Any], timeout: float = 300) -> requests.Response:
    return requests.post(
        f"{url}/infer/vista3d", params={"image": image, "output": "json"}, data={"params": json.dumps(params)},
        timeout=timeout,
    )  # fmt: skip


# --- The learning loop on a local datastore, killed mid-training, mid-save, mid-promotion; then resumed ---


def test_kills_mid_round_mid_save_and_mid_promotion_lose_nothing_and_the_round_resumes(
    tmp_path: Path, test_weights: Path
) -> None:
    studies = local_studies(tmp_path / "studies")
    points = tmp_path / "failpoints"
    points.mkdir()
    final = studies / "labels" / "final"
    store = studies / ".vista3d" / "models"

    # A loop that waits for 4 labels: this test starts its rounds itself, until the restart that resumes one.
    waiting = {**MANUAL, "train_trigger": "4"}
    with running_server(str(studies), tmp_path / "a.log", test_weights, waiting, **{FAILPOINT_ENV: str(points)}) as a:
        assert {"point", "auto"} <= set(requests.get(f"{a.url}/info/", timeout=30).json()["trainers"])
        for case in CASES:
            submit(a, case)
            if case == CASES[0]:
                wait(lambda: "Learning loop: 1 of 4 final labels pending" in a.log_text(), 30, "the loop's count", a)
        labels = sorted(final.glob("*.nii.gz"))
        before = digest(labels)
        # The training process killed mid-round: the task fails, nothing else changes.
        response = requests.post(f"{a.url}/train/point", json={"crop": 64, "clicks": 2}, timeout=60)
        assert response.status_code == 200, response.text
        wait(lambda: "point[rank 0]" in a.log_text() or "Cached STS_001" in a.log_text(), 300, "steps", a)
        process = training_process(a)
        assert process is not None, "no training subprocess found"
        process.send_signal(signal.SIGKILL)
        wait(lambda: train_status(a) in ("ERROR", "DONE"), 60, "the killed task to end", a)
        assert train_status(a) == "ERROR" and learning(a)["served_version"] == 0
        # The server killed between a corrected label's temporary file and its rename.
        with _armed(points, "label.written") as reached:
            saving = _in_background(lambda: put_label(a.url, "STS_001", *_half_label("STS_001"), timeout=120))
            wait(reached.exists, 60, "the save to reach its fail point", a)
            assert list(final.glob(".saving-*")), "the kill lands mid-save"
            _crash(a)
        with pytest.raises(requests.ConnectionError):
            saving.result(timeout=60)  # the client saw the connection drop: it was not told "saved"

    with running_server(str(studies), tmp_path / "b.log", test_weights, MANUAL, **{FAILPOINT_ENV: str(points)}) as b:
        assert digest(labels) == before, "the old label is whole"
        assert not list(studies.rglob(".saving-*")), "the killed save's temporary files are removed at start"
        assert "left by a write that did not finish" in b.log_text()
        # The server killed between a promotion's weights file and its manifest.
        with _armed(points, "promote.weights_written") as reached:
            response = requests.post(f"{b.url}/train/point", json={"steps": 2, "crop": 64, "clicks": 2}, timeout=60)
            assert response.status_code == 200, response.text
            wait(reached.exists, 400, "the promotion to reach its fail point", b)
            assert (store / "v1.pt").is_file()
            _crash(b)
    manifest = store / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["served"] == 0, "v1 was never promoted"

    # Two clicks per scored object (train_clicks): the gate scores as in any round, in fewer clicks.
    resume = {**ROUND, "train_trigger": "3", "train_debounce_s": "1", "train_steps": "2", "train_clicks": "2"}
    with running_server(str(studies), tmp_path / "c.log", test_weights, resume) as c:
        assert "Removed 1 files left by an interrupted training or promotion: ['v1.pt']" in c.log_text()
        # The three labels no round has seen start a round at start-up, which promotes v1 whole.
        wait(lambda: learning(c)["served_version"] == 1, 400, "the resumed round's promotion", c)
        assert "Learning loop: started a point fine-tune on 3 new final labels" in c.log_text()
        assert set(torch.load(store / "v1.pt", weights_only=True)) == set(torch.load(test_weights, weights_only=True))
        assert not [p.name for p in store.iterdir() if p.name.endswith(".tmp")]
        assert digest(labels) == before
        state = learning(c)
        assert state["validation"]["images"] == ["STS_002"], "the second label is the first validation image"
        # STS_003, the newest training label, is held back: scored by both models, trained on next round.
        assert state["trained_on_labels"] == 1 and state["last_round"]["kind"] == "point"
        assert state["last_round"]["gate"]["held_back"]["objects"] >= 1
        # The next click is answered by the promoted version.
        gtv = np.asarray(nib.load(str(STS / "STS_003_gtv.nii.gz")).dataobj) > 0
        clicked = _infer(c.url, "STS_003", {"label": "sarcoma", "foreground": [deepest_voxel(gtv)]})
        assert clicked.status_code == 200 and clicked.json()["weights_version"] == "small:v1", clicked.text
        assert "Serving v1" in c.log_text()


# --- A full disk under a local datastore ---


@contextmanager
def _small_filesystem(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``path`` for the test's life (root, or password-less sudo, mounts it)."""
    path.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    mounted = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.fail(f"the full-disk test mounts a {size_mb} MB tmpfs and could not: {mounted.stderr.strip()} "
                    "(run the suite as root or with password-less sudo)", pytrace=False)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run([*sudo, "umount", "--lazy", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Fill ``folder``'s filesystem to the last byte (a write takes what fits, the next one fails); returns the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(1 << 20))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "link"
        for p in sorted(root.rglob("*"))
        if p.name not in ("filler", ".lock") and (p.is_file() or p.is_symlink())
    }


def test_full_disk_answers_507_changes_nothing_and_recovers(tmp_path: Path, test_weights: Path) -> None:
    with _small_filesystem(tmp_path / "disk", 16) as disk:
        studies = disk / "studies"
        studies.mkdir()
        os.symlink(STS / "STS_001_ct.nii.gz", studies / "STS_001.nii.gz")
        with running_server(str(studies), tmp_path / "server.log", test_weights, {"train_trigger": "0"}) as server:
            label, affine = sarcoma_label("STS_001")
            small_ct = nib.load(str(STS / "STS_002_ct.nii.gz"))
            filler = _fill(disk)
            before = _snapshot(studies)

            saved = put_label(server.url, "STS_001", label, affine)
            assert saved.status_code == 507 and "no space left" in saved.json()["detail"], saved.text
            uploaded = requests.put(
                f"{server.url}/datastore/image",
                params={"image": "STS_002"},
                files={
                    "file": ("STS_002.nii.gz", nifti_bytes(np.asarray(small_ct.dataobj)[:64, :64, :8], small_ct.affine))
                },
                timeout=60,
            )
            assert uploaded.status_code == 507 and "no space left" in uploaded.json()["detail"], uploaded.text
            assert _snapshot(studies) == before, "a refused write changed the datastore"

            assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
            # A known class: a new zero-shot name would need its id written (and get a 507 too).
            clicked = _infer(server.url, "STS_001", {"label": "liver", "foreground": [[99, 101, 29]]})
            assert clicked.status_code == 200, "the server keeps serving: " + clicked.text

            filler.unlink()  # space again: the same save goes through, no restart
            assert put_label(server.url, "STS_001", label, affine).status_code == 200
            assert (studies / "labels" / "final" / "STS_001.nii.gz").is_file()


# --- The image server (Orthanc) slow, down, and the server killed mid-upload ---


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[tuple[Path, int, HoldingProxy]]:
    """Orthanc with the test series, behind a :class:`HoldingProxy`; stopped (if running) at the end."""
    require_orthanc()
    home, port = tmp_path / "orthanc", free_port()
    process, url = start_orthanc(home, port)
    try:
        assert add_study.add(list(TEST_SERIES), f"{url}/dicom-web", "http://viewer") == len(TEST_SERIES)
        with holding_proxy(port) as proxy:
            yield home, port, proxy
    finally:
        stop_orthanc(process)
        for orthanc in psutil.process_iter(["cmdline"]):  # the one restarted by the test
            if str(home) in " ".join(orthanc.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    orthanc.kill()


def _ct_mask(server: Server, series: str) -> tuple[np.ndarray, np.ndarray]:
    """A box label on the series' grid as the server converted it (fetched through the API)."""
    response = requests.get(f"{server.url}/datastore/image", params={"image": series}, timeout=120)
    assert response.status_code == 200, response.text
    path = server.log.parent / f"{series}.nii.gz"
    path.write_bytes(response.content)
    image = nib.load(str(path))
    label = np.zeros(image.shape[:3], dtype=np.uint8)
    x, y, z = label.shape
    label[x // 4 : x // 2, y // 4 : y // 2, z // 4 : z // 2] = 133
    return label, image.affine


def test_image_server_slow_down_and_killed_mid_upload(
    tmp_path: Path, test_weights: Path, image_server: tuple[Path, int, HoldingProxy]
) -> None:
    home, port, proxy = image_server
    slow, fast, third = (series_uid(DATA / "sts_dicom" / c / "image") for c in ("STS_001", "STS_002", "STS_003"))
    env = {FAILPOINT_ENV: str(tmp_path), "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}
    studies = f"http://127.0.0.1:{proxy.port}/dicom-web"
    conf = {"train_trigger": "0"}

    with running_server(studies, tmp_path / "a.log", test_weights, conf, **env) as server:
        assert _infer(server.url, fast, A_CLICK).status_code == 200
        # Slow: one user's series retrieval held at the image server; everyone else is served meanwhile.
        proxy.hold_requests(f"/series/{slow}")
        held = _in_background(lambda: _infer(server.url, slow, {**A_CLICK, "client_id": "alice"}))
        assert proxy.held.wait(60), "the slow series was never requested"
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
        assert _infer(server.url, fast, {**A_CLICK, "client_id": "bob"}, timeout=120).status_code == 200
        assert requests.get(f"{server.url}/proxy/dicom/qido/studies", timeout=30).status_code == 200
        assert not held.done(), "the slow request finished before the image server answered it"
        proxy.release()
        assert held.result(timeout=300).status_code == 200

        # Down: clear 502s with Retry-After, nothing half saved, the server up; back without a restart.
        label, affine = _ct_mask(server, fast)
        process = next(p for p in psutil.process_iter(["cmdline"]) if str(home) in " ".join(p.info["cmdline"] or []))
        process.terminate()
        process.wait(30)
        down = [
            _infer(server.url, third, A_CLICK),
            requests.get(f"{server.url}/proxy/dicom/qido/studies", timeout=60),
            put_label(server.url, fast, label, affine),
        ]
        for response in down:
            assert response.status_code == 502, response.text
            assert "cannot be reached" in response.json()["detail"] and response.headers["retry-after"]
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
        start_orthanc(home, port)
        assert "final" not in _labels(server, fast), "a label that reached no image server is not saved"
        assert _infer(server.url, third, A_CLICK).status_code == 200
        assert put_label(server.url, fast, label, affine).status_code == 200

        # Killed between the SEG's upload and the local cache: the image server has it whole.
        label, affine = _ct_mask(server, slow)
        with _armed(tmp_path, "seg.stored") as reached:
            saving = _in_background(lambda: put_label(server.url, slow, label, affine, timeout=120))
            wait(reached.exists, 120, "the upload to reach its fail point", server)
            _crash(server)
        with pytest.raises(requests.ConnectionError):
            saving.result(timeout=60)

    with running_server(studies, tmp_path / "b.log", test_weights, conf, **env) as server:
        assert not list((tmp_path / "cache").rglob(".saving-*")) and not list((tmp_path / "cache").rglob(".download-*"))
        # The SEG stored before the kill is whole in the image server: it reads back as sent. The local
        # index, which the kill did not reach, has no label for the series (rather than half of one).
        seg = _seg_of(f"http://127.0.0.1:{port}/dicom-web", slow)
        assert int(seg.sum()) == int((label > 0).sum())
        assert "final" not in _labels(server, slow)
        assert _infer(server.url, slow, A_CLICK).status_code == 200


def _labels(server: Server, series: str) -> dict[str, Any]:
    """The series' labels in the server's index."""
    response = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["objects"].get(series, {}).get("labels", {})


def _seg_of(dicomweb: str, series: str) -> np.ndarray:
    """The pixels of the one DICOM-SEG in the image server that references ``series``."""
    client = DICOMwebClient(dicomweb)
    for found in client.search_for_series(search_filters={"Modality": "SEG"}):
        ds = pydicom.Dataset.from_json(found)
        seg = client.retrieve_series(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))[0]
        if seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series:
            return np.asarray(seg.pixel_array)
    raise AssertionError(f"no DICOM-SEG references {series}")
