"""Two users clicking on two images at once get exactly what they would get one after the other."""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.inference.engine import Engine
from lib.infers.vista3d import Vista3DInfer
from lib.labels import load_label_dictionary
from lib.model import load_model, patch_size_for
from lib.sessions import SessionStore
from lib.zero_shot import ZeroShotRegistry

from .conftest import STS
from .helpers import deepest_voxel, load_nifti

LABELS = load_label_dictionary()
CASES = ("STS_004", "STS_005")


def make_task(tmp_path: Path) -> Vista3DInfer:
    torch.manual_seed(0)
    model = load_model("small", "starter", tmp_path, torch.device("cpu"))
    engine = Engine(model, patch_size_for("small"), LABELS.sw_overlap, LABELS.special, "fp32")
    return Vista3DInfer(engine, LABELS, ZeroShotRegistry(None), SessionStore(2**32))


def requests_for(case: str) -> list[dict]:
    gtv, _ = load_nifti(STS / f"{case}_gtv.nii.gz")
    centre = deepest_voxel(gtv > 0)
    second = [centre[0] + 4, centre[1] - 3, centre[2]]
    image = str(STS / f"{case}_ct.nii.gz")
    return [
        {"image": image, "points": [centre], "point_labels": [1], "label_prompt": [133]},
        {"image": image, "points": [centre, second], "point_labels": [1, 0], "label_prompt": [133]},
    ]


def run(task: Vista3DInfer, case: str, out: dict[str, list[np.ndarray]]) -> None:
    results = []
    for request in requests_for(case):
        path, _ = task(dict(request))
        results.append(np.asarray(nib.load(path).dataobj))
    out[case] = results


@pytest.mark.timeout(600)
def test_concurrent_users_on_two_images_match_sequential(tmp_path: Path) -> None:
    sequential: dict[str, list[np.ndarray]] = {}
    task = make_task(tmp_path)
    for case in CASES:
        run(task, case, sequential)

    concurrent: dict[str, list[np.ndarray]] = {}
    task = make_task(tmp_path)  # fresh state: the same first-click work as above
    threads = [threading.Thread(target=run, args=(task, case, concurrent)) for case in CASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for case in CASES:
        assert len(concurrent[case]) == 2
        for a, b in zip(sequential[case], concurrent[case], strict=True):
            assert np.array_equal(a, b)
    assert len(task.store) == 2
