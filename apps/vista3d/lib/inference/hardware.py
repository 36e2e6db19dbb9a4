"""What the device under the served network can do natively: reduced precisions and cores.

A speed default must not assume an instruction set. On a CPU, bfloat16 is fast only where oneDNN
has bfloat16 kernels and the CPU the instructions (AVX512-BF16, AMX-BF16): on a 2-core AMD EPYC
with AVX2 only, a ``small`` click under bfloat16 autocast took 115 s instead of 0.5 s in float32.
On GPUs, bfloat16 autocast is emulated before Ampere (``torch.cuda.is_bf16_supported`` counts
emulation unless told not to). The functions here say what runs natively, and why, without running
the network; :mod:`.precision` then measures what they allow.

``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` makes any x86 CPU look like one without
bfloat16, here as in PyTorch and oneDNN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..cores import available_cores

__all__ = [
    "CudaView",
    "DeviceChoice",
    "Support",
    "cpu_flags",
    "cpu_model",
    "cuda_view",
    "fingerprint",
    "has_kernels",
    "reduced_support",
    "select_device",
    "use_device",
]

logger = logging.getLogger(__name__)

# The oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that stop short of bfloat16 instructions.
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


@dataclass(frozen=True)
class Support:
    """How a reduced precision runs on a device.

    Attributes:
        precision: ``bf16`` or ``fp16``.
        level: ``native`` (hardware instructions), ``emulated`` (kernels exist, the instructions
            do not: it may still be faster, only a measurement says) or ``none`` (no kernels:
            every convolution falls back to a reference loop, minutes per window).
        detail: what was found, for the log and ``/info``.
    """

    precision: str
    level: str
    detail: str

    @property
    def usable(self) -> bool:
        return self.level != "none"


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _onednn_cap() -> str:
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()


def cpu_isa() -> str:
    """A one-line description of the CPU's instruction sets as PyTorch and oneDNN will use them."""
    flags = ", ".join(f for f in _FLAGS_SHOWN if f in cpu_flags()) or "no AVX2"
    cap = _onednn_cap()
    limit = f"; oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)" if cap else ""
    return f"{cpu_model()} ({flags}; ATen {torch.backends.cpu.get_cpu_capability()}{limit})"


def _cpu_bf16() -> Support:
    if not torch.backends.mkldnn.is_available():
        return Support("bf16", "none", "this PyTorch build has no oneDNN")
    cap = _onednn_cap()
    # oneDNN's own answer; it honours ONEDNN_MAX_CPU_ISA.
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return Support("bf16", "none", f"oneDNN has no bfloat16 kernels on this CPU: {cpu_isa()}")
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        native = "bf16" in flags
    else:
        native = any(f in flags for f in _BF16_FLAGS) and cap not in _ONEDNN_ISAS_WITHOUT_BF16
    if native:
        return Support("bf16", "native", f"bfloat16 instructions: {cpu_isa()}")
    return Support("bf16", "emulated", f"oneDNN emulates bfloat16 on this CPU: {cpu_isa()}")


def _cuda(device: torch.device) -> list[Support]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    where = f"{name} (sm_{major}{minor})"
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    # Tensor cores take float16 from Volta (sm_70) on.
    return [
        Support("bf16", "native" if bf16 else "emulated", f"{where}: bfloat16 {'native' if bf16 else 'emulated'}"),
        Support("fp16", "native" if major >= 7 else "emulated", f"{where}: float16 tensor cores {major >= 7}"),
    ]


def reduced_support(device: torch.device) -> list[Support]:
    """The reduced precisions worth trying on ``device``, best first (CPU: bfloat16; CUDA: bfloat16, float16)."""
    if device.type == "cuda":
        return _cuda(device)
    if device.type == "cpu":
        return [_cpu_bf16()]
    return [Support("bf16", "none", f"no reduced precision is tried on {device.type}")]


def fingerprint(device: torch.device) -> str:
    """What a measured speed depends on besides the network: the machine, its limits, PyTorch."""
    parts: dict[str, object] = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        parts["gpu"] = [torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)]
    else:
        parts.update(
            cpu=cpu_model(),
            flags=sorted(f for f in _FLAGS_SHOWN if f in cpu_flags()),
            aten=torch.backends.cpu.get_cpu_capability(),
            onednn=_onednn_cap(),
            cores=available_cores(),
        )
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CudaView:
    """What the installed torch says about CUDA here (tests pass a fake: there is no GPU in CI).

    Attributes:
        available: ``torch.cuda.is_available()``.
        count: visible devices (after ``CUDA_VISIBLE_DEVICES``).
        arch_list: the architectures this torch build has kernels for (``sm_80``, ``compute_90``...).
        capability: a device index -> its compute capability ``(major, minor)``.
        name: a device index -> its name.
        current: the current device's index.
        build: the CUDA version torch was built with, ``None`` for a CPU-only build.
    """

    available: bool
    count: int
    arch_list: tuple[str, ...]
    capability: Callable[[int], tuple[int, int]]
    name: Callable[[int], str]
    current: int
    build: str | None


