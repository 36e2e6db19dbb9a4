"""The load benchmark's pieces: the server it starts, a signed-in simulated annotator, what it records."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
import requests
from common import DATA, serve, serve_replicas

from lib.server.users import Role, UserStore
from lib.simulate import deepest_voxel, next_click

STS = DATA / "sts"
SARCOMA_ID = 133


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "max": float("nan")}
    a = np.asarray(values)
    return {
        "n": len(values),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "max": round(float(a.max()), 3),
    }


class Recorder:
    """Thread-safe record of every request (kind, phase, status, seconds, start), RSS samples and submitted labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[tuple[str, str, int, float, float]] = []
        self._rss: dict[str, float] = {"server": 0.0, "children": 0.0}
        self.round_running: tuple[float, float] | None = None  # when the client saw the round RUNNING, first to last
        self.submitted: dict[str, bytes] = {}

    def add(self, kind: str, phase: str, status: int, seconds: float, start: float) -> None:
        with self._lock:
            self._rows.append((kind, phase, status, seconds, start))

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k, *_ in self._rows if k == kind)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(k for k, *_ in self._rows))

    def errors(self) -> dict[str, int]:
        with self._lock:
            return {str(s): n for s, n in Counter(r[2] for r in self._rows if r[2] >= 400).items()}

    def latencies(self, kind: str, phase: str) -> list[float]:
        with self._lock:
            return [t for k, p, s, t, _ in self._rows if k == kind and p == phase and s == 200]

    def saw_round(self, running: bool) -> None:
        """The round's status as polled now: the interval it was seen running grows."""
        if running:
            now = time.time()
            with self._lock:
                self.round_running = (self.round_running or (now, now))[0], now

    def clicks_by_background(self, phase: str) -> dict[str, list[float]]:
        """Click latencies of ``phase`` by what else ran when the click was sent: none, round, auto, both."""
        with self._lock:
            autos = [(b, b + t) for k, _, _, t, b in self._rows if k == "auto"]
            rounds = [self.round_running] if self.round_running else []
            clicks = [(t, b) for k, p, s, t, b in self._rows if k == "click" and p == phase and s == 200]
        out: dict[str, list[float]] = {"none": [], "round": [], "auto": [], "both": []}
        for seconds, begin in clicks:
            auto = any(lo <= begin <= hi for lo, hi in autos)
            training = any(lo <= begin <= hi for lo, hi in rounds)
            out["both" if auto and training else "auto" if auto else "round" if training else "none"].append(seconds)
        return out

    def rss(self, server: float, children: float) -> None:
        with self._lock:
            self._rss["server"] = max(self._rss["server"], server)
            self._rss["children"] = max(self._rss["children"], children)

    def peak_rss_gb(self) -> dict[str, float]:
        return {k: round(v / 2**30, 2) for k, v in self._rss.items()}

    def verify_labels(self, reader: Annotator) -> tuple[int, int]:
        """Labels submitted (distinct images) and how many of them the server gives back byte for byte."""
        stored = sum(reader.fetch_label(image) == content for image, content in self.submitted.items())
        return len(self.submitted), stored


def sample_rss(pid: int, stop: threading.Event, rec: Recorder) -> None:
    """Peak resident memory of the server process and, separately, of its subprocesses (rounds, scoring)."""
    server = psutil.Process(pid)
    while not stop.wait(0.5):
        try:
            children = sum(c.memory_info().rss for c in server.children(recursive=True))
            rec.rss(server.memory_info().rss, children)
        except psutil.Error:
            continue


@contextmanager
def start_server(
    studies: Path, conf: Mapping[str, str], users: Mapping[str, Any], password: str, log: Path, replicas: int = 1
) -> Iterator[tuple[str, subprocess.Popen, list[str]]]:
    """The real server behind its edge on a loopback port (or ``replicas`` of it behind HAProxy), one
    annotator per user; yields the URL users call, the process, each server's own URL; stopped on exit."""
    store = UserStore(studies / ".vista3d" / "users.json")
    for name in users:
        store.add(name, Role.ANNOTATOR, password)
    if replicas > 1:
        with serve_replicas(studies, conf, log, replicas) as (url, proc, urls):
            yield url, proc, urls
    else:
        with serve(studies, conf, log) as (url, proc):
            yield url, proc, [url]


def _nifti(data: np.ndarray, affine: np.ndarray) -> bytes:
    buf = io.BytesIO()
    img = nib.Nifti1Image(data, affine)
    img.to_file_map(img.make_file_map({"image": buf, "header": buf}))
    return gzip.compress(buf.getvalue(), mtime=0)


class Annotator:
    """One signed-in person: click sessions with the simulated annotator, final labels, autos, /info."""

    def __init__(self, url: str, name: str, password: str, cases: list[str], rec: Recorder) -> None:
        self.url, self.name, self.cases, self.rec = url, name, cases, rec
        token = requests.post(f"{url}/auth/token", data={"username": name, "password": password}, timeout=60)
        token.raise_for_status()
        self.token = token.json()["access_token"]
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    def _timed(self, kind: str, phase: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        begin = time.time()
        response = self.http.request(method, f"{self.url}{path}", timeout=900, **kwargs)
        self.rec.add(kind, phase, response.status_code, time.time() - begin, begin)
        return response

    def session(self, case: str, clicks: int, think_s: float, phase: str) -> None:
        """Clicks on the case's tumour as the simulated annotator places them; each answer feeds the next click."""
        truth = np.asarray(nib.load(str(STS / f"{case}_gtv.nii.gz")).dataobj) > 0
        points, labels = [deepest_voxel(truth).tolist()], [1]
        for _ in range(clicks):
            params = {"points": points, "point_labels": labels, "label_prompt": [SARCOMA_ID]}
            path = f"/infer/vista3d?image={case}_ct&output=image"
            response = self._timed("click", phase, "POST", path, files={"params": (None, json.dumps(params))})
            if response.status_code != 200:
                return
            result = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
            prediction = np.asarray(result.dataobj) == SARCOMA_ID
            click = next_click(prediction, truth)
            if click is None:
                return
            points.append([int(c) for c in click[0]])
            labels.append(int(click[1]))
            time.sleep(think_s)

    def submit(self, case: str) -> None:
        """The corrected label (the ground truth, tumour = 133) submitted as final."""
        gtv = nib.load(str(STS / f"{case}_gtv.nii.gz"))
        content = _nifti((np.asarray(gtv.dataobj) > 0).astype(np.uint8) * SARCOMA_ID, gtv.affine)
        path = f"/datastore/label?image={case}_ct&tag=final"
        response = self._timed("label", "load", "PUT", path, files={"label": (f"{case}_ct.nii.gz", content)})
        if response.status_code == 200:
            self.rec.submitted[f"{case}_ct"] = content

    def auto(self, image: str) -> None:
        self._timed("auto", "load", "POST", f"/infer/vista3d?image={image}&output=json", files={"params": (None, "{}")})

    def info(self) -> None:
        self._timed("info", "load", "GET", "/info/")

    def fetch_label(self, image: str) -> bytes:
        return self.http.get(f"{self.url}/datastore/label?label={image}&tag=final", timeout=120).content
