"""One datastore folder shared by several server processes (replicas): no write loses another's.

MONAI Label's local datastore rewrites its index from memory, so before these changes the second
process to save a label dropped the first one's entry. The tests write small NIfTI volumes; the
multi-process test starts real processes (spawn) that save labels at the same time.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from lib.data.datastore import SafeLocalDatastore

SHAPE = (8, 8, 8)


def _nifti(path: Path, value: int) -> Path:
    nib.save(nib.Nifti1Image(np.full(SHAPE, value, dtype=np.int16), np.eye(4)), str(path))
    return path


def _folder(root: Path, images: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        _nifti(root / f"img{i}.nii.gz", -1000)
    return root


def _open(root: Path) -> SafeLocalDatastore:
    return SafeLocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)


def test_two_instances_see_and_keep_each_others_labels(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", 2)
    a, b = _open(root), _open(root)
    a.save_label("img0", str(_nifti(tmp_path / "l0.nii.gz", 1)), "final", {"user": "ann"})
    b.save_label("img1", str(_nifti(tmp_path / "l1.nii.gz", 2)), "final", {"user": "bob"})

    for ds in (a, b, _open(root)):
        assert sorted(ds.get_labeled_images("final")) == ["img0", "img1"]
        assert ds.get_label_info("img0", "final")["user"] == "ann"
    assert np.asarray(nib.load(a.get_label_uri("img1", "final")).dataobj).max() == 2


def test_info_updates_and_removals_keep_the_other_instances_writes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", 3)
    a, b = _open(root), _open(root)
    a.save_label("img0", str(_nifti(tmp_path / "l0.nii.gz", 1)), "final", {})
    b.update_label_info("img0", "final", {"reviewed": "yes"})
    a.save_label("img1", str(_nifti(tmp_path / "l1.nii.gz", 1)), "final", {})
    b.remove_label("img1", "final")
    a.remove_image("img2")

    fresh = _open(root)
    assert fresh.get_label_info("img0", "final")["reviewed"] == "yes"
    assert fresh.get_labeled_images("final") == ["img0"]
    assert sorted(fresh.list_images()) == ["img0", "img1"]


def _save_labels(root: str, images: list[str], label: str, start: Any) -> None:
    ds = _open(Path(root))  # both hold the index as it was before either saved
    start.wait()
    for image_id in images:
        ds.save_label(image_id, label, "final", {"user": image_id})


@pytest.mark.timeout(120)
def test_processes_saving_at_once_lose_no_label(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", 16)
    _open(root)  # the index exists before the writers start, as on a running server
    label = str(_nifti(tmp_path / "label.nii.gz", 1))
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    writers = [
        ctx.Process(target=_save_labels, args=(str(root), [f"img{i}" for i in part], label, start))
        for part in (range(0, 16, 2), range(1, 16, 2))
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join(90)
        assert w.exitcode == 0

    ds = _open(root)
    assert sorted(ds.get_labeled_images("final")) == sorted(f"img{i}" for i in range(16))
    assert all(ds.get_label_info(f"img{i}", "final")["user"] == f"img{i}" for i in range(16))
