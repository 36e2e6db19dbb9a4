"""Every client mistake gets a 4xx whose message names the problem, nothing changes, and the server keeps serving.

Each row of issue 11's list of hostile requests is tried against the real server here (sign-in off,
loopback); the access table and sign-in are tested in test_access.py and test_auth.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import requests

from .conftest import STALE_SAVE, STS, Server
from .helpers import infer_json, load_nifti, nifti_bytes

VALID = {"points": [[60, 60, 10]], "point_labels": [1], "label_prompt": [3]}

BAD_PARAMS = [
    (
        "outside",
        {"points": [[60, 60, 10], [60, 9999, 10]], "point_labels": [1, 1], "label_prompt": [3]},
        400,
        "lies outside the image",
    ),
    ("lengths", {"points": [[60, 60, 10]], "point_labels": [1, 0], "label_prompt": [3]}, 400, "point_labels has 2"),
    (
        "non-integer id",
        {"points": [[60, 60, 10]], "point_labels": [1], "label_prompt": [2.5]},
        400,
        "must be an integer",
    ),
    ("unsupported id", {"label_prompt": [18]}, 400, "is not supported"),
    ("unknown id", {"label_prompt": [300]}, 400, "is not a class id"),
    (
        "group with points",
        {"points": [[60, 60, 10]], "point_labels": [1], "label_prompt": [21]},
        400,
        "is a group of classes",
    ),
    (
        "several prompts with points",
        {"points": [[60, 60, 10]], "point_labels": [1], "label_prompt": [1, 3]},
        400,
        "must hold one id",
    ),
    ("empty label_prompt", {"label_prompt": []}, 400, "label_prompt is empty"),
    # Issue 11's 500s, now 4xx.
    ("coordinate 1e308", {**VALID, "points": [[60, 60, 1e308]]}, 400, "must be an integer of at most"),
    ("result_extension .txt", {**VALID, "result_extension": ".txt"}, 400, "result_extension must be one of"),
    ("result_extension path", {**VALID, "result_extension": "/../../x"}, 400, "result_extension must be one of"),
    ("result_dtype evil", {**VALID, "result_dtype": "evil"}, 400, "result_dtype must be one of"),
    # Server paths through params.
    ("params.image", {**VALID, "image": str(STS / "STS_002_ct.nii.gz")}, 400, "params may not set ['image']"),
    ("params.label_file", {**VALID, "label_file": str(STS / "STS_001_gtv.nii.gz")}, 400, "params may not set"),
    ("save_label with a path tag", {**VALID, "save_label": True, "label_tag": "../x"}, 400, "label_tag must be"),
]


def assert_still_serving(server: Server) -> None:
    response = infer_json(server.url, "STS_001_ct", VALID)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("name", "params", "status", "message"), BAD_PARAMS, ids=[b[0] for b in BAD_PARAMS])
def test_bad_params(server: Server, name: str, params: dict[str, Any], status: int, message: str) -> None:
    response = infer_json(server.url, "STS_001_ct", params)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert_still_serving(server)


def raw_infer(server: Server, image: str, params: str) -> requests.Response:
    return requests.post(
        f"{server.url}/infer/vista3d", params={"image": image, "output": "json"}, files={"params": (None, params)}
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [("{not json", "params is not valid JSON"), ("[1, 2]", "params must be a JSON object, got list")],
)
def test_params_that_are_not_a_json_object(server: Server, params: str, message: str) -> None:
    response = raw_infer(server, "STS_001_ct", params)
    assert response.status_code == 400 and message in response.json()["detail"], response.text


@pytest.mark.parametrize("image", [str(STS / "STS_002_ct.nii.gz"), "../STS_002_ct", "/etc/hostname"])
def test_image_is_a_datastore_id_never_a_path(server: Server, image: str) -> None:
    response = infer_json(server.url, image, {"label_prompt": [1]})
    assert response.status_code == 400, response.text
    assert "must be a plain name" in response.json()["detail"]


def test_params_label_is_never_read_as_a_file(server: Server) -> None:
    """Slicer's ``label`` is a name; a path there must not make the server read that file as the previous label."""
    gtv = STS / "STS_001_gtv.nii.gz"  # voxels 1 (liver's id) where the tumour is
    params = {**VALID, "label": str(gtv), "client_id": "label-path-test"}  # a session of its own
    response = infer_json(server.url, "STS_001_ct", params)
    assert response.status_code == 200, response.text
    assert response.json()["previous"] == "empty"
    assert set(response.json()["label_names"].values()) <= {3}, "the result holds only what the click made"


