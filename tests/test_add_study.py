"""Adding studies as a user does (``make add``): NIfTI CT to a DICOM series, DICOM folders and zips, refusals.

The conversion is checked by reading the written series back with SimpleITK (an independent
DICOM reader): same voxels, same physical geometry. The DICOMweb path goes through a real Orthanc.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from bench.common import free_port
from lib.data.ct_import import StudyInputError, read_inputs, series_from_nifti
from tools import add_study

from .conftest import DATA, STS
from .orthanc import running_orthanc

ABDOMEN = DATA / "totalseg" / "example_ct.nii.gz"
STS_001_DICOM = DATA / "sts_dicom" / "STS_001"


def _read_back(instances: list, folder: Path) -> sitk.Image:
    folder.mkdir()
    names = []
    for i, ds in enumerate(instances[::-1]):  # written in reverse: the reader must sort by position
        names.append(str(folder / f"{i:04d}.dcm"))
        ds.save_as(names[-1], write_like_original=False)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("nifti", [ABDOMEN, STS / "STS_001_ct.nii.gz"], ids=["abdomen", "sarcoma"])
def test_a_nifti_ct_becomes_a_dicom_series_with_its_voxels_and_geometry(nifti: Path, tmp_path: Path) -> None:
    series = series_from_nifti(nifti)
    back = _read_back(series.instances, tmp_path / "series")
    original = sitk.ReadImage(str(nifti))
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original).astype(np.int16))
    assert np.allclose(back.GetSpacing(), original.GetSpacing(), atol=1e-4)
    assert np.allclose(back.GetOrigin(), original.GetOrigin(), atol=1e-3)
    assert np.allclose(back.GetDirection(), original.GetDirection(), atol=1e-5)
    uids = {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID)) for d in series.instances}
    assert len(uids) == 1 and len({str(d.SOPInstanceUID) for d in series.instances}) == len(series.instances)
    assert series_from_nifti(nifti).study_uid != series.study_uid, "UIDs are fresh for every conversion"
    assert all(d.Modality == "CT" and d.RescaleType == "HU" for d in series.instances)


def test_what_is_not_ct_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(StudyInputError, match="not CT in Hounsfield units: its lowest value is 0"):
        read_inputs(DATA / "totalseg" / "example_seg.nii.gz")  # a label map
    with pytest.raises(StudyInputError, match="does not exist"):
        read_inputs(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    found, refused = read_inputs(tmp_path)
    assert not found and refused == [f"{tmp_path / 'notes.txt'}: not a DICOM file"]
    found, refused = read_inputs(STS_001_DICOM / "mask")
    assert not found and len(refused) == 1 and "RTSTRUCT" in refused[0] and "not a CT image" in refused[0]


def test_the_cli_adds_to_a_folder_atomically_and_refuses_duplicates(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    assert add_study.main([str(ABDOMEN), str(STS_001_DICOM), "--studies", str(studies)]) == 0
    added = sorted(p.name for p in studies.iterdir())
    assert len(added) == 2 and "example_ct.nii.gz" in added, added
    assert (studies / "example_ct.nii.gz").read_bytes() == ABDOMEN.read_bytes()
    dicom = sitk.ReadImage(str(studies / next(n for n in added if n != "example_ct.nii.gz")))
    assert dicom.GetSize() == sitk.ReadImage(str(STS / "STS_001_ct.nii.gz")).GetSize()
    assert add_study.main([str(ABDOMEN), "--studies", str(studies)]) == 2, "already there: nothing added"
    assert add_study.main([str(DATA / "totalseg" / "example_seg.nii.gz"), "--studies", str(studies)]) == 2
    assert sorted(p.name for p in studies.iterdir()) == added, "no temporary file left behind"


@pytest.fixture(scope="module")
def empty_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), series=()) as url:
        yield url


def test_the_cli_adds_nifti_folders_and_zips_to_dicomweb(
    empty_orthanc: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = tmp_path / "sts_001.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(STS_001_DICOM.rglob("*.dcm")):
            z.write(f, f.relative_to(STS_001_DICOM))
    dicomweb = f"{empty_orthanc}/dicom-web"
    caplog.set_level("INFO")
    inputs = [ABDOMEN, archive, DATA / "totalseg" / "example_ct_dicom"]
    assert add_study.main([*map(str, inputs), "--studies", dicomweb, "--viewer", "http://viewer:8000"]) == 0
    added = [r.getMessage() for r in caplog.records if r.getMessage().startswith("added CT series")]
    assert len(added) == 3 and all("http://viewer:8000/ohif/monai-label?StudyInstanceUIDs=" in a for a in added)
    assert sum("RTSTRUCT" in r.getMessage() for r in caplog.records) == 1, "the zip's RTSTRUCT is refused"
    studies = requests.get(f"{dicomweb}/studies", timeout=30).json()
    assert len(studies) == 3
    assert add_study.main([str(archive), "--studies", dicomweb]) == 0  # the same instances again
    assert len(requests.get(f"{dicomweb}/studies", timeout=30).json()) == 3, "adding twice does not duplicate"
    counts = sorted(int(s["00201208"]["Value"][0]) for s in studies)  # NumberOfStudyRelatedInstances
    assert counts == sorted([112, 20, len(list((STS_001_DICOM / "image").glob("*.dcm")))])


def test_a_converted_nifti_comes_back_from_dicomweb_as_the_same_volume(empty_orthanc: str, tmp_path: Path) -> None:
    """What the server's DICOMweb datastore does with it: retrieve the series (WADO-RS), read it as a volume."""
    from dicomweb_client.api import DICOMwebClient

    series = series_from_nifti(ABDOMEN)
    add_study._to_dicomweb(series, f"{empty_orthanc}/dicom-web")
    first = series.instances[0]
    client = DICOMwebClient(f"{empty_orthanc}/dicom-web")
    retrieved = client.retrieve_series(str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    back = _read_back(retrieved, tmp_path / "retrieved")
    original = sitk.ReadImage(str(ABDOMEN))
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original).astype(np.int16))
    assert np.allclose(back.GetOrigin(), original.GetOrigin(), atol=1e-3)
    assert np.allclose(back.GetDirection(), original.GetDirection(), atol=1e-5)
