"""SIGTERM stops the server within seconds: running jobs cancelled, background processes killed, nothing left."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import pytest
import requests
from monailabel.utils.async_tasks import utils as async_tasks

from lib.server.scheduler import Busy, Kind, Scheduler
from lib.server.shutdown import GRACE_S, stop_on_signals

from .conftest import STS, Server, running_server

# A large STS CT: its automatic segmentation of every class runs for many window passes on 2 cores.
LONG_AUTO = "STS_013"


def test_a_signal_stops_the_scheduler_and_background_work_then_reaches_the_previous_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler uvicorn installed still gets the signal (it starts the graceful shutdown), after ours."""
    background = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(async_tasks, "background_processes", {"scoring": {"t1": background}})
    monkeypatch.setattr(async_tasks, "background_tasks", {"scoring": [{"id": "t1", "status": "RUNNING"}]})
    received: list[int] = []

    def uvicorns(sig: int, frame: FrameType | None) -> None:
        received.append(sig)

    scheduler = Scheduler(max_jobs=4, max_wait_s=30)
    previous = signal.signal(signal.SIGTERM, uvicorns)
    try:
        with stop_on_signals(scheduler, grace_s=math.inf):
            signal.raise_signal(signal.SIGTERM)
            assert received == [signal.SIGTERM]
            assert scheduler.stopping
            with pytest.raises(Busy, match=r"stopping \(SIGTERM\)"):
                scheduler.submit(Kind.CLICK, "ann", "x", lambda job: None)
            assert background.wait(timeout=5) == -signal.SIGKILL
            assert async_tasks.background_tasks["scoring"][0]["status"] == "STOPPED"
        assert signal.getsignal(signal.SIGTERM) is uvicorns, "the previous handler is back"
    finally:
        signal.signal(signal.SIGTERM, previous)
        background.kill()
        background.wait()


def _post_auto(server: Server, answer: dict[str, Any]) -> None:
    """Every class of the long image: a long automatic segmentation."""
    try:
        response = requests.post(
            f"{server.url}/infer/vista3d",
            params={"image": f"{LONG_AUTO}_ct"},
            files={"params": (None, json.dumps({"client_id": "erin"}))},
            timeout=120,
        )
        answer["status"] = response.status_code
        answer["body"] = response.text[:500]
    except requests.RequestException as e:  # a closed connection is an answer too; a hang is not
        answer["error"] = repr(e)
    answer["at"] = time.monotonic()


def _wait_for(check: Any, timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{server.log_text()[-3000:]}"
        time.sleep(0.2)


def test_sigterm_during_an_automatic_segmentation_stops_the_server_within_seconds(
    tmp_path: Path, test_weights: Path
) -> None:
    """The auto stops at its next window with a 503, uvicorn's graceful shutdown ends, no process is left.

    Scoring at start-up is on here: its background process, if still running, must go too.
    """
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / f"{LONG_AUTO}_ct.nii.gz").symlink_to(STS / f"{LONG_AUTO}_ct.nii.gz")
    conf = {"train_trigger": "0"}
    log = tmp_path / "server.log"
    with running_server(str(studies), log, test_weights, conf, MONAI_LABEL_AUTO_UPDATE_SCORING="true") as server:
        assert server.process is not None
        answer: dict[str, Any] = {}
        client = threading.Thread(target=_post_auto, args=(server, answer), daemon=True)
        client.start()
        _wait_for(lambda: "window passes in" in server.log_text(), 180, "the auto's windows", server)
        time.sleep(1.0)  # some windows in
        assert client.is_alive(), f"the auto ended before the signal: {answer}"
        tree = psutil.Process(server.pid).children(recursive=True)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(timeout=15)
        exited_s = time.monotonic() - sent
        client.join(timeout=15)

        assert not client.is_alive(), "the client still waits for an answer"
        assert returncode == -signal.SIGTERM, f"not the graceful path (rc {returncode}):\n{server.log_text()[-3000:]}"
        assert exited_s < 15, exited_s
        text = server.log_text()
        assert "Scheduler stopping (the server is stopping (SIGTERM)" in text and "1 jobs cancelled" in text
        assert "exiting without waiting further" not in text, f"the {GRACE_S:.0f} s deadline had to end it"
        if "status" in answer:  # the answer was sent before the connection closed
            assert answer["status"] == 503 and "stopping" in answer["body"], answer
        _, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        print(f"exited {exited_s:.1f} s after SIGTERM; answer {answer}; {len(tree)} descendants at the signal")
