"""Shared fixtures: paths to the real CT in ../shared/data, seeded RNGs, and the live MONAI Label server.

Servers live as long as the test module that started them, and a module that leaves any process
of its own running fails (:func:`_no_process_left`): a server and its background work (scoring
every image at start-up, training rounds) running on through the modules after it took their cores.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "vista3d"
DATA = (ROOT / ".." / "shared" / "data").resolve()
STS = DATA / "sts"
ABDOMEN_SM = DATA / "totalseg" / "example_ct_sm.nii.gz"
ABDOMEN_SEG_SM = DATA / "totalseg" / "example_seg.nii.gz"
# Tests that assert which ids a result holds get an image of their own (STS_006, STS_007).
SERVER_CASES = ("STS_001", "STS_002", "STS_003", "STS_006", "STS_007")
# Planted in each module's datastore before its server starts (tests/test_bad_input.py checks them).
STALE_SAVE = Path("labels") / "final" / ".saving-killedwrite.nii.gz"
LINKED_IMAGE = "linked"

sys.path.insert(0, str(APP_DIR))

from bench.common import serve  # noqa: E402  (the launcher the benchmarks use too)

from .postgres import BACKENDS, running_postgres, store_url  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    if not DATA.is_dir():
        raise pytest.UsageError(f"the tests need the real CT in {DATA} (../shared/data beside the project)")
    # Tests that run torch in this process use one thread (a test that needs more sets them): on a 2-core
    # runner beside another CPU-bound process, two threads wait on each other at every OpenMP barrier.
    # Measured on a 2-core EPYC beside two busy processes: test_schedule 99 s with two threads, 19 s with one.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Torch's threads as the test found them: a training task sets them for the subprocess it runs in, and
    run in process by a test it left every later test of the session on one thread."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# Python's own helpers, started once and kept for the interpreter's life: not a test's leftovers.
INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def processes_left(timeout_s: float = 5.0) -> list[psutil.Process]:
    """This process's descendants still running after up to ``timeout_s`` (zombies and helpers aside)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and not any(
                    helper in " ".join(child.cmdline()) for helper in INTERPRETER_HELPERS
                ):
                    left.append(child)
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:300]}"
    except psutil.NoSuchProcess:
        return f"{process.pid} (gone)"


@pytest.fixture(scope="module", autouse=True)
def _no_process_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test module that leaves a process running (its module-scoped servers are stopped by then)."""
    yield
    left = processes_left()
    names = [describe(p) for p in left]
    for process in left:  # the modules after this one start clean
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    assert not names, f"{request.module.__name__} left processes running:\n" + "\n".join(names)


class Server:
    """A running ``monailabel start_server`` with this app; ``tmp`` is its TMPDIR when the test chose one."""

    def __init__(
        self,
        url: str,
        studies: Path,
        log: Path,
        pid: int,
        tmp: Path | None = None,
        process: subprocess.Popen | None = None,
    ) -> None:
        self.url = url
        self.studies = studies
        self.log = log
        self.pid = pid
        self.tmp = tmp
        self.process = process  # to signal it and read its exit status

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="session")
def linked_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CT volume outside the datastore that each datastore links to (deleting must spare it)."""
    import nibabel as nib

    path = tmp_path_factory.mktemp("outside") / "linked_target.nii.gz"
    data = np.asarray(nib.load(str(ABDOMEN_SM)).dataobj)[:48, :48, :24]
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, linked_target: Path) -> Path:
    """A datastore of real CT, linked (not copied) from ../shared/data, with what a killed write leaves behind."""
    root = tmp_path_factory.mktemp("studies")
    for case in SERVER_CASES:
        os.symlink(STS / f"{case}_ct.nii.gz", root / f"{case}_ct.nii.gz")
    os.symlink(ABDOMEN_SM, root / "abdomen.nii.gz")
    os.symlink(linked_target, root / f"{LINKED_IMAGE}.nii.gz")
    (root / STALE_SAVE).parent.mkdir(parents=True)
    (root / STALE_SAVE).write_bytes(b"half a label")
    return root


