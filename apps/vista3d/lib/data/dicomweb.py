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
import threading
from collections.abc import Mapping
from typing import Any

import requests
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom import Dataset
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

from ..atomic import storage_full_as_error
from ..failpoints import failpoint
from ..zero_shot import ZeroShotRegistry
from .datastore import SafeLocalDatastore
from .dicomseg import SegError, segment_names, write_seg

__all__ = ["Vista3DDICOMWebDatastore", "open_dicomweb_datastore"]

logger = logging.getLogger(__name__)

ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
SEG_TAGS = (DefaultLabelTag.FINAL.value, DefaultLabelTag.ORIGINAL.value)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # between two reads, not for a whole series
RETRY_ATTEMPTS = 3
RETRY_WAIT_MS = 500  # retrying's exponential multiplier: waits of 1 s, then 2 s


class Vista3DDICOMWebDatastore(DICOMWebDatastore, SafeLocalDatastore):
    """``DICOMWebDatastore`` whose labels are uploaded as DICOM-SEG referencing their CT series.

    Its local cache (converted images, labels, the index) is written as :class:`SafeLocalDatastore`
    writes: MONAI Label's copies onto the destination and truncates the index in place.
    """

    def __init__(self, classes: Mapping[int, str], registry: ZeroShotRegistry, **kwargs: Any) -> None:
        self._classes = dict(classes)
        self._registry = registry
        self._downloads: dict[str, threading.Lock] = {}
        self._downloads_lock = threading.Lock()
        super().__init__(**kwargs)

    def get_image_uri(self, image_id: str) -> str:
        """Empty for a series the server does not list (MONAI Label's answer is an IndexError, a 500)."""
        if image_id not in self.list_images():
            return ""
        image_dir = os.path.join(self._datastore.image_path(), image_id)
        if not os.path.isdir(image_dir) or not os.listdir(image_dir):
            self._download_series(image_id, image_dir)
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The cached label file where the index has one; MONAI Label's lookup otherwise.

        MONAI Label takes a final label's id for the series UID of a DICOM-SEG and downloads that
        series. A label saved through this server is indexed under its image's id, so it fetched the
        CT itself as the "SEG" and failed: ``GET /datastore/label`` answered 500 for every final label
        and a round could not read the labels it should train on.
        """
        cached = LocalDatastore.get_label_uri(self, label_id, label_tag)
        if cached and os.path.isfile(cached):
            return cached
        return str(super().get_label_uri(label_id, label_tag, image_id))

    def _download_series(self, series_uid: str, image_dir: str) -> None:
        """Fetches the series in its stored transfer syntax (``transfer-syntax=*``), into ``image_dir`` atomically.

        MONAI Label asks for explicit VR little endian, which makes the server transcode; Orthanc's Debian
        build cannot transcode JPEG 2000 and answers 500. SimpleITK (GDCM) decodes the compressed files here.
        One download per series at a time: a second request for it waits and finds it in the cache;
        a file lock beside it does the same for replicas sharing the cache (one replica's download
        replaced the folder another was reading).
        """
        with self._downloads_lock:
            lock = self._downloads.setdefault(series_uid, threading.Lock())
        with lock:
            if os.path.isdir(image_dir) and os.listdir(image_dir):
                return
            parent = os.path.dirname(image_dir)
            with storage_full_as_error(parent):
                os.makedirs(parent, exist_ok=True)
                with FileLock(os.path.join(parent, f".{series_uid}.download.lock")):
                    if os.path.isdir(image_dir) and os.listdir(image_dir):
                        return
                    self._fetch_into(series_uid, image_dir)
        logger.info("Downloaded series %s into %s", series_uid, image_dir)

    def _fetch_into(self, series_uid: str, image_dir: str) -> None:
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        study_uid = str(Dataset.from_json(found[0]).StudyInstanceUID)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(image_dir), prefix=".download-")
        try:
            for instance in self._client.retrieve_series(study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX):
                instance.save_as(os.path.join(tmp, f"{instance.SOPInstanceUID}.dcm"))
            shutil.rmtree(image_dir, ignore_errors=True)
            os.replace(tmp, image_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

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
            return SafeLocalDatastore.save_label(self, image_id, label_file, label_tag, info)
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
        failpoint("seg.stored")  # in the image server, not yet in the local cache and index
        logger.info("Stored DICOM-SEG %s (%s) for series %s", seg.SeriesInstanceUID, label_tag, image_id)
        return {
            "SeriesInstanceUID": str(seg.SeriesInstanceUID),
            "StudyInstanceUID": str(seg.StudyInstanceUID),
            "PatientID": str(seg.get("PatientID", "")),
            "Modality": "SEG",
        }


class _BoundedWait(HTTPAdapter):
    """Every call to the image server gives up after a bounded wait (``dicomweb_client`` sets no timeout:
    an image server that stops answering held a request's thread, and its lock on the series, for ever)."""

    def send(self, request: PreparedRequest, **kwargs: Any) -> Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        return super().send(request, **kwargs)


def open_dicomweb_datastore(url: str, classes: Mapping[int, str], registry: ZeroShotRegistry) -> DICOMWebDatastore:
    """The DICOMweb datastore MONAI Label would build for ``url`` (same settings), minus the dcmqi download."""
    session = requests.Session()
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(
            settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        )
    for scheme in ("http://", "https://"):
        session.mount(scheme, _BoundedWait())
    client = DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    # dicomweb_client retries any failure 5 times over 30 s (a user waited that long to learn the image
    # server is down); a blip is still ridden out: 3 attempts, 1 s then 2 s apart.
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
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
