"""``GET /healthz`` for load balancers, and which replica answered.

A balancer in front of several replicas (``tools/haproxy.py``, a Kubernetes probe) asks every second
whether each replica serves: the route is public (a health check carries no token), answers on the
event loop without touching the datastore or the network, and says which model version the replica
serves, so that a rollout can be watched. ``tools/serve.py --replicas N`` numbers its replicas in
:data:`REPLICA_ENV`; a numbered replica names itself in ``/healthz`` and in an ``X-Replica`` header on
every answer, so that a user (or a test) can see where the balancer sent them.
"""

from __future__ import annotations

import os
from typing import Literal

from fastapi import APIRouter
from monailabel.interfaces.utils.app import app_instance
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .launch import REPLICA_ENV

__all__ = ["REPLICA_ENV", "Health", "ReplicaHeaderMiddleware", "health_router", "replica_name"]


def replica_name() -> str | None:
    """This process's replica name, or None when it is not one of several."""
    return os.environ.get(REPLICA_ENV) or None


class Health(BaseModel):
    """What ``GET /healthz`` answers while the server serves."""

    status: Literal["ok"] = "ok"
    version: str = Field(description="the served model version, e.g. small:model_starter.pt or small:v3")
    replica: str | None = Field(None, description="which replica answered (tools/serve.py --replicas); else null")


def health_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", summary="Liveness for a load balancer: ok, the served model version, the replica")
    async def healthz() -> Health:
        # the app is built before uvicorn serves (the edge's lifespan); reading its version costs nothing
        return Health(version=str(app_instance().model.version), replica=replica_name())

    return router


class ReplicaHeaderMiddleware:
    """Adds ``X-Replica: <name>`` to every HTTP answer of a numbered replica."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (b"x-replica", name.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
