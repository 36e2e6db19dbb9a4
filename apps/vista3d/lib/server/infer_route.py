"""``POST /infer/{model}``: the request checked and built here, the segmentation run off the event loop.

It replaces MONAI Label's route, which merged the client's ``params`` over the request (so
``params.image`` could name any file on the server), wrote uploads to temporary files that a
rejected request left behind, logged the whole params (up to a megabyte a line) and ran the
inference on the event loop. Here the image is a datastore id, fetched from a DICOMweb server
before the request queues for compute (a slow image server delays its own request, not the
others' clicks), the keys the server sets cannot come from the client, an uploaded label lives
only as long as the request, and the caller's name (the session owner) is handed inward as a
plain string. The work runs behind the
:class:`~.scheduler.Scheduler` (clicks first), and a client that disconnects cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from concurrent.futures import Future
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from monailabel.endpoints.infer import send_response
from monailabel.interfaces.utils.app import app_instance

from ..data.datastore import LABEL_EXTENSIONS, UnknownImageError, check_plain_name
from ..infers.vista3d import IMAGE_ID_KEY, LABEL_FILE_KEY, ON_COMPUTED_KEY, ON_WINDOW_KEY, THREADS_KEY, USER_KEY
from ..prompts import is_interactive
from .auth import Identity
from .forms import json_object, upload_to_temp
from .scheduler import Job, Kind, Scheduler
from .threads import ThreadBudget
from .users import Role

__all__ = ["SERVER_KEYS", "Output", "infer_router", "session_owner"]

logger = logging.getLogger(__name__)

# Request keys only the server sets; a client's params holding any of them are refused.
SERVER_KEYS = frozenset(
    {"model", "image", "file", "session", "description"}
    | {USER_KEY, LABEL_FILE_KEY, IMAGE_ID_KEY, ON_WINDOW_KEY, ON_COMPUTED_KEY, THREADS_KEY}
)


class Output(str, Enum):
    """What an answer holds: the label file, the result JSON, or both (multipart; the default).

    MONAI Label's ``dicom_seg`` is not offered: this app writes no DICOM-SEG per request (it answered 500).
    """

    image = "image"
    json = "json"
    all = "all"


def session_owner(identity: Identity, params: dict[str, Any]) -> str:
    """Whose session a request edits: the signed-in user, else Slicer's ``client_id``, else one anonymous session."""
    if identity.signed_in:
        return identity.name
    client = params.get("client_id")
    if isinstance(client, str) and client.strip():
        return f"client:{client.strip()[:64]}"
    return "anonymous"


def _check_params(params: dict[str, Any], identity: Identity) -> None:
    reserved = sorted(SERVER_KEYS & params.keys())
    if reserved:
        raise HTTPException(
            status_code=400,
            detail=f"params may not set {reserved}: the image is the query parameter 'image' (a datastore id) "
            "and a previous label is the file field 'label'",
        )
    if params.get("label_tag") is not None:
        check_plain_name(str(params["label_tag"]), "label_tag")
    if params.get("save_label") and not identity.may(Role.ANNOTATOR):
        raise HTTPException(
            status_code=403, detail="save_label stores the result as a label: it needs the annotator role"
        )


async def _wait(request: Request, scheduler: Scheduler, job: Job, future: Future[Any]) -> Any:
    """The job's result; the job is cancelled as soon as its client disconnects (checked twice a second)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        if done:
            return waiting.result()
        if not job.cancelled.is_set() and await request.is_disconnected():
            logger.info("Job %d (%s by %s): the client has gone", job.id, job.kind.name.lower(), job.user)
            scheduler.cancel(job)


def infer_router(scheduler: Scheduler, threads: ThreadBudget) -> APIRouter:
    router = APIRouter()

    @router.post("/infer/{model}", summary="Segment an image of the datastore (auto, clicks, zero-shot)")
    async def infer(
        request: Request,
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: Annotated[str, Form()] = "{}",
        file: Annotated[UploadFile | None, File()] = None,
        label: Annotated[UploadFile | None, File()] = None,
        output: Output | None = None,
    ) -> Any:
        if file is not None or session_id:
            raise HTTPException(
                status_code=400,
                detail="this server infers on datastore images only: upload with PUT /datastore/image, "
                "then pass its id",
            )
        if not image:
            raise HTTPException(status_code=400, detail="the query parameter 'image' (a datastore id) is required")
        identity: Identity = request.state.identity
        body = json_object(params, "params")
        _check_params(body, identity)
        check_plain_name(image, "image (a datastore id)")
        owner = session_owner(identity, body)
        logger.info("Infer request by %s: %s", owner, json.dumps({"model": model, "image": image, "params": body}))
        built = {**body, "model": model, "image": image, USER_KEY: owner}
        instance = app_instance()
        # Fetched before the request queues for compute: a slow image server holds this request only.
        if not await run_in_threadpool(instance.datastore().get_image_uri, image):
            raise UnknownImageError(f"unknown image id {image!r}")
        kind = Kind.CLICK if is_interactive(body) else Kind.AUTO
        with contextlib.ExitStack() as stack:
            if label is not None:
                built[LABEL_FILE_KEY] = stack.enter_context(upload_to_temp(label, LABEL_EXTENSIONS, "label file"))

            def work(job: Job) -> Any:
                def on_window(i: int, n: int) -> None:
                    scheduler.checkpoint(job)

                return instance.infer(
                    {
                        **built,
                        ON_WINDOW_KEY: on_window,
                        ON_COMPUTED_KEY: lambda: scheduler.computed(job),
                        THREADS_KEY: lambda: threads.serving(job.kind),
                    }
                )

            job, future = scheduler.submit(kind, owner, image, work)
            result = await _wait(request, scheduler, job, future)
        return send_response(instance.datastore(), result, output, background_tasks)

    @router.get("/queue", summary="Inference queue: running and waiting requests, yours marked; threads in use")
    async def queue(request: Request, client_id: str = "") -> dict[str, Any]:
        identity: Identity = request.state.identity
        owner = session_owner(identity, {"client_id": client_id})
        admin = identity.signed_in and identity.role == Role.ADMIN
        return {**scheduler.status(owner, show_names=admin), "threads": threads.status()}

    return router
