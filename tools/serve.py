#!/usr/bin/env python
"""Serve the app (``make serve``): on the project's own Orthanc unless a datastore is given.

    .venv/bin/python tools/serve.py                                   # Orthanc in .orthanc/, OHIF at :8000/ohif/
    .venv/bin/python tools/serve.py --studies ./studies               # a local folder of NIfTI images
    .venv/bin/python tools/serve.py --studies https://pacs/dicom-web  # any DICOMweb server

The bundled OHIF viewer reads a DICOMweb datastore, so the default is a loopback Orthanc whose
storage lives in the project: the viewer works from the first command, and ``make add`` puts
studies in it. The server is ``monailabel start_server`` with this app behind its serving edge
(:func:`lib.server.launch.server_command`). Ctrl-C or SIGTERM stops the server (it finishes its
shutdown) and then the Orthanc this started; both die with this process if it is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "vista3d"
sys.path.insert(0, str(APP_DIR))
sys.path.insert(0, str(ROOT))

from lib.server.launch import server_command  # noqa: E402
from tools.orthanc import OrthancError, die_with_parent, start_orthanc, stop_orthanc  # noqa: E402

logger = logging.getLogger("serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="", help="local folder or DICOMweb URL; default: the project's Orthanc")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--orthanc-port", type=int, default=8042)
    parser.add_argument("--orthanc-home", type=Path, default=ROOT / ".orthanc", help="Orthanc's config and storage")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    return parser.parse_args(argv)


def _serve(studies: str, args: argparse.Namespace) -> int:
    """Runs the server until it exits; SIGINT/SIGTERM/SIGHUP here become one SIGTERM to its process group."""
    bin_dir = Path(sys.executable).parent
    cmd = server_command(bin_dir / "monailabel", APP_DIR, studies, args.host, args.port, dict(args.conf))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(APP_DIR)}
    server = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent)

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: stopping the server", signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):  # it has exited already
            os.killpg(server.pid, signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    return server.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] serve: %(message)s")
    if args.studies:
        if not args.studies.startswith(("http://", "https://")):
            Path(args.studies).mkdir(parents=True, exist_ok=True)
        return _serve(args.studies, args)
    try:
        orthanc, url = start_orthanc(args.orthanc_home, args.orthanc_port)
    except OrthancError as e:
        logger.error("%s", e)
        return 1
    logger.info("the project's Orthanc serves DICOMweb at %s/dicom-web (storage %s)", url, args.orthanc_home)
    try:
        return _serve(f"{url}/dicom-web", args)
    finally:
        stop_orthanc(orthanc)
        logger.info("Orthanc stopped")


if __name__ == "__main__":
    sys.exit(main())
