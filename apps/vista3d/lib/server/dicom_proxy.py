"""The DICOMweb proxy OHIF reads images through, without blocking the server on a slow image server.

MONAI Label's ``/proxy/dicom/...`` calls ``requests`` inside its async handlers: the event loop
waits for the image server, so one slow series retrieval froze every other user's requests (sign-in,
clicks, label saves). These routes forward the same paths with an async client, stream the answer
as it arrives, and bound the wait: an unreachable image server is a 502 and a silent one a 504
(:func:`~.errors.upstream_failure`), and the server keeps serving. Credentials are MONAI Label's
DICOMweb settings; Google Healthcare's token exchange (MONAI Label's proxy) is not supported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from monailabel.config import settings
from starlette.background import BackgroundTask

__all__ = ["CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "dicom_proxy_router"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # between two reads: a large series streams for longer than this in total
# What a request passes on: never the user's cookie or token, which are this server's, not the image server's.
_FORWARDED = {"accept", "accept-encoding", "content-type"}
# What an answer does not pass on: hop-by-hop headers (RFC 9110 7.6.1) and the length, which streaming sets.
_NOT_RETURNED = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


def _prefix(op: str, path: str) -> str:
    """MONAI Label's mapping of the proxy's operation to the server's prefix (metadata asked by QIDO goes to WADO)."""
    if op == "qido" and path.endswith("metadata"):
        op = "wado"
    prefixes = {
        "wado": settings.MONAI_LABEL_WADO_PREFIX,
        "qido": settings.MONAI_LABEL_QIDO_PREFIX,
        "stow": settings.MONAI_LABEL_STOW_PREFIX,
    }
    return prefixes.get(op, "")


def _target(op: str, path: str) -> str:
    prefix = _prefix(op, path)
    return f"{settings.MONAI_LABEL_STUDIES.rstrip('/')}/{prefix + '/' if prefix else ''}{path}"


def _client() -> httpx.AsyncClient:
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    return httpx.AsyncClient(
        auth=(user, password) if user and password else None,
        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
    )


def dicom_proxy_router() -> APIRouter:
    """GET and POST ``/proxy/dicom/{wado,qido,stow}/{path}`` and ``/proxy/dicom/{path}``, as MONAI Label's."""
    router = APIRouter(prefix="/proxy/dicom")
    client = _client()

    async def forward(request: Request, op: str, path: str) -> StreamingResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        body = await request.body() if request.method == "POST" else None
        upstream = client.build_request(
            request.method, _target(op, path), params=request.query_params, headers=headers, content=body
        )
        answer = await client.send(upstream, stream=True)  # httpx errors -> 502/504 (errors.upstream_failure)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k.lower() not in _NOT_RETURNED},
            background=BackgroundTask(answer.aclose),
        )

    def route(op: str) -> Callable[[Request, str], Coroutine[Any, Any, StreamingResponse]]:
        async def proxy(request: Request, path: str) -> StreamingResponse:
            return await forward(request, op, path)

        return proxy

    for op in ("wado", "qido", "stow", ""):
        path = f"/{op}/{{path:path}}" if op else "/{path:path}"
        router.add_api_route(path, route(op), methods=["GET", "POST"], include_in_schema=False)
    return router