def cuda_view() -> CudaView:
    """The real :class:`CudaView`; asks nothing of a machine without CUDA."""
    available = torch.cuda.is_available()
    return CudaView(
        available=available,
        count=torch.cuda.device_count() if available else 0,
        arch_list=tuple(torch.cuda.get_arch_list()) if available else (),
        capability=torch.cuda.get_device_capability,
        name=torch.cuda.get_device_name,
        current=torch.cuda.current_device() if available else 0,
        build=torch.version.cuda,
    )


def has_kernels(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a build with ``arch_list`` runs on a GPU of ``capability``.

    A cubin ``sm_XY`` runs on the same major with a minor of at least Y (an ``a``/``f``
    architecture-specific one only on exactly XY); PTX ``compute_XY`` is compiled at load time for
    any later GPU. CUDA 13 builds of torch carry no ``sm_70``: a V100 has CUDA but no kernels.
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("af")
        if len(digits) < 2 or not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
        if kind == "sm" and a_major == major and (a_minor == minor or (digits == number and a_minor < minor)):
            return True
    return False


@dataclass(frozen=True)
class DeviceChoice:
    """The device the network runs on, and why (for the log and ``/info``)."""

    device: torch.device
    reason: str


def _kernel_problem(cuda: CudaView, index: int) -> str | None:
    major, minor = cuda.capability(index)
    if has_kernels((major, minor), cuda.arch_list):
        return None
    return (
        f"{cuda.name(index)} is sm_{major}{minor} but this torch (CUDA {cuda.build}) has kernels for "
        f"{', '.join(cuda.arch_list) or 'no architecture'} only: install a torch build for this GPU "
        "(e.g. a cu126 wheel for Volta)"
    )


def select_device(name: str, cuda: CudaView | None = None) -> DeviceChoice:
    """``--conf device`` -> a device: ``auto`` takes the current GPU only where torch has kernels for it.

    ``cuda`` without an index means the current GPU; ``cuda:N`` is checked now (no CUDA, no such
    ordinal, no kernels), not at the first ``.to()``.
    """
    if name == "cpu":
        return DeviceChoice(torch.device("cpu"), "asked for (device=cpu)")
    view = cuda or cuda_view()
    if name == "auto":
        if not view.available:
            why = "this torch is a CPU-only build" if view.build is None else "no CUDA device is visible"
            return DeviceChoice(torch.device("cpu"), f"device=auto: {why}")
        problem = _kernel_problem(view, view.current)
        if problem is not None:
            return DeviceChoice(torch.device("cpu"), f"device=auto: {problem}; serving on the CPU")
        return DeviceChoice(torch.device("cuda", view.current), f"device=auto: {_gpu(view, view.current)}")
    device = torch.device(name)
    if device.type != "cuda":
        raise ValueError(f"--conf device must be auto, cpu or cuda[:N], got {name!r}")
    if not view.available:
        raise ValueError(f"--conf device {name}: torch sees no CUDA device (CUDA build: {view.build})")
    index = view.current if device.index is None else device.index
    if index >= view.count:
        raise ValueError(f"--conf device {name}: only {view.count} CUDA device(s) visible (CUDA_VISIBLE_DEVICES)")
    problem = _kernel_problem(view, index)
    if problem is not None:
        raise ValueError(f"--conf device {name}: {problem}")
    return DeviceChoice(torch.device("cuda", index), f"asked for: {_gpu(view, index)}")


def _gpu(view: CudaView, index: int) -> str:
    major, minor = view.capability(index)
    return f"{view.name(index)} (sm_{major}{minor})"


def use_device(choice: DeviceChoice) -> None:
    """Make ``choice`` this process's device: on CUDA the current device (autocast's bfloat16 check and
    every index-less ``cuda`` tensor go there), cuDNN autotuning on (fixed window shapes), and float32
    kept float32 (no TF32), so that ``fp32`` means what it means on a CPU."""
    logger.info("Device %s: %s", choice.device, choice.reason)
    if choice.device.type != "cuda":
        return
    torch.cuda.set_device(choice.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
