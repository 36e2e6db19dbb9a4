#!/usr/bin/env python
"""Add CT studies to the serving datastore (``make add STUDY=<path>``).

    .venv/bin/python tools/add_study.py ct.nii.gz                       # to the project's Orthanc
    .venv/bin/python tools/add_study.py dicom_folder/ export.zip --studies https://pacs/dicom-web
    .venv/bin/python tools/add_study.py ct.nii.gz --studies ./studies    # a local folder datastore

Each path is a NIfTI CT (sent to a DICOMweb datastore as a new DICOM series, see
:mod:`lib.data.ct_import`), a folder of DICOM files, a zip of them, or one DICOM file. A DICOMweb
datastore receives the instances through STOW-RS; a local folder receives one NIfTI per series,
written to a temporary name and renamed. Anything that is not CT is refused with the reason; the
exit status is 0 when at least one series was added.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "vista3d"))

from lib.data.ct_import import NIFTI_SUFFIXES, CtSeries, StudyInputError, read_inputs  # noqa: E402
from lib.server.launch import EMBEDDED_ORTHANC  # noqa: E402

logger = logging.getLogger("add_study")

DEFAULT_STUDIES = EMBEDDED_ORTHANC  # the Orthanc `make serve` starts
BATCH = 32  # instances per STOW-RS request: bounded memory, few round trips


def _to_dicomweb(series: CtSeries, url: str) -> None:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url)
    for start in range(0, len(series.instances), BATCH):
        client.store_instances(series.instances[start : start + BATCH])


def _to_folder(series: CtSeries, folder: Path) -> Path:
    """The series as ``<patient>_<series uid tail>.nii.gz`` (the NIfTI itself when it came as one)."""
    import SimpleITK as sitk

    source = Path(series.source)
    if source.is_file() and source.name.lower().endswith(NIFTI_SUFFIXES):
        dest = folder / (source.name if source.name.endswith(".gz") else f"{source.name}.gz")

        def write(tmp: Path) -> None:  # the file as it is: its header is the user's
            if source.name.endswith(".gz"):
                shutil.copyfile(source, tmp)
            else:
                sitk.WriteImage(sitk.ReadImage(str(source)), str(tmp), useCompression=True)

    else:
        first = series.instances[0]
        dest = folder / f"{first.get('PatientID', '') or 'ct'}_{str(first.SeriesInstanceUID)[-12:]}.nii.gz"

        def write(tmp: Path) -> None:
            with tempfile.TemporaryDirectory() as files:
                names = []
                for i, ds in enumerate(series.instances):
                    names.append(f"{files}/{i:05d}.dcm")
                    ds.save_as(names[-1], write_like_original=False)
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(names)
                sitk.WriteImage(reader.Execute(), str(tmp), useCompression=True)

    if dest.exists():
        raise StudyInputError(f"{dest} is already in the datastore")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".adding-{os.getpid()}.nii.gz"  # MONAI Label's datastore skips dot files
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def add(paths: list[Path], studies: str, viewer: str) -> int:
    """Adds every CT series found; returns how many were added."""
    added = 0
    for path in paths:
        try:
            found, refused = read_inputs(path)
        except StudyInputError as e:
            logger.error("refused: %s", e)
            continue
        for line in refused:
            logger.warning("refused: %s", line)
        if not found and not refused:
            logger.error("refused: %s holds no file", path)
        for series in found:
            try:
                if studies.startswith(("http://", "https://")):
                    _to_dicomweb(series, studies)
                    where = f"{viewer}/ohif/monai-label?StudyInstanceUIDs={series.study_uid}"
                else:
                    where = str(_to_folder(series, Path(studies)))
            except StudyInputError as e:
                logger.error("refused: %s", e)
                continue
            added += 1
            logger.info("added %s: %s", series.describe(), where)
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="NIfTI CT, DICOM folder, DICOM zip or DICOM file")
    parser.add_argument("--studies", default=DEFAULT_STUDIES, help=f"DICOMweb URL or folder ({DEFAULT_STUDIES})")
    parser.add_argument("--viewer", default="http://127.0.0.1:8000", help="the server's URL, for the OHIF links")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # a line per request otherwise
    try:
        added = add(args.paths, args.studies.rstrip("/"), args.viewer.rstrip("/"))
    except OSError as e:  # the datastore does not answer, or a folder cannot be written
        logger.error("cannot add to %s: %s", args.studies, e)
        return 1
    if not added:
        logger.error("nothing was added")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
