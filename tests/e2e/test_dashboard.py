"""The team dashboard through the real server: two annotators' labels, one promoted round, the page in Chromium.

One server and one round serve every test here (the round is the costly part): alice submits two
labels, bob one, each with the model's proposal (tag ``original``) so that the ``dice`` scoring
method records how much was corrected; an admin starts a 2-step point round that the gate promotes
(tolerance 1.0: the round's figures, not its quality, are under test); bob is handed the
unlabelled image by uncertainty sampling and alice clicks once; the dashboard is read while the round
runs. Then the JSON is checked against the model store's manifest and the datastore, the page is
opened in headless Chromium as the reviewer (everything), alice (her own work only) and the admin
(who rolls back from the page), and each view is saved to ``artifacts/dashboard/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By

from lib.dashboard.learning import STEP_LINE

from ..conftest import PASSWORD, ROOT, STS, Server, running_server
from ..helpers import deepest_voxel, nifti_bytes

ARTIFACTS = ROOT / "artifacts" / "dashboard"
SARCOMA = 133
# alice's two labels first: STS_002, the second label, becomes the validation image; bob's STS_003, the
# newest, is held back by the round; STS_006 stays unlabelled for uncertainty sampling.
SUBMITTED = (("STS_001", "alice"), ("STS_002", "alice"), ("STS_003", "bob"))
UNLABELLED = "STS_006"
USERS = {"alice": "annotator", "bob": "annotator", "rita": "reviewer", "ada": "admin"}
ROUND = {"steps": 2, "clicks": 1}  # two steps, one click per validation object: the cheapest real round


def _token(server: Server, user: str) -> str:
    response = requests.post(f"{server.url}/auth/token", data={"username": user, "password": PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _save(server: Server, token: str, case: str, tag: str, shift: int = 0) -> None:
    """The ground truth as the submitted label; shifted by ``shift`` voxels as the model's proposal."""
    gtv = nib.load(str(STS / f"{case}_gtv.nii.gz"))
    label = np.roll((np.asarray(gtv.dataobj) > 0).astype(np.uint8) * SARCOMA, shift, axis=0)
    response = requests.put(
        f"{server.url}/datastore/label",
        params={"image": case, "tag": tag},
        files={"label": (f"{case}.nii.gz", nifti_bytes(label, gtv.affine))},
        headers=_as(token),
        timeout=60,
    )
    assert response.status_code == 200, response.text


def _wait_for_round(server: Server, token: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = requests.get(f"{server.url}/train/", headers=_as(token), timeout=30)
        if response.status_code == 200 and response.json().get("status") in ("DONE", "ERROR"):
            assert response.json()["status"] == "DONE", server.log_text()[-4000:]
            return
        time.sleep(1)
    raise AssertionError(f"the round did not finish in {timeout:.0f} s:\n{server.log_text()[-4000:]}")


@dataclass(frozen=True)
class Team:
    """The server after the team's work (see the module docstring), a token per user, and the dashboard's JSON
    and page as the reviewer got them while the round ran."""

    server: Server
    tokens: dict[str, str]
    during_round: dict[str, Any]
    page_during_round: str


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, test_weights: Path) -> Iterator[Team]:
    from lib.server.users import Role, UserStore

    root = tmp_path_factory.mktemp("dashboard-studies")
    for case in (*(c for c, _ in SUBMITTED), UNLABELLED):
        os.symlink(STS / f"{case}_ct.nii.gz", root / f"{case}.nii.gz")
    users = UserStore(root / ".vista3d" / "users.json")
    for user, role in USERS.items():
        users.add(user, Role.parse(role), PASSWORD)
    conf = {"train_trigger": "0", "train_threads": "1", "promote_tolerance": "1.0", "train_patience": "0"}
    log = tmp_path_factory.mktemp("dashboard-server") / "server.log"
    with running_server(str(root), log, test_weights, conf) as server:
        tokens = {user: _token(server, user) for user in USERS}
        for case, user in SUBMITTED:
            _save(server, tokens[user], case, "original", shift=4)
            _save(server, tokens[user], case, "final")
        scoring = requests.post(f"{server.url}/scoring/dice?run_sync=true", headers=_as(tokens["alice"]), timeout=300)
        assert scoring.status_code == 200, scoring.text
        started = requests.post(f"{server.url}/train/point", json=ROUND, headers=_as(tokens["ada"]), timeout=60)
        assert started.status_code == 200, started.text
        handed = requests.post(f"{server.url}/activelearning/uncertainty", json={}, headers=_as(tokens["bob"]))
        assert handed.json()["id"] == UNLABELLED, handed.text
        gtv = np.asarray(nib.load(str(STS / f"{UNLABELLED}_gtv.nii.gz")).dataobj) > 0
        params = {"label": "sarcoma", "foreground": [deepest_voxel(gtv)]}
        click = requests.post(
            f"{server.url}/infer/vista3d",
            params={"image": UNLABELLED, "output": "json"},
            files={"params": (None, json.dumps(params))},
            headers=_as(tokens["alice"]),
            timeout=300,
        )
        assert click.status_code == 200, click.text
        during = _data(server, tokens["rita"])
        page = requests.get(f"{server.url}/dashboard/", headers=_as(tokens["rita"]), timeout=60).text
        _wait_for_round(server, tokens["ada"], 400)
        yield Team(server, tokens, during, page)


