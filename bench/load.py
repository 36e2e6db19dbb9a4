"""A team on one server: N signed-in annotators clicking, one auto a minute, labels submitted, a round mid-run.

Starts the real server (behind its edge, on loopback, in a temporary datastore of sarcoma CTs linked
from ../shared/data), adds one annotator per simulated person, and runs two phases:

1. idle: one annotator alone does click sessions (what a click costs with nothing else running);
2. load: every annotator works through their own images at once: a click session with the simulated
   annotator of ``lib/simulate.py`` (first click at the tumour's deepest voxel, then at the centre of
   the largest error, ``--think-s`` between clicks), then submits the ground truth as the final label
   (zero-shot id 133); annotator 1 also starts an automatic segmentation of the abdominal scan every
   ``--auto-every-s``; ``/info`` is polled every second. Final labels start the learning loop's round.

The load phase ends once the round has completed and every annotator has submitted ``--cases``
labels (or after ``--max-minutes``). Then every submitted label is fetched back and compared byte
for byte. One JSON line (stdout and ``<out>/load.json``): requests by kind, errors by status,
click latency idle and under load (also split by what else ran when the click was sent: nothing,
the round, an auto, both), ``/info`` under load, labels submitted vs stored, the round,
peak RSS of the server and of its subprocesses.

    .venv/bin/python bench/load.py                       # small preset, 4 annotators, ~5-10 min
    .venv/bin/python bench/load.py --replicas 2          # two replicas behind HAProxy (make serve REPLICAS=2)

With ``--replicas`` the round is seen in ``/info``'s ``learning.last_round`` (the model store all
replicas share; MONAI Label's task status answers only on the replica that runs it), and the JSON
adds the version each replica serves at the end, asked of each replica directly.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from common import DATA, ROOT
from load_client import Annotator, Recorder, percentiles, sample_rss, start_server

STS = DATA / "sts"
ABDOMEN = DATA / "totalseg" / "example_ct_sm.nii.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotators", type=int, default=4)
    p.add_argument("--cases", type=int, default=3, help="labels each annotator submits under load (at least)")
    p.add_argument("--clicks", type=int, default=5, help="clicks per session")
    p.add_argument("--think-s", type=float, default=2.0, help="seconds between an annotator's clicks")
    p.add_argument("--auto-every-s", type=float, default=60.0)
    p.add_argument("--idle-sessions", type=int, default=4, help="click sessions of the idle phase")
    p.add_argument("--train-steps", type=int, default=40, help="steps of the learning loop's round")
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--preset", default="small")
    p.add_argument("--replicas", type=int, default=1, help="servers behind HAProxy (make serve REPLICAS=N)")
    p.add_argument("--conf", nargs="*", default=[], help="more --conf key=value pairs for the server")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "load")
    return p.parse_args(argv)


def datastore(root: Path, annotators: int, per: int) -> tuple[dict[str, list[str]], str]:
    """Link the abdominal scan, ``per + 1`` sarcoma cases per annotator (the first for the idle phase)
    and one more to warm the server up with; the cases by annotator, and the warm-up case."""
    root.mkdir(parents=True)
    (root / "abdomen.nii.gz").symlink_to(ABDOMEN)
    cases = sorted(p.name.split("_ct")[0] for p in STS.glob("STS_*_ct.nii.gz"))
    need = annotators * (per + 1) + 1
    if len(cases) < need:
        raise SystemExit(f"{need} cases needed, {len(cases)} in {STS}")
    out: dict[str, list[str]] = {}
    for n in range(annotators):
        out[f"annotator-{n + 1}"] = cases[n : annotators * (per + 1) : annotators]
    warm_up = cases[annotators * (per + 1)]
    for case in cases[:need]:
        (root / f"{case}_ct.nii.gz").symlink_to(STS / f"{case}_ct.nii.gz")
    return out, warm_up


def wait_quiet(url: str, token: str, timeout: float = 600) -> None:
    """Until no background task (start-up scoring) holds threads: the idle phase must be idle."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = requests.get(f"{url}/queue", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        if not queue["threads"]["background"] and not queue["running"]:
            return
        time.sleep(2)
    raise SystemExit("the server never went quiet")


