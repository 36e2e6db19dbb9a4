"""Fixtures of the browser tests: Orthanc loaded with the test series, the app's server on it, headless Chromium.

Missing system packages (Orthanc, Chromium, chromedriver) fail the tests with the command that
installs them (``make e2e`` does): a browser test that is skipped quietly proves nothing. Orthanc,
the server and the browser live as long as the test module that uses them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from bench.common import free_port

from ..conftest import PASSWORD, ROOT, Server, running_server
from ..orthanc import running_orthanc

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


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), free_port()) as url:
        yield url


ANNOTATOR = "e2e-annotator"


@pytest.fixture(scope="module")
def dicomweb_server(
    orthanc: str, test_weights: Path, tmp_path_factory: pytest.TempPathFactory, artifacts: Path
) -> Iterator[Server]:
    """The app's server on Orthanc's DICOMweb with sign-in on (one annotator), its series cache in a temporary
    folder; its log kept as artifact."""
    from lib.server.users import Role, UserStore

    cache = str(tmp_path_factory.mktemp("dicomweb-cache"))
    users = tmp_path_factory.mktemp("users") / "users.json"  # not the app's model/ folder, the DICOMweb default
    UserStore(users).add(ANNOTATOR, Role.ANNOTATOR, PASSWORD)
    studies = f"{orthanc}/dicom-web"
    with running_server(
        studies, artifacts / "server.log", test_weights, {"users": str(users)}, MONAI_LABEL_DICOMWEB_CACHE_PATH=cache
    ) as server:
        yield server


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
