"""How the server is started: the bind address, and the command line that puts the serving edge in front.

MONAI Label does not hand its ``--host`` to the application, so it is read from the command line
(``monailabel start_server`` runs uvicorn in its own process); its default is all interfaces.
A replica behind a balancer (``tools/serve.py --replicas N``) listens on loopback while its users
reach it at the balancer's address: :data:`PUBLIC_HOST_ENV` and :data:`PUBLIC_PORT_ENV` say which,
so that a replica behind a public balancer keeps every check a server on that address has (no start
without users, the warnings) and its start log shows the address users open.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "ASGI_APP",
    "EDGE_ENV",
    "PUBLIC_HOST_ENV",
    "PUBLIC_PORT_ENV",
    "REPLICA_ENV",
    "bind_host",
    "bind_port",
    "getting_started",
    "is_loopback",
    "server_command",
    "server_env",
]

ASGI_APP = "lib.server.asgi:app"
EDGE_ENV = "VISTA3D_EDGE"  # set by the edge at import: the app knows it is served behind it
PUBLIC_HOST_ENV = "VISTA3D_PUBLIC_HOST"  # set by tools/serve.py for replicas: the balancer's address
PUBLIC_PORT_ENV = "VISTA3D_PUBLIC_PORT"
REPLICA_ENV = "VISTA3D_REPLICA"  # set by tools/serve.py for each replica it starts: "1", "2", ... (see .health)
MONAI_LABEL_DEFAULT_HOST = "0.0.0.0"
MONAI_LABEL_DEFAULT_PORT = 8000
EMBEDDED_ORTHANC = "http://127.0.0.1:8042/dicom-web"  # what `make serve` starts without STUDIES


def bind_host(argv: Sequence[str] | None = None) -> str:
    """The ``--host`` (``-i``) of ``monailabel start_server``'s command line, or MONAI Label's default.

    Without ``argv``, a replica's :data:`PUBLIC_HOST_ENV` comes first: the address its users reach.
    """
    if argv is None and os.environ.get(PUBLIC_HOST_ENV):
        return os.environ[PUBLIC_HOST_ENV]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--host", default=MONAI_LABEL_DEFAULT_HOST)
    known, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return str(known.host)


def bind_port(argv: Sequence[str] | None = None) -> int:
    """The ``--port`` (``-p``) of ``monailabel start_server``'s command line, or MONAI Label's default.

    Without ``argv``, a replica's :data:`PUBLIC_PORT_ENV` comes first (see :func:`bind_host`).
    """
    if argv is None and os.environ.get(PUBLIC_PORT_ENV):
        return int(os.environ[PUBLIC_PORT_ENV])
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-p", "--port", type=int, default=MONAI_LABEL_DEFAULT_PORT)
    known, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return int(known.port)


def getting_started(host: str, port: int, studies: str, users: int, auth: str = "auto") -> list[str]:
    """What a newcomer needs once the server is up: where OHIF is, how to add a study and the first user."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    where = "" if studies == EMBEDDED_ORTHANC else f" STUDIES={studies}"
    lines = [f"OHIF viewer: http://{shown}:{port}/ohif/ (3D Slicer: server http://{shown}:{port}/)"]
    if studies.startswith(("http://", "https://")):
        lines.append(f"add a study: make add STUDY=<NIfTI CT, DICOM folder or zip>{where}")
    else:
        lines.append(f"add a study: make add STUDY=<NIfTI CT, DICOM folder or zip>{where} (OHIF needs DICOMweb)")
    if auth == "off":
        lines.append("sign-in is off (--conf auth off)")
    elif users:
        lines.append(f"sign-in is on: {users} user(s); add one with make user NAME=<name> ROLE=<role>{where}")
    else:
        lines.append(f"no users yet, sign-in is off: add the first with make user NAME=<name> ROLE=admin{where}")
    return lines


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_env(app_dir: Path, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` (an environment) for :func:`server_command`: this venv's ``bin`` first on ``PATH``
    (``monailabel start_server`` runs ``python`` from it) and the app on ``PYTHONPATH``."""
    bin_dir = Path(sys.executable).parent
    return {**base, "PATH": f"{bin_dir}{os.pathsep}{base.get('PATH', '')}", "PYTHONPATH": str(app_dir)}


def server_command(
    monailabel: Path, app_dir: Path, studies: str, host: str, port: int, conf: Mapping[str, str]
) -> list[str]:
    """``monailabel start_server`` with this app behind the edge (run it with PYTHONPATH=<app_dir>)."""
    cmd = [str(monailabel), "start_server", "--app", str(app_dir), "--studies", studies]
    cmd += ["--host", host, "--port", str(port), "--uvicorn_app", ASGI_APP]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    return cmd
