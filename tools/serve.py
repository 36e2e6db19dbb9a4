#!/usr/bin/env python
"""Serve the app (``make serve``): on the project's own Orthanc unless a datastore is given.

    .venv/bin/python tools/serve.py                                   # Orthanc in .orthanc/, OHIF at :8000/ohif/
    .venv/bin/python tools/serve.py --studies ./studies               # a local folder of NIfTI images
    .venv/bin/python tools/serve.py --studies https://pacs/dicom-web  # any DICOMweb server
    .venv/bin/python tools/serve.py --replicas 2                      # 2 replicas behind HAProxy on :8000

The bundled OHIF viewer reads a DICOMweb datastore, so the default is a loopback Orthanc whose
storage lives in the project: the viewer works from the first command, and ``make add`` puts
studies in it. The server is ``monailabel start_server`` with this app behind its serving edge
(:func:`lib.server.launch.server_command`). Ctrl-C or SIGTERM stops the server (it finishes its
shutdown) and then the Orthanc this started; both die with this process if it is killed.
With ``--replicas N`` (N > 1), N servers listen on loopback ports PORT+1..PORT+N, each with its own
GPU or share of the cores (:mod:`tools.replicas`), behind HAProxy on HOST:PORT (:mod:`tools.haproxy`);
Ctrl-C stops HAProxy first (no new request reaches a replica that is stopping), then the replicas,
then Orthanc; a replica that crashes after it has served is started again. See docs/replicas.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "vista3d"
sys.path.insert(0, str(APP_DIR))
sys.path.insert(0, str(ROOT))

from lib.server.launch import server_command, server_env  # noqa: E402
from tools.haproxy import HaproxyError, server_states, start_haproxy, stop_haproxy  # noqa: E402
from tools.orthanc import OrthancError, die_with_parent, start_orthanc, stop_orthanc  # noqa: E402
from tools.replicas import Fleet, plan_for_machine, port_taken, start_replica  # noqa: E402

logger = logging.getLogger("serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="", help="local folder or DICOMweb URL; default: the project's Orthanc")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--orthanc-port", type=int, default=8042)
    parser.add_argument("--orthanc-home", type=Path, default=ROOT / ".orthanc", help="Orthanc's config and storage")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--replicas", type=_positive, default=1, help="servers behind HAProxy on HOST:PORT (default 1)")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1, else a message naming the value."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def _serve(studies: str, args: argparse.Namespace) -> int:
    """Runs the server until it exits; SIGINT/SIGTERM/SIGHUP here become one SIGTERM to its process group."""
    bin_dir = Path(sys.executable).parent
    cmd = server_command(bin_dir / "monailabel", APP_DIR, studies, args.host, args.port, dict(args.conf))
    server = subprocess.Popen(
        cmd, env=server_env(APP_DIR, os.environ), cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: stopping the server", signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):  # it has exited already
            os.killpg(server.pid, signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    return server.wait()


def _watch(fleet: Fleet, run_dir: Path, stop: threading.Event) -> None:
    """Restarts crashed replicas (:class:`~tools.replicas.Fleet`) and logs each change of a replica's health as
    HAProxy's checks see it; returns on ``stop`` or when no replica is left."""
    serving: dict[str, bool] = {}
    while not stop.wait(1.0):
        fleet.poll()
        if not fleet.alive():
            logger.error("no replica is left")
            return
        with contextlib.suppress(OSError):  # HAProxy's socket only feeds this log
            for name, (status, check) in server_states(run_dir).items():
                if status == "UP" and check == "L7OK":
                    fleet.served(int(name.removeprefix("r")))
                    if not serving.get(name):
                        logger.info("HAProxy: replica %s serves", name)
                    serving[name] = True
                elif status.startswith(("DOWN", "MAINT")) and serving.get(name):
                    logger.warning("HAProxy: replica %s is %s: its users go to the others", name, status)
                    serving[name] = False


def _serve_replicas(studies: str, args: argparse.Namespace) -> int:
    """N replicas behind HAProxy until a signal, or until no replica is left; then all stopped in order."""
    replicas = plan_for_machine(args.replicas, args.port, dict(args.conf))
    if taken := [r.port for r in replicas if port_taken(r.port)]:
        logger.error("replica port(s) %s are taken: choose another PORT (replicas use PORT+1..PORT+N)", taken)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: stopping HAProxy, then the replicas", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    fleet = Fleet(replicas, lambda r: start_replica(r, studies, args.host, args.port, APP_DIR))
    try:
        fleet.start()
        with tempfile.TemporaryDirectory(prefix="vista3d-haproxy-") as run_dir:
            haproxy = start_haproxy(Path(run_dir), args.host, args.port, [r.port for r in replicas])
            for replica in replicas:
                logger.info("%s", replica.describe())
            shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            logger.info("HAProxy serves http://%s:%d/ (OHIF: /ohif/) over %d replicas", shown, args.port, len(replicas))
            logger.info("HAProxy's config, log and stats socket: %s (removed at exit)", run_dir)
            try:
                _watch(fleet, Path(run_dir), stop)
            finally:
                stop_haproxy(haproxy)
                logger.info("HAProxy stopped")
    except HaproxyError as e:
        logger.error("%s", e)
        return 1
    finally:
        code = fleet.stop()
        logger.info("replicas stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serve = _serve if args.replicas == 1 else _serve_replicas
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] serve: %(message)s")
    if args.studies:
        if not args.studies.startswith(("http://", "https://")):
            Path(args.studies).mkdir(parents=True, exist_ok=True)
        return serve(args.studies, args)
    try:
        orthanc, url = start_orthanc(args.orthanc_home, args.orthanc_port)
    except OrthancError as e:
        logger.error("%s", e)
        return 1
    logger.info("the project's Orthanc serves DICOMweb at %s/dicom-web (storage %s)", url, args.orthanc_home)
    try:
        return serve(f"{url}/dicom-web", args)
    finally:
        stop_orthanc(orthanc)
        logger.info("Orthanc stopped")


if __name__ == "__main__":
    sys.exit(main())
