"""Every client mistake gets a 4xx whose message names the problem, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import requests

from .conftest import Server
from .helpers import infer_json, nifti_bytes

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


def upload(server: Server, image_id: str, content: bytes) -> None:
    response = requests.put(
        f"{server.url}/datastore/image",
        params={"image": image_id},
        files={"file": (f"{image_id}.nii.gz", content)},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def test_corrupt_image(server: Server) -> None:
    upload(server, "corrupt", b"\x1f\x8b this is not a gzip stream")
    response = infer_json(server.url, "corrupt", {"label_prompt": [1]})
    assert response.status_code == 422, response.text
    assert "cannot be read as a medical image" in response.json()["detail"]
    assert_still_serving(server)


def test_2d_image(server: Server) -> None:
    upload(server, "flat2d", nifti_bytes(np.zeros((64, 64), dtype=np.int16), np.eye(4)))
    response = infer_json(server.url, "flat2d", {"label_prompt": [1]})
    assert response.status_code == 422, response.text
    assert "must be a single-channel 3D volume" in response.json()["detail"]
    assert_still_serving(server)


def test_label_of_the_wrong_shape_is_refused(server: Server) -> None:
    label = nifti_bytes(np.zeros((10, 10, 10), dtype=np.uint8), np.eye(4))
    response = requests.put(
        f"{server.url}/datastore/label",
        params={"image": "STS_001_ct", "tag": "final"},
        files={"label": ("STS_001_ct.nii.gz", label)},
        timeout=60,
    )
    assert response.status_code == 422, response.text
    assert "has shape [10, 10, 10]" in response.json()["detail"]
    response = infer_json(server.url, "STS_001_ct", VALID, files={"label": ("prev.nii.gz", label)})
    assert response.status_code == 422 and "has shape [10, 10, 10]" in response.json()["detail"]
    assert_still_serving(server)
