"""The project's own Orthanc: a loopback DICOMweb server whose storage lives in a folder of the project.

``make serve`` starts one when no ``STUDIES`` is given, so that the bundled OHIF viewer has a
DICOMweb datastore from the first command; the tests start throw-away ones. Orthanc comes from
Debian (``apt-get install orthanc orthanc-dicomweb``). The process is started with a parent-death
signal, so that it never outlives whoever started it, even one killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from shutil import which

import requests

__all__ = [
    "PLUGIN",
    "OrthancError",
    "die_with_parent",
    "missing",
    "running_orthanc",
    "start_orthanc",
    "stop_orthanc",
    "terminate",
]

TEMPLATE = Path(__file__).with_name("orthanc.json.in")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "apt-get install -y orthanc orthanc-dicomweb (make orthanc-install)"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class OrthancError(RuntimeError):
    """Orthanc cannot be started; the message says why and what to do."""


def missing() -> str | None:
    """What is not installed, or None when Orthanc and its DICOMweb plugin are."""
    if which("Orthanc") is None:
        return f"Orthanc is not installed: {INSTALL}"
    if not PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin is not installed ({PLUGIN}): {INSTALL}"
    return None


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _config(home: Path, port: int) -> Path:
    storage = home / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    text = TEMPLATE.read_text().replace("@STORAGE@", str(storage)).replace("@PLUGINS@", str(PLUGIN))
    config = home / "orthanc.json"
    config.write_text(text.replace("@HTTP_PORT@", str(port)))
    return config


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start_orthanc(home: Path, port: int, timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Orthanc on ``127.0.0.1:port`` with its config, storage and log in ``home``; returns it and its URL.

    Raises :class:`OrthancError` when it is not installed, the port is taken, or it does not answer.
    """
    if problem := missing():
        raise OrthancError(problem)
    url = f"http://127.0.0.1:{port}"
    if _answers(url):
        raise OrthancError(f"something already serves DICOMweb at {url}: stop it, or choose another ORTHANC_PORT")
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "orthanc.log").open("ab")
    process = subprocess.Popen(
        ["Orthanc", str(_config(home, port))],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C in the terminal reaches whoever started it, who stops it last
        preexec_fn=die_with_parent,
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_orthanc(process)
            tail = (home / "orthanc.log").read_text(errors="replace")[-2000:]
            raise OrthancError(f"Orthanc did not start on port {port} (is it taken?); its log ends:\n{tail}")
        time.sleep(0.2)
    return process, url


def stop_orthanc(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM (Orthanc closes its index cleanly), then SIGKILL if it does not exit in time."""
    terminate(process, timeout_s)


def terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``timeout_s``; waits for it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_orthanc(home: Path, port: int) -> Iterator[str]:
    """Orthanc for the duration of the block; yields its base URL (DICOMweb at ``<url>/dicom-web``)."""
    process, url = start_orthanc(home, port)
    try:
        yield url
    finally:
        stop_orthanc(process)
