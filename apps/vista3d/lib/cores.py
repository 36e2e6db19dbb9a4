"""The cores this process may run on: what thread counts are derived from, not ``os.cpu_count()``.

Kept free of heavy imports: settings parse it, and command-line tools that read settings (users,
model store) should start in a fraction of a second, not after importing torch and MONAI.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cores"]


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores
