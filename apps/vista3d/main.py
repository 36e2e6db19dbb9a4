"""MONAI Label app serving VISTA3D: automatic, point-prompted and zero-shot CT segmentation.

Start with ``monailabel start_server --app apps/vista3d --studies <folder or DICOMweb URL>``;
``--conf`` keys are documented in :class:`lib.settings.Settings`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from monailabel.config import settings as ml_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.activelearning.dice import MultiClassDice
from lib.activelearning.uncertainty import Uncertainty, UncertaintyScoring
from lib.data.datastore import SafeLocalDatastore, UnknownImageError, check_plain_name, latest_label
from lib.data.dicomweb import open_dicomweb_datastore
from lib.data.imageio import warm_up_writer
from lib.inference.engine import Engine
from lib.inference.gpu_memory import auto_budget_mb, place_process, warm_up
from lib.inference.precision import Precisions, TrialCache, choose_precisions
from lib.infers.vista3d import IMAGE_ID_KEY, UnknownModelError, Vista3DInfer
from lib.labels import load_label_dictionary
from lib.loop import LearningLoop, pending_labels
from lib.model import load_model, patch_size_for
from lib.model_store import ModelReloader, ModelStore
from lib.server.launch import EDGE_ENV, bind_host, bind_port, getting_started, is_loopback
from lib.server.threads import in_background_process, yield_to_serving
from lib.server.users import UserStore
from lib.sessions import SessionStore
from lib.settings import Settings, state_dir, users_path
from lib.state import open_state_store
from lib.state.lease import TRAINING, LeaseHeld, check_free, holding
from lib.trainers.tasks import AutoTrainTask, PointTrainTask
from lib.zero_shot import ZeroShotRegistry

logger = logging.getLogger(__name__)

MODEL_NAME = "vista3d"
PRECISION_TRIALS = "precision_trials.json"  # in the app's model/ folder: measured once per machine and weights
LOOP_POLL_S = 30.0  # the loop also counts labels saved through other replicas (lib/loop.py)


class MyApp(MONAILabelApp):
    """Registers the ``vista3d`` infer task on one shared network."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.settings = Settings.from_conf(conf)
        # Background processes (training rounds, scoring) build this app too: they take train_threads
        # at the lowest priority; the server process takes `threads` in on_init_complete (see
        # lib/server/threads.py).
        torch.set_num_threads(self.settings.train_threads)
        if in_background_process():
            yield_to_serving()
        self.model_dir = Path(app_dir) / "model"
        self.dictionary = load_label_dictionary()
        # The server's device, or a round's (train_device: refused when it does not fit beside the server).
        self.placement = place_process(self.settings, in_background_process(), patch_size_for(self.settings.preset)[0])
        device = self.placement.choice.device
        logger.info("VISTA3D app: %s (torch threads %d)", self.settings, torch.get_num_threads())
        self.model = load_model(self.settings.preset, self.settings.weights, self.model_dir, device)
        self.store = ModelStore(self.settings.model_store or state_dir(studies, app_dir) / "models")
        self.reloader = ModelReloader(self.model, self.store)  # serves the latest promoted version
        self.precisions = self._choose_precisions()
        self.engine = Engine(
            self.model,
            patch=patch_size_for(self.settings.preset),
            overlap=self.dictionary.sw_overlap,
            special=self.dictionary.special,
            precision=self.precisions.click.precision,
            auto_memory_mb=auto_budget_mb(self.settings, device),
            auto_precision=self.precisions.auto.precision,
        )
        self.sessions_store = SessionStore(self.settings.session_cache_mb * 1024 * 1024, self.settings.session_idle_s)
        warm_up_writer()
        if device.type == "cuda" and not in_background_process():
            precisions = {self.precisions.click.precision, self.precisions.auto.precision}
            warm_up(self.model.network, patch_size_for(self.settings.preset), precisions)
        # Shared by every replica and their training processes: zero-shot names, the training lease.
        self.state = open_state_store(self.settings.state, state_dir(studies, app_dir))
        self.registry = ZeroShotRegistry(
            self.state,
            self.settings.zero_shot_names_per_hour,
            legacy_json=state_dir(studies, app_dir) / "zero_shot_labels.json",
        )
        self.loop: LearningLoop | None = None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="VISTA3D",
            description="VISTA3D for CT: 127 classes automatically, 3D clicks, zero-shot structures",
            version="0.1.0",
        )

    def _choose_precisions(self) -> Precisions:
        """Each path's precision on this machine (:mod:`lib.inference.precision`), measured with the
        server's threads; background processes find the server's measurement in the cache."""
        background = torch.get_num_threads()
        if not in_background_process():
            torch.set_num_threads(self.settings.threads)
        try:
            precisions = choose_precisions(
                {"click": self.settings.precision, "auto": self.settings.auto_precision},
                self.model,
                patch_size_for(self.settings.preset),
                self.dictionary.preprocessing.hu_window,
                self.dictionary.everything,
                TrialCache(self.model_dir / PRECISION_TRIALS),
            )
        finally:
            torch.set_num_threads(background)
        precisions.log()
        return precisions

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            # DICOM-SEG written in Python (lib.data.dicomseg): no dcmqi download, segments named from the dictionary.
            return open_dicomweb_datastore(self.studies, self.dictionary.classes, self.registry)
        return SafeLocalDatastore(
            self.studies,
            extensions=ml_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {
            MODEL_NAME: Vista3DInfer(
                self.engine,
                self.dictionary,
                self.registry,
                self.sessions_store,
                self.reloader,
                precisions=self.precisions,
                max_points=self.settings.max_points,
                saved_label=lambda image_id, user: latest_label(self.datastore(), image_id, user),
            )
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        studies = None if self.studies.startswith(("http://", "https://")) else self.studies
        args = (self.settings, self.model, self.store, self.dictionary, studies, self.precisions)
        refused = self.placement.refused
        return {
            "point": PointTrainTask(*args, refused=refused, state=self.state),
            "auto": AutoTrainTask(*args, refused=refused, state=self.state),
        }

    def on_init_complete(self) -> None:
        """Start the learning loop (server process only; training subprocesses never get here)."""
        _check_served_behind_edge()
        torch.set_num_threads(self.settings.threads)
        super().on_init_complete()
        self._remove_leftovers()
        self.loop = LearningLoop(
            self.settings.train_trigger,
            self.settings.train_debounce_s,
            pending=lambda: pending_labels(self.datastore(), self.store),
            start_training=self._start_point_training,
            poll_s=LOOP_POLL_S,
        )
        self.loop.on_label_saved()  # labels submitted while the server was down
        users = UserStore(users_path(self.settings.users, self.studies, self.app_dir))
        for line in getting_started(bind_host(), bind_port(), self.studies, len(users), self.settings.auth):
            logger.info("%s", line)

    def _remove_leftovers(self) -> None:
        """Files a promotion killed with the server left, removed holding the training lease: with
        replicas, a round of another one may be running, and its files are not leftovers."""
        try:
            with holding(self.state, TRAINING):
                self.store.remove_temp_files()
        except LeaseHeld as e:
            logger.info("Model store: temporary files left as they are (%s)", e)

    def _start_point_training(self) -> bool:
        """Start a background point round; False when a training is already running (here, or on
        another replica: the training lease, :mod:`lib.state.lease`), so the loop tries again later."""
        try:
            self.check_training_lease()
        except LeaseHeld as e:
            logger.info("Learning loop: %s", e)
            return False
        return self.async_training("point", params={"point": {"trigger": "loop"}}) is not None

    def check_training_lease(self) -> None:
        """Raise :class:`LeaseHeld` (409) when a round runs anywhere; the round takes the lease itself."""
        check_free(self.state, TRAINING)

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        result = super().on_save_label(image_id, label_id)
        if self.loop is not None:
            self.loop.on_label_saved()
        return result or {}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First(), "uncertainty": Uncertainty()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        uncertainty = UncertaintyScoring(
            lambda: self.model, self.dictionary, precision=self.precisions.scoring.precision
        )
        return {"dice": MultiClassDice(), "uncertainty": uncertainty}

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Images are datastore ids, never paths; unknown models and images are 404s (MONAI Label: 500)."""
        model = request.get("model")
        if model not in self._infers:
            raise UnknownModelError(f"unknown model {model!r}; this server has {sorted(self._infers)}")
        image = check_plain_name(str(request.get("image") or ""), "image (a datastore id)")
        if not (datastore or self.datastore()).get_image_uri(image):
            raise UnknownImageError(f"unknown image id {image!r}")
        return super().infer({**request, IMAGE_ID_KEY: image}, datastore)


def _check_served_behind_edge() -> None:
    """Refuse a network address without the serving edge; warn on loopback (benchmarks start the plain server).

    ``monailabel start_server`` without ``--uvicorn_app lib.server.asgi:app`` serves MONAI Label's own
    application: no sign-in, every route open, CORS for any site.
    """
    if os.environ.get(EDGE_ENV) == "1":
        return
    message = "served without lib.server.asgi (make serve): no sign-in, no access control, CORS open"
    if not is_loopback(bind_host()):
        raise RuntimeError(f"refusing to start: {message}; start with `make serve`")
    logger.warning("VISTA3D app %s (acceptable on loopback only)", message)
