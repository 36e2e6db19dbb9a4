"""``GET /dashboard/`` (the team dashboard page) and ``GET /dashboard/data`` (the same figures as JSON).

Signed-in users of any role may open it (an anonymous browser gets the sign-in page, as for OHIF);
what each sees is decided here, from the role, once per request: reviewers and admins the team's
work, the others their own (:class:`lib.dashboard.figures.Viewer`); admins also get the rollback
button, which calls ``POST /model/{model}/rollback``. The figures are read in a worker thread: the
datastore and the manifest are files. The page carries its own Content-Security-Policy
(:func:`lib.dashboard.page.content_security_policy`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask

from ..dashboard.figures import ServerState, Viewer, dashboard_data
from ..loop import pending_labels
from ..settings import Settings
from .auth import Identity
from .infer_route import session_owner
from .scheduler import Scheduler
from .users import Role

__all__ = ["dashboard_router", "viewer_of"]


def viewer_of(identity: Identity) -> Viewer:
    """What ``identity`` may see (with sign-in off everybody is an unchecked admin: everything)."""
    role = identity.role.label if identity.role is not None and identity.signed_in else None
    return Viewer(identity.name, role, identity.may(Role.REVIEWER), identity.may(Role.ADMIN))


def _collect(identity: Identity, scheduler: Scheduler, settings: Settings) -> dict[str, Any]:
    """The dashboard's figures for ``identity``, read now (blocking: datastore and manifest files)."""
    viewer = viewer_of(identity)
    instance = app_instance()
    datastore, store = instance.datastore(), instance.store
    task, _ = AsyncTask.status("train", check_if_running=True)
    loop = {
        "trigger": settings.train_trigger,
        "debounce_s": settings.train_debounce_s,
        "pending_labels": len(pending_labels(datastore, store)),
    }
    queue = scheduler.status(session_owner(identity, {}), show_names=viewer.sees_everyone)
    state = ServerState(store.manifest(), loop, task, queue, scheduler.recent())
    return dashboard_data(viewer, datastore, state)


def _page(data: dict[str, Any]) -> HTMLResponse:
    """The page of ``data``; matplotlib is imported with the first page drawn (see lib.dashboard.plots)."""
    from ..dashboard.page import content_security_policy, render_page

    page, nonce = render_page(data)
    headers = {"content-security-policy": content_security_policy(nonce), "cache-control": "no-store"}
    return HTMLResponse(page, headers=headers)


def dashboard_router(scheduler: Scheduler, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/dashboard")

    @router.get("/", summary="The team dashboard: learning, work, what to label next (a page)")
    async def page(request: Request) -> HTMLResponse:
        data = await run_in_threadpool(_collect, request.state.identity, scheduler, settings)
        return await run_in_threadpool(_page, data)

    @router.get("/data", summary="The team dashboard's figures (reviewers and admins: everybody's; others: their own)")
    async def figures(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(_collect, request.state.identity, scheduler, settings)

    return router
