"""What the learning-loop and fault tests do to a running server: submit labels, read its learning state, wait."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests

from .conftest import STS, Server
from .helpers import nifti_bytes

CASES = ("STS_001", "STS_002", "STS_003")
SARCOMA = 133


def local_studies(root: Path) -> Path:
    """A datastore folder linking the three sarcoma CTs of :data:`CASES` (named ``<case>.nii.gz``)."""
    root.mkdir()
    for case in CASES:
        os.symlink(STS / f"{case}_ct.nii.gz", root / f"{case}.nii.gz")
    return root


def sarcoma_label(case: str) -> tuple[np.ndarray, np.ndarray]:
    """The case's tumour as a VISTA3D label map (sarcoma id) and its affine."""
    gtv = nib.load(str(STS / f"{case}_gtv.nii.gz"))
    return (np.asarray(gtv.dataobj) > 0).astype(np.uint8) * SARCOMA, gtv.affine


def put_label(
    url: str,
    image: str,
    label: np.ndarray,
    affine: np.ndarray,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    """What OHIF's and Slicer's "submit label" sends: a final label for the image."""
    return requests.put(
        f"{url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={"label": (f"{image}.nii.gz", nifti_bytes(label, affine))},
        headers=headers,
        timeout=timeout,
    )


def submit(server: Server, case: str) -> None:
    response = put_label(server.url, case, *sarcoma_label(case))
    assert response.status_code == 200, response.text


def learning(server: Server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=30).json()["models"]["vista3d"]["learning"]


def wait(predicate: Callable[[], bool], timeout: float, what: str, server: Server) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n{server.log_text()[-5000:]}")


def train_status(server: Server) -> str:
    response = requests.get(f"{server.url}/train/", timeout=30)
    return response.json().get("status", "") if response.status_code == 200 else ""


def digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def training_process(server: Server) -> psutil.Process | None:
    for child in psutil.Process(server.pid).children(recursive=True):
        cmd = " ".join(child.cmdline())
        if "monailabel.interfaces.utils.app" in cmd and "-m train" in cmd:
            return child
    return None
