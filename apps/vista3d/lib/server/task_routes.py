"""MONAI Label's task routes with their names checked first and their work off the event loop.

MONAI Label starts a background process for any name given to ``/train/{model}``,
``/scoring/{method}`` or ``/batch/infer/{model}`` (an unknown one fails minutes of CPU later).
Here an unknown name is 404, a training while another replica's round runs is 409 (the training
lease, :mod:`lib.state.lease`), and the rest is MONAI Label's own code, run in a worker thread.

MONAI Label's ``/model/{model}`` routes (upload, download, delete a weights file) do not fit this
app, whose weights are versions in the model store; ``POST /model/{model}/rollback`` serves the
previous version instead (``tools/model_store.py rollback`` over HTTP).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from monailabel.endpoints import activelearning, batch_infer, scoring, train
from monailabel.endpoints.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance

from .auth import Identity

__all__ = ["task_router"]


def _known(kind: str, name: str) -> None:
    """404 unless ``name`` is one of the app's ``kind`` (``models``, ``trainers``, ``strategies``, ``scoring``)."""
    names = sorted(app_instance().info().get(kind, {}))
    if name not in names:
        raise HTTPException(status_code=404, detail=f"unknown {kind} entry {name!r}; this server has {names}")


def task_router() -> APIRouter:
    router = APIRouter()

    @router.post("/train/{model}", summary="Start a training round")
    async def run_training(
        model: str, params: dict[str, Any] | None = None, run_sync: bool = False, enqueue: bool = False
    ) -> Any:
        await run_in_threadpool(_known, "trainers", model)
        # A round running on any replica holds the training lease: 409 naming it (lib.state.lease).
        await run_in_threadpool(app_instance().check_training_lease)
        return await run_in_threadpool(train.run_model, model, params, run_sync, enqueue)

    @router.post("/scoring/{method}", summary="Score the datastore's images")
    async def run_scoring(method: str, params: dict[str, Any] | None = None, run_sync: bool = False) -> Any:
        await run_in_threadpool(_known, "scoring", method)
        return await run_in_threadpool(scoring.run_method, method, params, run_sync)

    @router.post("/batch/infer/{model}", summary="Segment many datastore images")
    async def run_batch_infer(
        model: str,
        images: BatchInferImageType = BatchInferImageType.IMAGES_ALL,
        params: dict[str, Any] | None = None,
        run_sync: bool = False,
    ) -> Any:
        await run_in_threadpool(_known, "models", model)
        return await run_in_threadpool(batch_infer.run, model, images, params, run_sync)

    @router.post("/activelearning/{strategy}", summary="The next image to annotate")
    async def next_sample(request: Request, strategy: str, params: dict[str, Any] | None = None) -> Any:
        await run_in_threadpool(_known, "strategies", strategy)
        identity: Identity = request.state.identity
        return await run_in_threadpool(activelearning.sample, strategy, params, identity.name)

    @router.post("/model/{model}/rollback", summary="Serve the previous learned version of the model")
    async def rollback(model: str) -> dict[str, Any]:
        await run_in_threadpool(_known, "models", model)
        store = app_instance().store
        try:
            await run_in_threadpool(store.rollback)
        except ValueError as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        return dict(store.summary())

    return router
