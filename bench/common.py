"""What the benchmarks share: case parsing, agreement, peak memory, the real server, the app's library on the path."""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
# The shared real CT; VISTA3D_DATA names a copy laid out the same way (a GPU machine gets a carried subset).
DATA = Path(os.environ.get("VISTA3D_DATA") or ROOT / ".." / "shared" / "data").resolve()
APP_DIR = ROOT / "apps" / "vista3d"
sys.path.insert(0, str(APP_DIR))

sys.path.insert(0, str(ROOT))

from lib.server.launch import server_command, server_env  # noqa: E402
from tools.orthanc import die_with_parent  # noqa: E402


@dataclass(frozen=True)
class Case:
    """A CT and the one object to segment in it.

    The object is the voxels of ``label`` equal to ``value`` (any non-zero voxel when None); it is
    prompted with global id ``class_id`` (default: the first zero-shot id, for structures such as
    sarcoma that are not VISTA3D classes).
    """

    name: str
    image: Path
    label: Path
    value: int | None = None
    class_id: int = 133

    def ground_truth(self) -> np.ndarray:
        data = np.asarray(nib.load(str(self.label)).dataobj)
        return data == self.value if self.value is not None else data > 0


def parse_case(spec: str) -> Case:
    """A case from ``X_ct.nii.gz`` (label ``X_gtv.nii.gz`` beside it) or ``image:label[:value[:class_id]]``."""
    parts = spec.split(":")
    image = Path(parts[0])
    if len(parts) == 1:
        if "_ct" not in image.name:
            raise SystemExit(f"{spec}: name the label as image:label, or use the X_ct / X_gtv naming")
        label = image.with_name(image.name.replace("_ct", "_gtv"))
        return Case(image.name.split("_ct")[0], image, label)
    value = int(parts[2]) if len(parts) > 2 else None
    class_id = int(parts[3]) if len(parts) > 3 else 133
    name = image.name.split(".")[0] + (f"#{value}" if value is not None else "")
    return Case(name, image, Path(parts[1]), value, class_id)


def parse_counts(text: str) -> list[int]:
    """``"0,5,10"`` -> ``[0, 5, 10]``: distinct non-negative counts in ascending order (an argparse ``type``)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers, e.g. 0,5,10") from None
    if any(c < 0 for c in counts) or counts != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct counts >= 0 in ascending order")
    return counts


def take_cases(
    folder: Path, need: int | None = None, names: Sequence[str] | None = None, flag: str = "--cases"
) -> list[str]:
    """The first ``need`` (all when None) of ``names`` (default: every case of ``folder``,
    :func:`lib.trainers.corpus.case_names`),
    each with its CT and label in ``folder``. SystemExit naming ``flag``, the folder and what is missing,
    or how many pairs it has when fewer than ``need`` (or none)."""
    from lib.trainers.corpus import case_names  # torch: only where a folder is listed

    pairs = case_names(Path(folder)) if names is None else list(names)
    missing = [n for n in pairs if not all((Path(folder) / f"{n}_{k}.nii.gz").is_file() for k in ("ct", "gtv"))]
    if missing:
        raise SystemExit(f"{flag}: {folder} lacks <case>_ct.nii.gz / <case>_gtv.nii.gz for {', '.join(missing)}")
    least = 1 if need is None else need
    if len(pairs) < least:
        split = " in the default split" if names is not None else ""
        raise SystemExit(
            f"{flag}: {least} cases needed, {folder} has {len(pairs)}{split}; "
            f"give {flag} a folder with at least {least} <case>_ct.nii.gz + <case>_gtv.nii.gz pairs"
        )
    return pairs[:need]


def multiclass_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two label maps over all foreground classes at once (same id in both counts)."""
    total = int((a > 0).sum()) + int((b > 0).sum())
    return 1.0 if total == 0 else 2.0 * int(((a == b) & (a > 0)).sum()) / total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    studies: Path | str,
    conf: Mapping[str, str],
    log: Path,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    limit_s: float = 300.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """The real server, started as `make serve` starts it (behind the serving edge, which gives
    inference its threads; the plain `monailabel start_server` leaves the process at
    ``train_threads``), on a free port of ``host``; yields its loopback URL and process once
    ``/auth/`` answers (public: it does once the app is up), and stops it and every process it
    started on exit (:func:`stop_tree`). ``env`` adds to the server's environment (a TMPDIR of
    its own, for example). Used by the benchmarks and the tests."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    cmd = server_command(bin_dir / "monailabel", APP_DIR, str(studies), host, port, conf)
    full_env = {**server_env(APP_DIR, os.environ), **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + limit_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /auth/ within {limit_s:.0f} s:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/auth/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield url, proc
    finally:
        stop_tree(proc)


@contextmanager
def serve_replicas(
    studies: Path | str, conf: Mapping[str, str], log: Path, replicas: int, limit_s: float = 300.0
) -> Iterator[tuple[str, subprocess.Popen, list[str]]]:
    """``replicas`` servers behind HAProxy, started as ``make serve REPLICAS=N`` starts them
    (``tools/serve.py``); yields the balancer's URL, the launcher and each replica's own URL once
    every replica's ``/healthz`` answers, and stops them all on exit (:func:`stop_tree`)."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--studies", str(studies), "--port", str(port)]
    cmd += ["--replicas", str(replicas), *(a for k, v in conf.items() for a in ("--conf", k, v))]
    with open(log, "w") as out:
        proc = subprocess.Popen(  # with the benchmark: a killed one left N servers and HAProxy running
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent
        )
    urls = [f"http://127.0.0.1:{port + i}" for i in range(1, replicas + 1)]
    try:
        deadline = time.monotonic() + limit_s
        while not all(_answers(f"{u}/healthz") for u in [*urls, f"http://127.0.0.1:{port}"]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the replicas did not come up within {limit_s:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", proc, urls
    finally:
        stop_tree(proc)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def stop_tree(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Stop a process started with ``start_new_session=True`` and every process below it.

    Its descendants are collected first: MONAI Label's background processes (scoring, training)
    run in sessions of their own, out of reach of a signal to the server's process group, and
    once the server has exited nothing leads from it to them. The group gets SIGTERM (the server
    cancels its jobs and stops its background processes, see ``lib/server/shutdown.py``), then
    SIGKILL after ``timeout_s``; descendants still alive 5 s after the server get SIGKILL.
    """
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=5)
    for straggler in alive:
        with suppress(psutil.NoSuchProcess):
            straggler.kill()
    psutil.wait_procs(alive, timeout=5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the whole group has gone
        os.killpg(pgid, sig)
