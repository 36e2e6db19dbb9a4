"""HAProxy in front of several server replicas: one public address, each user kept on one replica.

``make serve REPLICAS=N`` and the replica test start one (``tools/serve.py``, ``tests/test_replicas.py``).
HAProxy comes from Debian (``apt-get install haproxy``, ``make haproxy-install``; 2.6 in bookworm).
Why these choices, in the configuration :func:`config` writes:

- **One replica per user.** A user's click sessions (result, clicks, cached encoder features) live in
  the memory of the replica that served them, so the balancer hashes the user: the ``sub`` of the
  sign-in token, taken from ``Authorization: Bearer`` (3D Slicer) or else the session cookie (OHIF),
  both of which carry the same JWT. HAProxy only reads the claim (it does not verify the signature:
  a forged ``sub`` chooses a replica, and that replica refuses the token). Anonymous requests have no
  key and go round robin. ``hash-type consistent``: when a replica goes down only its users move.
- **Health checks** on ``GET /healthz`` every second, down after 2 failures, up after 2 successes;
  a request that cannot connect is retried at once on another replica (``option redispatch 1``: a
  retry on the same one would wait a second for a replica that is gone),
  and so is a read (GET, HEAD) that got no answer at all (the replica died under it). Other requests
  are not replayed: an inference or a save may be what killed the replica, or may have done its work.
- **Timeouts** as long as the server's own limits (an automatic segmentation may queue
  ``queue_wait_s`` and run ``run_limit_s``, 35 minutes with the defaults), so that HAProxy never cuts
  an answer the server is still computing or streaming.

The process is started with a parent-death signal (as Orthanc is, :mod:`tools.orthanc`); its config,
log and read-only stats socket (:func:`server_states`; ``echo "show stat" | socat stdio <run>/haproxy.sock``)
live in a run folder of the caller's choice (a temporary one), never in the datastore.

Before servers on other machines (each started with ``make serve HOST=<its address>``)::

    .venv/bin/python tools/haproxy.py --host 0.0.0.0 --port 8000 10.0.0.5:8000 10.0.0.6:8000 [--print]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from shutil import which

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project's tools package

from tools.orthanc import die_with_parent, terminate  # stopped and tied to its parent as Orthanc is

__all__ = [
    "COOKIE",
    "SOCKET",
    "HaproxyError",
    "config",
    "missing",
    "running_haproxy",
    "server_states",
    "start_haproxy",
    "stop_haproxy",
]

INSTALL = "apt-get install -y haproxy (make haproxy-install)"
COOKIE = "vista3d_session"  # lib.server.edge.COOKIE: the tools import no part of the server
HEALTH_PATH = "/healthz"
SOCKET = "haproxy.sock"  # in the run folder: HAProxy's stats socket (read-only)
# Longer than the server's own bounds on a request (queue_wait_s 300 + run_limit_s 1800 by default).
SERVER_TIMEOUT = "40m"


class HaproxyError(RuntimeError):
    """HAProxy cannot be started; the message says why and what to do."""


def missing() -> str | None:
    """What is not installed, or None when HAProxy is."""
    return None if which("haproxy") else f"HAProxy is not installed: {INSTALL}"


def config(
    host: str, port: int, replicas: Sequence[int | str], run_dir: Path | None, check_interval_s: float = 1.0
) -> str:
    """The configuration: a frontend on ``host:port``, a backend of ``replicas``.

    A replica is a port on 127.0.0.1, or ``address:port`` of a server on another machine (docs/replicas.md).
    Replica ``i`` (1-based) is the server ``r<i>``, the name HAProxy's log and stats use. The stats
    socket is ``run_dir``'s :data:`SOCKET` (none without a ``run_dir``).
    """
    stats = "" if run_dir is None else f"\n    stats socket {run_dir / SOCKET} mode 600 level user"
    inter = f"{int(check_interval_s * 1000)}ms"
    addresses = [f"127.0.0.1:{r}" if isinstance(r, int) else r for r in replicas]
    servers = "\n".join(f"    server r{i} {a} check" for i, a in enumerate(addresses, start=1))
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"""\
global
    log stderr format short local0 notice
    maxconn 2048{stats}

defaults
    mode http
    log global
    option httplog
    option dontlognull
    option forwardfor
    option redispatch 1
    retries 2
    retry-on conn-failure empty-response
    timeout connect 5s
    timeout http-request 60s
    timeout http-keep-alive 10s
    timeout queue 60s
    timeout check 5s
    timeout client {SERVER_TIMEOUT}
    timeout server {SERVER_TIMEOUT}
    timeout tunnel 1h

