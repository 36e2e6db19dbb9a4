"""Data-parallel training over processes with torch.distributed: gloo on CPU, nccl on GPUs.

MONAI Label's own multi-GPU path spawns one process per GPU and lets DDP average gradients. Our
trainers call the encoder and the heads separately (the rounds of click simulation reuse one
encoder pass), which DDP's forward hooks do not see, so gradients are averaged explicitly after
each backward: the same arithmetic as DDP, for any call pattern. Every rank draws different crops
(seed + rank) and runs the same number of steps, so the collective calls always pair up.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["average_gradients", "free_port", "spawn"]

logger = logging.getLogger(__name__)


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` over the process group."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        logger.info("rank %d/%d up (%s)", rank, world, backend)
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in one process group."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
