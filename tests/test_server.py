"""The app inside the real MONAI Label server, driven over HTTP as OHIF, Slicer and MONAI Label's client do.

Accuracy is not asserted here (that is a benchmark figure); structure and geometry are.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from scipy import ndimage

from lib.inference.refine import POSITIVE_MARGIN

from .conftest import ABDOMEN_SM, STS, Server
from .helpers import deepest_voxel, infer_json, load_nifti, nifti_bytes, ohif_infer, read_nrrd

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def sts_click(case: str) -> list[int]:
    gtv, _ = load_nifti(STS / f"{case}_gtv.nii.gz")
    return deepest_voxel(gtv > 0)


def test_info_lists_the_vista3d_model(server: Server) -> None:
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    model = info["models"]["vista3d"]
    assert model["type"] == "vista3d"
    labels = model["labels"]
    # VISTA3D's 127 served classes, plus any zero-shot names other tests on this server registered.
    assert len([i for i in labels.values() if i <= 132]) == 127
    assert labels["liver"] == 1 and labels["left kidney"] == 14 and labels["kidney"] == 2
    assert "rectum" not in labels  # unsupported by the published model
    assert all(name == name.lower() for name in labels)
    assert model["preset"] == "small"
    assert model["weights"].endswith("small_seed0.pt") and "warning" not in model


def test_ohif_page_is_served(server: Server) -> None:
    assert requests.get(f"{server.url}/ohif/", timeout=30).status_code == 200


def test_auto_on_abdomen_keeps_grid_and_requested_ids(server: Server, tmp_path: Path) -> None:
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    result, params = client.infer("vista3d", "abdomen", {"label_prompt": [1, 3, 2]})
    params = json.loads(params) if isinstance(params, str) else params
    label, affine = load_nifti(result)
    image, image_affine = load_nifti(ABDOMEN_SM)
    assert label.shape == image.shape
    np.testing.assert_allclose(affine, image_affine, atol=1e-3)
    assert set(np.unique(label).tolist()) <= {0, 1, 3, 5, 14}  # kidney (2) expands to 5 and 14
    assert params["label_prompt"] == [1, 3, 14, 5]  # group members in dictionary order


def assert_one_component_at(mask: np.ndarray, click: list[int], applied: bool) -> None:
    """Algorithm 1's contract for a first positive click, whatever the weights predict.

    Applied (the prediction covers the click or comes within 2 voxels): exactly one component, that
    close to the click. Not applied: nothing.
    """
    labelled, n = ndimage.label(mask, structure=STRUCTURE_26)
    if applied:
        near = tuple(slice(max(c - POSITIVE_MARGIN, 0), c + POSITIVE_MARGIN + 1) for c in click)
        assert n == 1 and labelled[near].any(), "one component, at most 2 voxels from the click"
    else:
        assert n == 0, "a click the prediction does not answer adds nothing"


def test_ohif_point_request_returns_uint8_nrrd_on_the_image_grid(server: Server) -> None:
    click = sts_click("STS_006")
    params = {"points": [click], "point_labels": [1], "label_prompt": [3]}
    applied = infer_json(server.url, "STS_006_ct", params).json()["clicks"][0]["applied"]
    # The same clicks again add nothing new: the NRRD is the result of the first request.
    response = ohif_infer(
        server.url, "vista3d", "STS_006_ct", {**params, "result_extension": ".nrrd", "result_dtype": "uint8"}
    )
    assert response.status_code == 200, response.text
    data, header = read_nrrd(response.content)
    image, affine = load_nifti(STS / "STS_006_ct.nii.gz")
    assert data.shape == image.shape
    assert data.dtype == np.uint8
    # NRRD stores LPS; the image's RAS affine flips the first two axes.
    np.testing.assert_allclose(np.abs(header["space directions"]), np.abs(affine[:3, :3].T), atol=1e-4)
    assert set(np.unique(data).tolist()) <= {0, 3}
    assert_one_component_at(data == 3, click, applied)


def test_zero_shot_name_gets_an_id_and_is_reported(server: Server, tmp_path: Path) -> None:
    click = sts_click("STS_002")
    response = infer_json(
        server.url, "STS_002_ct", {"points": [click], "point_labels": [1], "label_prompt": ["sarcoma"]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    sarcoma_id = body["label_prompt"][0]
    assert 133 <= sarcoma_id <= 254 and body["zero_shot"] is True
    assert body["new_label"] == {"sarcoma": sarcoma_id}
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["vista3d"]["labels"]["sarcoma"] == sarcoma_id
    again = infer_json(server.url, "STS_002_ct", {"points": [click], "point_labels": [1], "label_prompt": ["Sarcoma"]})
    assert again.json()["label_prompt"] == [sarcoma_id] and "new_label" not in again.json()


def test_zero_shot_id_comes_back_as_that_id(server: Server, tmp_path: Path) -> None:
    click = sts_click("STS_007")
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    params = {"points": [click], "point_labels": [1], "label_prompt": [201]}
    result, body = client.infer("vista3d", "STS_007_ct", params)
    body = json.loads(body) if isinstance(body, str) else body
    label, _ = load_nifti(result)
    assert set(np.unique(label).tolist()) <= {0, 201}
    applied = bool((label == 201).any())
    assert body["clicks"] == [{"point": click, "positive": True, "new": True, "applied": applied}]
    assert_one_component_at(label == 201, click, applied)


def test_second_object_leaves_the_first_alone(server: Server, tmp_path: Path) -> None:
    """Algorithm 1 across requests: clicks on another object never remove the first object's voxels."""
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    click = sts_click("STS_001")
    first, _ = client.infer("vista3d", "STS_001_ct", {"points": [click], "point_labels": [1], "label_prompt": [202]})
    before, _ = load_nifti(first)
    far = [min(click[0] + 40, before.shape[0] - 1), click[1], click[2]]
    second, body = client.infer("vista3d", "STS_001_ct", {"points": [far], "point_labels": [1], "label_prompt": [203]})
    body = json.loads(body) if isinstance(body, str) else body
    after, _ = load_nifti(second)
    changed = before != after
    assert np.all(after[changed] == 203), "a positive click only adds voxels of its own object"
    assert np.all(np.isin(after[before == 202], [202, 203])), "the first object is kept where not overwritten"
    assert changed.any() == body["clicks"][0]["applied"]


