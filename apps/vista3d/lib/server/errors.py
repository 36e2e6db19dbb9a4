"""Domain errors -> HTTP status codes, in one place.

The segmentation core and the datastore raise plain exceptions that say what is wrong; only here
do they become status codes, with the message unchanged as the answer's ``detail``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from ..atomic import StorageFull
from ..data.datastore import DatastoreError, UnknownImageError
from ..data.imageio import ImageError
from ..inference.gpu_memory import GpuOutOfMemory
from ..infers.vista3d import UnknownModelError
from ..prompts import PromptError
from ..state.lease import LeaseHeld
from ..zero_shot import ZeroShotNamesExhausted, ZeroShotRateLimited
from .scheduler import Busy, ClientGone

__all__ = ["STATUS", "install_error_handlers", "upstream_failure"]

logger = logging.getLogger(__name__)

STATUS: tuple[tuple[type[Exception], int], ...] = (
    (PromptError, 400),  # malformed or unsupported prompt, point outside the image, bad output options
    (DatastoreError, 400),  # id or tag that is not a plain name, file type not accepted
    (UnknownImageError, 404),
    (UnknownModelError, 404),
    (ImageNotFoundException, 404),
    (LabelNotFoundException, 404),
    (ZeroShotNamesExhausted, 409),
    (LeaseHeld, 409),  # a training round runs on another replica (or this one): the detail names its holder
    (ImageError, 422),  # unreadable image or label, label on another grid
    (ZeroShotRateLimited, 429),
    (ClientGone, 499),  # nobody reads it: the client closed the connection (nginx's code)
    (Busy, 503),  # not served in time; Retry-After estimated from the jobs ahead
    (GpuOutOfMemory, 503),  # the request's GPU memory is freed; Retry-After: a few seconds
    (StorageFull, 507),  # the datastore's (or model store's) filesystem is full: nothing was written
)
# The image server (DICOMweb: Orthanc, a PACS) behind the datastore, unreachable, failing or slow.
UPSTREAM_RETRY_AFTER_S = 30


def upstream_failure(exc: Exception) -> tuple[int, str]:
    """Status and message for a failed call to the DICOMweb server (``requests``: datastore; ``httpx``: proxy)."""
    if isinstance(exc, requests.Timeout | httpx.TimeoutException):
        return 504, "the image server (DICOMweb) did not answer in time; retry later"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return 502, f"the image server (DICOMweb) answered {exc.response.status_code}; retry later"
    return 502, f"the image server (DICOMweb) cannot be reached ({type(exc).__name__}); retry when it is back"


async def _upstream(request: Request, exc: Exception) -> Response:
    status, detail = upstream_failure(exc)
    logger.warning("%s %s -> %d: %s: %s", request.method, request.url.path, status, detail, exc)
    return JSONResponse({"detail": detail}, status_code=status, headers={"retry-after": str(UPSTREAM_RETRY_AFTER_S)})


def _handler(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        headers = {}
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers["retry-after"] = str(int(retry_after))
        logger.info("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    return handle


def install_error_handlers(app: FastAPI) -> None:
    for cls, status in STATUS:
        app.add_exception_handler(cls, _handler(status))
    for upstream in (requests.RequestException, httpx.HTTPError):
        app.add_exception_handler(upstream, _upstream)