@pytest.fixture(scope="session")
def test_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised ``small`` checkpoint: the servers under test behave the same every run."""
    from lib.model import build_network

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "small_seed0.pt"
    torch.save(build_network("small").state_dict(), path)
    return path


# MONAI Label scores every image of the datastore in a background process at start-up (and after
# each training round and active-learning request). No test needs that; a test that does passes
# MONAI_LABEL_AUTO_UPDATE_SCORING="true" to running_server, or runs a scoring through /scoring.
NO_AUTO_SCORING = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


@contextmanager
def running_server(
    studies: str, log: Path, weights: Path, conf: dict[str, str] | None = None, host: str = "127.0.0.1", **env: str
) -> Iterator[Server]:
    """``monailabel start_server`` with this app behind its serving edge on a free port, without scoring at
    start-up (:data:`NO_AUTO_SCORING`, unless ``env`` says otherwise); stopped with all it started on exit."""
    env = {**NO_AUTO_SCORING, **env}
    with serve(studies, {"weights": str(weights), **(conf or {})}, log, host=host, env=env, limit_s=180) as (url, proc):
        tmp = Path(env["TMPDIR"]) if "TMPDIR" in env else None
        yield Server(url, Path(studies), log, proc.pid, tmp, proc)


@pytest.fixture(scope="module")
def server(studies: Path, test_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real MONAI Label server with this app over the temporary datastore."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    tmp = tmp_path_factory.mktemp("server-tmp")  # its temporary files, to check that rejected requests leave none
    # The learning loop is tested on servers of its own (test_faults.py).
    conf = {"train_trigger": "0"}
    with running_server(str(studies), log, test_weights, conf=conf, TMPDIR=str(tmp)) as running:
        yield running


ROLES = ("user", "annotator", "reviewer", "admin")
PASSWORD = "a password for tests"
ALLOWED_ORIGIN = "https://viewer.example"


@pytest.fixture(scope="module")
def auth_server(test_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with sign-in on: one user per role (``u-<role>``), one allowed CORS origin, 2 new names per hour."""
    import nibabel as nib

    from lib.server.users import Role, UserStore

    root = tmp_path_factory.mktemp("auth-studies")
    os.symlink(STS / "STS_001_ct.nii.gz", root / "STS_001_ct.nii.gz")
    image = nib.load(str(STS / "STS_001_ct.nii.gz"))
    (root / "labels" / "final").mkdir(parents=True)
    label = nib.Nifti1Image(np.zeros(image.shape, dtype=np.uint8), image.affine)
    nib.save(label, str(root / "labels" / "final" / "STS_001_ct.nii.gz"))
    store = UserStore(root / ".vista3d" / "users.json")
    for role in ROLES:
        store.add(f"u-{role}", Role.parse(role), PASSWORD)
    log = tmp_path_factory.mktemp("auth-server") / "server.log"
    conf = {"train_trigger": "0", "cors_origins": ALLOWED_ORIGIN, "zero_shot_names_per_hour": "2"}
    with running_server(str(root), log, test_weights, conf=conf) as running:
        yield running


@pytest.fixture(scope="module")
def tokens(auth_server: Server) -> dict[str, str]:
    """A bearer token per role, fetched as 3D Slicer does (``POST /auth/token``)."""
    out = {}
    for role in ROLES:
        response = requests.post(f"{auth_server.url}/auth/token", data={"username": f"u-{role}", "password": PASSWORD})
        assert response.status_code == 200, response.text
        out[role] = response.json()["access_token"]
    return out


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL for the module (tests/postgres.py), stopped at its end."""
    with running_postgres() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh state store for each backend: a SQLite file, or a new database on ``postgres_server``."""
    return store_url(request, tmp_path)
