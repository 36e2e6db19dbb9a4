"""The serving thread budget as /queue shows it: how an automatic segmentation splits its threads now."""

from __future__ import annotations

from lib.server.scheduler import Kind
from lib.server.threads import ThreadBudget


def test_an_autos_windows_follow_what_runs_beside_it() -> None:
    running: list[str] = []
    budget = ThreadBudget(cores=2, background_threads=1, window_workers=2, running=lambda: running)
    assert budget.status()["auto_windows"] == {"at_once": 2, "threads_each": 1}
    running.append("scoring")  # start-up scoring takes its core: one window at a time
    assert budget.serving(Kind.AUTO) == 1
    assert budget.status()["auto_windows"] == {"at_once": 1, "threads_each": 1}
    running.clear()  # and gives it back when it ends
    assert budget.serving(Kind.AUTO) == 2


def test_one_worker_takes_the_whole_share() -> None:
    budget = ThreadBudget(cores=4, background_threads=1, window_workers=1, running=lambda: [])
    assert budget.status()["auto_windows"] == {"at_once": 1, "threads_each": 4}


def test_the_queue_says_how_background_work_yields() -> None:
    yields = ThreadBudget(cores=2, background_threads=1, window_workers=2, running=lambda: []).status()[
        "background_yields"
    ]
    assert yields["nice"] == 19 and yields["own_session"] is True
    assert yields["policy"] == "SCHED_IDLE"  # Linux, where the suite runs
