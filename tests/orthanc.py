"""A throw-away Orthanc for tests: the project's start/stop script on a free port, loaded with the test series.

Orthanc is a system package (``make orthanc`` installs it). When it is missing the tests that need
it fail with the command to run: a DICOMweb round trip that silently does not run proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "orthanc" / "orthanc.sh"
UPLOAD = ROOT / "scripts" / "orthanc" / "upload.py"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def require_orthanc() -> None:
    """Fails the test (never skips) when Orthanc or its DICOMweb plugin is not installed."""
    if shutil.which("Orthanc") is None or not PLUGIN.exists():
        pytest.fail(
            "ORTHANC IS NOT INSTALLED: run `make orthanc` (apt-get install -y orthanc orthanc-dicomweb)",
            pytrace=False,
        )


@contextmanager
def running_orthanc(home: Path, port: int) -> Iterator[str]:
    """Orthanc on loopback ``port`` with its storage in ``home``, loaded with ../shared/data; yields its URL."""
    require_orthanc()
    env = dict(os.environ, ORTHANC_HOME=str(home), ORTHANC_PORT=str(port))
    subprocess.run([str(SCRIPT), "start"], check=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        subprocess.run([sys.executable, str(UPLOAD), "--orthanc", url], check=True)
        yield url
    finally:
        subprocess.run([str(SCRIPT), "stop"], check=True, env=env)
