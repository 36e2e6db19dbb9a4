"""Two replicas of the real server behind a real HAProxy (issue 25), on loopback.

The replicas serve one local datastore (two sarcoma CTs linked from ../shared/data) and one user
store, so a token either issued is valid on both; HAProxy is the one ``make serve REPLICAS=N`` starts
(:mod:`tools.haproxy`). Each replica names itself (``VISTA3D_REPLICA``): in ``/healthz`` and in an
``X-Replica`` header. The last test kills a replica with SIGKILL, so it runs last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from bench.common import free_port
from lib.server.users import Role, UserStore
from tools.haproxy import config, missing, running_haproxy, server_states
from tools.replicas import Fleet, Replica, plan_replicas

from .conftest import DATA, PASSWORD, STS, Server, running_server
from .helpers import infer_json
from .loop_helpers import put_label
from .orthanc import running_orthanc, series_uid
from .postgres import fresh_database

USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
# One thread each, no learning loop, float32 without a start-up measurement: two servers start on 2 cores.
CONF = {"threads": "1", "train_threads": "1", "train_trigger": "0", "precision": "fp32", "auto_precision": "fp32"}


@dataclass
class Farm:
    """The balancer's URL, the replicas by name, and HAProxy's run folder (config, log, stats socket)."""

    url: str
    replicas: dict[str, Server]
    run_dir: Path
    image: str  # an image id of the farm's datastore


def test_each_replica_gets_a_gpu_or_a_share_of_the_cores_unless_conf_says() -> None:
    cpu = plan_replicas(3, 8000, {"preset": "small"}, gpus=0, cores=8)
    assert [r.port for r in cpu] == [8001, 8002, 8003]
    assert [(r.conf["threads"], r.conf["train_threads"]) for r in cpu] == [("3", "1"), ("3", "1"), ("2", "1")]
    assert all("device" not in r.conf and r.conf["preset"] == "small" for r in cpu)
    assert [r.conf.get("train_trigger") for r in cpu] == [None, "0", "0"], "the learning loop on replica 1 only"
    assert [r.env.get("MONAI_LABEL_AUTO_UPDATE_SCORING") for r in cpu] == [None, "false", "false"]
    gpu = plan_replicas(3, 9000, {"threads": "4", "train_trigger": "2"}, gpus=2, cores=2)
    assert [r.conf["device"] for r in gpu] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [(r.conf["threads"], r.conf["train_trigger"]) for r in gpu] == [("4", "2"), ("4", "0"), ("4", "0")]
    assert plan_replicas(2, 8000, {"device": "cpu"}, gpus=4, cores=1)[1].conf["device"] == "cpu"
    with pytest.raises(ValueError, match="at least 1"):
        plan_replicas(0, 8000, {}, gpus=0, cores=2)


def _sleeper(_: Replica) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_a_replica_that_crashes_after_serving_is_started_again_but_not_one_that_never_served() -> None:
    fleet = Fleet([Replica(1, 8001), Replica(2, 8002)], _sleeper, restart_delay_s=0.0, max_deaths=3, window_s=60.0)
    fleet.start()
    try:
        first, never = fleet.processes
        fleet.served(1)
        for process in (first, never):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        fleet.poll(now=100.0)
        assert fleet.processes[0] is not first and fleet.processes[0].poll() is None, "r1 served: started again"
        assert fleet.processes[1] is never, "r2 never served: left down"
        for now in (101.0, 102.0):  # two more crashes after serving: the third within the window is the last
            fleet.served(1)
            os.killpg(fleet.processes[0].pid, signal.SIGKILL)
            fleet.processes[0].wait()
            fleet.poll(now=now)
        assert fleet.processes[0].poll() is not None and not fleet.alive(), "a crash loop is not started again"
    finally:
        assert fleet.stop() == 1  # killed replicas are not a clean exit


def test_haproxy_accepts_the_config(tmp_path: Path) -> None:
    if problem := missing():
        pytest.fail(f"HAPROXY IS NOT INSTALLED: {problem}", pytrace=False)
    text = config("0.0.0.0", 8000, [8001, 8002], tmp_path)
    assert "balance hash var(txn.user)" in text and "hash-type consistent" in text
    assert "server r2 127.0.0.1:8002 check" in text and "inter 1000ms fall 2 rise 2" in text
    (tmp_path / "haproxy.cfg").write_text(text)
    out = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _enter_all(stack: ExitStack, managers: list[AbstractContextManager[Server]]) -> list[Server]:
    """Enters the context managers at once (two servers start in the time of one); each entered one is exited."""
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
        errors = [f.exception() for f in futures]
    for manager, error in zip(managers, errors, strict=True):
        if error is None:
            stack.push(manager.__exit__)
    if first := next((e for e in errors if e is not None), None):
        raise first
    return [f.result() for f in futures]


@pytest.fixture(scope="module", params=["folder+sqlite", "orthanc+postgresql"])
def farm(
    request: pytest.FixtureRequest, test_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Farm]:
    """Two replicas behind HAProxy: on a local folder with the default SQLite state store; then on a
    throw-away Orthanc with a throw-away PostgreSQL state store (the several-machines layout)."""
    if problem := missing():
        pytest.fail(f"HAPROXY IS NOT INSTALLED: {problem}", pytrace=False)
    root = tmp_path_factory.mktemp("replica-studies")
    users = root / ".vista3d" / "users.json"
    store = UserStore(users)
    for name in USERS:
        store.add(name, Role.ANNOTATOR, PASSWORD)
    logs = tmp_path_factory.mktemp("replica-logs")
    conf, env = dict(CONF), {}
    with ExitStack() as stack:
        if request.param == "folder+sqlite":
            for case in ("STS_001", "STS_002"):
                os.symlink(STS / f"{case}_ct.nii.gz", root / f"{case}_ct.nii.gz")
            studies, image = str(root), "STS_001_ct"
        else:
            series = DATA / "sts_dicom" / "STS_001" / "image"
            orthanc = stack.enter_context(running_orthanc(root / "orthanc", free_port(), (series,)))
            studies, image = f"{orthanc}/dicom-web", series_uid(series)
            conf |= {"state": fresh_database(request.getfixturevalue("postgres_server"))}
            conf |= {"users": str(users), "model_store": str(root / "models")}
            env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(root / "cache")  # shared, as on one machine
        managers = [
            running_server(studies, logs / f"r{i}.log", test_weights, conf=conf, VISTA3D_REPLICA=str(i), **env)
            for i in (1, 2)
        ]
        servers = _enter_all(stack, managers)
        ports = [int(s.url.rsplit(":", 1)[1]) for s in servers]
        url = stack.enter_context(running_haproxy(logs / "haproxy", "127.0.0.1", free_port(), ports))
        wait_until_both_pass_checks(logs)
        yield Farm(url, {"1": servers[0], "2": servers[1]}, logs / "haproxy", image)


def wait_until_both_pass_checks(logs: Path, timeout_s: float = 30.0) -> None:
    """Both replicas UP with a passed health check; else fail with what HAProxy and each replica logged.

    HAProxy starts its servers UP before any check has run; a replica that then fails its checks
    would leave every user on the other one, and the tests below would fail without saying why.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = server_states(logs / "haproxy")
        if all(status == "UP" and check == "L7OK" for status, check in states.values()):
            return
        time.sleep(0.2)
    tails = {
        p.name: p.read_text(errors="replace")[-1500:] for p in (logs / "haproxy" / "haproxy.log", *logs.glob("r*.log"))
    }
    pytest.fail(f"replicas not both UP after {timeout_s:.0f} s: {states}; logs: {tails}", pytrace=False)


