"""Local datastore whose label writes are validated and atomic.

MONAI Label's ``LocalDatastore.save_label`` copies the upload straight onto the stored label, so a
crash mid-copy leaves a half-written file and a corrupt upload replaces a good label. Here the
upload is checked against its image first (readable, same grid), then written to a temporary file
beside the destination and renamed over it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, cast

import nibabel as nib
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore

from .imageio import ImageError, load_label

__all__ = ["SafeLocalDatastore"]

logger = logging.getLogger(__name__)


def _image_shape(path: str) -> tuple[int, ...] | None:
    """Spatial shape of a NIfTI image from its header (no voxel read); None for other formats."""
    if path.endswith((".nii", ".nii.gz")):
        return tuple(int(s) for s in cast(nib.Nifti1Image, nib.load(path)).shape[:3])
    return None


class SafeLocalDatastore(LocalDatastore):
    """``LocalDatastore`` with validated, atomic label saves."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}")
        image_path = self.get_image_uri(image_id)
        shape = _image_shape(image_path)
        if shape is not None:
            try:
                load_label(label_filename, shape)
            except ImageError as e:
                raise HTTPException(status_code=422, detail=str(e)) from e

        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        dest = os.path.join(label_path, self._filename(image_id, label_ext))
        logger.info("Saving label %s => %s => %s", image_id, label_tag, dest)
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=label_path, prefix=".saving-", suffix=label_ext)
            os.close(fd)
            try:
                shutil.copyfile(label_filename, tmp)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            info = dict(label_info or {})
            info["ts"] = int(time.time())
            info["name"] = os.path.basename(dest)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id
