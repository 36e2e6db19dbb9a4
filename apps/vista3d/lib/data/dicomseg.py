"""VISTA3D label maps <-> DICOM-SEG, in Python (pydicom-seg), referencing the source CT series.

MONAI Label writes DICOM-SEG with dcmqi's ``itkimage2segimage``, a binary it downloads at start-up
(impossible offline), and names every segment from a ``label_info`` list the OHIF panel never sends.
Here segments are named from the VISTA3D dictionary (and the zero-shot registry), so OHIF and
Slicer show "liver", "left kidney" or "sarcoma" instead of "unknown".

Segment numbers are consecutive (1..N, as the standard asks), not VISTA3D's sparse class ids; the
class id is recovered from the segment label when a SEG is read back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS

from .imageio import label_ids

__all__ = ["SegError", "read_seg", "segment_names", "write_seg"]

logger = logging.getLogger(__name__)

# SNOMED CT "Anatomical structure": the category MONAI Label and dcmqi use for organ segments.
_CATEGORY = {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"}
_TYPE_CODE = "85756007"  # SNOMED CT "Tissue": a generic type; the segment label carries the name


GRID_TOLERANCE_MM = 0.1


class SegError(ValueError):
    """The label or the SEG cannot be converted (empty label, unknown class, mismatched series)."""


def segment_names(classes: Mapping[int, str], zero_shot: Mapping[str, int]) -> dict[int, str]:
    """Class id -> segment label: VISTA3D's classes plus the zero-shot names the server assigned."""
    return {**classes, **{int(i): name for name, i in zero_shot.items()}}


def _color(class_id: int, name: str) -> list[int]:
    """MONAI Label's anatomy colour when it knows the name, else a fixed colour derived from the id."""
    rgb = GENERIC_ANATOMY_COLORS.get(name)
    if rgb is None:
        rng = np.random.default_rng(class_id)
        rgb = tuple(int(v) for v in rng.integers(64, 256, size=3))
    return [int(v) for v in rgb[:3]]


def _template(ids: Sequence[int], names: Mapping[int, str], description: str) -> pydicom.Dataset:
    attributes: list[dict[str, Any]] = []
    for number, class_id in enumerate(ids, start=1):
        name = names.get(class_id, f"class {class_id}")
        attributes.append(
            {
                "labelID": number,
                "SegmentLabel": name,
                "SegmentDescription": name,
                "SegmentAlgorithmType": "AUTOMATIC",
                "SegmentAlgorithmName": "VISTA3D",
                "SegmentedPropertyCategoryCodeSequence": _CATEGORY,
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": _TYPE_CODE,
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": name,
                },
                "recommendedDisplayRGBValue": _color(class_id, name),
            }
        )
    return pydicom_seg.template.from_dcmqi_metainfo(
        {
            "ContentCreatorName": "VISTA3D",
            "SeriesDescription": description,
            "SeriesNumber": "300",
            "InstanceNumber": "1",
            "segmentAttributes": [attributes],
            "ContentLabel": "SEGMENTATION",
            "ContentDescription": "MONAI Label VISTA3D segmentation",
            "ClinicalTrialCoordinatingCenterName": "MONAI",
            "BodyPartExamined": "",
        }
    )


def _check_grid(label: sitk.Image, sources: Sequence[pydicom.Dataset]) -> None:
    """Refuses a label that is not on the series' grid: pydicom-seg would write it, misplaced, without a word."""
    expected = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    if tuple(label.GetSize()) != expected:
        raise SegError(f"the label's size {label.GetSize()} is not the series' {expected} (columns, rows, slices)")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
    if np.linalg.norm(positions - np.array(label.GetOrigin()), axis=1).min() > GRID_TOLERANCE_MM:
        raise SegError(f"the label's origin {label.GetOrigin()} is not the position of any slice of the series")


def write_seg(
    label_path: str | Path, series_dir: str | Path, names: Mapping[int, str], description: str
) -> pydicom.Dataset:
    """A DICOM-SEG of the label map at ``label_path`` (on the series' grid) for the series in ``series_dir``."""
    label = sitk.ReadImage(str(label_path))
    values = sitk.GetArrayViewFromImage(label)
    ids = label_ids(values)
    if not ids:
        raise SegError("the label is empty: DICOM-SEG needs at least one segment")
    numbers = np.zeros(max(ids) + 1, dtype=np.uint16)
    numbers[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    mask = sitk.GetImageFromArray(numbers[values.astype(np.int64)])
    mask.CopyInformation(label)

    sources = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sorted(Path(series_dir).iterdir())]
    if not sources:
        raise SegError(f"no source DICOM files in {series_dir}")
    _check_grid(label, sources)
    writer = pydicom_seg.MultiClassWriter(
        template=_template(ids, names, description), inplane_cropping=False, skip_empty_slices=False
    )
    try:
        seg = writer.write(mask, sources)
    except ValueError as e:
        raise SegError(f"the label does not fit series {sources[0].get('SeriesInstanceUID')}: {e}") from e
    if len(seg.PixelData) % 2:
        seg.PixelData += b"\x00"  # pydicom-seg leaves bit-packed frames at odd length; DICOM values are even
    logger.info("DICOM-SEG with %d segments for series %s", len(ids), sources[0].get("SeriesInstanceUID"))
    return seg


def read_seg(seg: pydicom.Dataset, names: Mapping[int, str]) -> sitk.Image:
    """The label map of a DICOM-SEG written by :func:`write_seg`, voxels as VISTA3D class ids."""
    by_name = {name: class_id for class_id, name in names.items()}
    result = pydicom_seg.MultiClassReader().read(seg)
    lookup = np.zeros(max([0, *result.segment_infos]) + 1, dtype=np.uint8)
    for number, info in result.segment_infos.items():
        label = str(info.SegmentLabel)
        if label not in by_name:
            raise SegError(f"segment {number} {label!r} is not a known class name")
        lookup[number] = by_name[label]
    image = sitk.GetImageFromArray(lookup[result.data])
    image.CopyInformation(result.image)
    return image