def round_status(url: str, token: str) -> str:
    r = requests.get(f"{url}/train/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return str(r.json().get("status", "")) if r.status_code == 200 else ""


def last_round(url: str, token: str) -> Any:
    """The model store's last recorded round (shared by every replica, unlike MONAI Label's task status)."""
    r = requests.get(f"{url}/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return r.json()["models"]["vista3d"]["learning"]["last_round"] if r.status_code == 200 else None


def served_versions(urls: list[str]) -> list[Any]:
    """What each server (each replica, asked directly) serves now."""
    return [requests.get(f"{u}/healthz", timeout=30).json().get("version") for u in urls]


def run_load(url: str, people: list[Annotator], args: argparse.Namespace, rec: Recorder) -> dict[str, Any]:
    """The load phase; returns what happened to the learning loop's round."""
    stop = threading.Event()
    done = {a.name: 0 for a in people}
    round_seen: dict[str, Any] = {"started": False, "status": "", "recorded": False}
    before = last_round(url, people[0].token)

    def work(person: Annotator) -> None:
        for case in person.cases[1:] * 10:
            if stop.is_set():
                return
            person.session(case, args.clicks, args.think_s, "load")
            person.submit(case)
            done[person.name] += 1

    def autos(person: Annotator) -> None:
        while not stop.wait(0 if rec.count("auto") == 0 else args.auto_every_s):
            person.auto("abdomen")

    def info() -> None:
        while not stop.wait(1.0):
            people[0].info()

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    threads += [threading.Thread(target=autos, args=(people[0],)), threading.Thread(target=info)]
    for t in threads:
        t.start()
    deadline = time.time() + args.max_minutes * 60
    while time.time() < deadline:
        status = round_status(url, people[0].token)
        round_seen["started"] = round_seen["started"] or status == "RUNNING"
        rec.saw_round(status == "RUNNING")
        round_seen["status"] = status
        round_seen["recorded"] = round_seen["recorded"] or last_round(url, people[0].token) != before
        if round_seen["recorded"] and min(done.values()) >= args.cases:
            break
        time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=900)
    return {**round_seen, "labels_per_annotator": done}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="vista3d-load-") as tmp:
        studies = Path(tmp) / "studies"
        assignment, warm_up = datastore(studies, args.annotators, args.cases)
        password = secrets.token_urlsafe(12)
        conf = {
            "preset": args.preset,
            "train_trigger": str(args.annotators),
            "train_debounce_s": "5",
            "train_steps": str(args.train_steps),
            **dict(kv.split("=", 1) for kv in args.conf),
        }
        log = args.out / "server.log"
        with start_server(studies, conf, assignment, password, log, args.replicas) as (url, proc, urls):
            people = [Annotator(url, name, password, cases, rec) for name, cases in assignment.items()]
            stop_rss = threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(proc.pid, stop_rss, rec))
            sampler.start()
            for server in urls:
                wait_quiet(server, people[0].token)
            people[0].session(warm_up, args.clicks, 0.0, "warm-up")  # the first requests pay one-off set-up
            for n in range(args.idle_sessions):  # idle: one annotator at a time, nothing else running
                person = people[n % len(people)]
                person.session(person.cases[0], args.clicks, args.think_s, "idle")
            begin = time.time()
            learning = run_load(url, people, args, rec)
            load_s = time.time() - begin
            submitted, stored = rec.verify_labels(people[0])
            versions = served_versions(urls)
            stop_rss.set()
            sampler.join()
    report = {
        "preset": args.preset,
        "annotators": args.annotators,
        "replicas": args.replicas,
        "served_version_by_replica": versions,
        "load_minutes": round(load_s / 60, 2),
        "requests": rec.counts(),
        "errors": rec.errors(),
        "click_idle_s": percentiles(rec.latencies("click", "idle")),
        "click_load_s": percentiles(rec.latencies("click", "load")),
        "click_load_by_background_s": {k: percentiles(v) for k, v in rec.clicks_by_background("load").items()},
        "info_load_s": percentiles(rec.latencies("info", "load")),
        "auto_load_s": percentiles(rec.latencies("auto", "load")),
        "labels_submitted": submitted,
        "labels_stored": stored,
        "training_round": learning,
        "peak_rss_gb": rec.peak_rss_gb(),
        "cores": len(os.sched_getaffinity(0)),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report["ratio_click_p95_load_vs_idle"] = round(report["click_load_s"]["p95"] / report["click_idle_s"]["p95"], 2)
    line = json.dumps(report)
    (args.out / "load.json").write_text(line + "\n")
    print(line)
    return 0 if not any(str(s).startswith("5") for s in report["errors"]) and submitted == stored else 1


if __name__ == "__main__":
    raise SystemExit(main())