frontend vista3d
    bind {bind}
    default_backend replicas

backend replicas
    # the user: the token's subject, from the bearer token (Slicer) or else the session cookie (OHIF)
    http-request set-var(txn.token) http_auth_bearer
    http-request set-var(txn.token) req.cook({COOKIE}) unless {{ var(txn.token) -m found }}
    http-request set-var(txn.user) var(txn.token),jwt_payload_query('$.sub') if {{ var(txn.token) -m found }}
    http-request disable-l7-retry unless METH_GET
    balance hash var(txn.user)
    hash-type consistent
    option httpchk
    http-check send meth GET uri {HEALTH_PATH}
    http-check expect status 200
    default-server inter {inter} fall 2 rise 2
{servers}
"""


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=1):
            return True
    except OSError:
        return False


def _check(path: Path) -> None:
    """``haproxy -c``: a config HAProxy refuses is reported with HAProxy's own words."""
    out = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise HaproxyError(f"HAProxy refuses {path}:\n{out.stdout}{out.stderr}")


def start_haproxy(
    run_dir: Path, host: str, port: int, replicas: Sequence[int | str], timeout_s: float = 10.0
) -> subprocess.Popen[bytes]:
    """HAProxy on ``host:port`` before ``replicas``, its config and log in ``run_dir``.

    Raises :class:`HaproxyError` when it is not installed, refuses the config, or does not listen.
    """
    if problem := missing():
        raise HaproxyError(problem)
    if _answers(host, port):
        raise HaproxyError(f"something already listens on {host}:{port}: stop it, or choose another PORT")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "haproxy.cfg"
    path.write_text(config(host, port, replicas, run_dir))
    _check(path)
    log = (run_dir / "haproxy.log").open("ab")
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(path)],  # -db: in the foreground, so that it can be waited for
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C reaches whoever started it, who stops it first
        preexec_fn=die_with_parent,
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    while not _answers(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_haproxy(process)
            tail = (run_dir / "haproxy.log").read_text(errors="replace")[-2000:]
            raise HaproxyError(f"HAProxy did not listen on {host}:{port}; its log ends:\n{tail}")
        time.sleep(0.1)
    return process


def server_states(run_dir: Path) -> dict[str, tuple[str, str]]:
    """Each replica as HAProxy sees it, from its stats socket: ``r1`` -> (``UP``, ``L7OK``).

    The status is ``UP``, ``DOWN``, ``UP 1/2`` (going down), ...; the last check's result is ``INI``
    until a check has run (HAProxy starts with its servers UP), ``L7OK`` after a passed one.
    """
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(run_dir / SOCKET))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = csv.DictReader(data.decode().lstrip("# ").splitlines())
    return {
        r["svname"]: (r["status"], r["check_status"]) for r in rows if r["pxname"] == "replicas" and r["sid"] != "0"
    }


def stop_haproxy(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM (HAProxy closes at once), then SIGKILL if it does not exit in time."""
    terminate(process, timeout_s)


@contextmanager
def running_haproxy(run_dir: Path, host: str, port: int, replicas: Sequence[int | str]) -> Iterator[str]:
    """HAProxy for the duration of the block; yields its URL."""
    process = start_haproxy(run_dir, host, port, replicas)
    try:
        yield f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    finally:
        stop_haproxy(process)


def main(argv: list[str] | None = None) -> int:
    """HAProxy before the given servers until Ctrl-C (or, with ``--print``, only its configuration)."""
    parser = argparse.ArgumentParser(description="HAProxy before server replicas (docs/replicas.md)")
    parser.add_argument("servers", nargs="+", help="address:port of each server, or a port on 127.0.0.1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--print", action="store_true", help="print the configuration and exit")
    args = parser.parse_args(argv)
    replicas = [int(s) if s.isdigit() else s for s in args.servers]
    with tempfile.TemporaryDirectory(prefix="vista3d-haproxy-") as run_dir:
        if args.print:
            print(config(args.host, args.port, replicas, None), end="")
            return 0
        try:
            process = start_haproxy(Path(run_dir), args.host, args.port, replicas)
        except HaproxyError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"HAProxy serves {args.host}:{args.port} before {', '.join(args.servers)}; log {run_dir}/haproxy.log")
        with contextlib.suppress(KeyboardInterrupt):
            process.wait()
        stop_haproxy(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