def test_negative_click_removes_only_the_component_it_touches(server: Server, tmp_path: Path) -> None:
    image, affine = load_nifti(STS / "STS_002_ct.nii.gz")
    click = sts_click("STS_002")
    previous = np.zeros(image.shape, dtype=np.uint8)
    a = tuple(slice(c - 3, c + 4) for c in click)  # a blob around the click
    far = list(click)
    far[0] = click[0] - 30 if click[0] >= 40 else click[0] + 30
    b = tuple(slice(c - 3, c + 4) for c in far)  # a second blob of the same class, elsewhere
    previous[a] = 204
    previous[b] = 204
    previous[0:5, 0:5, 0:2] = 5  # another class, far away
    label_file = tmp_path / "previous.nii.gz"
    label_file.write_bytes(nifti_bytes(previous, affine))
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    params = {"points": [click], "point_labels": [0], "label_prompt": [204]}
    result, body = client.infer("vista3d", "STS_002_ct", params, label_in=str(label_file))
    body = json.loads(body) if isinstance(body, str) else body
    edited, _ = load_nifti(result)
    # Where the model still predicts the object at the click, Algorithm 1 keeps it; otherwise it goes.
    assert edited[tuple(click)] == (0 if body["clicks"][0]["applied"] else 204), body
    assert np.all(edited[b] == 204), "the untouched component of the same class stays"
    assert np.all(edited[0:5, 0:5, 0:2] == 5), "other classes stay"
    outside_a = np.ones(image.shape, bool)
    outside_a[a] = False
    assert np.array_equal(edited[outside_a], previous[outside_a]), "nothing else changes"


def test_slicer_request_form(server: Server) -> None:
    """3D Slicer's MONAI Label module sends label name + foreground/background IJK lists."""
    click = sts_click("STS_003")
    bg = [click[0], click[1], max(click[2] - 6, 0)]
    response = infer_json(server.url, "STS_003_ct", {"label": "spleen", "foreground": [click], "background": [bg]})
    assert response.status_code == 200, response.text
    assert response.json()["label_prompt"] == [3]


