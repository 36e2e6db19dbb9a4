"""The point branch's training loop, free of MONAI Label: a round, a benchmark or a GPU check runs it.

:func:`train_point` is what a ``/train/point`` round (:mod:`.tasks`) runs in one process, and what each
rank of a data-parallel round runs (:func:`point_worker`); the benchmarks and ``bench/gpu_check.py``
call it directly, so they import nothing of the server.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets.vista3d import VISTA3D

from ..model import build_network
from .data import CachedVolume, VolumeSampler
from .distributed import average_gradients
from .point_trainer import PointTrainConfig, PointTrainer
from .request import TrainRequest
from .schedule import TrainStats, run_steps, seed_everything
from .supervoxel_objects import SupervoxelSampling

__all__ = ["FINETUNE_SUPERVOXELS", "point_worker", "replay_weights", "train_point"]

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
    stop_when: Callable[[int], bool] | None = None,
    grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    shift: int = 0,
) -> TrainStats:
    """The point branch's training loop, shared by single- and multi-process runs and the benchmarks.

    ``grad_sync`` averages gradients over the ranks; by default the process group's all-reduce when
    ``world > 1`` (a test passes an in-process one to check the arithmetic). ``shift``: voxels a crop
    may move off its object (see :class:`.data.VolumeSampler`; the starter trains with 16).
    """
    seed_everything(req.seed + rank)
    config = PointTrainConfig(
        rounds=req.rounds, special=special, train_encoder=req.train_encoder, click_weight=req.click_weight
    )
    sync = grad_sync or (average_gradients if world > 1 else None)
    trainer = PointTrainer(network, config, lr=req.lr, seed=req.seed + rank, grad_sync=sync)
    sampler = VolumeSampler(volumes, (req.crop,) * 3, req.seed + rank, weights, FINETUNE_SUPERVOXELS, shift=shift)
    max_s = 60 * req.max_minutes if req.max_minutes and world == 1 else None
    warmup = max(1, req.steps // 10)
    desc = f"point[rank {rank}]"
    return run_steps(trainer, sampler, req.steps, warmup, desc=desc, max_seconds=max_s, stop_when=stop_when)


def point_worker(
    rank: int,
    world: int,
    device: torch.device,
    preset: str,
    state: dict[str, torch.Tensor],
    volumes: list[CachedVolume],
    weights: list[float],
    req: TrainRequest,
    special: frozenset[int],
    out: str,
    threads: int,
) -> None:
    """One rank: its own network, built from the CPU ``state`` on ``device``, ``threads`` torch threads
    (a spawned process starts with every core); rank 0 writes the result."""
    torch.set_num_threads(threads)
    network = build_network(preset)
    network.load_state_dict(state)
    network.to(device)
    stats = train_point(network, volumes, weights, req, special, rank, world)
    if rank == 0:
        torch.save({"state": {k: v.detach().cpu() for k, v in network.state_dict().items()}, "stats": stats}, out)
