"""The ``vista3d`` infer task: automatic, point-prompted and zero-shot segmentation in one model.

One task serves the three tabs of MONAI Label's OHIF panel (they all list models of type
``vista3d``): a request with points is interactive, one without is automatic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.transform.writer import Writer

from ..data.imageio import label_ids, load_label, to_tensor
from ..inference.engine import Engine
from ..inference.gpu_memory import free_on_oom
from ..inference.precision import Precisions
from ..inference.segment import ClickEdit, new_state, segment_auto, segment_points
from ..labels import LabelDictionary
from ..model_store import ModelReloader
from ..prompts import DEFAULT_MAX_POINTS, AutoPrompt, OutputOptions, PointPrompt, parse_output, parse_prompt
from ..sessions import ImageState, SessionStore, state_key
from ..zero_shot import ZeroShotRegistry

__all__ = [
    "IMAGE_ID_KEY",
    "LABEL_FILE_KEY",
    "ON_COMPUTED_KEY",
    "ON_WINDOW_KEY",
    "THREADS_KEY",
    "USER_KEY",
    "SavedLabel",
    "UnknownModelError",
    "Vista3DInfer",
]

logger = logging.getLogger(__name__)

DEFAULT_EXTENSION = ".nii.gz"
# Request keys set by the server, never by a client's params (the serving edge refuses them there):
USER_KEY = "user"  # whose session the request edits (a signed-in user, Slicer's client_id, or "anonymous")
LABEL_FILE_KEY = "label_file"  # a label uploaded with the request (a temporary file the edge removes)
IMAGE_ID_KEY = "image_id"  # the image's datastore id (MONAI Label replaces "image" with its path)
ON_WINDOW_KEY = "on_window"  # the scheduler's callback between window passes of an automatic segmentation
THREADS_KEY = "serving_threads"  # the thread budget of an automatic segmentation now (asked every window)
ON_COMPUTED_KEY = "on_computed"  # called once the result is computed, before it is written (the slot is handed on)

SavedLabel = Callable[[str, str], str | None]
"""(image id, user) -> the path of the user's latest saved label of the image, or None."""


class UnknownModelError(LookupError):
    """The request names a model this server does not have."""


