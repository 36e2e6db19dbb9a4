"""The scheduler on its own: one compute slot, clicks first, cancellation, 503 not a hang, shutdown; thread shares.

Background priorities are in test_background.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lib.server.scheduler import Busy, ClientGone, Job, Kind, Scheduler
from lib.server.threads import ThreadBudget


def auto_work(windows: int, log: list[str], name: str, scheduler: Scheduler, step_s: float = 0.05):
    def work(job: Job) -> str:
        for i in range(windows):
            scheduler.checkpoint(job)
            log.append(f"{name}:{i}")
            time.sleep(step_s)
        return name

    return work


def click_work(log: list[str], name: str):
    def work(job: Job) -> str:
        log.append(name)
        return name

    return work


def wait_until(check, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_a_click_runs_between_two_windows_of_a_running_auto() -> None:
    scheduler = Scheduler(max_jobs=8, max_wait_s=30)
    log: list[str] = []
    job, auto = scheduler.submit(Kind.AUTO, "alice", "x", auto_work(20, log, "auto", scheduler))
    wait_until(lambda: len(log) >= 3)
    _, click = scheduler.submit(Kind.CLICK, "bob", "y", click_work(log, "click"))
    assert click.result(timeout=5) == "click"
    assert auto.result(timeout=10) == "auto"
    at = log.index("click")
    assert 3 <= at < 10, f"the click ran at the next window, not after the auto: {log}"
    assert log[at - 1].startswith("auto:") and log[at + 1].startswith("auto:")


def test_clicks_go_before_queued_autos_and_autos_keep_their_order() -> None:
    scheduler = Scheduler(max_jobs=8, max_wait_s=30)
    log: list[str] = []
    gate = threading.Event()

    def blocker(job: Job) -> None:
        gate.wait(5)

    _, first = scheduler.submit(Kind.CLICK, "u", "x", blocker)
    futures = [
        scheduler.submit(Kind.AUTO, "a", "x", click_work(log, "auto1"))[1],
        scheduler.submit(Kind.AUTO, "b", "x", click_work(log, "auto2"))[1],
        scheduler.submit(Kind.CLICK, "c", "x", click_work(log, "click"))[1],
    ]
    time.sleep(0.2)
    gate.set()
    for f in (first, *futures):
        f.result(timeout=5)
    assert log == ["click", "auto1", "auto2"]


def test_a_queued_job_of_a_gone_client_is_dropped_and_a_running_auto_stops() -> None:
    scheduler = Scheduler(max_jobs=8, max_wait_s=30)
    log: list[str] = []
    running, auto = scheduler.submit(Kind.AUTO, "alice", "x", auto_work(100, log, "auto", scheduler))
    wait_until(lambda: len(log) >= 2)
    queued, later = scheduler.submit(Kind.AUTO, "bob", "y", click_work(log, "never"))
    scheduler.cancel(queued)
    with pytest.raises(ClientGone):
        later.result(timeout=5)
    scheduler.cancel(running)
    with pytest.raises(ClientGone):
        auto.result(timeout=5)
    assert "never" not in log and len(log) < 100
    assert scheduler.status("alice", show_names=True)["running"] == []


def test_shutdown_drops_queued_jobs_stops_the_running_auto_and_refuses_new_ones() -> None:
    scheduler = Scheduler(max_jobs=8, max_wait_s=30)
    log: list[str] = []
    _, auto = scheduler.submit(Kind.AUTO, "alice", "x", auto_work(100, log, "auto", scheduler))
    wait_until(lambda: len(log) >= 2)
    _, queued = scheduler.submit(Kind.CLICK, "bob", "y", click_work(log, "never"))
    assert scheduler.shutdown("the server is stopping") == 2 and scheduler.stopping
    for future in (auto, queued):
        with pytest.raises(Busy, match="the server is stopping") as stopped:
            future.result(timeout=5)
        assert stopped.value.retry_after >= 1
    assert "never" not in log and len(log) < 10, log
    with pytest.raises(Busy, match="the server is stopping"):
        scheduler.submit(Kind.CLICK, "carol", "x", click_work(log, "late"))
    assert scheduler.shutdown("again") == 0, "a second call changes nothing"
    status = scheduler.status("alice", show_names=True)
    assert status["running"] == [] and status["queued"] == [] and "late" not in log


def test_shutdown_stops_an_auto_that_waits_for_the_slot_back_after_clicks() -> None:
    """Paused behind a click (it gave the slot up at a checkpoint), the auto stops when it would resume."""
    scheduler = Scheduler(max_jobs=8, max_wait_s=30)
    log: list[str] = []
    in_click, release = threading.Event(), threading.Event()

    def slow_click(job: Job) -> str:
        in_click.set()
        release.wait(5)
        return "click"

    _, auto = scheduler.submit(Kind.AUTO, "alice", "x", auto_work(100, log, "auto", scheduler))
    wait_until(lambda: len(log) >= 1)
    _, click = scheduler.submit(Kind.CLICK, "bob", "y", slow_click)
    assert in_click.wait(5)
    scheduler.shutdown("the server is stopping")
    release.set()
    assert click.result(timeout=5) == "click", "a click that runs finishes (clicks have no checkpoint)"
    with pytest.raises(Busy, match="the server is stopping"):
        auto.result(timeout=5)


def test_an_auto_over_the_run_limit_stops_at_its_next_checkpoint_and_the_slot_is_free() -> None:
    scheduler = Scheduler(max_jobs=8, max_wait_s=30, max_run_s=0.2)
    log: list[str] = []
    _, auto = scheduler.submit(Kind.AUTO, "alice", "x", auto_work(100, log, "auto", scheduler))
    with pytest.raises(Busy, match="ran longer than the server's limit of 0 s"):
        auto.result(timeout=5)
    assert 2 <= len(log) < 10, log
    _, click = scheduler.submit(Kind.CLICK, "bob", "y", click_work(log, "click"))
    assert click.result(timeout=5) == "click"


def test_a_job_that_has_computed_hands_the_slot_on_while_it_writes() -> None:
    scheduler = Scheduler(max_jobs=8, max_wait_s=30)
    writing = threading.Event()
    written = threading.Event()

    def compute_then_write(job: Job) -> str:
        scheduler.computed(job)
        writing.set()
        written.wait(5)  # the answer file being written
        return "first"

    first_job, first = scheduler.submit(Kind.CLICK, "alice", "x", compute_then_write)
    assert writing.wait(5)
    assert scheduler.status("alice", show_names=False)["running"][0]["stage"] == "writing"
    _, second = scheduler.submit(Kind.CLICK, "bob", "y", lambda job: "second")
    assert second.result(timeout=5) == "second", "the next click computed while the first one wrote"
    assert not first.done()
    written.set()
    assert first.result(timeout=5) == "first" and first_job.computed


def test_full_queue_and_late_start_get_busy_with_a_retry_estimate() -> None:
    scheduler = Scheduler(max_jobs=2, max_wait_s=0.5)
    gate = threading.Event()
    _, first = scheduler.submit(Kind.AUTO, "alice", "x", lambda job: gate.wait(5))
    _, second = scheduler.submit(Kind.AUTO, "bob", "x", lambda job: "ran")
    with pytest.raises(Busy, match="2 requests queued or running") as full:
        scheduler.submit(Kind.CLICK, "carol", "x", lambda job: "ran")
    assert full.value.retry_after >= 1
    with pytest.raises(Busy, match="waited 0 s without starting") as late:
        second.result(timeout=5)
    assert late.value.retry_after >= 1
    gate.set()
    assert first.result(timeout=5) is True


def test_status_shows_positions_and_hides_other_names() -> None:
    scheduler = Scheduler(max_jobs=8, max_wait_s=30)
    gate = threading.Event()
    scheduler.submit(Kind.AUTO, "alice", "x", lambda job: gate.wait(5))
    time.sleep(0.1)
    scheduler.submit(Kind.AUTO, "bob", "x", lambda job: None)
    scheduler.submit(Kind.CLICK, "carol", "x", lambda job: None)
    status = scheduler.status("bob", show_names=False)
    gate.set()
    assert status["length"] == 2 and len(status["running"]) == 1
    assert status["queued"][0] == {**status["queued"][0], "kind": "click", "position": 1, "mine": False}
    assert "user" not in status["queued"][0]
    assert status["queued"][1]["position"] == 2 and status["queued"][1]["user"] == "bob"


def test_autos_leave_room_for_background_work_and_clicks_take_every_core() -> None:
    running: list[str] = []
    budget = ThreadBudget(cores=4, background_threads=2, running=lambda: running)
    assert budget.serving(Kind.AUTO) == 4 and budget.serving(Kind.CLICK) == 4
    running.append("train")
    assert budget.serving(Kind.AUTO) == 2 and budget.status()["background"] == {"train": 2}
    assert budget.serving(Kind.CLICK) == 4, "a click runs on every core; the niced round waits for it"
    running.append("scoring")
    assert budget.serving(Kind.AUTO) == 1, "never fewer than one"


def test_apply_sets_the_threads_of_the_job_that_got_the_slot() -> None:
    running = ["train"]
    budget = ThreadBudget(cores=2, background_threads=1, running=lambda: running)
    before = torch.get_num_threads()
    try:
        budget.apply(Job(1, "ann", Kind.AUTO, "x"))
        assert torch.get_num_threads() == 1
        budget.apply(Job(2, "ann", Kind.CLICK, "x"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
