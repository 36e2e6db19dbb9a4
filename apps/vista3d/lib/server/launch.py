"""How the server is started: the bind address, and the command line that puts the serving edge in front.

MONAI Label does not hand its ``--host`` to the application, so it is read from the command line
(``monailabel start_server`` runs uvicorn in its own process); its default is all interfaces.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ASGI_APP", "EDGE_ENV", "bind_host", "is_loopback", "server_command"]

ASGI_APP = "lib.server.asgi:app"
EDGE_ENV = "VISTA3D_EDGE"  # set by the edge at import: the app knows it is served behind it
MONAI_LABEL_DEFAULT_HOST = "0.0.0.0"


def bind_host(argv: Sequence[str] | None = None) -> str:
    """The ``--host`` (``-i``) of ``monailabel start_server``'s command line, or MONAI Label's default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--host", default=MONAI_LABEL_DEFAULT_HOST)
    known, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return str(known.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_command(
    monailabel: Path, app_dir: Path, studies: str, host: str, port: int, conf: Mapping[str, str]
) -> list[str]:
    """``monailabel start_server`` with this app behind the edge (run it with PYTHONPATH=<app_dir>)."""
    cmd = [str(monailabel), "start_server", "--app", str(app_dir), "--studies", studies]
    cmd += ["--host", host, "--port", str(port), "--uvicorn_app", ASGI_APP]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    return cmd
