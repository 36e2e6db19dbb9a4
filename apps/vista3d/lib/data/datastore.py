"""Local datastore whose writes are validated, atomic and confined to the datastore folder.

MONAI Label's ``LocalDatastore`` copies uploads straight onto their destination (a crash mid-copy
leaves a half-written file, a corrupt upload replaces a good label), builds file names from ids and
tags as given (``../../x`` writes outside the datastore), and deletes images through
``realpath`` (the target of a linked image, not the link). Here ids and tags are plain names, an
upload is checked against its image and written to a temporary file beside its destination and
renamed over it, deleting removes the datastore's own entry (a link stays a link's worth of
deletion), and temporary files a killed write left behind are removed at start.

Several server processes (replicas) may share one datastore folder. MONAI Label keeps the index in
memory and rewrites it from there, so each process overwrote the others' new entries. Here every
write re-reads the index under the datastore's file lock before it changes it, and every read
first checks (one ``stat``) whether another process replaced the index since.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import nibabel as nib
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import Datastore

from ..atomic import FileVersion, file_version, replace_all, storage_full_as_error
from .imageio import check_volume_header, load_label

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_EXTENSIONS",
    "DatastoreError",
    "SafeLocalDatastore",
    "UnknownImageError",
    "check_plain_name",
    "file_extension",
    "latest_label",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd")
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TEMPORARY = (".saving-", ".adding-")


class DatastoreError(ValueError):
    """A datastore request with a bad id, tag or file type; the message names it."""


class UnknownImageError(LookupError):
    """No image with this id in the datastore."""


def check_plain_name(value: str, what: str) -> str:
    """An id or tag that is a plain file name: letters, digits, ``_ . -``, no separators, never ``..``."""
    if not _PLAIN.match(value) or ".." in value:
        raise DatastoreError(
            f"{what} must be a plain name (letters, digits, _ . -, starting with a letter or digit; "
            f"no '/' or '..'), got {value[:80]!r}"
        )
    return value


def file_extension(filename: str, allowed: Sequence[str], what: str) -> str:
    """The allowed extension ``filename`` ends with (longest first), or :class:`DatastoreError`."""
    for ext in sorted(allowed, key=len, reverse=True):
        if filename.lower().endswith(ext):
            return ext
    raise DatastoreError(f"{what} {os.path.basename(filename)[:80]!r} must be one of {list(allowed)}")


def latest_label(datastore: Datastore, image_id: str, user: str) -> str | None:
    """The file of the newest label of ``image_id`` that ``user`` saved (any tag), or None.

    Labels saved through the server record who saved them (``info["user"]``); a click whose session
    was lost starts from this label.
    """
    newest: tuple[int, str] | None = None
    for tag, label_id in datastore.get_labels_by_image_id(image_id).items():
        info = datastore.get_label_info(label_id, tag)
        if info.get("user") == user and (newest is None or int(info.get("ts", 0)) > newest[0]):
            newest = (int(info.get("ts", 0)), datastore.get_label_uri(label_id, tag))
    return newest[1] if newest and newest[1] else None


def _image_shape(path: str) -> tuple[int, ...] | None:
    """Spatial shape of a NIfTI image from its header (no voxel read); None for other formats."""
    if path.endswith((".nii", ".nii.gz")):
        return tuple(int(s) for s in cast(nib.Nifti1Image, nib.load(path)).shape[:3])
    return None


class SafeLocalDatastore(LocalDatastore):
    """``LocalDatastore`` with validated, atomic, confined writes (see the module docstring)."""

    _index: LocalDatastoreModel
    _index_seen: FileVersion | None = None
    _writing = 0  # > 0 while this process holds the lock and edits the index: no reload under it

    def __init__(self, datastore_path: str, **kwargs: Any) -> None:
        super().__init__(datastore_path, **kwargs)
        self._remove_stale_temporaries()

    @property
    def _datastore(self) -> LocalDatastoreModel:
        """The index, reloaded first if another process replaced the file (MONAI Label reads it directly)."""
        if not self._writing:
            self._reload_if_replaced()
        return self._index

    @_datastore.setter
    def _datastore(self, model: LocalDatastoreModel) -> None:
        self._index = model
        if hasattr(self, "_datastore_config_path"):
            self._index_seen = file_version(self._datastore_config_path)

    def _reload_if_replaced(self) -> None:
        key = file_version(self._datastore_config_path) if hasattr(self, "_datastore_config_path") else None
        if key is None or key == self._index_seen:
            return
        with open(self._datastore_config_path) as f:
            model = LocalDatastoreModel.model_validate_json(f.read())
        model.base_path = self._datastore_path
        self._index, self._index_seen = model, key
        logger.debug("Datastore index reloaded: another process changed it")

    @contextmanager
    def _editing(self) -> Iterator[None]:
        """The datastore's file lock, with the index as the last writer (in any process) left it."""
        with FileLock(self._lock_file):
            self._reload_if_replaced()
            self._writing += 1
            try:
                yield
            finally:
                self._writing -= 1

    def _remove_stale_temporaries(self) -> None:
        folders = [self._datastore.image_path(), *glob.glob(os.path.join(self._datastore.label_path(None), "*"))]
        for folder in folders:
            for prefix in _TEMPORARY:
                for stale in glob.glob(os.path.join(glob.escape(folder), f"{prefix}*")):
                    os.remove(stale)
                    logger.warning("Removed %s, left by a write that did not finish", stale)

    def _object(self, image_id: str) -> ImageLabelModel:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise UnknownImageError(f"unknown image id {image_id!r}")
        return obj

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        check_plain_name(image_id, "image id")
        image_ext = file_extension(image_filename, IMAGE_EXTENSIONS, "image file")
        check_volume_header(image_filename, "the uploaded image")  # ImageError (422): nothing is stored
        name = self._filename(image_id, image_ext)
        dest = os.path.join(self._datastore.image_path(), name)
        logger.info("Adding image %s => %s", image_id, name)
        info = {**(image_info or {}), "ts": int(time.time()), "name": name}
        with self._editing():
            before = self._datastore.objects.get(image_id)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._commit(image_filename, dest, ".adding-", "image.written", lambda: self._restore(image_id, before))
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_plain_name(label_tag, "label tag")
        self._object(image_id)
        label_ext = file_extension(label_filename, LABEL_EXTENSIONS, "label file")
        shape = _image_shape(self.get_image_uri(image_id))
        if shape is not None:
            load_label(label_filename, shape)  # ImageError (422) for unreadable labels or the wrong grid

        label_path = self._datastore.label_path(label_tag)
        dest = os.path.join(label_path, self._filename(image_id, label_ext))
        logger.info("Saving label %s => %s => %s", image_id, label_tag, os.path.basename(dest))
        info = {**(label_info or {}), "ts": int(time.time()), "name": os.path.basename(dest)}
        with self._editing():
            with storage_full_as_error(label_path):
                os.makedirs(label_path, exist_ok=True)
            obj = self._object(image_id)  # as the last writer left the index
            before = obj.labels.get(label_tag)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)

            def undo() -> None:
                if before is None:
                    obj.labels.pop(label_tag, None)
                else:
                    obj.labels[label_tag] = before

            self._commit(label_filename, dest, ".saving-", "label.written", undo)
        return image_id

    def _commit(self, source: str, dest: str, prefix: str, point: str, undo: Callable[[], None]) -> None:
        """Copy ``source`` to ``dest`` and rewrite the index, both staged before either is renamed.

        A full disk or a failed write leaves the old file and the old index (``undo`` restores the
        in-memory entry); only a kill between the two renames can land the file without its entry,
        and the index is then rebuilt from the folder at start, as MONAI Label does for any new file.
        """
        self._ignore_event_config = True
        try:
            replace_all(
                [(dest, lambda tmp: shutil.copyfile(source, tmp)), (self._datastore_config_path, self._dump_index)],
                prefix,
                point,
            )
        except BaseException:
            undo()
            raise
        self._written()

    def _written(self) -> None:
        """The index file is this process's own write: no reload for it."""
        self._config_ts = os.stat(self._datastore_config_path).st_mtime
        self._index_seen = file_version(self._datastore_config_path)

    def _restore(self, image_id: str, before: ImageLabelModel | None) -> None:
        if before is None:
            self._datastore.objects.pop(image_id, None)
        else:
            self._datastore.objects[image_id] = before

    def _dump_index(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))

    def _update_datastore_file(self, lock: bool = True) -> None:
        """The index rewritten through a temporary file (MONAI Label truncates it in place: a full disk or a
        kill mid-write left an empty index, and every label's entry with it)."""

        def write() -> None:
            self._ignore_event_config = True
            replace_all([(self._datastore_config_path, self._dump_index)], ".saving-")
            self._written()

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def remove_image(self, image_id: str) -> None:
        """Remove the image's labels and its datastore entry; a linked image loses the link, never the target."""
        for tag in list(self._object(image_id).labels):
            self.remove_label(image_id, tag)
        with self._editing():
            obj = self._object(image_id)
            self._unlink(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)))
            self._datastore.objects.pop(image_id, None)
            self._update_datastore_file(lock=False)
        logger.info("Removed image %s", image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._editing():
            label = self._datastore.label(label_id, label_tag)
            if label is None:
                raise UnknownImageError(f"no label {label_tag!r} for image {label_id!r}")
            self._unlink(os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, label.ext)))
            self._datastore.objects[label_id].labels.pop(label_tag, None)
            self._update_datastore_file(lock=False)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with self._editing():
            self._object(image_id).image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with self._editing():
            label = self._datastore.label(label_id, label_tag)
            if label is None:
                raise UnknownImageError(f"no label {label_tag!r} for image {label_id!r}")
            label.info.update(info)
            self._update_datastore_file(lock=False)

    @staticmethod
    def _unlink(path: str) -> None:
        if os.path.lexists(path):
            os.unlink(path)
