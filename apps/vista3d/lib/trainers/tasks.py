"""MONAI Label ``/train`` tasks: fine-tune on final labels, validate, promote through the model store.

``point`` fine-tunes the interactive branch (:mod:`.point_trainer`), ``auto`` the automatic branch
(:mod:`.auto_trainer`). A round:

1. collects the datastore's final labels and updates the persisted validation split;
2. holds back the newest training label(s) the served version has not learned from
   (:func:`.split.hold_back`) and scores the served model on them first ("test, then train");
3. trains a copy of the served network on the other training images at a learning rate that falls
   as the served version has learned more labels; labels it has not learned from get
   ``1 - replay_share`` of the steps, earlier ones the rest (replay); a point round keeps the best
   state it reached on its training labels and stops when they stop improving (:mod:`.early_stop`);
4. scores served and candidate object by object on the validation images and the held-back labels,
   which the candidate has not trained on, with the server's own inference path;
5. promotes the candidate through :class:`lib.model_store.ModelStore` unless the gate
   (:mod:`.gate`) finds it worse, and records the round with the gate's evidence either way. The
   held-back labels are not among the new version's ``trained_on``, so the next round trains on them.

A round whose every new training label is held back is skipped (the served model's scores on the
held-back labels and the reason are recorded, nothing is trained); the next label's round trains on
them. With no new label to learn from, a round has nothing to add and can only risk what the served
version learned. A round with no new label at all (a ``/train`` request after everything was
learned) trains on the learned labels as before, judged on validation alone.

MONAI Label runs ``/train`` in a subprocess, one at a time, so the server keeps answering while a
round runs, and killing that process (even with SIGKILL) cannot leave a half-written model.
"""

from __future__ import annotations

import copy
import logging
import time
from abc import abstractmethod
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from monai.networks.nets.vista3d import VISTA3D
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from ..inference.precision import Precisions
from ..labels import LabelDictionary
from ..model import LoadedModel, patch_size_for
from ..model_store import ModelStore, ServedVersion
from ..settings import Settings
from ..state import StateStore
from ..state.lease import TRAINING, LeaseHeld, holding
from .auto_trainer import AutoTrainer
from .data import CachedVolume, VolumeSampler
from .distributed import spawn
from .early_stop import EarlyStop, monitored_labels, round_lr
from .gate import Decision, GateConfig, decide
from .labelled import FinalLabel, final_labels, load_final_volumes
from .point_cached import train_point_head
from .point_loop import point_worker, replay_weights, train_point
from .request import TrainRequest
from .schedule import TrainStats, run_steps, seed_everything
from .split import RoundLabels, ValidationSplit, round_labels
from .validation import ClickScorer, auto_dice, click_dice

__all__ = ["AutoTrainTask", "PointTrainTask", "Trained"]

logger = logging.getLogger(__name__)


@dataclass
class Trained:
    """What a round's training produced.

    Attributes:
        stats: the loop's figures.
        early_stop: the early stop's checks, when one ran.
    """

    stats: TrainStats
    early_stop: dict[str, Any] | None = None


