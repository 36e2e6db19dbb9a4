"""The datastore's write routes and the dataset download: inputs checked at the edge, nothing left behind.

They replace MONAI Label's ``PUT /datastore/image``, ``PUT /datastore/label`` and the two info
updates, which answered malformed JSON with 500, left the temporary upload of a rejected request
behind and read and copied files on the event loop. Ids, tags and file types are checked by
:class:`~lib.data.datastore.SafeLocalDatastore` (and the edge, for any datastore). ``GET
/datastore/dataset`` streams the archive as it is written (:mod:`lib.data.dataset_zip`) instead of
leaving a copy of the dataset in the system's temporary folder. File work runs off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance

from ..data.dataset_zip import dataset_zip
from ..data.datastore import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, check_plain_name, file_extension
from .auth import Identity
from .forms import json_object, upload_to_temp
from .infer_route import session_owner

__all__ = ["datastore_router"]

logger = logging.getLogger(__name__)


def _save_label(image: str, label_file: str, tag: str, info: dict[str, Any]) -> dict[str, Any]:
    instance = app_instance()
    label_id = instance.datastore().save_label(image, label_file, tag, info)
    result = dict(instance.on_save_label(image, label_id) or {})
    result.update({"image": image, "label": label_id})
    return result


def datastore_router() -> APIRouter:
    router = APIRouter(prefix="/datastore")

    @router.put("/image", summary="Upload a new image (NIfTI or NRRD)")
    async def add_image(
        request: Request,
        file: Annotated[UploadFile, File()],
        image: str | None = None,
        params: Annotated[str, Form()] = "{}",
    ) -> dict[str, Any]:
        info = json_object(params, "params")
        if image is None:
            name = os.path.basename(file.filename or "")
            image = name[: -len(file_extension(name, IMAGE_EXTENSIONS, "image file"))]
        check_plain_name(image, "image id")
        identity: Identity = request.state.identity
        if identity.signed_in:
            info["user"] = identity.name
        datastore = app_instance().datastore()
        with upload_to_temp(file, IMAGE_EXTENSIONS, "image file") as path:
            image_id = await run_in_threadpool(datastore.add_image, image, path, info)
        return {"image": image_id}

    @router.put("/label", summary="Save a label of an image (tag 'final' is a submitted label)")
    async def save_label(
        request: Request,
        image: str,
        label: Annotated[UploadFile, File()],
        params: Annotated[str, Form()] = "{}",
        tag: str = DefaultLabelTag.FINAL.value,
    ) -> dict[str, Any]:
        info = json_object(params, "params")
        tag = check_plain_name(tag or DefaultLabelTag.FINAL.value, "label tag")
        info["user"] = session_owner(request.state.identity, info)  # a lost session's clicks start from here
        logger.info("Saving label %s (tag %s) by %s", image, tag, info["user"])
        with upload_to_temp(label, LABEL_EXTENSIONS, "label file") as path:
            return await run_in_threadpool(_save_label, image, path, tag, info)

    @router.put("/image/info", summary="Update an image's info")
    async def update_image_info(image: str, info: Annotated[str, Form()] = "{}") -> Any:
        values = json_object(info, "info")
        return await run_in_threadpool(app_instance().datastore().update_image_info, image, values)

    @router.put("/label/info", summary="Update a label's info")
    async def update_label_info(label: str, tag: str, info: Annotated[str, Form()] = "{}") -> Any:
        values = json_object(info, "info")
        return await run_in_threadpool(app_instance().datastore().update_label_info, label, tag, values)

    @router.get("/dataset", summary="The images with a final label and their labels, as a ZIP archive (streamed)")
    async def dataset(limit_cases: Annotated[int | None, Query(ge=1)] = None) -> StreamingResponse:
        datastore = app_instance().datastore()
        pairs = await run_in_threadpool(datastore.datalist)
        if not pairs:
            raise HTTPException(status_code=404, detail="no image has a final label yet: the dataset is empty")
        chosen = pairs[:limit_cases]
        metadata = json.dumps(datastore.json(), default=str)
        logger.info("Streaming the dataset: %d of %d labelled images", len(chosen), len(pairs))
        return StreamingResponse(
            dataset_zip(chosen, metadata),
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="dataset.zip"'},
        )

    return router
