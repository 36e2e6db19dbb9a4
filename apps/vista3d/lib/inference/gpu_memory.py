"""GPU memory: where a background round runs, what each process may allocate, and out-of-memory answers.

The server and its background processes (training rounds, scoring) share a GPU. Each caps its own
allocations (``torch.cuda.set_per_process_memory_fraction``): the server ``gpu_memory_fraction``, a
round ``train_gpu_memory_fraction``. With ``train_device=auto`` a round runs on the server's GPU
only when its estimate (:func:`round_gpu_bytes`) fits under its cap and in the memory free when it
starts; otherwise it is refused with the reason, which ``/info`` shows as the last round's. A CUDA
out-of-memory error in a request frees what the request held and answers 503 with ``Retry-After``
(:func:`free_on_oom`): the server keeps serving.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from monai.networks.nets.vista3d import VISTA3D

from ..settings import Settings
from .hardware import CudaView, DeviceChoice, select_device, use_device

__all__ = [
    "GpuOutOfMemory",
    "Placement",
    "auto_budget_mb",
    "background_placement",
    "cap_process",
    "free_on_oom",
    "place_process",
    "round_gpu_bytes",
    "warm_up",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
MB = 2**20
# Feature channels at full resolution, where the point head's activations live.
_FEATURES = {"small": 16, "vista3d": 48}
OOM_RETRY_AFTER_S = 10


class GpuOutOfMemory(RuntimeError):
    """The GPU ran out of memory for this request; its memory is freed, a retry may fit (HTTP 503 with
    ``Retry-After``, mapped in ``lib.server.errors``; ``retry_after`` in seconds)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def round_gpu_bytes(preset: str, crop: int, parameters: int, objects: int = 3, rounds: int = 3) -> int:
    """An estimate of a point round's peak GPU memory (float32, no autocast), to be checked on a GPU.

    Weights: the process's served copy, the candidate, its gradients and AdamW's two moments (5 x
    the parameters x 4 B; the early stop's best state is kept on the CPU). Activations: per click
    round about 4 kept ``[objects, C, crop³]`` float32 tensors of the point head, x 1.5 for the
    encoder (from the code read in ``docs/gpu.md``; ``bench/gpu_check.py`` measures a step's peak).
    """
    weights = 5 * parameters * 4
    activations = objects * _FEATURES.get(preset, 48) * crop**3 * 4 * 4 * rounds * 3 // 2
    return weights + activations


@dataclass(frozen=True)
class Placement:
    """Where a background process puts its network, and why; ``refused`` says why a round may not run."""

    choice: DeviceChoice
    refused: str | None = None


def cap_process(device: torch.device, fraction: float) -> None:
    """Cap this process's allocations on ``device`` at ``fraction`` of its memory (CUDA only)."""
    if device.type == "cuda" and fraction < 1.0:
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def background_placement(
    settings: Settings,
    preset: str,
    parameters: int,
    crop: int,
    cuda: CudaView | None = None,
    memory: Callable[[int], tuple[int, int]] | None = None,
) -> Placement:
    """The device of a training or scoring process, from ``train_device`` (``memory``: free and total
    bytes of a GPU, ``torch.cuda.mem_get_info`` unless a test fakes it)."""
    if settings.train_device != "auto":
        return Placement(select_device(settings.train_device, cuda))
    serving = select_device(settings.device, cuda)
    if serving.device.type != "cuda":
        return Placement(DeviceChoice(serving.device, f"train_device=auto, as the server: {serving.reason}"))
    index = serving.device.index or 0
    free, total = (memory or torch.cuda.mem_get_info)(index)
    budget = min(free, int(settings.train_gpu_memory_fraction * total))
    need = round_gpu_bytes(preset, crop, parameters)
    if need <= budget:
        why = f"train_device=auto: the round's estimate {need / 2**30:.1f} GiB fits in {budget / 2**30:.1f} GiB"
        return Placement(DeviceChoice(serving.device, why))
    refused = (
        f"refused: a {preset} round at {crop}³ needs about {need / 2**30:.1f} GiB of GPU memory, and "
        f"{serving.device} has {budget / 2**30:.1f} GiB for it (free {free / 2**30:.1f} GiB, "
        f"train_gpu_memory_fraction {settings.train_gpu_memory_fraction}); set train_device to another "
        "GPU or cpu, or raise train_gpu_memory_fraction"
    )
    return Placement(DeviceChoice(torch.device("cpu"), refused), refused)


def auto_budget_mb(settings: Settings, device: torch.device, total: Callable[[int], int] | None = None) -> int:
    """The stitching budget of one automatic segmentation: ``auto_memory_mb`` of host memory on a CPU;
    on a GPU ``auto_gpu_memory_mb``, by default a quarter of what the server may allocate there."""
    if device.type != "cuda":
        return settings.auto_memory_mb
    if settings.auto_gpu_memory_mb:
        return settings.auto_gpu_memory_mb
    index = device.index or 0
    size = (total or (lambda i: torch.cuda.get_device_properties(i).total_memory))(index)
    return max(256, int(size * settings.gpu_memory_fraction / 4 / MB))


def release_cached_memory() -> None:
    """Hand freed blocks back: a collection (frames of the failed request), then the caching allocator."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def free_on_oom(run: Callable[[], T]) -> T:
    """``run()``; a GPU out-of-memory error frees the request's memory and becomes :class:`GpuOutOfMemory`.

    The new error is raised outside the ``except`` block: the original one's traceback holds the
    request's tensors, and a chained ``__context__`` would keep them alive until the answer is sent.
    """
    try:
        return run()
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
    release_cached_memory()
    logger.warning("GPU out of memory in a request (freed its memory, answering 503): %s", message)
    raise GpuOutOfMemory(f"the GPU is out of memory for this request, retry shortly ({message})", OOM_RETRY_AFTER_S)


def _parameters(preset: str) -> int:
    """The preset's parameter count, from a network built on the meta device (no memory, no time)."""
    from ..model import build_network

    with torch.device("meta"):
        return sum(p.numel() for p in build_network(preset).parameters())


def place_process(settings: Settings, background: bool, crop: int) -> Placement:
    """This process's device: the server's ``device``, or for a training or scoring process
    :func:`background_placement`; made current and capped at its memory fraction (CUDA)."""
    if background:
        placement = background_placement(settings, settings.preset, _parameters(settings.preset), crop)
        fraction = settings.train_gpu_memory_fraction
    else:
        placement = Placement(select_device(settings.device))
        fraction = settings.gpu_memory_fraction
    use_device(placement.choice)
    cap_process(placement.choice.device, fraction)
    return placement


def warm_up(network: VISTA3D, patch: tuple[int, int, int], precisions: set[str]) -> float:
    """One window through the encoder, the point head and the class head in each precision in use, so
    that the first click does not pay for the CUDA context, cuDNN's autotuning and lazy kernel loading.
    Returns the seconds it took (logged)."""
    import time

    device = next(network.parameters()).device
    start = time.perf_counter()
    x = torch.zeros(1, 1, *patch, device=device)
    point = torch.tensor([[[p // 2 for p in patch]]], dtype=torch.float32, device=device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    with torch.inference_mode():
        for precision in sorted(precisions):
            dtype = dtypes.get(precision)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                feats, feats_auto = network.image_encoder(x, with_point=True, with_label=True)
                network.point_head(feats, point, torch.ones(1, 1, dtype=torch.long, device=device))
                network.class_head(feats_auto, torch.ones(1, 1, dtype=torch.long, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    logger.info("Warm-up on %s (%s): %.2f s", device, ", ".join(sorted(precisions)), seconds)
    return seconds