class FineTuneTask(TrainTask):
    """What the point and auto rounds share: data, split, gate, store. Subclasses train and score."""

    kind = ""

    def __init__(
        self,
        settings: Settings,
        model: LoadedModel,
        store: ModelStore,
        labels: LabelDictionary,
        studies: str | None,
        precisions: Precisions | None = None,
        refused: str | None = None,
        state: StateStore | None = None,
    ) -> None:
        """``refused``: why this process may not train (``lib.inference.gpu_memory``); its rounds
        record that reason, which ``/info`` shows as the last round's. ``state``: the shared store
        whose training lease a round holds (None: no lease, for tests and tools)."""
        super().__init__(f"VISTA3D {self.kind} branch: fine-tune on final labels, promote if validation holds")
        self.settings = settings
        # Candidates are scored as the server answers (float32 where no precisions are given).
        self.click_precision = precisions.scoring.precision if precisions is not None else "fp32"
        self.auto_precision = precisions.auto.precision if precisions is not None else "fp32"
        self.model = model
        self.store = store
        self.labels = labels
        self.studies = studies
        self.split = ValidationSplit(store.root / "split.json")
        self.refused = refused
        self.state = state

    @property
    def patch(self) -> tuple[int, int, int]:
        return patch_size_for(self.model.preset)

    def config(self) -> dict[str, Any]:
        """Defaults shown by OHIF/Slicer's training options."""
        return TrainRequest.parse({}, self.settings, self.patch[0]).as_dict()

    def stats(self) -> dict[str, Any]:
        return self.store.summary()

    @abstractmethod
    def train(
        self,
        network: VISTA3D,
        volumes: list[CachedVolume],
        weights: list[float],
        req: TrainRequest,
        items: list[FinalLabel],
        new: set[str],
    ) -> Trained:
        """Train ``network`` (a copy of the served one) in place on ``items``, ``new`` the image ids
        the served version has not learned from."""

    @abstractmethod
    def score(self, network: VISTA3D, items: list[FinalLabel], req: TrainRequest) -> dict[str, Any]:
        """Figures with ``per_object`` scores and their mean ``score`` (higher is better) when any object."""

    @staticmethod
    @abstractmethod
    def trains_encoder(req: TrainRequest) -> bool:
        """Whether the round updates the shared encoder levels (see :meth:`.TrainRequest.round_steps`)."""

    def _served_validation(self, served: ServedVersion, items: list[FinalLabel], req: TrainRequest) -> dict[str, Any]:
        """The served version's validation figures: stored with it, rescored when the split grew."""
        stored = served.validation or {}
        if stored.get("images") == sorted(f.image_id for f in items) and "per_object" in stored:
            return stored
        figures = self.score(self.model.network, items, req)
        self.store.update_validation(figures)
        return figures

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """One round, holding the training lease for its whole run: one round at a time across replicas.

        A round that cannot take the lease ends at once and records nothing; its result names the holder.
        """
        if self.state is None:
            return self._round(request, datastore)
        try:
            with holding(self.state, TRAINING):
                return self._round(request, datastore)
        except LeaseHeld as e:
            logger.warning("%s round not started: %s", self.kind, e)
            return {"kind": self.kind, "promoted": None, "refused": str(e), "holder": e.info.holder}

    def _round(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        req = TrainRequest.parse(request, self.settings, self.patch[0])
        torch.set_num_threads(self.settings.train_threads)
        begin = time.perf_counter()
        self.store.remove_temp_files()
        labelled = final_labels(datastore)
        served = self.store.served()
        if self.refused is not None:
            refusal = {"kind": self.kind, "from_version": served.version}
            return self._record(refusal, self.refused, begin, [f.stamp for f in labelled])
        labels = round_labels(self.split, labelled, served.trained_on, req.holdback)
        req = replace(
            req,
            lr=round_lr(req.lr, labels.learned, req.lr_half_life),
            steps=req.round_steps(len(labels.train), self.trains_encoder(req)),
        )
        logger.info(
            "%s round: %d training labels (%d new), %d held back, %d validation; served v%d (%s); %s",
            self.kind, len(labels.train), len(labels.new), len(labels.held_back), len(labels.validation),
            served.version, self.model.weights, req,
        )  # fmt: skip
        # Test, then train: the served model answers on the held-back labels before anything trains.
        served_held = self.score(self.model.network, labels.held_back, req) if labels.held_back else {}
        round_info: dict[str, Any] = {
            "kind": self.kind,
            "from_version": served.version,
            "lr": round(req.lr, 6),
            "train_labels": len(labels.train),
            "new_labels": len(labels.new),
            "held_back": {
                "images": [f.image_id for f in labels.held_back],
                "served": served_held.get("per_object", {}),
                "candidate": None,
            },
        }
        seen = [f.stamp for f in labelled]
        if not labels.new and labels.held_back:
            reason = (
                f"skipped: the only new training label(s) {round_info['held_back']['images']} are held back "
                "for the gate; the next round trains on them"
            )
            return self._record(round_info, reason, begin, seen)
        candidate = copy.deepcopy(self.model.network)
        volumes = load_final_volumes(labels.train, self.labels.preprocessing, self.studies)
        weights = replay_weights(volumes, labels.new, req.replay_share)
        trained = self.train(candidate, volumes, weights, req, labels.train, labels.new)
        stats = trained.stats
        round_info.update(
            steps=stats.steps, s_per_step=round(stats.s_per_step, 3), loss_first=round(stats.loss_first, 4),
            loss_last=round(stats.loss_last, 4), early_stop=trained.early_stop,
        )  # fmt: skip
        decision, candidate_val = self._judge(candidate, served, labels, served_held, req, round_info)
        if not decision.promote:
            return self._record(round_info, decision.reason, begin, seen)
        self._finish(round_info, decision.reason, begin)
        trained_on = [f.stamp for f in labels.train]
        round_info["promoted"] = self.store.promote(candidate, candidate_val, trained_on, round_info, seen).version
        return round_info

    def _judge(
        self,
        candidate: VISTA3D,
        served: ServedVersion,
        labels: RoundLabels,
        served_held: dict[str, Any],
        req: TrainRequest,
        round_info: dict[str, Any],
    ) -> tuple[Decision, dict[str, Any]]:
        """Score the candidate on validation and the held-back labels and let the gate decide; the
        figures and the gate's evidence go into ``round_info``. Returns the decision and the candidate's
        validation figures."""
        served_val = self._served_validation(served, labels.validation, req)
        candidate_val = self.score(candidate, labels.validation, req)
        candidate_held = self.score(candidate, labels.held_back, req) if labels.held_back else {}
        round_info["held_back"]["candidate"] = candidate_held.get("per_object", {})
        decision = decide(
            (served_val.get("per_object", {}), candidate_val.get("per_object", {})),
            (served_held.get("per_object", {}), candidate_held.get("per_object", {})),
            GateConfig(tolerance=req.tolerance),
        )
        round_info.update(
            candidate_validation=_figures(candidate_val), served_validation=_figures(served_val),
            gate=decision.as_dict(),
        )  # fmt: skip
        return decision, candidate_val

    def _finish(self, round_info: dict[str, Any], reason: str, begin: float) -> None:
        """Why the round ended, how long it took and when: what every round records."""
        round_info.update(reason=reason, seconds=round(time.perf_counter() - begin, 1))
        round_info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        logger.info("%s round done: %s", self.kind, reason)

    def _record(self, round_info: dict[str, Any], reason: str, begin: float, seen: list[str]) -> dict[str, Any]:
        """Record a round that promotes nothing (refused or skipped), with why."""
        self._finish(round_info, reason, begin)
        self.store.record_round(round_info, seen)
        round_info["promoted"] = None
        return round_info


def _figures(scores: dict[str, Any]) -> dict[str, Any]:
    """Validation figures without the per-object scores (those go in the gate's evidence)."""
    return {k: v for k, v in scores.items() if k != "per_object"}


class PointTrainTask(FineTuneTask):
    """Fine-tunes the point branch (and the shared encoder levels unless ``train_encoder`` is false)."""

    kind = "point"

    def train(
        self,
        network: VISTA3D,
        volumes: list[CachedVolume],
        weights: list[float],
        req: TrainRequest,
        items: list[FinalLabel],
        new: set[str],
    ) -> Trained:
        if req.world_size > 1:
            return self._train_distributed(network, volumes, weights, req)
        loop = partial(train_point_head, precision=self.click_precision) if req.cached else train_point
        if req.patience == 0:
            return Trained(loop(network, volumes, weights, req, self.labels.special))
        # ``items`` are the round's training labels: the early stop never sees the held-back ones.
        scorer = ClickScorer(
            self.model.preset, self.labels, monitored_labels(items, new), req.clicks, self.click_precision
        )
        early = EarlyStop(network, scorer, req.steps, req.check_every, req.patience)
        early.baseline()
        stats = loop(network, volumes, weights, req, self.labels.special, stop_when=early)
        early.restore_best()
        return Trained(stats, early.summary())

    def _train_distributed(
        self,
        network: VISTA3D,
        volumes: list[CachedVolume],
        weights: list[float],
        req: TrainRequest,
    ) -> Trained:
        """``world_size`` processes, the whole schedule (no early stop: every rank would have to agree)."""
        out = self.store.root / ".distributed-candidate.tmp"
        # A CPU copy of the state, never the module: each rank builds its own network on its own device.
        state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        device_type = next(network.parameters()).device.type
        threads = max(1, self.settings.train_threads // req.world_size)  # the ranks share the round's threads
        args = (self.model.preset, state, volumes, weights, req, self.labels.special, str(out), threads)
        spawn(req.world_size, point_worker, *args, device_type=device_type)
        result = torch.load(out, map_location="cpu", weights_only=False)
        out.unlink(missing_ok=True)
        network.load_state_dict(result["state"])
        return Trained(result["stats"])

    def score(self, network: VISTA3D, items: list[FinalLabel], req: TrainRequest) -> dict[str, Any]:
        return click_dice(network, self.model.preset, self.labels, items, req.clicks, self.click_precision)

    @staticmethod
    def trains_encoder(req: TrainRequest) -> bool:
        return req.train_encoder and not req.cached  # a cached round trains the point head alone


class AutoTrainTask(FineTuneTask):
    """Fine-tunes the automatic branch only (partial labels: only classes a label holds are supervised)."""

    kind = "auto"

    def train(
        self,
        network: VISTA3D,
        volumes: list[CachedVolume],
        weights: list[float],
        req: TrainRequest,
        items: list[FinalLabel],
        new: set[str],
    ) -> Trained:
        seed_everything(req.seed)
        trainer = AutoTrainer(network, lr=req.lr)
        sampler = VolumeSampler(volumes, (req.crop,) * 3, req.seed, weights)
        max_s = 60 * req.max_minutes if req.max_minutes else None
        return Trained(run_steps(trainer, sampler, req.steps, max(1, req.steps // 10), desc="auto", max_seconds=max_s))

    def score(self, network: VISTA3D, items: list[FinalLabel], req: TrainRequest) -> dict[str, Any]:
        return auto_dice(network, self.model.preset, self.labels, items, self.auto_precision)

    @staticmethod
    def trains_encoder(req: TrainRequest) -> bool:
        return False  # the automatic decoder and the class head only
