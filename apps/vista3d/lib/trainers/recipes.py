"""From-scratch recipes on the shared real CT: the starter weights and the zero-shot ablation's arms.

``organs``: the point branch learns from the abdominal scan's organ labels only. ``lowlevel``: the
same plus low-level supervoxels of every CT in the data folder as extra objects (no sarcoma label is
used). These two are ``bench/zeroshot.py``'s arms. ``starter``: the organs plus the tumours of the
sarcoma cases :data:`.corpus.SARCOMA_STARTER` (zero-shot id 133), which ``tools/train_starter.py``
ships; the other 30 cases stay unseen (20 for the learning curve, 10 held out for every figure).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets.vista3d import VISTA3D
from tqdm import tqdm

from ..labels import load_label_dictionary
from ..model import build_network, load_state, patch_size_for
from .corpus import SARCOMA_STARTER, abdomen_volume, case_names, sarcoma_volume
from .data import CachedVolume, VolumeSampler
from .point_trainer import PointTrainConfig, PointTrainer
from .schedule import Checkpoint, TrainStats, run_steps, seed_everything
from .supervoxel_objects import SupervoxelSampling

__all__ = ["MODES", "RecipeConfig", "recipe_volumes", "train_point_recipe"]

logger = logging.getLogger(__name__)

MODES = ("organs", "lowlevel", "starter")


def scratch_point_config(special: frozenset[int], rounds: int = 2) -> PointTrainConfig:
    """Dice-led loss (from scratch, full-weight cross-entropy collapsed two 450-step runs to all
    background, the clicks ignored) and 2 objects a step to afford more steps."""
    return PointTrainConfig(special=special, rounds=rounds, max_objects=2, ce_weight=0.1)


PRESET = "small"


@dataclass(frozen=True)
class RecipeConfig:
    """Steps, seed and data of a from-scratch run (every ablation arm shares them)."""

    data: Path
    cache: Path
    steps: int = 600
    crop: int = patch_size_for(PRESET)[0]  # the served window (see patch_size_for)
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0
    abdomen_share: float = 0.3
    max_minutes: float | None = None
    rounds: int = 2
    device: str = "cpu"
    shift: int = 0  # voxels a crop may move off its object voxel (see VolumeSampler)
    time_schedule: bool = False  # decay the learning rate over max_minutes when they end first


def recipe_volumes(config: RecipeConfig, mode: str) -> tuple[list[CachedVolume], list[float]]:
    """The abdominal organs; plus every sarcoma CT as unlabelled CT (``lowlevel``) or the starter's
    labelled sarcoma cases (``starter``)."""
    labels = load_label_dictionary()
    if mode == "organs":
        return [abdomen_volume(config.data, labels)], [1.0]
    if mode == "starter":
        sarcoma = [sarcoma_volume(config.data / "sts", c, labels) for c in SARCOMA_STARTER]
        share = (1 - config.abdomen_share) / len(sarcoma)
        return [abdomen_volume(config.data, labels), *sarcoma], [config.abdomen_share] + [share] * len(sarcoma)
    if mode != "lowlevel":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    abdomen = abdomen_volume(config.data, labels, config.cache)
    cts = [
        sarcoma_volume(config.data / "sts", c, labels, with_label=False, supervoxel_cache=config.cache)
        for c in tqdm(case_names(config.data / "sts"), desc="supervoxels", file=sys.stderr)
    ]
    share = (1 - config.abdomen_share) / len(cts)
    return [abdomen, *cts], [config.abdomen_share] + [share] * len(cts)


def train_point_recipe(
    config: RecipeConfig, mode: str, init: Path | None = None, checkpoint: Checkpoint | None = None
) -> tuple[VISTA3D, TrainStats]:
    """Encoder + point head from a seeded random initialisation, or further from ``init``'s weights.

    With ``checkpoint`` the run can be stopped and resumed (see :func:`.schedule.run_steps`).
    """
    labels = load_label_dictionary()
    volumes, weights = recipe_volumes(config, mode)
    seed_everything(config.seed)
    network = build_network(PRESET)
    if init is not None:
        load_state(network, init)
        logger.info("Point branch continues from %s", init)
    network.to(torch.device(config.device))
    trainer = PointTrainer(network, scratch_point_config(labels.special, config.rounds), lr=config.lr, seed=config.seed)
    sv = SupervoxelSampling() if mode == "lowlevel" else None
    sampler = VolumeSampler(volumes, (config.crop,) * 3, config.seed, weights, sv, shift=config.shift)
    max_s = 60 * config.max_minutes if config.max_minutes else None
    stats = run_steps(
        trainer, sampler, config.steps, config.warmup, desc=f"train[{mode}]", max_seconds=max_s, checkpoint=checkpoint,
        time_schedule=config.time_schedule,
    )  # fmt: skip
    return network, stats
