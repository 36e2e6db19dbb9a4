"""Upload the project's DICOM test series to a DICOMweb server (Orthanc's REST ``/instances``).

The sarcoma cases (``sts_dicom``) are uploaded as they are. The abdominal series
(``totalseg/example_ct_dicom``) ships with empty Study/Series/SOP Instance UIDs, which no DICOMweb
server can index, so they are filled in first: deterministically (derived from the folder and file
names), so that repeated uploads land on the same study instead of duplicating it.

    python scripts/orthanc/upload.py [--orthanc http://127.0.0.1:8042] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

logger = logging.getLogger("upload")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = (ROOT / ".." / "shared" / "data").resolve()


def _uid(*parts: str) -> str:
    """A stable UID for the given names (same input, same UID, across machines and runs)."""
    return str(generate_uid(entropy_srcs=["vista3d-monailabel", *parts]))


def with_uids(path: Path, series_key: str) -> bytes:
    """The file's bytes with empty Study/Series/SOP Instance UIDs filled in deterministically."""
    ds = pydicom.dcmread(path)
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = _uid(series_key, "study")
    if not ds.get("SeriesInstanceUID"):
        ds.SeriesInstanceUID = _uid(series_key, "series")
    if not ds.get("SOPInstanceUID"):
        ds.SOPInstanceUID = ds.file_meta.get("MediaStorageSOPInstanceUID") or _uid(series_key, path.name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def post(orthanc: str, data: bytes) -> None:
    response = requests.post(
        f"{orthanc}/instances", data=data, headers={"Content-Type": "application/dicom"}, timeout=60
    )
    response.raise_for_status()


def upload(orthanc: str, data_dir: Path) -> int:
    """Uploads every series; returns the number of instances sent."""
    count = 0
    for path in sorted((data_dir / "sts_dicom").rglob("*.dcm")):
        post(orthanc, path.read_bytes())
        count += 1
    abdomen = data_dir / "totalseg" / "example_ct_dicom"
    for path in sorted(p for p in abdomen.iterdir() if p.is_file()):
        post(orthanc, with_uids(path, "totalseg/example_ct_dicom"))
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    count = upload(args.orthanc.rstrip("/"), args.data)
    studies = requests.get(f"{args.orthanc}/studies", timeout=30).json()
    logger.info("uploaded %d instances; Orthanc holds %d studies", count, len(studies))


if __name__ == "__main__":
    main()