def sign_in(farm: Farm, name: str) -> dict[str, str]:
    """Headers with the token 3D Slicer would get (``POST /auth/token``, anonymous: any replica answers)."""
    response = requests.post(f"{farm.url}/auth/token", data={"username": name, "password": PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def replica_of(farm: Farm, headers: dict[str, str], path: str = "/info/") -> str:
    response = requests.get(f"{farm.url}{path}", headers=headers, timeout=60)
    assert response.status_code == 200, response.text[:300]
    return response.headers["x-replica"]


def test_healthz_through_the_balancer_names_each_replica_and_the_served_version(farm: Farm) -> None:
    seen = {}
    for _ in range(6):  # anonymous: round robin
        response = requests.get(f"{farm.url}/healthz", timeout=10)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok" and body["version"] == "small:small_seed0.pt"
        assert body["replica"] == response.headers["x-replica"]
        seen[body["replica"]] = body
    assert set(seen) == {"1", "2"}, "anonymous requests reach both replicas"


def test_a_users_requests_stay_on_one_replica_and_users_spread(farm: Farm) -> None:
    placed = {}
    for name in USERS:
        headers = sign_in(farm, name)
        where = {replica_of(farm, headers, path) for path in ("/info/", "/healthz", "/queue", "/info/", "/datastore/")}
        assert len(where) == 1, f"{name}'s requests went to replicas {where}"
        placed[name] = where.pop()
    assert set(placed.values()) == {"1", "2"}, f"every user on one replica: {placed}"
    # OHIF's session cookie carries the same user: the browser lands where the user's Slicer does
    session = requests.Session()
    page = session.post(f"{farm.url}/signin", data={"username": "alice", "password": PASSWORD}, allow_redirects=False)
    assert page.status_code == 303 and "vista3d_session" in session.cookies
    assert {session.get(f"{farm.url}/info/", timeout=60).headers["x-replica"] for _ in range(3)} == {placed["alice"]}


def _click_new_name(farm: Farm, headers: dict[str, str], name: str, start: threading.Barrier) -> requests.Response:
    params = {"points": [[40, 40, 8]], "point_labels": [1], "label_prompt": [name]}  # inside any test CT
    start.wait(30)
    return infer_json(farm.url, farm.image, params, headers=headers)


def test_two_replicas_creating_one_new_name_at_once_give_it_one_id(farm: Farm) -> None:
    """Users on different replicas click with the same new zero-shot name at the same moment (and a
    third with another name): the shared state store gives the name one id, the other name another."""
    by_replica: dict[str, dict[str, str]] = {}
    for name in USERS:
        headers = sign_in(farm, name)
        by_replica.setdefault(replica_of(farm, headers), headers)
    assert set(by_replica) == {"1", "2"}
    calls = [(by_replica["1"], "renal cyst"), (by_replica["2"], "renal cyst"), (by_replica["2"], "polyp")]
    start = threading.Barrier(len(calls))
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda c: _click_new_name(farm, c[0], c[1], start), calls))
    assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers]
    assert [a.headers["x-replica"] for a in answers] == ["1", "2", "2"]
    ids = [a.json()["label_prompt"][0] for a in answers]
    assert ids[0] == ids[1] != ids[2], f"ids {ids}"
    for replica in ("1", "2"):  # each replica's /info names both, with the same ids
        labels = requests.get(f"{farm.url}/info/", headers=by_replica[replica], timeout=60).json()
        assert labels["models"]["vista3d"]["labels"]["renal cyst"] == ids[0]
        assert labels["models"]["vista3d"]["labels"]["polyp"] == ids[2]


