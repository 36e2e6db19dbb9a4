"""Several server replicas on one machine behind one HAProxy (``make serve REPLICAS=N``, ``tools/serve.py``).

Each replica is the whole server (``monailabel start_server`` behind this app's edge) on a loopback
port ``PORT+i``; HAProxy (:mod:`tools.haproxy`) serves ``HOST:PORT`` and keeps each user on one
replica. A replica gets a device of its own so that N of them do not fight over one: GPU ``i`` (round
robin when there are fewer GPUs than replicas), else a share of the cores as ``threads`` and
``train_threads``, each only where ``--conf`` did not set it. The automatic learning loop and MONAI
Label's automatic scoring (every image at start-up, again after each round) run on replica 1 only
(``train_trigger 0`` on the others whatever ``--conf`` says; ``MONAI_LABEL_AUTO_UPDATE_SCORING=false``
unless the environment sets it): every replica sees the same datastore, and N of them would each
start the same round and score the same images.
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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from shutil import which
from typing import IO

from lib.cores import available_cores
from lib.server.launch import PUBLIC_HOST_ENV, PUBLIC_PORT_ENV, REPLICA_ENV, server_command, server_env
from tools.orthanc import die_with_parent

__all__ = ["Fleet", "Replica", "count_gpus", "plan_replicas", "start_replica", "stop_all", "stop_replica"]

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
            own["train_trigger"] = "0"  # CONF's trigger is replica 1's: one loop, however it is set
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
        **server_env(app_dir, {**replica.env, **os.environ}),
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


class Fleet:
    """The replicas' processes: a replica that dies after it has served is started again after
    ``restart_delay_s``, unless it died ``max_deaths`` times within ``window_s`` (a crash loop). One that
    exits before it ever served (a configuration it refuses, a port taken) is left down: starting it
    again would fail again.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        start: Callable[[Replica], subprocess.Popen[bytes]],
        restart_delay_s: float = 5.0,
        max_deaths: int = 5,
        window_s: float = 600.0,
    ) -> None:
        self.replicas = list(replicas)
        self._start = start
        self.restart_delay_s, self.max_deaths, self.window_s = restart_delay_s, max_deaths, window_s
        self.processes: list[subprocess.Popen[bytes]] = []
        self._served: set[int] = set()  # positions whose current process has passed a health check
        self._deaths: dict[int, list[float]] = {}
        self._due: dict[int, float] = {}  # position -> when to start it again
        self._noted: set[int] = set()  # positions whose exit has been seen

    def start(self) -> None:
        self.processes = [self._start(r) for r in self.replicas]

    def served(self, index: int) -> None:
        """Replica ``index`` (1-based) passed a health check: a later death is a crash worth a restart."""
        if self.processes[index - 1].poll() is None:
            self._served.add(index - 1)

    def alive(self) -> bool:
        """Whether a replica runs or will be started again."""
        return bool(self._due) or any(p.poll() is None for p in self.processes)

    def poll(self, now: float | None = None) -> None:
        """Notes the replicas that exited and starts again those whose time has come."""
        now = time.monotonic() if now is None else now
        for i, process in enumerate(self.processes):
            code = process.returncode if process.returncode is not None else process.poll()
            if code is not None and i not in self._noted:
                self._noted.add(i)
                self._exited(i, code, now)
            if i in self._due and now >= self._due[i]:
                del self._due[i]
                logger.info("starting replica r%d again", i + 1)
                self.processes[i] = self._start(self.replicas[i])
                self._noted.discard(i)

    def _exited(self, i: int, code: int, now: float) -> None:
        served = i in self._served
        self._served.discard(i)
        deaths = [t for t in self._deaths.get(i, []) if now - t < self.window_s] + [now]
        self._deaths[i] = deaths
        if not served:
            logger.error("replica r%d exited with %d before it served: not started again", i + 1, code)
        elif len(deaths) >= self.max_deaths:
            logger.error(
                "replica r%d exited with %d, %d times in %.0f s: not started again",
                i + 1,
                code,
                len(deaths),
                self.window_s,
            )
        else:
            logger.warning("replica r%d exited with %d; starting it again in %.0f s", i + 1, code, self.restart_delay_s)
            self._due[i] = now + self.restart_delay_s

    def stop(self) -> int:
        """Stops every replica (none is started again); 0 when each exited cleanly, else 1."""
        self._due.clear()
        return stop_all(self.processes)
