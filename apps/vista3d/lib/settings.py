"""App settings: MONAI Label's ``--conf key value`` pairs parsed once into a frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["PRESETS", "Settings"]

PRESETS = ("small", "vista3d")
PRECISIONS = ("fp32", "bf16")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parse_positive_int(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--conf {key} must be an integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"--conf {key} must be at least 1, got {n}")
    return n


@dataclass(frozen=True)
class Settings:
    """What the server runs with.

    Attributes:
        preset: ``small`` (16-filter SegResNetDS2 encoder, 5.7M parameters, CPU friendly) or
            ``vista3d`` (the published 218M-parameter ``vista3d132``).
        weights: checkpoint path; ``official`` (the default of ``vista3d``) downloads the published
            checkpoint (md5 checked) into the app's ``model/`` folder; ``starter`` (the default of
            ``small``) is the checkpoint shipped in ``weights/``; ``none`` means random
            initialisation (a loud warning).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        threads: torch intra-op threads; defaults to the cores this process may use.
        precision: ``bf16`` (default) runs the click path's convolutions and matrix products
            under bfloat16 autocast, ``fp32`` runs it in float32; the automatic path is always
            float32 (see :class:`.engine.Engine`).
        session_cache_mb: memory budget of the per-image session state (preprocessed image,
            previous result, cached encoder features); least recently used images are dropped.
    """

    preset: str = "small"
    weights: str = "starter"
    device: str = "auto"
    threads: int = field(default_factory=_available_cores)
    precision: str = "bf16"
    session_cache_mb: int = 4096

    @classmethod
    def from_conf(cls, conf: dict[str, Any]) -> Settings:
        """Parse MONAI Label's conf dict; unknown keys are left to MONAI Label itself."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in conf.items():
            if key not in known:
                continue
            value = str(raw)
            if key == "preset":
                if value not in PRESETS:
                    raise ValueError(f"--conf preset must be one of {PRESETS}, got {value!r}")
                values[key] = value
            elif key == "precision":
                if value not in PRECISIONS:
                    raise ValueError(f"--conf precision must be one of {PRECISIONS}, got {value!r}")
                values[key] = value
            elif key in ("threads", "session_cache_mb"):
                values[key] = _parse_positive_int(key, value)
            else:
                values[key] = value.strip()
        if "weights" not in values:
            values["weights"] = "official" if values.get("preset", cls.preset) == "vista3d" else "starter"
        return cls(**values)
