"""Fixtures of the browser tests: the server a newcomer starts with the README's commands, headless Chromium.

Missing system packages (Orthanc, Chromium, chromedriver) fail the tests with the command that
installs them (``make e2e`` does): a browser test that is skipped quietly proves nothing. The
server (with the Orthanc it starts) and the browser live as long as the test module that uses them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from bench.common import free_port, stop_tree

from ..conftest import DATA, NO_AUTO_SCORING, PASSWORD, ROOT, Server

ARTIFACTS = ROOT / "artifacts" / "e2e"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots and logs of the last run (git-ignored)."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


ANNOTATOR = "e2e-annotator"
# What a newcomer adds with `make add`: a sarcoma CT's DICOM folder (its RTSTRUCT is refused) and another's NIfTI.
# (The abdominal NIfTI would do too, but its automatic segmentation takes 150 window passes instead of 27.)
NEWCOMER_STUDIES = (DATA / "sts_dicom" / "STS_001", DATA / "sts" / "STS_002_ct.nii.gz")


class Newcomer(Server):
    """The server ``make serve`` started, and what ``make add`` printed."""

    added: str = ""


def _make(*args: str, env: dict[str, str], **popen: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, text=True, **popen)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[Newcomer]:
    """The README's commands from a clean state: ``make user``, ``make serve`` (the project's Orthanc, started
    and stopped by it), ``make add``. Its state (Orthanc's storage, users, learned models, DICOMweb cache) lives
    in a temporary folder through the documented variables; stopped with a Ctrl-C, as a user stops it."""
    state = tmp_path_factory.mktemp("newcomer")
    port, orthanc_port = free_port(), free_port()
    conf = f"users={state / 'users.json'} model_store={state / 'models'} train_trigger=0"
    variables = [f"PORT={port}", f"ORTHANC_PORT={orthanc_port}", f"ORTHANC_HOME={state / 'orthanc'}", f"CONF={conf}"]
    env = {**os.environ, **NO_AUTO_SCORING, "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(state / "cache")}
    user = _make("user", f"NAME={ANNOTATOR}", "ROLE=annotator", *variables, env=env, input=f"{PASSWORD}\n")
    assert user.returncode == 0
    log = artifacts / "server.log"
    with log.open("w") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "serve", *variables],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Newcomer(f"http://127.0.0.1:{port}", state, log, make.pid, None, make)
    try:
        wait_until_up(server, make, 300)
        added = _make("add", f"STUDY={' '.join(map(str, NEWCOMER_STUDIES))}", *variables, env=env, capture_output=True)
        assert added.returncode == 0, added.stdout + added.stderr
        server.added = added.stdout + added.stderr
        (artifacts / "make-add.log").write_text(server.added)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):  # the last test stops it itself
            os.killpg(make.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            make.wait(timeout=120)
        finally:
            stop_tree(make)


def wait_until_up(server: Server, make: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert make.poll() is None, f"make serve exited with {make.returncode}:\n{server.log_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no answer within {timeout_s} s:\n{server.log_text()[-4000:]}"
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/auth/", timeout=5).status_code == 200:
                return
        time.sleep(0.5)


@contextmanager
def _chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium driven by Debian's chromedriver (nothing downloaded), with its own profile."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail(
            f"CHROMIUM OR CHROMEDRIVER MISSING ({CHROMIUM}, {CHROMEDRIVER}): run `make e2e` "
            "(apt-get install -y chromium chromium-driver)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    with _chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


@pytest.fixture
def anonymous_browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A browser that never signed in (a fresh profile: no cookie, no cached viewer)."""
    with _chromium(tmp_path / "chromium") as driver:
        yield driver