def test_too_many_points_are_refused_quickly(server: Server) -> None:
    points = [[60, 60, 10]] * 20_000
    start = time.time()
    response = infer_json(
        server.url, "STS_001_ct", {"points": points, "point_labels": [1] * 20_000, "label_prompt": [3]}
    )
    assert response.status_code == 400, response.text
    assert "has 20000 clicks; at most 200 per request" in response.json()["detail"]
    assert time.time() - start < 10


def test_refused_new_names_take_no_zero_shot_id(server: Server) -> None:
    """125 requests with new names and points outside the image used up every zero-shot id before the fix."""
    before = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["vista3d"]["zero_shot_labels"]
    for n in range(125):
        params = {"points": [[60, 9999, 10]], "point_labels": [1], "label_prompt": [f"hostile{n}"]}
        response = infer_json(server.url, "STS_001_ct", params)
        assert response.status_code == 400 and "outside the image" in response.json()["detail"]
    after = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["vista3d"]["zero_shot_labels"]
    assert after == before
    response = infer_json(server.url, "STS_001_ct", {**VALID, "label_prompt": ["legitimate structure"]})
    assert response.status_code == 200, response.text
    assert 133 <= response.json()["new_label"]["legitimate structure"] <= 254


def test_unknown_model(server: Server) -> None:
    response = requests.post(
        f"{server.url}/infer/deepedit", params={"image": "STS_001_ct", "output": "json"}, timeout=60
    )
    assert response.status_code == 404
    assert "unknown model 'deepedit'" in response.json()["detail"]
    assert_still_serving(server)


def test_unknown_image(server: Server) -> None:
    response = infer_json(server.url, "no_such_image", VALID)
    assert response.status_code == 404
    assert "unknown image id 'no_such_image'" in response.json()["detail"]
    assert_still_serving(server)


def upload(server: Server, image_id: str, content: bytes) -> requests.Response:
    return requests.put(
        f"{server.url}/datastore/image",
        params={"image": image_id},
        files={"file": (f"{image_id}.nii.gz", content)},
        timeout=60,
    )


def test_corrupt_image_is_not_stored(server: Server) -> None:
    response = upload(server, "corrupt", b"\x1f\x8b this is not a gzip stream")
    assert response.status_code == 422, response.text
    assert "cannot be read as a medical image" in response.json()["detail"]
    assert not list(server.studies.glob("corrupt*"))
    assert infer_json(server.url, "corrupt", {"label_prompt": [1]}).status_code == 404
    assert_still_serving(server)


def test_2d_image_is_not_stored(server: Server) -> None:
    response = upload(server, "flat2d", nifti_bytes(np.zeros((64, 64), dtype=np.int16), np.eye(4)))
    assert response.status_code == 422, response.text
    assert "must be a single-channel 3D volume" in response.json()["detail"]
    assert not list(server.studies.glob("flat2d*"))


@pytest.mark.parametrize(("image_id", "message"), [("../../escaped", "must be a plain name"), ("ok", "must be one of")])
def test_upload_names_and_types_are_checked(server: Server, image_id: str, message: str) -> None:
    name = f"{image_id}.nii.gz" if image_id != "ok" else "ok.txt"
    response = requests.put(
        f"{server.url}/datastore/image", params={"image": image_id}, files={"file": (name, b"x")}, timeout=60
    )
    assert response.status_code == 400 and message in response.json()["detail"], response.text
    assert not (server.studies.parent.parent / "escaped.nii.gz").exists()


def put_label(server: Server, image: str, content: bytes, tag: str = "final", params: str = "{}") -> requests.Response:
    return requests.put(
        f"{server.url}/datastore/label",
        params={"image": image, "tag": tag},
        files={"label": (f"{image}.nii.gz", content), "params": (None, params)},
        timeout=60,
    )


