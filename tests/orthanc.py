"""A throw-away Orthanc for tests: the project's own (``tools/orthanc.py``) on a free port, with the test series.

Orthanc is a system package (``make orthanc-install``). When it is missing the tests that need it
fail with the command to run: a DICOMweb round trip that silently does not run proves nothing.
The test series are added as a user adds studies (``tools/add_study.py``): the sarcoma CTs of
``sts_dicom`` (their RTSTRUCTs are refused: not CT) and the abdominal series, whose empty UIDs the
tool fills in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from tools import add_study
from tools.orthanc import missing
from tools.orthanc import running_orthanc as _running_orthanc

from .conftest import DATA

TEST_SERIES = (*sorted(p for p in (DATA / "sts_dicom").iterdir() if p.is_dir()), DATA / "totalseg" / "example_ct_dicom")


def require_orthanc() -> None:
    """Fails the test (never skips) when Orthanc or its DICOMweb plugin is not installed."""
    if problem := missing():
        pytest.fail(f"ORTHANC IS NOT INSTALLED: {problem}", pytrace=False)


@contextmanager
def running_orthanc(home: Path, port: int, series: tuple[Path, ...] = TEST_SERIES) -> Iterator[str]:
    """Orthanc on loopback ``port`` with its storage in ``home``, holding ``series``; yields its URL."""
    require_orthanc()
    with _running_orthanc(home, port) as url:
        assert add_study.add(list(series), f"{url}/dicom-web", "http://viewer") == len(series)
        yield url


def series_uid(folder: Path) -> str:
    """The SeriesInstanceUID of the DICOM series in ``folder`` (its image id in a DICOMweb datastore)."""
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
