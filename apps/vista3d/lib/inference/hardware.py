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
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..cores import available_cores

__all__ = ["Support", "cpu_flags", "cpu_model", "fingerprint", "reduced_support"]

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