def test_label_tag_cannot_leave_the_datastore(server: Server) -> None:
    image, affine = load_nifti(STS / "STS_001_ct.nii.gz")
    label = nifti_bytes(np.zeros(image.shape, dtype=np.uint8), affine)
    response = put_label(server, "STS_001_ct", label, tag="../../escape")
    assert response.status_code == 400, response.text
    assert "label tag must be a plain name" in response.json()["detail"]
    for folder in (server.studies, server.studies.parent, server.studies.parent.parent):
        assert not list(folder.glob("escape*")), f"nothing written in {folder}"


def test_label_params_that_are_not_json(server: Server) -> None:
    image, affine = load_nifti(STS / "STS_001_ct.nii.gz")
    label = nifti_bytes(np.zeros(image.shape, dtype=np.uint8), affine)
    response = put_label(server, "STS_001_ct", label, params="{oops")
    assert response.status_code == 400 and "params is not valid JSON" in response.json()["detail"], response.text


def test_label_of_the_wrong_shape_is_refused(server: Server) -> None:
    label = nifti_bytes(np.zeros((10, 10, 10), dtype=np.uint8), np.eye(4))
    response = put_label(server, "STS_001_ct", label)
    assert response.status_code == 422, response.text
    assert "has shape [10, 10, 10]" in response.json()["detail"]
    response = infer_json(server.url, "STS_001_ct", VALID, files={"label": ("prev.nii.gz", label)})
    assert response.status_code == 422 and "has shape [10, 10, 10]" in response.json()["detail"]
    assert_still_serving(server)


def test_rejected_uploads_leave_no_temporary_files(server: Server) -> None:
    assert server.tmp is not None
    before = set(server.tmp.iterdir())
    bad = nifti_bytes(np.zeros((10, 10, 10), dtype=np.uint8), np.eye(4))
    assert put_label(server, "STS_001_ct", b"not a label").status_code == 422
    assert put_label(server, "STS_001_ct", bad, tag="a/b").status_code == 400
    assert infer_json(server.url, "STS_001_ct", VALID, files={"label": ("prev.nii.gz", bad)}).status_code == 422
    assert upload(server, "corrupt2", b"junk").status_code == 422
    time.sleep(0.5)
    assert set(server.tmp.iterdir()) <= before


def test_stale_partial_label_is_removed_at_start(server: Server) -> None:
    assert not (server.studies / STALE_SAVE).exists()
    assert "Removed" in server.log_text() and STALE_SAVE.name in server.log_text()


def test_deleting_a_linked_image_removes_the_link_only(server: Server, linked_target: Any) -> None:
    link = server.studies / "linked.nii.gz"
    assert link.is_symlink()
    response = requests.delete(f"{server.url}/datastore/image", params={"id": "linked"}, timeout=60)
    assert response.status_code == 200, response.text
    assert not link.exists() and not link.is_symlink()
    assert linked_target.exists(), "the link's target outside the datastore is untouched"
    response = requests.delete(f"{server.url}/datastore/image", params={"id": "linked"}, timeout=60)
    assert response.status_code == 404


def test_gpu_report_on_a_cpu_machine(server: Server) -> None:
    response = requests.get(f"{server.url}/logs/gpu", timeout=60)
    assert response.status_code in (200, 404)
    if response.status_code == 404:
        assert "no GPU" in response.json()["detail"]


def test_logged_params_are_truncated(server: Server) -> None:
    response = infer_json(server.url, "STS_001_ct", {**VALID, "padding": "x" * 200_000})
    assert response.status_code == 200, response.text
    longest = max(len(line) for line in server.log_text().splitlines())
    assert longest < 2500, f"a log line of {longest} characters"


def test_answers_carry_no_absolute_server_paths(server: Server) -> None:
    """Without sign-in nobody is an admin: datastore and active-learning answers name files, not paths."""
    answers = [
        requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30),
        requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=30),
        requests.get(f"{server.url}/datastore/image/info", params={"image": "STS_001_ct"}, timeout=30),
        requests.post(f"{server.url}/activelearning/first", json={}, timeout=60),
        upload(server, "corrupt3", b"junk"),
    ]
    for response in answers:
        assert response.status_code < 500, response.text
        text = json.dumps(response.json())
        for root in (str(server.studies), str(STS), str(server.tmp), "/tmp/", "/work/"):
            assert root not in text, f"{response.url} names {root}: {text[:300]}"
    assert "STS_001_ct.nii.gz" in answers[2].text
