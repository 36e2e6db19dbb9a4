"""DICOM-SEG written in Python: named segments, the source series referenced, voxels that survive Orthanc.

The round-trip tests run a real Orthanc (Debian package, ``make orthanc``) on a free loopback port
with the sarcoma and abdominal series uploaded by ``scripts/orthanc/upload.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.datastore.utils.convert import dicom_to_nifti

from bench.common import free_port
from lib.data.dicomseg import SegError, read_seg, segment_names, write_seg
from lib.data.dicomweb import Vista3DDICOMWebDatastore
from lib.labels import load_label_dictionary
from lib.trainers.labelled import final_labels
from lib.zero_shot import ZeroShotRegistry

from .conftest import DATA
from .orthanc import running_orthanc, series_uid

STS_SERIES = DATA / "sts_dicom" / "STS_001" / "image"
ABDOMEN_SERIES = DATA / "totalseg" / "example_ct_dicom"
CLASSES = load_label_dictionary().classes


def _boxes(shape: tuple[int, ...], ids: list[int]) -> np.ndarray:
    """A label map (z, y, x) with one box per class id, boxes in different slices and corners."""
    label = np.zeros(shape, dtype=np.uint8)
    z, y, x = shape
    for n, class_id in enumerate(ids):
        label[n * z // len(ids) : (n + 1) * z // len(ids) - 1, y // 4 : y // 2, x // 4 : x // 2] = class_id
    return label


def _label_file(image_path: str | Path, ids: list[int], out: Path) -> Path:
    """A label on the grid of ``image_path`` (as the server's results are), written with SimpleITK."""
    image = sitk.ReadImage(str(image_path))
    label = sitk.GetImageFromArray(_boxes(sitk.GetArrayViewFromImage(image).shape, ids))
    label.CopyInformation(image)
    sitk.WriteImage(label, str(out))
    return out


@pytest.fixture(scope="module")
def sts_nifti() -> str:
    """STS_001 converted the way MONAI Label converts a DICOMweb series."""
    return str(dicom_to_nifti(str(STS_SERIES)))


def test_segments_are_named_numbered_and_reference_the_series(sts_nifti: str, tmp_path: Path) -> None:
    names = segment_names(CLASSES, {"sarcoma": 133})
    label = _label_file(sts_nifti, [1, 14, 133], tmp_path / "label.nii.gz")
    seg = write_seg(label, STS_SERIES, names, "VISTA3D final")
    assert seg.Modality == "SEG"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "left kidney", "sarcoma"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid(STS_SERIES)
    source = pydicom.dcmread(next(STS_SERIES.iterdir()), stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID


def test_seg_reads_back_as_class_ids_on_the_series_grid(sts_nifti: str, tmp_path: Path) -> None:
    names = segment_names(CLASSES, {"sarcoma": 133})
    label = _label_file(sts_nifti, [3, 133], tmp_path / "label.nii.gz")
    seg = write_seg(label, STS_SERIES, names, "VISTA3D original")
    back = read_seg(seg, names)
    expected = sitk.ReadImage(str(label))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(back.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetSpacing(), expected.GetSpacing(), atol=1e-4)


def test_empty_label_and_foreign_grid_are_refused(sts_nifti: str, tmp_path: Path) -> None:
    names = segment_names(CLASSES, {})
    with pytest.raises(SegError, match="empty"):
        write_seg(_label_file(sts_nifti, [], tmp_path / "empty.nii.gz"), STS_SERIES, names, "x")
    other = sitk.GetImageFromArray(_boxes((7, 30, 30), [1]))
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))
    with pytest.raises(SegError):
        write_seg(tmp_path / "other.nii.gz", STS_SERIES, names, "x")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), free_port()) as url:
        yield url


@pytest.fixture()
def store(orthanc: str, tmp_path: Path) -> Vista3DDICOMWebDatastore:
    """The app's DICOMweb datastore on the test Orthanc, its cache in a temporary folder."""
    client = DICOMwebClientX(url=f"{orthanc}/dicom-web")
    registry = ZeroShotRegistry(tmp_path / "zero_shot_labels.json")
    registry.assign("sarcoma")
    return Vista3DDICOMWebDatastore(
        classes=CLASSES, registry=registry, client=client, search_filter={"Modality": "CT"}, cache_path=str(tmp_path)
    )


def test_final_label_round_trips_through_orthanc(store: Vista3DDICOMWebDatastore, tmp_path: Path) -> None:
    series = series_uid(STS_SERIES)
    image = store.get_image_uri(series)
    label = _label_file(image, [1, 14, 133], tmp_path / "submitted.nii.gz")
    store.save_label(series, str(label), "final", {})
    info = store.get_label_info(series, "final")
    assert info["Modality"] == "SEG"

    client = store._client
    seg = client.retrieve_series(info["StudyInstanceUID"], info["SeriesInstanceUID"])[0]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "left kidney", "sarcoma"]
    back = read_seg(seg, segment_names(CLASSES, store._registry.as_dict()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(sitk.ReadImage(str(label))))
    assert series in store.get_labeled_images()  # MONAI Label's own SEG lookup finds the reference
    # what a round trains on: the submitted label, read from the cache (MONAI Label fetched the CT as a SEG)
    (found,) = final_labels(store)
    assert found.image_id == series
    np.testing.assert_array_equal(np.asarray(nib.load(found.label).dataobj), np.asarray(nib.load(label).dataobj))


def test_jpeg2000_series_is_fetched_and_decoded(store: Vista3DDICOMWebDatastore) -> None:
    """The abdominal series is stored as JPEG 2000, which Orthanc's Debian build cannot transcode."""
    series = next(
        s
        for s in store.list_images()
        if s not in {series_uid(DATA / "sts_dicom" / c / "image") for c in ("STS_001", "STS_002", "STS_003")}
    )
    image = nib.load(store.get_image_uri(series))
    assert image.shape == (512, 512, 20)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ABDOMEN_SERIES)))
    local = sitk.GetArrayFromImage(reader.Execute())
    assert float(np.asarray(image.dataobj).mean()) == pytest.approx(float(local.mean()), rel=1e-6)


def test_unknown_series_has_no_image(store: Vista3DDICOMWebDatastore) -> None:
    assert store.get_image_uri("1.2.3.4") == ""
