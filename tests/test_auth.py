"""Signing in as OHIF (the page and its cookie) and as 3D Slicer (MONAI Label's /auth contract), and safe defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from bench.common import free_port
from lib.server.launch import server_command, server_env
from lib.server.users import Role, UserStore

from .conftest import ALLOWED_ORIGIN, APP_DIR, PASSWORD, ROOT, Server, running_server
from .helpers import infer_json

CLICK = {"points": [[60, 60, 10]], "point_labels": [1], "label_prompt": [3]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_slicer_signs_in_with_monai_labels_client(auth_server: Server, tmp_path: Path) -> None:
    client = MONAILabelClient(auth_server.url, tmpdir=str(tmp_path), client_id="slicer-1")
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException, match="401"):
        client.info()
    with pytest.raises(MONAILabelClientException, match="401"):
        client.auth_token("u-annotator", "wrong password")
    token = client.auth_token("u-annotator", PASSWORD)
    assert token["token_type"] == "bearer" and token["expires_in"] > 0
    client.update_auth(token)
    assert client.auth_valid_token()
    assert "vista3d" in client.info()["models"]
    result, params = client.infer("vista3d", "STS_001_ct", dict(CLICK))
    params = json.loads(params) if isinstance(params, str) else params
    assert result is not None and params["label_prompt"] == [3]
    valid = requests.get(f"{auth_server.url}/auth/token/valid", headers=bearer(token["access_token"]), timeout=30)
    expected = {"username": "u-annotator", "name": "u-annotator", "email": None, "roles": ["user", "annotator"]}
    assert valid.json() == expected


def test_ohif_signs_in_through_the_page_and_its_cookie(auth_server: Server) -> None:
    anonymous = requests.get(f"{auth_server.url}/ohif/", headers={"Accept": "text/html"}, allow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/signin?next=%2Fohif%2F"
    page = requests.get(f"{auth_server.url}{anonymous.headers['location']}", timeout=30)
    assert page.status_code == 200 and 'name="password"' in page.text and 'value="/ohif/"' in page.text
    wrong = requests.post(f"{auth_server.url}/signin", data={"username": "u-user", "password": "nope"})
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text and not wrong.cookies

    session = requests.Session()
    signed = session.post(
        f"{auth_server.url}/signin",
        data={"username": "u-user", "password": PASSWORD, "next": "/ohif/"},
        allow_redirects=False,
    )
    assert signed.status_code == 303 and signed.headers["location"] == "/ohif/"
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith("vista3d_session=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/" in cookie
    assert session.get(f"{auth_server.url}/ohif/", timeout=30).status_code == 200
    info = session.get(f"{auth_server.url}/info/", timeout=30).json()
    assert {k: info["server"][k] for k in ("auth", "user", "role")} == {"auth": "on", "user": "u-user", "role": "user"}
    assert session.put(f"{auth_server.url}/datastore/label?image=STS_001_ct", timeout=30).status_code == 403
    session.post(f"{auth_server.url}/signout", allow_redirects=False)
    assert session.get(f"{auth_server.url}/info/", timeout=30).status_code == 401


def test_sign_in_never_redirects_to_another_site(auth_server: Server) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        response = requests.post(
            f"{auth_server.url}/signin",
            data={"username": "u-user", "password": PASSWORD, "next": target},
            allow_redirects=False,
        )
        assert response.headers["location"] == "/ohif/"


def test_forged_and_stale_tokens_get_401(auth_server: Server, tokens: dict[str, str]) -> None:
    claims = jwt.decode(tokens["admin"], options={"verify_signature": False})
    forged = jwt.encode({**claims, "sub": "u-admin"}, "not the server's key, but long enough", algorithm="HS256")
    response = requests.get(f"{auth_server.url}/info/", headers=bearer(forged), timeout=30)
    assert response.status_code == 401 and "not valid" in response.json()["detail"]
    store = UserStore(auth_server.studies / ".vista3d" / "users.json")
    store.add("temp-user", Role.ADMIN, PASSWORD)
    token = requests.post(f"{auth_server.url}/auth/token", data={"username": "temp-user", "password": PASSWORD})
    headers = bearer(token.json()["access_token"])
    assert requests.delete(f"{auth_server.url}/train/", headers=headers, timeout=30).status_code == 200
    store.set_role("temp-user", Role.USER)  # counts from the next request, no restart
    assert requests.delete(f"{auth_server.url}/train/", headers=headers, timeout=30).status_code == 403
    store.remove("temp-user")
    response = requests.get(f"{auth_server.url}/info/", headers=headers, timeout=30)
    assert response.status_code == 401 and "no longer exists" in response.json()["detail"]


def test_cors_admits_only_the_configured_origin(auth_server: Server, server: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = requests.options(f"{auth_server.url}/info/", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    for url in (auth_server.url, server.url):  # server: no origins configured, the default
        evil = requests.options(f"{url}/info/", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in evil.headers
        plain = requests.get(f"{url}/auth/", headers={"Origin": "https://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in plain.headers


def test_new_zero_shot_names_are_capped_per_user(auth_server: Server, tokens: dict[str, str]) -> None:
    def click(token: str, name: str) -> requests.Response:
        return requests.post(
            f"{auth_server.url}/infer/vista3d",
            params={"image": "STS_001_ct", "output": "json"},
            files={"params": (None, json.dumps({**CLICK, "label_prompt": [name]}))},
            headers=bearer(token),
            timeout=300,
        )

    for name in ("first structure", "second structure"):
        assert click(tokens["annotator"], name).status_code == 200
    third = click(tokens["annotator"], "third structure")
    assert third.status_code == 429 and int(third.headers["retry-after"]) > 3000
    assert "u-annotator created 2 new zero-shot names in the last hour" in third.json()["detail"]
    assert click(tokens["annotator"], "first structure").status_code == 200, "existing names stay usable"
    assert click(tokens["reviewer"], "third structure").status_code == 200, "the cap is per user"


def test_only_admins_see_server_paths(auth_server: Server, tokens: dict[str, str]) -> None:
    url = f"{auth_server.url}/datastore/image/info?image=STS_001_ct"
    user = requests.get(url, headers=bearer(tokens["user"]), timeout=30).json()
    admin = requests.get(url, headers=bearer(tokens["admin"]), timeout=30).json()
    assert user["path"] == "STS_001_ct.nii.gz"
    assert admin["path"].startswith("/") and admin["path"].endswith("STS_001_ct.nii.gz")


def start(studies: Path, host: str, conf: dict[str, str], log: Path) -> subprocess.CompletedProcess[str]:
    """Runs ``monailabel start_server`` behind the edge until it exits (or 90 s)."""
    bin_dir = Path(sys.executable).parent
    cmd = server_command(bin_dir / "monailabel", APP_DIR, str(studies), host, free_port(), conf)
    return subprocess.run(
        cmd, env=server_env(APP_DIR, os.environ), cwd=ROOT, capture_output=True, text=True, timeout=90
    )


def test_network_address_without_users_refuses_to_start(tmp_path: Path) -> None:
    began = time.time()
    done = start(tmp_path, "0.0.0.0", {"weights": "none"}, tmp_path / "log")
    assert done.returncode != 0
    assert "refusing to start: serving on 0.0.0.0 needs sign-in" in done.stdout + done.stderr
    assert time.time() - began < 60


def test_auth_off_on_a_network_address_says_so_loudly(tmp_path: Path, test_weights: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    with running_server(str(studies), tmp_path / "log", test_weights, {"auth": "off"}, host="0.0.0.0") as s:
        info = requests.get(f"{s.url}/info/", timeout=30).json()
        assert info["warning"].startswith("SIGN-IN IS OFF on 0.0.0.0")
        assert "SIGN-IN IS OFF" in s.log_text()
        assert infer_json(s.url, "nosuch", CLICK).status_code == 404


def test_make_serve_binds_loopback_behind_the_edge() -> None:
    dry = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "tools/serve.py" in dry and "--host 127.0.0.1" in dry
    from tools.serve import parse_args

    args = parse_args(["--host", "127.0.0.1"])
    cmd = server_command(Path("monailabel"), ROOT / "apps" / "vista3d", "s", args.host, args.port, dict(args.conf))
    assert "--uvicorn_app" in cmd and cmd[cmd.index("--uvicorn_app") + 1] == "lib.server.asgi:app"
    assert parse_args([]).host == "127.0.0.1", "tools/serve.py binds loopback unless told otherwise"
    dry = subprocess.run(["make", "-n", "serve", "HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--host 0.0.0.0" in dry


def test_training_while_another_replica_trains_is_409_naming_it(auth_server: Server, tokens: dict[str, str]) -> None:
    """The training lease in the server's state store (SQLite, state.db) is checked before a round starts."""
    from lib.state.lease import TRAINING
    from lib.state.sqlite import SQLiteStore

    state = SQLiteStore(auth_server.studies / ".vista3d" / "state.db")
    assert state.acquire(TRAINING, "replica-2:4242", ttl_s=120)  # a round running on another replica
    try:
        response = requests.post(f"{auth_server.url}/train/point", headers=bearer(tokens["admin"]), timeout=30)
        assert response.status_code == 409 and "replica-2:4242" in response.json()["detail"], response.text
    finally:
        state.release(TRAINING, "replica-2:4242")
    running = requests.get(
        f"{auth_server.url}/train/", params={"check_if_running": "true"}, headers=bearer(tokens["admin"])
    )
    assert running.status_code == 404, "no round was started"
