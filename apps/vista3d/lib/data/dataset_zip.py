"""The labelled dataset as a ZIP archive, produced while it is sent: nothing is written to disk.

MONAI Label's ``GET /datastore/dataset`` wrote the whole archive to the system's temporary folder
and never removed it (each download left a copy of the dataset there) and answered an empty
datastore with 500. Here the archive is written into an unseekable sink and handed out in pieces
of at most :data:`CHUNK` bytes as each file is read, so memory stays bounded and the server
writes nothing outside the datastore. Members are stored, not compressed: CT and label files are
gzip-compressed NIfTI already. The layout is MONAI Label's (``image/<file>``, ``label/<file>``,
``metadata.json``), so scripts written for it read this one.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence

__all__ = ["CHUNK", "dataset_zip"]

CHUNK = 1 << 20


class _Sink(io.RawIOBase):
    """An unseekable byte sink that hands out what was written since the last :meth:`take`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def dataset_zip(pairs: Sequence[Mapping[str, str]], metadata: str) -> Iterator[bytes]:
    """The bytes of a ZIP archive of ``pairs`` (``{"image": path, "label": path}``) and ``metadata.json``."""
    sink = _Sink()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for pair in pairs:
            for key, path in pair.items():
                info = zipfile.ZipInfo.from_file(path, arcname=f"{key}/{os.path.basename(path)}")
                with open(path, "rb") as source, archive.open(info, "w", force_zip64=True) as member:
                    while chunk := source.read(CHUNK):
                        member.write(chunk)
                        yield sink.take()
        archive.writestr("metadata.json", metadata)
    if tail := sink.take():
        yield tail
