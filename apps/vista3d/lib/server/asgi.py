"""The ASGI application uvicorn serves: MONAI Label's routes behind sign-in, the access table and safe defaults.

Started by ``monailabel start_server ... --uvicorn_app lib.server.asgi:app`` with the app folder on
``PYTHONPATH`` (``make serve`` and the tests do both). MONAI Label has set up its settings (app
folder, studies, ``--conf``) in this process before uvicorn imports this module, so everything
here is decided once, at import: who may do what, which origins may call, whether it is safe to
start at all. MONAI Label's own routes are kept (its handlers, the bundled OHIF), except those
replaced here (``*_routes.py``: checked params, no leftovers, work off the event loop; its DICOMweb
proxy by :mod:`.dicom_proxy`) and those it marks deprecated. The OpenAPI document is completed in :mod:`.openapi`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from monailabel.config import settings as ml_settings
from monailabel.endpoints import activelearning, batch_infer, datastore, info, ohif, scoring, train
from monailabel.interfaces.utils.app import app_instance
from starlette.routing import BaseRoute

from ..cores import available_cores
from ..inference.auto_infer import window_workers
from ..model import patch_size_for
from ..settings import Settings, users_path
from .access import RULES
from .auth import Authenticator, Identity
from .dashboard_route import dashboard_router
from .datastore_routes import datastore_router
from .dicom_proxy import dicom_proxy_router
from .edge import AccessMiddleware
from .errors import install_error_handlers
from .health import ReplicaHeaderMiddleware, health_router, replica_name
from .infer_route import infer_router
from .launch import EDGE_ENV, bind_host, is_loopback
from .logs_route import logs_router
from .openapi import install_contract
from .redact import ScrubPathsMiddleware, TruncatingFilter
from .scheduler import Scheduler
from .shutdown import stop_on_signals
from .signin import sign_in_router
from .task_routes import task_router
from .threads import ThreadBudget
from .tokens import TokenIssuer
from .users import UserStore

__all__ = ["app", "create_app"]

logger = logging.getLogger(__name__)

# MONAI Label re-imports the app's ``lib`` package when it builds the app (after this module is
# imported): two copies of every module, and errors raised by one copy not caught as the other's.
os.environ["MONAI_LABEL_RELOAD_APP_LIB"] = "false"
os.environ[EDGE_ENV] = "1"

STATIC = Path(datastore.__file__).parent / "static"
MONAI_LABEL_ROUTERS = (info, train, batch_infer, scoring, activelearning, datastore, ohif)


def _routes(router: APIRouter | FastAPI) -> set[tuple[str, str]]:
    return {(m, r.path) for r in router.routes if isinstance(r, APIRoute) for m in r.methods or ()}


def _monailabel_routes(replaced: set[tuple[str, str]]) -> Iterator[BaseRoute]:
    """MONAI Label's routes minus the replaced and the deprecated ones.

    Not served: image sessions and whole-slide inference (not this app's), model-file routes (see
    :mod:`.task_routes`), and MONAI Label's DICOMweb proxy (replaced by :mod:`.dicom_proxy`).
    """
    for module in MONAI_LABEL_ROUTERS:
        for route in module.router.routes:
            if isinstance(route, APIRoute) and (
                route.deprecated or {(m, route.path) for m in route.methods or ()} & replaced
            ):
                continue
            yield route


class Edge:
    """What the edge decided at start: settings, who signs in how, and whether a warning must be shown."""

    def __init__(self, settings: Settings, studies: str, app_dir: str, host: str) -> None:
        self.settings = settings
        self.network = not is_loopback(host)
        users = users_path(settings.users, studies, app_dir)
        issuer = TokenIssuer.from_key_file(users.parent / "auth_key", settings.token_hours * 3600)
        self.auth = Authenticator(UserStore(users), issuer, settings.auth, self.network)
        # as many as Engine.auto's pool (one per core at most), fewer when `threads` is set lower
        workers = window_workers(patch_size_for(settings.preset), min(settings.threads, available_cores()))
        self.threads = ThreadBudget(settings.threads, settings.train_threads, workers)
        self.scheduler = Scheduler(
            settings.queue_max, settings.queue_wait_s, on_start=self.threads.apply, max_run_s=settings.run_limit_s
        )
        self.warning = ""
        if self.network and settings.auth == "auto" and len(self.auth.store) == 0:
            raise SystemExit(
                f"refusing to start: serving on {host} needs sign-in, and {users} holds no user. Add one with "
                f"`tools/users.py --studies {studies} add NAME --role admin`, or pass --conf auth off "
                "(CONF=auth=off) to serve the network without sign-in."
            )
        if self.network and not self.auth.enabled:
            self.warning = f"SIGN-IN IS OFF on {host}: anyone who can reach this server may read, change and delete"
        elif self.auth.enabled and len(self.auth.store) == 0:
            self.warning = f"sign-in is on but {users} holds no user: nobody can sign in (tools/users.py add)"

    def server_info(self, identity: Identity) -> dict[str, Any]:
        queue = self.scheduler.status(identity.name, show_names=False)
        return {
            "auth": "on" if self.auth.enabled else "off",
            "user": identity.name,
            "role": identity.role.label if identity.role is not None and identity.signed_in else None,
            "queue": {"length": queue["length"], "running": len(queue["running"])},
            "threads": self.threads.status(),
        }


def _info_router(edge: Edge) -> APIRouter:
    router = APIRouter()

    @router.get("/info/", summary="Models, labels, learning status; who you are signed in as")
    async def app_info(request: Request) -> dict[str, Any]:
        data = await run_in_threadpool(app_instance().info)
        data["server"] = edge.server_info(request.state.identity)
        if edge.warning:
            data["warning"] = edge.warning
        return dict(data)

    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")

    return router


def _install_log_filter() -> None:
    """Every log line the server writes is cut to a bounded length (see :class:`TruncatingFilter`)."""
    truncating = TruncatingFilter()
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(truncating)


def create_app() -> FastAPI:
    settings = Settings.from_conf(ml_settings.MONAI_LABEL_APP_CONF or {})
    edge = Edge(settings, ml_settings.MONAI_LABEL_STUDIES, ml_settings.MONAI_LABEL_APP_DIR, bind_host())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _install_log_filter()
        if edge.warning:
            logger.warning("*" * 20 + f" {edge.warning} " + "*" * 20)
        logger.info("Sign-in %s; %d access rules", "on" if edge.auth.enabled else "off", len(RULES))
        instance = app_instance()
        instance.server_mode(True)
        instance.on_init_complete()
        with stop_on_signals(edge.scheduler):  # SIGTERM cancels running jobs rather than waiting for them
            yield

    app = FastAPI(
        title="VISTA3D on MONAI Label",
        openapi_url="/openapi.json",
        docs_url="/",
        redoc_url="/docs",
        swagger_ui_oauth2_redirect_url=None,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_contract(app, lambda: edge.auth.enabled)
    ours = [
        sign_in_router(edge.auth),
        _info_router(edge),
        infer_router(edge.scheduler, edge.threads),
        datastore_router(),
        task_router(),
        logs_router(os.path.join(ml_settings.MONAI_LABEL_APP_DIR, "logs", "app.log")),
        dashboard_router(edge.scheduler, settings),
        health_router(),
    ]
    if ml_settings.MONAI_LABEL_STUDIES.startswith(("http://", "https://")):
        ours.append(dicom_proxy_router())
    for router in ours:
        app.include_router(router)
    replaced = set().union(*(_routes(r) for r in ours))
    app.router.routes.extend(_monailabel_routes(replaced))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(ScrubPathsMiddleware)
    app.add_middleware(AccessMiddleware, auth=edge.auth)
    if (replica := replica_name()) is not None:  # outside the access check: its 401s and 404s name the replica too
        app.add_middleware(ReplicaHeaderMiddleware, name=replica)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


app = create_app()