def _submit_box_label(farm: Farm, headers: dict[str, str], tmp_path: Path) -> tuple[np.ndarray, str]:
    """A final label on the image's grid as the server reads it (fetched through the API), submitted."""
    image = requests.get(f"{farm.url}/datastore/image", params={"image": farm.image}, headers=headers, timeout=120)
    assert image.status_code == 200, image.text[:300]
    (tmp_path / "image.nii.gz").write_bytes(image.content)
    grid = nib.load(tmp_path / "image.nii.gz")
    label = np.zeros(grid.shape[:3], dtype=np.uint8)
    label[8:24, 8:24, 2:6] = 133
    saved = put_label(farm.url, farm.image, label, grid.affine, timeout=120, headers=headers)
    assert saved.status_code == 200, saved.text[:300]
    return label, saved.headers["x-replica"]


def test_a_killed_replica_is_taken_out_and_its_users_served_by_the_other(farm: Farm, tmp_path: Path) -> None:
    headers = sign_in(farm, "alice")
    home = replica_of(farm, headers)
    other = "2" if home == "1" else "1"
    label, saved_by = _submit_box_label(farm, headers, tmp_path)  # alice's work before her replica dies
    assert saved_by == home
    assert all(status.startswith("UP") for status, _ in server_states(farm.run_dir).values())
    answers: list[tuple[float, int, str | None]] = []
    done = threading.Event()

    def keep_asking() -> None:  # alice works on: one request every 0.2 s from the kill until the end
        while not done.is_set():
            response = requests.get(f"{farm.url}/info/", headers=headers, timeout=60)
            answers.append(
                (round(time.monotonic() - killed, 2), response.status_code, response.headers.get("x-replica"))
            )
            time.sleep(0.2)

    os.killpg(farm.replicas[home].pid, signal.SIGKILL)  # the server and everything in its group, at once
    killed = time.monotonic()
    asking = threading.Thread(target=keep_asking)
    asking.start()
    try:
        while not server_states(farm.run_dir)[f"r{home}"][0].startswith("DOWN") and time.monotonic() - killed < 10:
            time.sleep(0.05)
        down_after = time.monotonic() - killed
        time.sleep(1.5)  # requests after it is out
    finally:
        done.set()
        asking.join()
    print(f"replica r{home} DOWN after {down_after:.2f} s; answers (s after the kill, status, replica): {answers}")
    # two failed checks a second apart; meanwhile a request that cannot connect is sent to the other replica
    assert down_after < 5, (down_after, answers)
    assert answers and all(status == 200 for _, status, _ in answers), f"answers after the kill: {answers}"
    assert {replica for _, _, replica in answers} == {other}, answers
    # the token alice got before is valid there: signed with the key beside the shared user store
    assert requests.get(f"{farm.url}/info/", headers=headers, timeout=60).json()["server"]["user"] == "alice"
    # and her label, saved through the dead replica, is read back through the other one, voxel for voxel
    back = requests.get(
        f"{farm.url}/datastore/label", params={"label": farm.image, "tag": "final"}, headers=headers, timeout=120
    )
    assert back.status_code == 200 and back.headers["x-replica"] == other, back.text[:300]
    (tmp_path / "back.nii.gz").write_bytes(back.content)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "back.nii.gz").dataobj), label)
    # her click session died with the replica: her first click there edits that label, and says so
    params = {"points": [[16, 16, 4]], "point_labels": [1], "label_prompt": [133]}
    click = infer_json(farm.url, farm.image, params, headers=headers)
    assert click.status_code == 200 and click.headers["x-replica"] == other, click.text[:300]
    assert click.json()["previous"] == "saved label"
