"""The ``vista3d`` infer task: automatic, point-prompted and zero-shot segmentation in one model.

One task serves the three tabs of MONAI Label's OHIF panel (they all list models of type
``vista3d``): a request with points is interactive, one without is automatic.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.transform.writer import Writer

from ..engine import Engine
from ..imageio import ImageError, load_label, to_tensor
from ..labels import LabelDictionary
from ..model_store import ModelReloader
from ..prompts import AutoPrompt, PointPrompt, PromptError, parse_prompt
from ..segment import ClickEdit, new_state, segment_auto, segment_points
from ..sessions import ImageState, SessionStore, state_key
from ..zero_shot import ZeroShotRegistry

__all__ = ["Vista3DInfer"]

logger = logging.getLogger(__name__)

DEFAULT_EXTENSION = ".nii.gz"


class Vista3DInfer(InferTask):
    """Validates the request, segments on the cached image state, writes the label file."""

    def __init__(
        self,
        engine: Engine,
        labels: LabelDictionary,
        registry: ZeroShotRegistry,
        store: SessionStore,
        reloader: ModelReloader | None = None,
    ) -> None:
        super().__init__(
            type="vista3d",
            labels=labels.served_labels(),
            dimension=3,
            description="VISTA3D: 127 CT classes automatically, point-prompted editing, zero-shot clicks",
            config={"result_extension": DEFAULT_EXTENSION, "result_dtype": "uint8"},
        )
        self.engine = engine
        self.dictionary = labels
        self.registry = registry
        self.store = store
        self.reloader = reloader

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        info = super().info()
        if self.reloader is not None:
            self.reloader.refresh()
        model = self.engine.model
        info["labels"] = {**self.dictionary.served_labels(), **self.registry.as_dict()}
        info["preset"] = model.preset
        info["weights"] = model.weights or "random"
        info["weights_version"] = model.version
        if model.warning:
            info["warning"] = model.warning
            info["description"] = f"[RANDOM WEIGHTS] {info['description']}"
        info["zero_shot_labels"] = self.registry.as_dict()
        if self.reloader is not None:
            info["learning"] = self.reloader.store.summary()
        return info

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        begin = time.time()
        if self.reloader is not None:
            self.reloader.refresh()  # a promoted version is served from the next request on
        try:
            prompt = parse_prompt(request, self.dictionary, self.registry)
        except PromptError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        image_path = str(request["image"])

        start = time.time()
        state = self._state(image_path)
        latency_load = time.time() - start

        start = time.time()
        edit: ClickEdit | None = None
        with state.lock:
            if isinstance(prompt, AutoPrompt):
                result = segment_auto(self.engine, state, prompt)
            else:
                edit = self._edit(state, prompt, request)
                result = edit.label
            state.result = result
        latency_infer = time.time() - start
        self.store.enforce_budget()

        start = time.time()
        data = {
            "image_path": image_path,
            "pred": to_tensor(result, torch.as_tensor(state.original_affine)),
            "result_extension": request.get("result_extension") or DEFAULT_EXTENSION,
            "result_dtype": request.get("result_dtype") or "uint8",
            "result_compress": request.get("result_compress", False),
            "result": self._result_json(prompt, result, edit),
        }
        out_file, out_json = Writer(label="pred", json="result")(data)
        latency_write = time.time() - start
        total = time.time() - begin
        out_json["latencies"] = {
            "pre": round(latency_load, 3),
            "infer": round(latency_infer, 3),
            "write": round(latency_write, 3),
            "total": round(total, 3),
        }
        kind = "auto" if isinstance(prompt, AutoPrompt) else "zero-shot" if prompt.zero_shot else "points"
        logger.info(
            "vista3d %s on %s: load/preprocess %.2fs, infer %.2fs, write %.2fs, total %.2fs (weights %s)",
            kind,
            image_path,
            latency_load,
            latency_infer,
            latency_write,
            total,
            self.engine.weights_version,
        )
        return out_file, out_json

    def _state(self, image_path: str) -> ImageState:
        pre = self.dictionary.preprocessing
        try:
            return self.store.get(state_key(image_path), lambda: new_state(image_path, pre, self.engine.patch))
        except ImageError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    def _edit(self, state: ImageState, prompt: PointPrompt, request: dict[str, Any]) -> ClickEdit:
        try:
            prompt.check_inside(state.original_shape)
        except PromptError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        previous = self._previous(state, request)
        return segment_points(self.engine, state, prompt, previous)

    @staticmethod
    def _previous(state: ImageState, request: dict[str, Any]) -> np.ndarray:
        """The label the clicks edit: an uploaded label, else this image's last result, else empty."""
        label = request.get("label")
        if (
            isinstance(label, str)
            and os.path.isfile(label)
            and not ("foreground" in request or "background" in request)
        ):
            try:
                return load_label(label, state.original_shape)
            except ImageError as e:
                raise HTTPException(status_code=422, detail=str(e)) from e
        if state.result is not None:
            return state.result
        return np.zeros(state.original_shape, dtype=np.int16)

    def _result_json(
        self, prompt: AutoPrompt | PointPrompt, result: np.ndarray, edit: ClickEdit | None
    ) -> dict[str, Any]:
        present = sorted(int(v) for v in np.unique(result) if v)
        names = {
            **{i: n for i, n in self.dictionary.classes.items()},
            **{v: k for k, v in self.registry.as_dict().items()},
        }
        out: dict[str, Any] = {
            "label_names": {names.get(i, str(i)): i for i in present},
            "weights_version": self.engine.weights_version,
        }
        if isinstance(prompt, AutoPrompt):
            out["label_prompt"] = list(prompt.class_ids)
        elif edit is not None:
            out["label_prompt"] = [prompt.class_id]
            out["zero_shot"] = prompt.zero_shot
            out["clicks"] = [
                {"point": p.tolist(), "positive": bool(s), "new": n, "applied": a}
                for p, s, n, a in zip(prompt.points, prompt.positive, edit.new, edit.applied, strict=True)
            ]
            if prompt.new_name:
                out["new_label"] = {prompt.new_name: prompt.class_id}
        return out