class Vista3DInfer(InferTask):
    """Validates the request, segments in the caller's session on the image, writes the label file.

    Sessions are per (user, image) (:mod:`..sessions`): a user's clicks edit that user's result only.
    """

    def __init__(
        self,
        engine: Engine,
        labels: LabelDictionary,
        registry: ZeroShotRegistry,
        store: SessionStore,
        reloader: ModelReloader | None = None,
        precisions: Precisions | None = None,
        max_points: int = DEFAULT_MAX_POINTS,
        saved_label: SavedLabel | None = None,
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
        self.precisions = precisions
        self.max_points = max_points
        self.saved_label = saved_label

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
        if self.precisions is not None:
            info["precision"] = self.precisions.as_dict()
        if model.warning:
            info["warning"] = model.warning
            info["description"] = f"[RANDOM WEIGHTS] {info['description']}"
        info["zero_shot_labels"] = self.registry.as_dict()
        if self.reloader is not None:
            info["learning"] = self.reloader.store.summary()
        return info

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """:meth:`segment`; a GPU out-of-memory error frees the request's memory and answers 503
        (:func:`~lib.inference.gpu_memory.free_on_oom`)."""
        return free_on_oom(lambda: self.segment(request))

    def segment(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Validate everything (prompt, output options, image, points, uploaded label), then segment.

        Raises the core's errors unchanged (the serving edge maps them to status codes):
        :class:`~lib.prompts.PromptError` (bad prompt, point outside the image), :class:`~lib.data.imageio.ImageError`
        (unreadable image or label), the zero-shot registry's limits for new names, and whatever
        the request's ``on_window`` callback raises to cancel an automatic segmentation.
        """
        begin = time.time()
        if self.reloader is not None:
            self.reloader.refresh()  # a promoted version is served from the next request on
        prompt = parse_prompt(request, self.dictionary, self.registry, self.max_points)
        output = parse_output(request)
        user = str(request.get(USER_KEY) or "anonymous")
        image_path = str(request["image"])

        start = time.time()
        state = self._session(user, image_path)
        uploaded = None
        if isinstance(prompt, PointPrompt):
            prompt.check_inside(state.original_shape)
            uploaded = self._uploaded_label(state, request)
        latency_load = time.time() - start

        with self._class_id(prompt, user) as prompt:
            start = time.time()
            edit: ClickEdit | None = None
            source = ""
            if isinstance(prompt, AutoPrompt):  # no lock while it runs: it yields to clicks between windows
                on_window, threads = request.get(ON_WINDOW_KEY), request.get(THREADS_KEY)
                result = segment_auto(self.engine, state, prompt, on_window, threads)
                with state.lock:
                    state.result = result
            else:
                with state.lock, state.features.lock:
                    previous, source = self._previous(state, uploaded, str(request.get(IMAGE_ID_KEY) or ""), user)
                    edit = segment_points(self.engine, state, prompt, previous)
                    state.result = result = edit.label
            latency_infer = time.time() - start
            self.store.enforce_budget()
            on_computed = request.get(ON_COMPUTED_KEY)
            if on_computed is not None:
                on_computed()

            start = time.time()
            out_file, out_json = self._write(
                image_path, state, result, output, self._result_json(prompt, result, edit, source)
            )
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
            "vista3d %s by %s on %s: load/preprocess %.2fs, infer %.2fs, write %.2fs, total %.2fs (weights %s)",
            kind,
            user,
            image_path,
            latency_load,
            latency_infer,
            latency_write,
            total,
            self.engine.weights_version,
        )
        return out_file, out_json

    def _session(self, user: str, image_path: str) -> ImageState:
        pre = self.dictionary.preprocessing
        state, _ = self.store.session(
            user, state_key(image_path), lambda: new_state(image_path, pre, self.engine.patch)
        )
        return state

    @contextmanager
    def _class_id(self, prompt: AutoPrompt | PointPrompt, user: str) -> Iterator[AutoPrompt | PointPrompt]:
        """The prompt with a new zero-shot name's id reserved; the name is registered only if the block succeeds."""
        if not isinstance(prompt, PointPrompt) or prompt.new_name is None:
            yield prompt
            return
        with self.registry.reserve(prompt.new_name, user) as class_id:
            yield dataclasses.replace(prompt, class_id=class_id)

    def _previous(
        self, state: ImageState, uploaded: np.ndarray | None, image_id: str, user: str
    ) -> tuple[np.ndarray, str]:
        """What the clicks edit, and where it came from (the answer's ``previous``).

        The label uploaded with the request; else this session's result; else, for a session that
        has none (new, evicted, expired, or the server restarted), the user's latest saved label of
        the image; else an empty label.
        """
        if uploaded is not None:
            return uploaded, "upload"
        if state.result is not None:
            return state.result, "session"
        saved = self.saved_label(image_id, user) if self.saved_label is not None and image_id else None
        if saved is not None:
            return load_label(saved, state.original_shape), "saved label"
        return np.zeros(state.original_shape, dtype=np.int16), "empty"

    @staticmethod
    def _uploaded_label(state: ImageState, request: dict[str, Any]) -> np.ndarray | None:
        """The label uploaded with the request (the edge's temporary file), checked against the image's grid."""
        path = request.get(LABEL_FILE_KEY)
        return load_label(str(path), state.original_shape) if path else None

    @staticmethod
    def _write(
        image_path: str, state: ImageState, result: np.ndarray, output: OutputOptions, result_json: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        data = {
            "image_path": image_path,
            "pred": to_tensor(result, torch.as_tensor(state.original_affine)),
            "result_extension": output.extension,
            "result_dtype": output.dtype,
            "result_compress": output.compress,
            "result": result_json,
        }
        out_file, out_json = Writer(label="pred", json="result")(data)
        return str(out_file), out_json

    def _result_json(
        self, prompt: AutoPrompt | PointPrompt, result: np.ndarray, edit: ClickEdit | None, source: str
    ) -> dict[str, Any]:
        present = label_ids(result)
        names = {
            **{i: n for i, n in self.dictionary.classes.items()},
            **{v: k for k, v in self.registry.as_dict().items()},
        }
        if isinstance(prompt, PointPrompt) and prompt.new_name:
            names[prompt.class_id] = prompt.new_name  # registered once this request has succeeded
        out: dict[str, Any] = {
            "label_names": {names.get(i, str(i)): i for i in present},
            "weights_version": self.engine.weights_version,
        }
        if isinstance(prompt, AutoPrompt):
            out["label_prompt"] = list(prompt.class_ids)
        elif edit is not None:
            out["label_prompt"] = [prompt.class_id]
            out["zero_shot"] = prompt.zero_shot
            out["previous"] = source
            out["clicks"] = [
                {"point": p.tolist(), "positive": bool(s), "new": n, "applied": a}
                for p, s, n, a in zip(prompt.points, prompt.positive, edit.new, edit.applied, strict=True)
            ]
            if prompt.new_name:
                out["new_label"] = {prompt.new_name: prompt.class_id}
        return out
