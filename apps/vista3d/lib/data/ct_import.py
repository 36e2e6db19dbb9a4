"""CT studies from the files a user has: a NIfTI volume, a folder of DICOM files, a zip of them.

``make add`` (``tools/add_study.py``) puts them in the serving datastore. A DICOMweb datastore (and
so the OHIF viewer) holds DICOM, so a NIfTI CT becomes a DICOM series: CT Image Storage, one slice
per instance, positions and orientation from the NIfTI's affine (RAS in the file, LPS in DICOM),
fresh UIDs. DICOM input is grouped by series; a series that is not CT is refused by name, as is a
volume whose values are not Hounsfield units (no air below -500: MR, PET or a label map).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["CtSeries", "StudyInputError", "read_dicom_series", "read_inputs", "series_from_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
AIR_BELOW_HU = -500.0  # every CT has air (about -1000 HU) in or around the body; MR, PET and labels do not
INT16 = np.iinfo(np.int16)


class StudyInputError(ValueError):
    """The input cannot be added as CT; the message says what it is and why."""


@dataclass
class CtSeries:
    """One CT series ready to store: its instances, sorted along the slice axis, and where it came from."""

    source: str
    instances: list[pydicom.Dataset] = field(default_factory=list)

    @property
    def study_uid(self) -> str:
        return str(self.instances[0].StudyInstanceUID)

    def describe(self) -> str:
        first = self.instances[0]
        size = f"{len(self.instances)} slices of {first.Rows}x{first.Columns}"
        name = first.get("SeriesDescription", "") or first.SeriesInstanceUID
        return f"CT series {name!s} ({size}) from {self.source}"


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _check_ct(values: np.ndarray, what: str) -> None:
    low = float(values.min())
    if low > AIR_BELOW_HU:
        raise StudyInputError(
            f"{what} is not CT in Hounsfield units: its lowest value is {low:g}, and CT has air near -1000 "
            "(an MR, PET or label volume?)"
        )


def _slice(
    pixels: np.ndarray, k: int, meta: Mapping[str, object], position: np.ndarray, uids: Mapping[str, str]
) -> pydicom.Dataset:
    """Slice ``k`` as a CT Image Storage instance (pixels in HU as int16, rescale 1/0)."""
    sop_uid = generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = CTImageStorage
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.FileDataset("", pydicom.Dataset(), file_meta=file_meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    for key, value in meta.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.SliceLocation = f"{position[2]:.4f}"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def series_from_nifti(path: Path, now: datetime | None = None) -> CtSeries:
    """A NIfTI CT as a DICOM series with fresh UIDs; the patient is named after the file."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise StudyInputError(f"{path} cannot be read as NIfTI: {e}") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise StudyInputError(f"{path} is not a single-channel 3D volume ({image.GetDimension()}D)")
    values = sitk.GetArrayFromImage(image)  # [slice, row, column]
    _check_ct(values, str(path))
    pixels = np.clip(np.rint(values), INT16.min, INT16.max).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)  # columns: the i, j, k axes in LPS
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    now = now or datetime.now()
    meta: dict[str, object] = {
        "PatientName": name,
        "PatientID": name,
        "PatientBirthDate": "",
        "PatientSex": "",
        "StudyDate": now.strftime("%Y%m%d"),
        "StudyTime": now.strftime("%H%M%S"),
        "StudyID": "1",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "StudyDescription": f"{name} (from NIfTI)",
        "SeriesDescription": f"{name} (from NIfTI)",
        "SeriesNumber": 1,
        "Modality": "CT",
        "Manufacturer": "",
        "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
        "ImageOrientationPatient": [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])],
        "PixelSpacing": [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"],  # between rows, between columns
        "SliceThickness": f"{spacing[2]:.6f}",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
        "RescaleIntercept": "0",
        "RescaleSlope": "1",
        "RescaleType": "HU",
        "WindowCenter": "40",
        "WindowWidth": "400",
    }
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    series = CtSeries(str(path))
    for k in range(pixels.shape[0]):
        position = origin + k * spacing[2] * direction[:, 2]
        series.instances.append(_slice(pixels[k], k, meta, position, uids))
    return series


def _datasets(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in a folder (recursively) or a zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield f"{path}:{info.filename}", archive.read(info)
        return
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        yield str(file), file.read_bytes()


def _fill_uids(ds: pydicom.Dataset, source: str, name: str) -> None:
    """Empty Study/Series/SOP Instance UIDs (some exports leave them out, no archive indexes such a file)
    filled in from the input's and the file's names: adding the same input twice lands on the same study."""

    def uid(*parts: str) -> str:
        return str(generate_uid(entropy_srcs=["vista3d-add-study", source, *parts]))

    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = uid("study")
    if not ds.get("SeriesInstanceUID"):
        ds.SeriesInstanceUID = uid("series", str(ds.get("SeriesNumber", "")))
    if not ds.get("SOPInstanceUID"):
        ds.SOPInstanceUID = ds.file_meta.get("MediaStorageSOPInstanceUID") or uid(name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _position_along_normal(ds: pydicom.Dataset) -> float:
    orientation = np.array(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    position = np.array(ds.get("ImagePositionPatient", [0, 0, 0]), dtype=float)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), position))


def read_dicom_series(files: Iterable[tuple[str, bytes]], source: str) -> tuple[list[CtSeries], list[str]]:
    """CT series among DICOM files, and a line for each thing refused (not DICOM, not CT, no pixels)."""
    by_series: dict[str, list[pydicom.Dataset]] = {}
    refused: list[str] = []
    for name, data in files:
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except pydicom.errors.InvalidDicomError:
            refused.append(f"{name}: not a DICOM file")
            continue
        modality = str(ds.get("Modality", "")) or "without a modality"
        if modality != "CT" or "PixelData" not in ds:
            refused.append(f"{name}: {modality} {ds.get('SOPClassUID', '')!s}, not a CT image")
            continue
        _fill_uids(ds, source, name)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    series = []
    for instances in by_series.values():
        instances.sort(key=_position_along_normal)
        series.append(CtSeries(source, instances))
    return series, refused


def read_inputs(path: Path) -> tuple[list[CtSeries], list[str]]:
    """The CT series of one input (a NIfTI file, a DICOM folder or zip, or a single DICOM file)."""
    if not path.exists():
        raise StudyInputError(f"{path} does not exist")
    if path.is_file() and _is_nifti(path):
        return [series_from_nifti(path)], []
    if path.is_dir() or zipfile.is_zipfile(path):
        return read_dicom_series(_datasets(path), str(path))
    return read_dicom_series([(str(path), path.read_bytes())], str(path))
