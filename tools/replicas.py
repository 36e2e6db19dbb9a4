"""Several server replicas on one machine behind one HAProxy (``make serve REPLICAS=N``, ``tools/serve.py``).

Each replica is the whole server (``monailabel start_server`` behind this app's edge) on a loopback
port ``PORT+i``; HAProxy (:mod:`tools.haproxy`) serves ``HOST:PORT`` and keeps each user on one
replica. A replica gets a device of its own so that N of them do not fight over one: GPU ``i`` (round
robin when there are fewer GPUs than replicas), else a share of the cores as ``threads`` and
``train_threads``, each only where ``--conf`` did not set it. The automatic learning loop and MONAI
Label's automatic scoring (every image at start-up, again after each round) run on replica 1 only
(``train_trigger 0`` and ``MONAI_LABEL_AUTO_UPDATE_SCORING=false`` on the others unless given): every
replica sees the same datastore, and N of them would each start the same round and score the same images.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from shutil import which
from typing import IO

from lib.cores import available_cores
from lib.server.launch import PUBLIC_HOST_ENV, PUBLIC_PORT_ENV, REPLICA_ENV, server_command
from tools.orthanc import die_with_parent

__all__ = ["Replica", "count_gpus", "plan_replicas", "start_replica", "stop_replica"]

logger = logging.getLogger("serve")

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
AUTO_SCORING_ENV = "MONAI_LABEL_AUTO_UPDATE_SCORING"


@dataclass(frozen=True)
class Replica:
    """Replica ``index`` (1-based) on ``127.0.0.1:port`` with its own ``--conf`` pairs, and environment
    defaults (``env``) that the launcher's own environment overrides."""

    index: int
    port: int
    conf: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        keys = ("threads", "train_threads", "train_trigger")
        shown = [f"device {self.conf.get('device', 'auto')}", *(f"{k} {self.conf[k]}" for k in keys if k in self.conf)]
        shown += [f"{k}={os.environ.get(k, v)}" for k, v in self.env.items()]  # as start_replica sets them
        return f"replica r{self.index} on 127.0.0.1:{self.port}: {', '.join(shown)}"


def _visible(count: int, visible: str | None) -> int:
    """``count`` GPUs as ``CUDA_VISIBLE_DEVICES`` restricts them (CUDA stops at the first invalid entry)."""
    if visible is None:
        return count
    shown = 0
    for entry in visible.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        shown += 1
    return min(count, shown)


def count_gpus(proc: Path = NVIDIA_PROC) -> int:
    """NVIDIA GPUs this process may use, without importing torch (the launcher starts in a blink).

    The driver's ``/proc`` folder, else ``nvidia-smi -L``; 0 when neither is there.
    """
    if proc.is_dir():
        count = sum(1 for _ in proc.iterdir())
    elif which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    else:
        count = 0
    return _visible(count, os.environ.get("CUDA_VISIBLE_DEVICES"))


def plan_replicas(count: int, port: int, conf: Mapping[str, str], gpus: int, cores: int) -> list[Replica]:
    """What each of ``count`` replicas gets: its port and ``conf`` with a device and a share of the cores.

    Settings given in ``conf`` are kept as given for every replica.
    """
    if count < 1:
        raise ValueError(f"--replicas must be at least 1, got {count}")
    replicas = []
    for i in range(count):
        own = dict(conf)
        if gpus and "device" not in conf:
            own["device"] = f"cuda:{i % gpus}"
        share = max(1, cores // count + (1 if i < cores % count else 0))
        own.setdefault("threads", str(share))
        own.setdefault("train_threads", str(max(1, share // 2)))
        env = {}
        if i > 0:
            own.setdefault("train_trigger", "0")
            env[AUTO_SCORING_ENV] = "false"
        replicas.append(Replica(i + 1, port + i + 1, own, env))
    return replicas


def plan_for_machine(count: int, port: int, conf: Mapping[str, str]) -> list[Replica]:
    """:func:`plan_replicas` for this machine's GPUs and cores, with a warning where they are shared."""
    gpus, cores = count_gpus(), available_cores()
    replicas = plan_replicas(count, port, conf, gpus, cores)
    if gpus and count > gpus and "device" not in conf:
        logger.warning(
            "%d replicas on %d GPU(s): some share a GPU; give them a gpu_memory_fraction that fits together",
            count,
            gpus,
        )
    if not gpus and count > cores:
        logger.warning("%d replicas on %d core(s): each gets one thread and they compete for the cores", count, cores)
    return replicas


def port_taken(port: int) -> bool:
    """Whether a server could not listen on loopback ``port`` (as uvicorn does: TIME_WAIT leftovers are no bar)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _relay(stream: IO[bytes], prefix: str) -> None:
    """Copies a replica's output to ours, each line prefixed with its name: N logs in one terminal."""
    for raw in iter(stream.readline, b""):
        sys.stdout.write(f"{prefix} | {raw.decode(errors='replace')}")
        sys.stdout.flush()


def start_replica(replica: Replica, studies: str, host: str, port: int, app_dir: Path) -> subprocess.Popen[bytes]:
    """The replica's server in a session of its own, dying with us; its users reach it at ``host:port``."""
    bin_dir = Path(sys.executable).parent
    cmd = server_command(bin_dir / "monailabel", app_dir, studies, "127.0.0.1", replica.port, replica.conf)
    env = {
        **replica.env,
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(app_dir),
        REPLICA_ENV: str(replica.index),
        PUBLIC_HOST_ENV: host,
        PUBLIC_PORT_ENV: str(port),
    }
    process = subprocess.Popen(
        cmd,
        env=env,
        cwd=app_dir.parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C reaches the launcher, which stops the replicas in order
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    threading.Thread(target=_relay, args=(process.stdout, f"r{replica.index}"), daemon=True).start()
    return process


def stop_replica(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """SIGTERM to the replica's process group (it finishes its shutdown), SIGKILL after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> int:
    """Stops every replica at once (each its shutdown in parallel); 0 when each exited cleanly, else 1."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    codes = [stop_replica(p) for p in processes]
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
