"""Shared fixtures: paths to the real CT in ../shared/data, seeded RNGs, and the live MONAI Label server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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

sys.path.insert(0, str(APP_DIR))


def pytest_configure(config: pytest.Config) -> None:
    if not DATA.is_dir():
        raise pytest.UsageError(f"the tests need the real CT in {DATA} (../shared/data beside the project)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    np.random.seed(0)
    torch.manual_seed(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_info(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server did not answer /info within {timeout}s:\n{log.read_text()[-4000:]}")


class Server:
    """A running ``monailabel start_server`` with this app."""

    def __init__(self, url: str, studies: Path, log: Path, pid: int) -> None:
        self.url = url
        self.studies = studies
        self.log = log
        self.pid = pid

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="session")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datastore of real CT, linked (not copied) from ../shared/data."""
    root = tmp_path_factory.mktemp("studies")
    for case in SERVER_CASES:
        os.symlink(STS / f"{case}_ct.nii.gz", root / f"{case}_ct.nii.gz")
    os.symlink(ABDOMEN_SM, root / "abdomen.nii.gz")
    return root


@pytest.fixture(scope="session")
def test_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised ``small`` checkpoint: the servers under test behave the same every run."""
    from lib.model import build_network

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "small_seed0.pt"
    torch.save(build_network("small").state_dict(), path)
    return path


@contextmanager
def running_server(
    studies: str, log: Path, weights: Path, conf: dict[str, str] | None = None, **env: str
) -> Iterator[Server]:
    """``monailabel start_server`` with this app on a free loopback port; stopped on exit."""
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    full_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **env)
    cmd = [str(bin_dir / "monailabel"), "start_server", "--app", str(APP_DIR), "--studies", studies]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--conf", "weights", str(weights)]
    for key, value in (conf or {}).items():
        cmd += ["--conf", key, value]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_info(url, proc, log)
        yield Server(url, Path(studies), log, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server(studies: Path, test_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real MONAI Label server with this app over the temporary datastore."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    # The learning loop is tested on servers of its own (test_learning_server.py).
    with running_server(str(studies), log, test_weights, conf={"train_trigger": "0"}) as running:
        yield running