def _data(server: Server, token: str) -> dict[str, Any]:
    response = requests.get(f"{server.url}/dashboard/data", headers=_as(token), timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _info(server: Server, token: str, what: str, **params: str) -> dict[str, Any]:
    response = requests.get(f"{server.url}/datastore/{what}/info", params=params, headers=_as(token), timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_figures_are_the_model_stores_and_the_datastores(team: Team) -> None:
    server, tokens = team.server, team.tokens
    data = _data(server, tokens["rita"])
    manifest = json.loads((server.studies / ".vista3d" / "models" / "manifest.json").read_text())
    learning = data["learning"]
    assert learning["served_version"] == manifest["served"] == 1
    assert [v["version"] for v in learning["versions"]] == [v["version"] for v in manifest["versions"]] == [0, 1]
    served = manifest["versions"][1]["validation"]
    assert learning["versions"][1]["validation_score"] == served["score"]
    assert learning["versions"][1]["dice_after_clicks"] == {"1": served["dice_1"]}
    (round_,) = learning["rounds"]
    assert round_["promoted"] == 1 and round_["gate"] == manifest["rounds"][0]["gate"]
    assert round_["held_back"] == ["STS_003"] and round_["steps"] == ROUND["steps"]
    assert [e["version"] for e in learning["served_history"]] == [1] and learning["rollback_to"] == 0
    # the running round's progress is read from this line of the training process (MONAI Label logs it too)
    assert any(STEP_LINE.search(line) for line in server.log_text().splitlines()), "no step line to read progress from"

    work = data["work"]
    assert work["annotators"] == ["alice", "bob"]
    assert work["images"] == {"total": 4, "labelled": 3, "remaining": 1}
    per_user = {u: sum(r["labels"] for r in work["labels_per_day"] if r["user"] == u) for u in ("alice", "bob")}
    assert per_user == {"alice": 2, "bob": 1}
    for submission in work["submissions"]:
        label = _info(server, tokens["rita"], "label", label=submission["image"], tag="final")
        image = _info(server, tokens["rita"], "image", image=submission["image"])
        assert submission["user"] == label["user"] == dict(SUBMITTED)[submission["image"]]
        assert submission["corrected_fraction"] == image["corrected_fraction"] > 0, "the shifted proposal was corrected"
    (next_image,) = data["next"]["active_learning"]
    assert (next_image["image"], next_image["handed_to"]) == (UNLABELLED, "bob")
    assert [j["kind"] for j in data["next"]["latencies"]] == ["click"]


def test_the_running_round_is_shown_while_it_runs(team: Team) -> None:
    running = team.during_round["learning"]["running_round"]
    assert running is not None and running["kind"] == "point" and running["started"], running
    assert running["stage"] in ("training", "preparing: loading labels, scoring the served model")
    assert '<meta http-equiv="refresh"' in team.page_during_round and "point round started" in team.page_during_round


def test_an_annotator_sees_only_their_own_work_and_anonymous_must_sign_in(team: Team) -> None:
    server, tokens = team.server, team.tokens
    alice = _data(server, tokens["alice"])
    assert alice["viewer"] == {"name": "alice", "role": "annotator", "sees": "own"}
    assert alice["work"]["annotators"] == ["alice"] and {s["image"] for s in alice["work"]["submissions"]} == {
        "STS_001", "STS_002"
    }  # fmt: skip
    assert "bob" not in json.dumps(alice["work"]) + json.dumps(alice["next"])
    assert alice["next"]["active_learning"][0]["handed_to"] == "another user"
    assert not alice["learning"]["may_rollback"]
    assert requests.get(f"{server.url}/dashboard/data", timeout=30).status_code == 401
    page = requests.get(f"{server.url}/dashboard/", headers={"Accept": "text/html"}, allow_redirects=False, timeout=30)
    assert page.status_code == 303 and page.headers["location"] == "/signin?next=%2Fdashboard%2F"


class DashboardPage:
    """The dashboard as a user opens it: signed in through the server's page, saved as a screenshot."""

    def __init__(self, driver: webdriver.Chrome, server: Server) -> None:
        self.driver = driver
        self.server = server

    def open_as(self, user: str) -> None:
        self.driver.delete_all_cookies()
        self.driver.get(f"{self.server.url}/dashboard/")
        assert "/signin" in self.driver.current_url, "anonymous gets the sign-in page"
        self.driver.find_element(By.ID, "username").send_keys(user)
        self.driver.find_element(By.ID, "password").send_keys(PASSWORD)
        self.driver.find_element(By.ID, "signin").click()
        self.wait(lambda: self.driver.current_url.endswith("/dashboard/"), "the dashboard after signing in")

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Polls ``check``; a page being replaced (a reload) counts as not yet."""
        deadline = time.time() + timeout
        while True:
            with contextlib.suppress(WebDriverException):
                if check():
                    return
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def text(self, ident: str) -> str:
        """The element's text content, the plots' SVG text (axes, legends) included."""
        return str(self.driver.find_element(By.ID, ident).get_attribute("textContent"))

    def has(self, ident: str) -> bool:
        return bool(self.driver.find_elements(By.ID, ident))

    def screenshot(self, name: str) -> None:
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1400, int(height) + 120)
        self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def policy_violations(self) -> list[str]:
        return [str(e["message"]) for e in self.driver.get_log("browser") if "Content Security Policy" in e["message"]]


@pytest.fixture(scope="module")
def page(team: Team, browser: webdriver.Chrome) -> DashboardPage:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return DashboardPage(browser, team.server)


@pytest.mark.e2e
def test_the_reviewer_sees_the_teams_figures_and_the_annotator_her_own(page: DashboardPage) -> None:
    page.open_as("rita")
    assert "rita (reviewer): you see the team's work" in page.text("viewer")
    for plot in ("plot-served", "plot-validation", "plot-labels", "plot-corrections", "plot-latency"):
        assert page.has(plot), plot
    assert "alice" in page.text("plot-labels") and "bob" in page.text("plot-labels"), "both annotators in the legend"
    assert "promoted v1" in page.text("rounds") and "Images labelled: 3 of 4" in page.text("images")
    assert not page.has("rollback"), "reviewers do not roll back"
    page.screenshot("reviewer")

    page.open_as("alice")
    assert "alice (annotator): you see your own work" in page.text("viewer")
    assert "bob" not in page.text("work") + page.text("next")
    assert "alice" in page.text("plot-labels") and page.has("plot-corrections")
    page.screenshot("annotator")
    assert page.policy_violations() == []


@pytest.mark.e2e
def test_the_admin_rolls_back_from_the_page(page: DashboardPage, team: Team) -> None:
    page.open_as("ada")
    page.driver.find_element(By.ID, "rollback").click()
    page.driver.switch_to.alert.accept()
    page.wait(lambda: "Learning: served v0" in page.text("learning"), "the page reloaded on v0")
    manifest = json.loads((team.server.studies / ".vista3d" / "models" / "manifest.json").read_text())
    assert manifest["served"] == 0 and manifest["rollbacks"][0]["to"] == 0
    assert page.has("plot-served") and page.policy_violations() == []
    page.screenshot("admin-after-rollback")
