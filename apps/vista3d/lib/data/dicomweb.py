"""DICOMweb datastore (Orthanc, any STOW-RS server) that stores labels back as DICOM-SEG written in Python.

MONAI Label's ``_init_dicomweb_datastore`` downloads dcmqi from GitHub before it builds the
datastore, so a server without internet access cannot start on a DICOMweb URL; its ``save_label``
then runs dcmqi with segments named "unknown". :func:`open_dicomweb_datastore` builds the same
client without that download, and :class:`Vista3DDICOMWebDatastore` writes the SEG with
:mod:`lib.data.dicomseg`, named from the VISTA3D dictionary and the zero-shot registry.

Both inference results saved by MONAI Label (tag ``original``, requests with ``save_label``) and
submitted labels (tag ``final``) go to the DICOMweb server; other tags stay in the local cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom import Dataset

from ..zero_shot import ZeroShotRegistry
from .dicomseg import SegError, segment_names, write_seg

__all__ = ["Vista3DDICOMWebDatastore", "open_dicomweb_datastore"]

logger = logging.getLogger(__name__)

ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
SEG_TAGS = (DefaultLabelTag.FINAL.value, DefaultLabelTag.ORIGINAL.value)


class Vista3DDICOMWebDatastore(DICOMWebDatastore):
    """``DICOMWebDatastore`` whose labels are uploaded as DICOM-SEG referencing their CT series."""

    def __init__(self, classes: Mapping[int, str], registry: ZeroShotRegistry, **kwargs: Any) -> None:
        self._classes = dict(classes)
        self._registry = registry
        super().__init__(**kwargs)

    def get_image_uri(self, image_id: str) -> str:
        """Empty for a series the server does not list (MONAI Label's answer is an IndexError, a 500)."""
        if image_id not in self.list_images():
            return ""
        image_dir = os.path.join(self._datastore.image_path(), image_id)
        if not os.path.isdir(image_dir) or not os.listdir(image_dir):
            self._download_series(image_id, image_dir)
        return super().get_image_uri(image_id)

    def _download_series(self, series_uid: str, image_dir: str) -> None:
        """Fetches the series in its stored transfer syntax (``transfer-syntax=*``), into ``image_dir`` atomically.

        MONAI Label asks for explicit VR little endian, which makes the server transcode; Orthanc's Debian
        build cannot transcode JPEG 2000 and answers 500. SimpleITK (GDCM) decodes the compressed files here.
        """
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        study_uid = str(Dataset.from_json(found[0]).StudyInstanceUID)
        os.makedirs(os.path.dirname(image_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(image_dir), prefix=".download-")
        try:
            for instance in self._client.retrieve_series(study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX):
                instance.save_as(os.path.join(tmp, f"{instance.SOPInstanceUID}.dcm"))
            shutil.rmtree(image_dir, ignore_errors=True)
            os.replace(tmp, image_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Downloaded series %s into %s", series_uid, image_dir)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        image_uri = self.get_image_uri(image_id)  # downloads the series when it is not cached yet
        converted = binary_to_image(image_uri, label_filename) if label_filename.endswith(".bin") else ""
        label_file = converted or label_filename
        tag = DefaultLabelTag(label_tag).value if label_tag in SEG_TAGS else label_tag
        try:
            info = dict(label_info or {})
            if tag in SEG_TAGS:
                info.update(self._store_seg(image_id, label_file, tag))
            return LocalDatastore.save_label(self, image_id, label_file, label_tag, info)
        finally:
            if converted:
                os.unlink(converted)

    def _store_seg(self, image_id: str, label_file: str, label_tag: str) -> dict[str, Any]:
        """Uploads the label as DICOM-SEG; returns the SEG's series fields for the label's info."""
        series_dir = os.path.join(self._datastore.image_path(), image_id)
        names = segment_names(self._classes, self._registry.as_dict())
        try:
            seg = write_seg(label_file, series_dir, names, f"VISTA3D {label_tag}")
        except SegError as e:
            if label_tag == DefaultLabelTag.ORIGINAL.value:
                logger.warning("Inference result for %s not stored as DICOM-SEG: %s", image_id, e)
                return {}
            raise HTTPException(status_code=422, detail=str(e)) from e
        self._client.store_instances([seg])
        logger.info("Stored DICOM-SEG %s (%s) for series %s", seg.SeriesInstanceUID, label_tag, image_id)
        return {
            "SeriesInstanceUID": str(seg.SeriesInstanceUID),
            "StudyInstanceUID": str(seg.StudyInstanceUID),
            "PatientID": str(seg.get("PatientID", "")),
            "Modality": "SEG",
        }


def open_dicomweb_datastore(url: str, classes: Mapping[int, str], registry: ZeroShotRegistry) -> DICOMWebDatastore:
    """The DICOMweb datastore MONAI Label would build for ``url`` (same settings), minus the dcmqi download."""
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(
            settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        )
    client = DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return Vista3DDICOMWebDatastore(
        classes=classes,
        registry=registry,
        client=client,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
    )
