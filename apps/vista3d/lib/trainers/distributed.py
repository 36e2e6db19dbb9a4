"""Data-parallel training over processes with torch.distributed: gloo on CPU, nccl on GPUs.

MONAI Label's own multi-GPU path spawns one process per GPU and lets DDP average gradients. Our
trainers call the encoder and the heads separately (the rounds of click simulation reuse one
encoder pass), which DDP's forward hooks do not see, so gradients are averaged explicitly after
each backward: the same arithmetic as DDP, for any call pattern. Every rank draws different crops
(seed + rank) and runs the same number of steps, so the collective calls always pair up.

Ranks must not share a network: a module handed to ``mp.spawn`` reaches every rank through shared
memory (CPU) or CUDA IPC, so every rank's optimiser would step the same storage. A rank builds its
own network from a CPU state dict on its own device (:func:`rank_device`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["average_gradients", "backend_for", "check_world_size", "free_port", "rank_device", "spawn"]

logger = logging.getLogger(__name__)

# Gradients are all-reduced in flat buckets of at most this many bytes: one collective per bucket,
# not one per parameter (hundreds of NCCL calls a step otherwise).
BUCKET_BYTES = 25 * 1024 * 1024


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype grouped up to :data:`BUCKET_BYTES` each."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not buckets or size + nbytes > BUCKET_BYTES or buckets[-1][0].dtype != g.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += nbytes
    return buckets


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` over the process group, bucket by bucket."""
    world = dist.get_world_size()
    for bucket in _buckets([p.grad for p in params if p.grad is not None]):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for g, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            g.copy_(averaged)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device_type: str) -> str:
    """The collective backend of the device the network trains on (not of what the machine has)."""
    return "nccl" if device_type == "cuda" else "gloo"


def rank_device(device_type: str, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda:rank`` (one GPU per rank), else the CPU."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def check_world_size(world_size: int, device_type: str, gpus: int | None = None) -> None:
    """Refuse a round that would put two ranks on one GPU (NCCL refuses duplicate devices)."""
    if device_type != "cuda":
        return
    count = torch.cuda.device_count() if gpus is None else gpus
    if world_size > count:
        raise ValueError(f"world_size {world_size} needs {world_size} GPUs (one per rank); this process sees {count}")


def _worker(rank: int, world: int, port: int, device_type: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    backend = backend_for(device_type)
    device = rank_device(device_type, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this rank's GPU
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logger.info("rank %d/%d up (%s on %s)", rank, world, backend, device)
        fn(rank, world, device, *args)
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, fn: Callable[..., Any], *args: Any, device_type: str = "cpu") -> None:
    """Run ``fn(rank, world_size, device, *args)`` in ``world_size`` processes joined in one process group.

    ``args`` are pickled to every rank: send CPU tensors and build modules inside ``fn``.
    """
    check_world_size(world_size, device_type)
    mp.spawn(_worker, args=(world_size, free_port(), device_type, fn, args), nprocs=world_size, join=True)
