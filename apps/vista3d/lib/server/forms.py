"""Request fields parsed once at the edge: JSON form fields; uploads as temporary files that die with the request."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException, UploadFile

from ..data.datastore import file_extension

__all__ = ["json_object", "upload_to_temp"]


def json_object(raw: str | None, field: str) -> dict[str, Any]:
    """A form field holding a JSON object (empty: ``{}``), or HTTP 400 naming the field and the problem."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise HTTPException(status_code=400, detail=f"{field} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"{field} must be a JSON object, got {type(value).__name__}")
    return value


@contextmanager
def upload_to_temp(upload: UploadFile, allowed: Sequence[str], what: str) -> Iterator[str]:
    """Copy an upload to a temporary file with its allowed extension; the file is removed whatever happens."""
    ext = file_extension(upload.filename or "", allowed, what)
    fd, path = tempfile.mkstemp(prefix="vista3d-upload-", suffix=ext)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        yield path
    finally:
        os.remove(path)