def test_label_save_and_fetch_round_trip(server: Server, tmp_path: Path) -> None:
    image, affine = load_nifti(STS / "STS_003_ct.nii.gz")
    label = np.zeros(image.shape, dtype=np.uint8)
    label[tuple(slice(c - 4, c + 4) for c in sts_click("STS_003"))] = 133
    path = tmp_path / "final.nii.gz"
    path.write_bytes(nifti_bytes(label, affine))
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    client.save_label("STS_003_ct", str(path), tag="final")
    fetched = requests.get(f"{server.url}/datastore/label", params={"label": "STS_003_ct", "tag": "final"}, timeout=60)
    assert fetched.status_code == 200
    out = tmp_path / "fetched.nii.gz"
    out.write_bytes(fetched.content)
    data, fetched_affine = load_nifti(out)
    assert np.array_equal(data, label)
    np.testing.assert_allclose(fetched_affine, affine, atol=1e-5)
    assert not list((server.studies / "labels" / "final").glob(".saving-*")), "no temporary file is left behind"


def test_dataset_download_streams_the_labelled_images_and_writes_no_temporary_file(
    server: Server, tmp_path: Path
) -> None:
    image, affine = load_nifti(STS / "STS_006_ct.nii.gz")
    label = np.zeros(image.shape, dtype=np.uint8)
    label[tuple(slice(c - 3, c + 3) for c in sts_click("STS_006"))] = 133
    path = tmp_path / "final.nii.gz"
    path.write_bytes(nifti_bytes(label, affine))
    MONAILabelClient(server.url, tmpdir=str(tmp_path)).save_label("STS_006_ct", str(path), tag="final")
    assert server.tmp is not None
    before = set(server.tmp.iterdir())

    response = requests.get(f"{server.url}/datastore/dataset", timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = archive.namelist()
        assert "image/STS_006_ct.nii.gz" in names and "label/STS_006_ct.nii.gz" in names
        assert archive.read("label/STS_006_ct.nii.gz") == path.read_bytes(), "the stored label, byte for byte"
        assert "STS_006_ct" in json.loads(archive.read("metadata.json"))["objects"]
    one = requests.get(f"{server.url}/datastore/dataset", params={"limit_cases": 1}, timeout=300)
    with zipfile.ZipFile(io.BytesIO(one.content)) as archive:
        assert len([n for n in archive.namelist() if n.startswith("image/")]) == 1
    assert requests.get(f"{server.url}/datastore/dataset", params={"limit_cases": 0}, timeout=30).status_code == 422
    assert set(server.tmp.iterdir()) <= before, "MONAI Label's route left a copy of the dataset in the temp folder"


@pytest.mark.parametrize("tag", ["final"])
def test_corrupt_label_is_refused_and_good_label_kept(server: Server, tmp_path: Path, tag: str) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    response = requests.put(
        f"{server.url}/datastore/label",
        params={"image": "STS_003_ct", "tag": tag},
        files={"label": ("bad.nii.gz", bad.read_bytes())},
        timeout=60,
    )
    assert 400 <= response.status_code < 500, response.text
    assert "cannot be read" in response.text


def test_dice_scoring_reports_how_much_was_corrected(server: Server, tmp_path: Path) -> None:
    image, affine = load_nifti(STS / "STS_002_ct.nii.gz")
    original = np.zeros(image.shape, dtype=np.uint8)
    original[10:20, 10:20, 5:10] = 133
    final = original.copy()
    final[10:15, 10:20, 5:10] = 0  # the annotator removed half
    for tag, label in (("original", original), ("final", final)):
        response = requests.put(
            f"{server.url}/datastore/label",
            params={"image": "STS_002_ct", "tag": tag},
            files={"label": ("STS_002_ct.nii.gz", nifti_bytes(label, affine))},
            timeout=60,
        )
        assert response.status_code == 200, response.text
    # MONAI Label scores every saved label in the background; wait for it, then ask once more in process.
    deadline = time.time() + 180
    while requests.get(f"{server.url}/scoring/", params={"check_if_running": "true"}, timeout=30).status_code == 200:
        assert time.time() < deadline, "background scoring did not finish"
        time.sleep(1)
    response = requests.post(f"{server.url}/scoring/dice", params={"run_sync": "true"}, json={}, timeout=120)
    assert response.status_code == 200, response.text
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": "STS_002_ct"}, timeout=30).json()
    assert info["dice"] == round(2 * 500 / 1500, 5)
    assert info["corrected_fraction"] == 0.5


def test_active_learning_strategies(server: Server) -> None:
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert {"random", "first"} <= set(info["strategies"])
    response = requests.post(f"{server.url}/activelearning/first", json={}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["id"]
