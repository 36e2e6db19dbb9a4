"""A newcomer's first session: the README's commands, then OHIF in headless Chromium, Auto segmentation and a click.

``make serve`` from a clean state (the project's Orthanc, started and stopped by it), ``make user``,
``make add`` of a NIfTI CT and a DICOM folder (see ``conftest.newcomer``); then sign-in through the
page, the added NIfTI study opened in OHIF, Auto segmentation and a Point prompt. What a user sees is
asserted through OHIF's own state (the labelmap the MONAI Label panel filled), the panel's
notifications and the requests the server logged; screenshots of every step are kept in
``artifacts/e2e/`` (the README's screenshot is the auto result). The network runs with the
weights a newcomer gets (the shipped starter): the test is about the path from the first command
to the rendered labelmap, not accuracy. The last test stops the server as a user does, with Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pydicom
import pytest
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from ..conftest import DATA, PASSWORD, Server
from .conftest import ANNOTATOR, Newcomer

pytestmark = pytest.mark.e2e

logger = logging.getLogger(__name__)

T = TypeVar("T")
STS_001 = DATA / "sts_dicom" / "STS_001" / "image"
INFER_TIMEOUT_S = 600
POINT_LABEL = "spleen"
RENDERED = "updated the segmentation's scalar data"  # MONAI Label's OHIF extension, after each result
TOAST = "[data-sonner-toast]"  # OHIF's notifications (sonner)

# Counts the voxels of each value in the labelmap the MONAI Label panel writes (OHIF segmentation '1').
LABELMAP_HISTOGRAM_JS = """
const volume = window.services.segmentationService.getLabelmapVolume('1');
if (!volume) { return null; }
const data = volume.voxelManager.getCompleteScalarDataArray();
const counts = {};
for (let i = 0; i < data.length; i++) { counts[data[i]] = (counts[data[i]] || 0) + 1; }
return counts;
"""


def wait_for(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """Polls ``check`` until it returns something truthy; fails naming ``what`` otherwise."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class OhifPage:
    """The OHIF viewer page and its MONAI Label panel, as a user drives them."""

    def __init__(self, driver: webdriver.Chrome, artifacts: Path) -> None:
        self.driver = driver
        self.artifacts = artifacts
        self.console: list[str] = []

    def sign_in(self, server: Server, name: str, password: str) -> None:
        """Signs in through the server's page, as a user does; the browser then holds the session cookie."""
        self.driver.get(f"{server.url}/ohif/")
        wait_for("the sign-in page", lambda: "/signin" in self.driver.current_url, 30)
        self.driver.find_element(By.ID, "username").send_keys(name)
        self.driver.find_element(By.ID, "password").send_keys(password)
        self.driver.find_element(By.ID, "signin").click()
        wait_for("the viewer after signing in", lambda: self.driver.current_url.endswith("/ohif/"), 30)

    def fetch_status(self, path: str) -> int:
        """The status of a same-origin ``fetch`` from the page (what the OHIF panel's requests get)."""
        script = "const done = arguments[1]; fetch(arguments[0]).then(r => done(r.status)).catch(e => done(-1));"
        return int(self.driver.execute_async_script(script, path))

    def open_study(self, server: Server, study_uid: str) -> None:
        """Opens the study with the panel's server field (a cookie; it defaults to port 8000) on the test server."""
        self.driver.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": f"{server.url}/", "path": "/"})
        self.driver.get(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        wait_for(
            "three viewports",
            lambda: len(self.driver.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas")) >= 3,
            120,
        )
        for button in self.driver.find_elements(By.XPATH, "//button[text()='Confirm and Hide']"):
            button.click()  # the "investigational use" banner covers the bottom of the viewports

    def connect(self) -> None:
        """Fetches the server's /info (the panel's refresh button) so that its model tabs appear."""
        self.driver.find_element(By.CSS_SELECTOR, ".monaiLabelPanel .actionButton").click()
        wait_for("the panel's model tabs", lambda: self._button("Run Segmentation"), 60)

    def labelmap(self) -> dict[int, int]:
        counts = self.driver.execute_script(LABELMAP_HISTOGRAM_JS) or {}
        return {int(k): int(v) for k, v in counts.items()}

    def run(self, button_title: str, success: str) -> float:
        """Clicks a panel button; seconds until the panel reports ``success`` and has rewritten the labelmap."""
        self._hide_notifications()
        self._read_console()
        rendered = len(self._rendered())
        start = time.time()
        self._button(button_title).click()
        wait_for(f"'{success}'", lambda: success in self._body(), INFER_TIMEOUT_S)
        wait_for("the panel to write the labelmap", lambda: len(self._rendered()) > rendered, 60)
        return time.time() - start

    def open_tab(self, name: str) -> None:
        self.driver.find_element(By.XPATH, f"//label[contains(@class,'tab-label') and text()='{name}']").click()

    def pick_label(self, name: str) -> None:
        row = f"//tr[contains(@class,'clickable-row')]/td[text()='{name}']"
        element = wait_for(f"label row {name!r}", lambda: self._visible(By.XPATH, row), 30)
        self._hide_notifications()
        element.click()

    def click_axial(self) -> None:
        """A click in the centre of the axial view (inside the thigh of STS_002)."""
        canvas = self.driver.find_element(By.CSS_SELECTOR, "[data-viewport-uid='mpr-axial'] canvas.cornerstone-canvas")
        ActionChains(self.driver).move_to_element(canvas).click().perform()

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def save_console(self) -> None:
        self._read_console()
        (self.artifacts / "browser-console.log").write_text("\n".join(self.console))

    def _read_console(self) -> None:
        """Moves the browser's new console entries (the driver hands each out once) into ``self.console``."""
        self.console += [str(e["message"]) for e in self.driver.get_log("browser")]

    def _rendered(self) -> list[str]:
        """The panel's console line after it copied a result into the labelmap, one per result."""
        self._read_console()
        return [line for line in self.console if RENDERED in line]

    def _button(self, title: str) -> WebElement | None:
        return self._visible(By.CSS_SELECTOR, f"button[title='{title}']")

    def _visible(self, by: str, selector: str) -> WebElement | None:
        return next((e for e in self.driver.find_elements(by, selector) if e.is_displayed()), None)

    def _hide_notifications(self) -> None:
        """Waits out earlier toasts, as a user would: a new 'Successful' cannot be confused with an old
        one, and no toast covers the control clicked next (they stand over the panel's bottom right)."""

        def gone() -> bool:
            return not self.driver.find_elements(By.CSS_SELECTOR, TOAST) and "Successful" not in self._body()

        wait_for("earlier notifications to close", gone, 60)

    def _body(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)


def infer_requests(server: Server, user: str) -> list[dict[str, Any]]:
    """The params of the infer requests the server logged for ``user`` (``Infer request by <user>: {...}``)."""
    marker = f"Infer request by {user}: "
    lines = [line.split(marker, 1)[1] for line in server.log_text().splitlines() if marker in line]
    return [{"image": r["image"], **r["params"]} for r in map(json.loads, lines)]


def added_nifti_study(newcomer: Newcomer) -> str:
    """The study ``make add`` made of the NIfTI CT, from the OHIF link it printed."""
    line = next(line for line in newcomer.added.splitlines() if "STS_002_ct (from NIfTI)" in line)
    return line.rsplit("StudyInstanceUIDs=", 1)[1].strip()


def test_make_add_reports_what_it_added_and_refused(newcomer: Newcomer) -> None:
    assert newcomer.added.count("added CT series") == 2, newcomer.added
    assert "RTSTRUCT" in newcomer.added and "not a CT image" in newcomer.added, "STS_001's RTSTRUCT is refused"
    assert f"{newcomer.url}/ohif/monai-label?StudyInstanceUIDs=" in newcomer.added
    log = newcomer.log_text()
    assert f"OHIF viewer: {newcomer.url}/ohif/" in log and "make add STUDY=" in log, "the start log says what next"


def test_auto_and_point_segmentation_render_in_ohif(
    newcomer: Newcomer, browser: webdriver.Chrome, artifacts: Path
) -> None:
    dicomweb_server = newcomer
    page = OhifPage(browser, artifacts)
    study = added_nifti_study(newcomer)
    try:
        page.sign_in(dicomweb_server, ANNOTATOR, PASSWORD)
        page.open_study(dicomweb_server, study)
        page.connect()
        page.screenshot("01-study-open")

        auto_s = page.run("Run Segmentation", "Running Segmentation - Successful")
        page.screenshot("02-auto-segmentation")
        auto = page.labelmap()
        assert sum(n for v, n in auto.items() if v) > 0, f"the auto result left the labelmap empty: {auto}"

        page.open_tab("Point Prompts")
        page.pick_label(POINT_LABEL)
        page.click_axial()
        point_s = page.run("Run PointPrompts", "Running Inference for Point Prompts - Successful")
        page.screenshot("03-point-prompt")
        assert sum(n for v, n in page.labelmap().items() if v) > 0
    finally:
        page.save_console()

    requests = infer_requests(dicomweb_server, ANNOTATOR)
    assert len(requests) == 2, requests
    assert "points" not in requests[0] and len(requests[0]["label_prompt"]) > 100  # the panel sends every class
    assert len(requests[1]["points"]) == 1 and requests[1]["point_labels"] == [1]
    assert requests[1]["label_prompt"] == [3]  # spleen
    assert requests[0]["image"] == requests[1]["image"]
    timings = {"auto_click_to_render_s": round(auto_s, 1), "point_click_to_render_s": round(point_s, 1)}
    (artifacts / "timings.json").write_text(json.dumps(timings, indent=2))
    logger.warning("OHIF click-to-render latencies: %s", timings)


def test_anonymous_browser_cannot_reach_the_viewers_data(
    newcomer: Newcomer, anonymous_browser: webdriver.Chrome, artifacts: Path
) -> None:
    dicomweb_server = newcomer
    browser = anonymous_browser
    page = OhifPage(browser, artifacts)
    header = pydicom.dcmread(next(STS_001.iterdir()), stop_before_pixels=True)
    study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)  # a series is a datastore image
    browser.get(f"{dicomweb_server.url}/ohif/monai-label?StudyInstanceUIDs={study}")
    wait_for("the sign-in page", lambda: "/signin?next=" in browser.current_url, 30)
    page.screenshot("04-anonymous")
    assert browser.find_elements(By.ID, "password"), "an anonymous browser gets the sign-in page"
    for path in (
        f"/proxy/dicom/qido/studies/{study}/series",  # OHIF's images come through here
        "/datastore/",
        "/info/",
        "/ohif/app-config.js",
    ):
        assert page.fetch_status(path) == 401, path
    assert page.fetch_status(f"/datastore/image?image={series}") == 401


def test_ctrl_c_stops_the_server_and_the_orthanc_it_started(newcomer: Newcomer) -> None:
    """Last in the module: what ``make serve`` started is gone once it has exited."""
    server = psutil.Process(newcomer.pid)
    started = server.children(recursive=True)
    orthanc = [p for p in started if p.name() == "Orthanc"]
    assert len(orthanc) == 1, [p.name() for p in started]
    os.killpg(newcomer.pid, signal.SIGINT)
    assert newcomer.process is not None
    newcomer.process.wait(timeout=120)
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"still running after make serve exited: {[p.name() for p in alive]}"
    assert "Orthanc stopped" in newcomer.log_text()
