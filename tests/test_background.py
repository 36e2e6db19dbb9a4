"""MONAI Label's background processes of this app yield to serving whatever session it runs in, and die with it.

On a kernel with autogroups every session has an equal share of the CPU and nice ranks a process
only within its own session; so a background process takes a session of its own at autogroup nice
19, runs under SCHED_IDLE (its torch threads too) at nice 19, and dies with its parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lib.server.threads import (
    BACKGROUND_AUTOGROUP_NICE,
    BACKGROUND_NICE,
    background_policy,
    in_background_process,
)

from .conftest import APP_DIR, ROOT, STS

AUTOGROUPS = Path("/proc/sys/kernel/sched_autogroup_enabled")
HAS_AUTOGROUPS = AUTOGROUPS.exists() and AUTOGROUPS.read_text().strip() == "1"
# Every sarcoma case: the scoring process must still run when the test kills its parent (about a
# second an image on a fast CPU; it is killed long before the last).
SCORED = tuple(sorted(p.name.removesuffix("_ct.nii.gz") for p in STS.glob("STS_*_ct.nii.gz")))

# Starts the command after the log path as its own child, prints that child's pid, then waits to be killed.
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def autogroup_nice(pid: int) -> int | None:
    """``/autogroup-N nice K`` -> K; None for a process in the root group, whose file is empty.

    A process whose session was never given an autogroup of its own (a CI runner started without
    ``setsid``, say) stays in the root task group, which is not an autogroup and has no nice to set.
    """
    text = Path(f"/proc/{pid}/autogroup").read_text()
    return int(text.split()[-1]) if text.strip() else None


def has_ended(process: psutil.Process) -> bool:
    """Exited (reaped, or a zombie whose parent has not reaped it yet)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, IndexError):  # psutil reads an empty stat file while the process is reaped
        return True


def thread_policies(pid: int) -> dict[int, tuple[int, int]]:
    """Each live thread of ``pid``: (scheduling policy, nice)."""
    out = {}
    for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the thread has ended
            out[tid] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
    return out


def test_this_process_is_not_a_background_process_and_the_policy_is_described() -> None:
    assert not in_background_process()
    policy = background_policy()
    assert policy["policy"] == "SCHED_IDLE" and policy["nice"] == BACKGROUND_NICE and policy["own_session"]
    assert policy["autogroup_nice"] == (BACKGROUND_AUTOGROUP_NICE if HAS_AUTOGROUPS else None)


def _yield_in_child(**popen: bool) -> tuple[dict[str, str], list[str], list[int]]:
    """Run :func:`yield_to_serving` in a child python: its steps, its log lines, and (own session, policy, nice)."""
    code = (
        "import json, logging, os, sys; sys.path.insert(0, 'apps/vista3d'); logging.basicConfig(level=logging.INFO);"
        "from lib.server.threads import yield_to_serving; steps = yield_to_serving();"
        "print(json.dumps([steps, [os.getsid(0) == os.getpid(), os.sched_getscheduler(0), os.nice(0)]]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, **popen)
    steps, state = json.loads(done.stdout.strip().splitlines()[-1])
    return steps, [line for line in done.stderr.splitlines() if "yields to serving" in line], state


def test_yield_to_serving_applies_every_step_in_a_process_of_monai_labels_kind() -> None:
    """As under MONAI Label's Popen (not a group leader, in its parent's session): every step, one log line."""
    steps, lines, (own_session, policy, nice) = _yield_in_child()
    refused = {k: v for k, v in steps.items() if v.startswith("not applied")}
    assert not refused or (refused.keys() == {"autogroup nice"} and not HAS_AUTOGROUPS), steps
    assert own_session and policy == os.SCHED_IDLE and nice == BACKGROUND_NICE
    assert len(lines) == 1, lines
    assert all(v in lines[0] for v in steps.values() if not v.startswith("not applied")), (lines, steps)


def test_a_session_leader_keeps_its_own_session() -> None:
    """Started with setsid it leads a session already (setsid is refused): nothing to leave, the rest applies."""
    steps, _, (own_session, policy, nice) = _yield_in_child(start_new_session=True)
    assert steps["own session"].startswith("own session"), steps
    assert own_session and policy == os.SCHED_IDLE and nice == BACKGROUND_NICE


def _studies(root: Path) -> Path:
    root.mkdir()
    for case in SCORED:
        (root / f"{case}_ct.nii.gz").symlink_to(STS / f"{case}_ct.nii.gz")
    return root


def test_monai_labels_scoring_process_yields_in_its_own_session_and_dies_with_its_parent(
    tmp_path: Path, test_weights: Path
) -> None:
    """The real thing: ``python -m monailabel.interfaces.utils.app -m scoring`` of this app, started as
    MONAI Label starts it (a plain Popen), from a parent that is then killed."""
    log = tmp_path / "scoring.log"
    scoring = [sys.executable, "-m", "monailabel.interfaces.utils.app", "-a", str(APP_DIR)]
    scoring += ["-s", str(_studies(tmp_path / "studies")), "-m", "scoring", "-r", '{"method": "uncertainty"}']
    conf = json.dumps({"weights": str(test_weights), "train_threads": "2"})
    env = {**os.environ, "PYTHONPATH": str(APP_DIR), "MONAI_LABEL_APP_CONF": conf}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(log), *scoring], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    child: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        child = psutil.Process(pid)
        deadline = time.monotonic() + 120
        while os.getsid(pid) != pid:  # yield_to_serving leaves the session last, after policy and nice
            assert child.is_running() and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        first = set(thread_policies(pid))
        seen: dict[int, tuple[int, int]] = {}
        while time.monotonic() < deadline and not set(seen) - first:  # until a thread started after it (torch's)
            seen.update(thread_policies(pid))
            time.sleep(0.05)
        for _ in range(20):  # and a while longer, as torch's pool grows
            seen.update(thread_policies(pid))
            time.sleep(0.05)
        assert set(seen) - first, f"no thread started after yield_to_serving: {seen}"
        assert all(p == (os.SCHED_IDLE, BACKGROUND_NICE) for p in seen.values()), seen
        assert os.getsid(pid) != os.getsid(0) and os.getpgid(pid) != os.getpgid(0)
        if HAS_AUTOGROUPS:
            assert autogroup_nice(pid) == BACKGROUND_AUTOGROUP_NICE, f"{pid} ended or is not in a group of its own"
            assert autogroup_nice(os.getpid()) != BACKGROUND_AUTOGROUP_NICE, "the test's own group was left alone"
        assert child.is_running(), "scoring ended before its parent was killed: score more images"

        parent.kill()
        parent.wait(timeout=10)
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone or has_ended(child), "the scoring process outlived its parent"
        assert "yields to serving: dies with the server" in log.read_text()
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if child is not None and child.is_running():
            child.kill()
