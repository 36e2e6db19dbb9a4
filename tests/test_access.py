"""The route -> role table, tested from itself: every row, as anonymous, user, annotator, reviewer and admin.

Each row has a sample request that succeeds (or, for destructive routes, targets something that does
not exist, so the handler's own 404 shows the request got through). Anonymous callers must get 401,
callers below the row's role 403, the others the sample's answer. A row without a sample, a served
route without a row, or a row without a served route fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests

from lib.server.access import RULES, Rule, find_rule
from lib.server.users import Role

from .conftest import APP_DIR, PASSWORD, ROLES, STS, Server
from .helpers import nifti_bytes

IDENTITIES = ("anonymous", *ROLES)


@dataclass(frozen=True)
class Sample:
    """A request for a row and the statuses it may get once allowed."""

    url: str
    allowed: tuple[int, ...] = (200,)
    kwargs: dict[str, Any] = field(default_factory=dict)


@cache
def sts_label() -> bytes:
    image = nib.load(str(STS / "STS_001_ct.nii.gz"))
    return nifti_bytes(np.zeros(image.shape, dtype=np.uint8), image.affine)


def form(**fields: str) -> dict[str, Any]:
    return {"files": {k: (None, v) for k, v in fields.items()}}


SIGN_IN = {"data": {"username": "u-user", "password": PASSWORD, "next": "/info/"}}
SAMPLES: dict[tuple[str, str], Sample] = {
    ("GET", "/signin"): Sample("/signin"),
    ("POST", "/signin"): Sample("/signin", (303,), SIGN_IN),
    ("POST", "/signout"): Sample("/signout", (303,)),
    ("GET", "/auth/"): Sample("/auth/"),
    ("POST", "/auth/token"): Sample("/auth/token", (200,), {"data": {"username": "u-user", "password": PASSWORD}}),
    ("GET", "/auth/token/valid"): Sample("/auth/token/valid"),
    ("GET", "/favicon.ico"): Sample("/favicon.ico"),
    ("GET", "/healthz"): Sample("/healthz"),
    ("GET", "/"): Sample("/"),
    ("GET", "/docs"): Sample("/docs"),
    ("GET", "/openapi.json"): Sample("/openapi.json"),
    ("GET", "/static/{path:path}"): Sample("/static/favicon.ico"),
    ("GET", "/ohif/{path:path}"): Sample("/ohif/"),
    ("GET", "/proxy/dicom/{path:path}"): Sample("/proxy/dicom/studies", (404,)),  # a local datastore: no proxy
    ("GET", "/info/"): Sample("/info/"),
    ("GET", "/queue"): Sample("/queue"),
    ("POST", "/infer/{model}"): Sample("/infer/nosuchmodel?image=STS_001_ct", (404,)),
    ("POST", "/activelearning/{strategy}"): Sample("/activelearning/first", (200,), {"json": {}}),
    ("GET", "/datastore/"): Sample("/datastore/"),
    ("GET", "/datastore/image"): Sample("/datastore/image?image=STS_001_ct"),
    ("HEAD", "/datastore/image"): Sample("/datastore/image?image=STS_001_ct"),
    ("GET", "/datastore/image/info"): Sample("/datastore/image/info?image=STS_001_ct"),
    ("GET", "/datastore/label"): Sample("/datastore/label?label=STS_001_ct&tag=final"),
    ("HEAD", "/datastore/label"): Sample("/datastore/label?image=STS_001_ct&tag=final"),
    ("GET", "/datastore/label/info"): Sample("/datastore/label/info?label=STS_001_ct&tag=final"),
    ("GET", "/train/"): Sample("/train/", (200, 404)),  # 404: no training has run yet
    ("GET", "/scoring/"): Sample("/scoring/", (200, 404)),
    ("GET", "/batch/infer"): Sample("/batch/infer", (200, 404)),
    ("GET", "/dashboard/"): Sample("/dashboard/"),
    ("GET", "/dashboard/data"): Sample("/dashboard/data"),
    ("PUT", "/datastore/image"): Sample(
        "/datastore/image?image=uploaded",
        (200,),
        {"files": {"file": ("uploaded.nii.gz", nifti_bytes(np.zeros((8, 8, 8), np.int16), np.eye(4)))}},
    ),
    ("PUT", "/datastore/image/info"): Sample("/datastore/image/info?image=STS_001_ct", (200,), form(info="{}")),
    ("PUT", "/datastore/label"): Sample("/datastore/label?image=STS_001_ct&tag=table", (200,), {}),
    ("PUT", "/datastore/label/info"): Sample("/datastore/label/info?label=STS_001_ct&tag=final", (200,), form()),
    ("POST", "/scoring/{method}"): Sample("/scoring/nosuchmethod", (404,)),
    ("POST", "/proxy/dicom/{path:path}"): Sample("/proxy/dicom/studies", (404,)),
    ("DELETE", "/datastore/image"): Sample("/datastore/image?id=nosuchimage", (404,)),
    ("DELETE", "/datastore/label"): Sample("/datastore/label?id=STS_001_ct&tag=nosuchtag", (404,)),
    ("GET", "/datastore/dataset"): Sample("/datastore/dataset?limit_cases=1"),
    ("POST", "/train/{model}"): Sample("/train/nosuchmodel", (404,)),
    ("DELETE", "/train/"): Sample("/train/"),
    ("DELETE", "/scoring/"): Sample("/scoring/"),
    ("POST", "/batch/infer/{model}"): Sample("/batch/infer/nosuchmodel", (404,)),
    ("DELETE", "/batch/infer"): Sample("/batch/infer"),
    ("POST", "/model/{model}/rollback"): Sample("/model/vista3d/rollback", (409,)),  # no older version
    ("GET", "/logs/"): Sample("/logs/?lines=5&text=true"),
    ("GET", "/logs/gpu"): Sample("/logs/gpu", (200, 404)),  # 404 on a machine without a GPU
}


def expected(rule: Rule, identity: str) -> int | None:
    """401 or 403 as the table says, None for 'allowed'."""
    if rule.role is None:
        return None
    if identity == "anonymous":
        return 401
    return None if Role.parse(identity) >= rule.role else 403


def call(server: Server, rule: Rule, token: str | None) -> requests.Response:
    sample = SAMPLES[(rule.method, rule.path)]
    kwargs = dict(sample.kwargs)
    if (rule.method, rule.path) == ("PUT", "/datastore/label"):
        kwargs["files"] = {"label": ("STS_001_ct.nii.gz", sts_label())}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(
        rule.method, server.url + sample.url, headers=headers, allow_redirects=False, timeout=120, **kwargs
    )


def test_every_row_has_a_sample() -> None:
    assert set(SAMPLES) == {(r.method, r.path) for r in RULES}


@pytest.mark.parametrize("identity", IDENTITIES)
@pytest.mark.parametrize("rule", RULES, ids=[f"{r.method} {r.path}" for r in RULES])
def test_route_answers_as_the_table_says(
    auth_server: Server, tokens: dict[str, str], rule: Rule, identity: str
) -> None:
    response = call(auth_server, rule, tokens.get(identity))
    want = expected(rule, identity)
    if want is None:
        assert response.status_code in SAMPLES[(rule.method, rule.path)].allowed, response.text[:500]
    else:
        assert response.status_code == want, response.text[:500]
        if want == 403:
            assert f"needs the role {rule.role.label}" in response.json()["detail"]  # type: ignore[union-attr]


ROUTES_SCRIPT = """
import json, sys
from monailabel.config import settings
settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES = sys.argv[1], sys.argv[2]
settings.MONAI_LABEL_APP_CONF = {"users": sys.argv[3]}
from starlette.routing import Mount
from lib.server import asgi
def walk(routes):
    for r in routes:
        if hasattr(r, "original_router"):  # FastAPI's include_router keeps the router
            yield from walk(r.original_router.routes)
        elif isinstance(r, Mount):
            yield "GET", r.path + "/{path:path}"
        else:
            yield from ((m, r.path) for m in sorted(r.methods))
local = list(walk(asgi.app.routes))
settings.MONAI_LABEL_STUDIES = "http://127.0.0.1:9/dicom-web"
print(json.dumps([local, list(walk(asgi.create_app().routes))]))
"""


def test_every_served_route_has_a_row_and_every_row_a_route(tmp_path: Path) -> None:
    """The routes the server's application holds (built in another process: the app is made at import)."""
    out = subprocess.run(
        [sys.executable, "-c", ROUTES_SCRIPT, str(APP_DIR), str(tmp_path), str(tmp_path / "users.json"), "-i", "::1"],
        env={"PYTHONPATH": str(APP_DIR), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        check=True,
    )
    local, dicomweb = ({(m, p) for m, p in routes} for routes in json.loads(out.stdout.strip().splitlines()[-1]))
    for method, path in local | dicomweb:
        assert find_rule(method, path) is not None, f"{method} {path} is served but has no row"
    for rule in RULES:
        assert (rule.method, rule.path) in local | dicomweb, f"row {rule.method} {rule.path} has no route"
    assert ("GET", "/proxy/dicom/{path:path}") in dicomweb - local
    assert not {p for _, p in local} & {"/session/", "/reload", "/model/{model}", "/infer/wsi_v2/{model}"}
