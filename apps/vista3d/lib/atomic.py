"""Writes that no reader ever sees half done: temporary files in the same folder, then renames.

A full disk fails a write with ENOSPC (or EDQUOT over a quota) before any rename, so nothing is
replaced; :class:`StorageFull` says so, and the edge answers it with 507 Insufficient Storage.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .failpoints import failpoint

__all__ = [
    "FileVersion",
    "StorageFull",
    "file_version",
    "replace_all",
    "replace_with",
    "storage_full_as_error",
    "write_json",
]

_FULL = (errno.ENOSPC, errno.EDQUOT)

Writer = Callable[[str], object]
FileVersion = tuple[int, int, int]


def file_version(path: str | Path) -> FileVersion | None:
    """Which version of ``path`` is on disk (None: none): cheap to poll before each use.

    Each write here renames a new file over the old one, so the inode changes even when two writes
    fall in one coarse mtime tick; size and mtime catch a file rewritten in place by someone else.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class StorageFull(OSError):
    """The filesystem holding ``folder`` has no space left: nothing was written."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message alone, without "[Errno 28]"


@contextmanager
def storage_full_as_error(folder: str | Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside into :class:`StorageFull` naming ``folder``."""
    try:
        yield
    except StorageFull:
        raise
    except OSError as e:
        if e.errno not in _FULL:
            raise
        raise StorageFull(
            e.errno, f"no space left on the filesystem holding {folder}: nothing was written; free space and retry"
        ) from e


def _temp_beside(dest: Path, prefix: str | None) -> str:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=prefix or f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def replace_all(writes: Sequence[tuple[str | Path, Writer]], prefix: str | None = None, point: str = "") -> None:
    """Write every ``(dest, write)`` to a temporary file beside ``dest``, then rename them all, in order.

    Every temporary file is complete (and fsynced) before the first rename, so a full disk or a
    failed write replaces nothing; a kill between two renames (no I/O left to fail) is the only
    window where some are replaced, and the fail point ``point`` (when given) sits just before them.
    ``prefix`` names the temporary files (default ``.<name>.``) so that no datastore pattern matches them.
    """
    temps: list[str] = []
    try:
        for dest, write in writes:
            dest = Path(dest)
            with storage_full_as_error(dest.parent):
                temps.append(_temp_beside(dest, prefix))
                write(temps[-1])
                _fsync(temps[-1])
            os.chmod(temps[-1], 0o644)
        if point:
            failpoint(point)
        for tmp, (dest, _) in zip(temps, writes, strict=True):
            os.replace(tmp, dest)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def replace_with(dest: str | Path, write: Writer, prefix: str | None = None, point: str = "") -> None:
    """``write`` a temporary file beside ``dest`` (readable by all), then rename it over ``dest``."""
    replace_all([(dest, write)], prefix, point)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (fsynced before the rename)."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    replace_with(path, dump)


def _fsync(path: str) -> None:
    """Data on disk before the rename makes it visible (a full disk may only show here)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
