"""The Learning figures: served versions over time, every round's gate decision, validation Dice per version.

All of it is in the model store's manifest (:mod:`lib.model_store`): the kept versions with their
validation figures, the last rounds (promoted or why not, with the gate's evidence) and rollbacks.
The running round's progress is read from MONAI Label's training task: the last lines the training
process printed (:func:`round_progress`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

__all__ = ["STEP_LINE", "click_curve", "learning_figures", "parse_time", "round_progress"]

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # the manifest's and MONAI Label's task times (server time)
# lib.trainers.schedule.run_steps logs this every 25 steps and at the last one ("point[rank 0]: step 25/200 ...").
STEP_LINE = re.compile(r": step (\d+)/(\d+) loss\(avg20\) ([-+\d.eainf]+), ([\d.]+) s/step")
DICE_KEY = re.compile(r"^dice_(\d+)$")


def parse_time(text: str | None) -> str | None:
    """A manifest or task time as ISO 8601 (server time), None when missing or unreadable."""
    if not text:
        return None
    try:
        return datetime.strptime(text, TIME_FORMAT).isoformat()
    except ValueError:
        return None


def click_curve(validation: Mapping[str, Any] | None) -> dict[str, float]:
    """Mean Dice after k simulated clicks, ``{"1": ..., "5": ...}``, for the clicks the figures were measured at."""
    out = {}
    for key, value in (validation or {}).items():
        match = DICE_KEY.match(key)
        if match and isinstance(value, int | float):
            out[match.group(1)] = float(value)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _version(entry: Mapping[str, Any], served: int) -> dict[str, Any]:
    validation = entry.get("validation") or {}
    return {
        "version": int(entry["version"]),
        "served": int(entry["version"]) == served,
        "created": parse_time(entry.get("created")),
        "trained_on_labels": len(entry.get("trained_on", [])),
        "validation_score": validation.get("score"),
        "validation_images": len(validation.get("images", [])),
        "validation_objects": validation.get("objects", 0),
        "dice_after_clicks": click_curve(validation),
    }


def _round(entry: Mapping[str, Any]) -> dict[str, Any]:
    served, candidate = entry.get("served_validation") or {}, entry.get("candidate_validation") or {}
    gate = entry.get("gate") or {}
    return {
        "finished": parse_time(entry.get("finished")),
        "kind": entry.get("kind"),
        "from_version": entry.get("from_version"),
        "promoted": entry.get("promoted"),
        "reason": entry.get("reason", ""),
        "gate": gate or None,
        "served_score": served.get("score"),
        "candidate_score": candidate.get("score"),
        "train_labels": entry.get("train_labels"),
        "new_labels": entry.get("new_labels"),
        "held_back": list((entry.get("held_back") or {}).get("images", [])),
        "steps": entry.get("steps"),
        "seconds": entry.get("seconds"),
        "lr": entry.get("lr"),
        "loss_first": entry.get("loss_first"),
        "loss_last": entry.get("loss_last"),
    }


Events = Iterable[Mapping[str, Any]]


def _served_history(rounds: Events, rollbacks: Events) -> list[dict[str, Any]]:
    """Every change of the served version the manifest remembers, oldest first."""
    events = [
        {"at": parse_time(r.get("finished")), "version": int(r["promoted"]), "event": "promoted"}
        for r in rounds
        if r.get("promoted") is not None
    ]
    events += [{"at": parse_time(b.get("at")), "version": int(b["to"]), "event": "rolled back"} for b in rollbacks]
    return sorted((e for e in events if e["at"] is not None), key=lambda e: str(e["at"]))


def learning_figures(manifest: Mapping[str, Any], running: dict[str, Any] | None) -> dict[str, Any]:
    """The Learning section from the store's manifest and the running round (:func:`round_progress`)."""
    served = int(manifest.get("served", 0))
    versions = [_version(v, served) for v in manifest.get("versions", [])]
    rounds = list(manifest.get("rounds", []))
    return {
        "served_version": served,
        "versions": versions,
        "served_history": _served_history(rounds, manifest.get("rollbacks", [])),
        "rounds": [_round(r) for r in rounds],
        "running_round": running,
        "rollback_to": max((v["version"] for v in versions if v["version"] < served), default=None),
    }


def round_progress(task: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The running training round from MONAI Label's task (``/train/`` with ``check_if_running``), or None.

    Steps, the loss (mean of the last 20) and the rate come from the last step line the training
    process printed; ``seconds_left`` is what the remaining steps take at that rate: an upper bound,
    since the early stop may end the round sooner, and without the gate's scoring after training.
    """
    if not task or task.get("status") != "RUNNING":
        return None
    request = task.get("request") or {}
    progress: dict[str, Any] = {
        "started": parse_time(task.get("start_ts")),
        "kind": request.get("model"),
        "stage": "preparing: loading labels, scoring the served model",
        "step": None,
        "steps": None,
        "loss": None,
        "s_per_step": None,
        "seconds_left": None,
    }
    for line in reversed(list(task.get("details") or [])):
        match = STEP_LINE.search(str(line))
        if match:
            step, steps, rate = int(match.group(1)), int(match.group(2)), float(match.group(4))
            progress.update(stage="training", step=step, steps=steps, loss=float(match.group(3)), s_per_step=rate)
            progress["seconds_left"] = round((steps - step) * rate)
            break
    return progress
