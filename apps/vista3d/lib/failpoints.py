"""Named points where a fault test can hold the server still and kill it (FreeBSD's fail points, TiKV's fail-rs).

A SIGKILL sent at a random moment rarely lands in the window that matters (between a promotion's
weights file and its manifest, between a label's temporary file and its rename). With
``VISTA3D_FAILPOINT_DIR`` set, :func:`failpoint` checks for a file named after the point in that
folder (the test "arms" it); when armed, it writes ``<name>.reached`` there and sleeps until the
process is killed. Without the variable, which is how the server runs, a point costs one lookup.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

__all__ = ["ENV", "failpoint"]

logger = logging.getLogger(__name__)

ENV = "VISTA3D_FAILPOINT_DIR"
_HOLD_S = 3600.0


def failpoint(name: str) -> None:
    """Hold here (until killed) when the test armed ``name``; return at once otherwise."""
    folder = os.environ.get(ENV)
    if not folder or not (Path(folder) / name).exists():
        return
    logger.warning("Fail point %s reached: holding until killed (%s=%s)", name, ENV, folder)
    (Path(folder) / f"{name}.reached").write_text(str(os.getpid()))
    time.sleep(_HOLD_S)
