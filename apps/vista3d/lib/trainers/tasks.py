"""MONAI Label ``/train`` tasks: fine-tune on final labels, validate, promote through the model store.

``point`` fine-tunes the interactive branch (:mod:`.point_trainer`), ``auto`` the automatic branch
(:mod:`.auto_trainer`). A round:

1. collects the datastore's final labels and updates the persisted validation split;
2. trains a copy of the served network on the training images; labels the served version has not
   learned from get ``1 - replay_share`` of the steps, earlier ones the rest (replay);
3. scores served and candidate on the validation images with the server's own inference path;
4. promotes the candidate through :class:`lib.model_store.ModelStore` unless it is worse by more
   than the tolerance, and records the round either way.

MONAI Label runs ``/train`` in a subprocess, one at a time, so the server keeps answering while a
round runs, and killing that process (even with SIGKILL) cannot leave a half-written model.
"""

from __future__ import annotations

import copy
import logging
import time
from abc import abstractmethod
from typing import Any

import torch
from monai.networks.nets.vista3d import VISTA3D
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from ..labels import LabelDictionary
from ..model import LoadedModel, patch_size_for
from ..model_store import ModelStore
from ..settings import Settings
from .auto_trainer import AutoTrainer
from .data import CachedVolume, VolumeSampler
from .distributed import average_gradients, spawn
from .labelled import FinalLabel, final_labels, load_final_volumes
from .point_trainer import PointTrainConfig, PointTrainer
from .request import TrainRequest
from .schedule import TrainStats, run_steps, seed_everything
from .split import ValidationSplit
from .supervoxel_objects import SupervoxelSampling
from .validation import auto_dice, click_dice, gate

__all__ = ["AutoTrainTask", "PointTrainTask", "replay_weights", "train_point"]

logger = logging.getLogger(__name__)

# Supervoxels of a team's images, where generated, add zero-shot objects now and then.
FINETUNE_SUPERVOXELS = SupervoxelSampling(new_object_prob=0.2, edit_object_prob=0.1, max_new=1)


def replay_weights(volumes: list[CachedVolume], new: set[str], replay_share: float) -> list[float]:
    """Sampling weights: new labels share ``1 - replay_share`` of the steps, earlier ones the rest."""
    n_new = sum(v.name in new for v in volumes)
    n_old = len(volumes) - n_new
    if n_new == 0 or n_old == 0:
        return [1.0] * len(volumes)
    return [(1 - replay_share) / n_new if v.name in new else replay_share / n_old for v in volumes]


def train_point(
    network: VISTA3D,
    volumes: list[CachedVolume],
    weights: list[float],
    req: TrainRequest,
    special: frozenset[int],
    rank: int = 0,
    world: int = 1,
) -> TrainStats:
    """The point branch's training loop, shared by single- and multi-process runs and the benchmarks."""
    seed_everything(req.seed + rank)
    config = PointTrainConfig(rounds=req.rounds, special=special, train_encoder=req.train_encoder)
    sync = average_gradients if world > 1 else None
    trainer = PointTrainer(network, config, lr=req.lr, seed=req.seed + rank, grad_sync=sync)
    sampler = VolumeSampler(volumes, (req.crop,) * 3, req.seed + rank, weights, FINETUNE_SUPERVOXELS)
    max_s = 60 * req.max_minutes if req.max_minutes and world == 1 else None
    warmup = max(1, req.steps // 10)
    return run_steps(trainer, sampler, req.steps, warmup, desc=f"point[rank {rank}]", max_seconds=max_s)


def _point_worker(
    rank: int,
    world: int,
    state: dict[str, torch.Tensor],
    network: VISTA3D,
    volumes: list[CachedVolume],
    weights: list[float],
    req: TrainRequest,
    special: frozenset[int],
    out: str,
) -> None:
    network.load_state_dict(state)
    stats = train_point(network, volumes, weights, req, special, rank, world)
    if rank == 0:
        torch.save({"state": network.state_dict(), "stats": stats}, out)


class FineTuneTask(TrainTask):
    """What the point and auto rounds share: data, split, gate, store. Subclasses train and score."""

    kind = ""

    def __init__(
        self, settings: Settings, model: LoadedModel, store: ModelStore, labels: LabelDictionary, studies: str | None
    ) -> None:
        super().__init__(f"VISTA3D {self.kind} branch: fine-tune on final labels, promote if validation holds")
        self.settings = settings
        self.model = model
        self.store = store
        self.labels = labels
        self.studies = studies
        self.split = ValidationSplit(store.root / "split.json")

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
        self, network: VISTA3D, volumes: list[CachedVolume], weights: list[float], req: TrainRequest
    ) -> TrainStats:
        """Train ``network`` in place."""

    @abstractmethod
    def score(self, network: VISTA3D, items: list[FinalLabel], req: TrainRequest) -> dict[str, Any]:
        """Validation figures with a ``score`` (higher is better) when there is anything to score."""

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        req = TrainRequest.parse(request, self.settings, self.patch[0])
        torch.set_num_threads(self.settings.train_threads)
        begin = time.perf_counter()
        self.store.remove_temp_files()
        labelled = final_labels(datastore)
        split = self.split.update(f.image_id for f in labelled)
        by_id = {f.image_id: f for f in labelled}
        train_items = [by_id[i] for i in split.train if i in by_id]
        val_items = [by_id[i] for i in split.validation if i in by_id]
        if not train_items:
            raise ValueError("no final labels in the training split yet: submit a label first")
        served = self.store.served()
        learned = set(served.trained_on)
        new = {f.image_id for f in train_items if f.stamp not in learned}
        logger.info(
            "%s round: %d training labels (%d new), %d validation; served v%d (%s); %s",
            self.kind, len(train_items), len(new), len(val_items), served.version, self.model.weights, req,
        )  # fmt: skip
        volumes = load_final_volumes(train_items, self.labels.preprocessing, self.studies)
        candidate = copy.deepcopy(self.model.network)
        stats = self.train(candidate, volumes, replay_weights(volumes, new, req.replay_share), req)
        served_val = served.validation or {}
        if served_val.get("images") != sorted(f.image_id for f in val_items):
            served_val = self.score(self.model.network, val_items, req)  # the split grew: rescore
            self.store.update_validation(served_val)
        candidate_val = self.score(candidate, val_items, req)
        promote, reason = gate(served_val, candidate_val, req.tolerance)
        round_info = {
            "kind": self.kind,
            "from_version": served.version,
            "steps": stats.steps,
            "s_per_step": round(stats.s_per_step, 3),
            "loss_first": round(stats.loss_first, 4),
            "loss_last": round(stats.loss_last, 4),
            "train_labels": len(train_items),
            "new_labels": len(new),
            "candidate_validation": candidate_val,
            "served_validation": served_val,
            "reason": reason,
            "seconds": round(time.perf_counter() - begin, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        seen = [f.stamp for f in labelled]
        if promote:
            entry = self.store.promote(candidate, candidate_val, [f.stamp for f in train_items], round_info, seen)
            round_info["promoted"] = entry.version
        else:
            self.store.record_round(round_info, seen)
            round_info["promoted"] = None
        logger.info("%s round done: %s", self.kind, reason)
        return round_info


class PointTrainTask(FineTuneTask):
    """Fine-tunes the point branch (and the encoder unless ``train_encoder`` is false)."""

    kind = "point"

    def train(
        self, network: VISTA3D, volumes: list[CachedVolume], weights: list[float], req: TrainRequest
    ) -> TrainStats:
        if req.world_size == 1:
            return train_point(network, volumes, weights, req, self.labels.special)
        out = self.store.root / ".distributed-candidate.tmp"
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        spawn(req.world_size, _point_worker, state, network, volumes, weights, req, self.labels.special, str(out))
        result = torch.load(out, map_location="cpu", weights_only=False)
        out.unlink(missing_ok=True)
        network.load_state_dict(result["state"])
        return result["stats"]

    def score(self, network: VISTA3D, items: list[FinalLabel], req: TrainRequest) -> dict[str, Any]:
        return click_dice(network, self.model.preset, self.labels, items, req.clicks)


class AutoTrainTask(FineTuneTask):
    """Fine-tunes the automatic branch only (partial labels: only classes a label holds are supervised)."""

    kind = "auto"

    def train(
        self, network: VISTA3D, volumes: list[CachedVolume], weights: list[float], req: TrainRequest
    ) -> TrainStats:
        seed_everything(req.seed)
        trainer = AutoTrainer(network, lr=req.lr)
        sampler = VolumeSampler(volumes, (req.crop,) * 3, req.seed, weights)
        max_s = 60 * req.max_minutes if req.max_minutes else None
        return run_steps(trainer, sampler, req.steps, max(1, req.steps // 10), desc="auto", max_seconds=max_s)

    def score(self, network: VISTA3D, items: list[FinalLabel], req: TrainRequest) -> dict[str, Any]:
        return auto_dice(network, self.model.preset, self.labels, items)
