"""What a click's compute costs while a training round runs beside it, by thread split and priority.

A background process trains ``small``'s encoder with one torch thread (as a round on 2 cores does);
the foreground times one 64³ window pass of the automatic branch (a stand-in for a click's
compute) in four set-ups: nothing beside it, 1 foreground thread beside a normal-priority round
(the old split), 2 threads beside a normal-priority round, 2 threads beside a nice-19 round (what
the server does now). Prints one JSON line; run it on a quiet machine.

    .venv/bin/python bench/threads_probe.py        # ~1 min
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time

import torch
from common import APP_DIR  # noqa: F401  (puts the app's lib on the path)

from lib.inference.auto_forward import window_features
from lib.model import build_network

WINDOW = (1, 1, 64, 64, 64)


def _train_forever(nice: int, ready: mp.Event) -> None:
    os.nice(nice)
    torch.set_num_threads(1)
    network = build_network("small")
    window = torch.randn(WINDOW)
    ready.set()
    while True:
        network.image_encoder(window)[1].sum().backward()


def _window_seconds(threads: int, repeats: int = 10) -> float:
    """Median seconds of one window pass with ``threads`` torch threads (2 warm-up passes dropped)."""
    torch.set_num_threads(threads)
    network = build_network("small").eval()
    window = torch.randn(WINDOW)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            window_features(network, window, frozenset())
            times.append(time.perf_counter() - start)
            time.sleep(0.2)  # clicks come with think time between them
    return round(statistics.median(times[2:]), 3)


def _beside_round(nice: int, threads: int) -> float:
    ready = mp.get_context("spawn").Event()
    round_ = mp.get_context("spawn").Process(target=_train_forever, args=(nice, ready), daemon=True)
    round_.start()
    try:
        ready.wait(120)
        time.sleep(3)  # the round is in its stride
        return _window_seconds(threads)
    finally:
        round_.kill()
        round_.join()


def main() -> None:
    torch.manual_seed(0)
    report = {
        "alone_2_threads_s": _window_seconds(2),
        "beside_round_1_thread_s": _beside_round(0, 1),
        "beside_round_2_threads_s": _beside_round(0, 2),
        "beside_nice19_round_2_threads_s": _beside_round(19, 2),
        "cores": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
