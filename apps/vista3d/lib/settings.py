"""App settings: MONAI Label's ``--conf key value`` pairs parsed once into a frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .cores import available_cores

# What --conf precision and auto_precision take (lib.inference.precision resolves "auto").
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

__all__ = ["AUTH_MODES", "PRECISIONS", "PRESETS", "Settings", "redact_url", "state_dir", "users_path"]

PRESETS = ("small", "vista3d")
AUTH_MODES = ("auto", "on", "off")


def state_dir(studies: str, app_dir: str | Path) -> Path:
    """Where the app keeps what belongs to a team's datastore (zero-shot names, users, learned models).

    A local datastore keeps it in ``<studies>/.vista3d``; a DICOMweb one in the app's ``model/`` folder.
    """
    if studies.startswith(("http://", "https://")):
        return Path(app_dir) / "model"
    return Path(studies) / ".vista3d"


def users_path(users: str | Path | None, studies: str, app_dir: str | Path) -> Path:
    """The user store: ``--conf users`` when given, else ``users.json`` in the state folder (:func:`state_dir`).

    The server's edge, its start log and ``tools/users.py`` all read this one path.
    """
    return Path(users) if users else state_dir(studies, app_dir) / "users.json"


def _parse_positive_int(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--conf {key} must be an integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"--conf {key} must be at least 1, got {n}")
    return n


def redact_url(url: str) -> str:
    """``url`` without its password (settings and errors are logged; a password in a URL must not be)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _parse_state(value: str) -> str:
    """Empty (SQLite in the state folder) or a PostgreSQL URL."""
    url = value.strip()
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            f"--conf state must be empty (SQLite) or postgresql://user@host:port/db, got {redact_url(url)!r}"
        )
    return url


MAX_TRAIN_CLICKS = 20  # as a /train request's clicks (lib.trainers.request)


def _parse_number(key: str, value: str, kind: type, minimum: float) -> Any:
    try:
        n = kind(value)
    except ValueError:
        raise ValueError(f"--conf {key} must be a number, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"--conf {key} must be at least {minimum}, got {n}")
    return n


def _parse_device(key: str, value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether that GPU exists is checked at start-up."""
    value = value.strip()
    index = value.removeprefix("cuda:")
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and index.isdigit()):
        return value
    raise ValueError(f"--conf {key} must be auto, cpu, cuda or cuda:N, got {value!r}")


def _parse_fraction(key: str, value: str) -> float:
    n = _parse_number(key, value, float, minimum=0.0)
    if not 0.0 < n <= 1.0:
        raise ValueError(f"--conf {key} must be in (0, 1], got {n}")
    return float(n)


def _parse_origins(value: str) -> tuple[str, ...]:
    """``https://a.example, https://b.example`` -> a tuple; ``*`` is refused (it would admit every site)."""
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        if not origin.startswith(("http://", "https://")) or "*" in origin:
            raise ValueError(f"--conf cors_origins takes origins such as https://viewer.example, got {origin!r}")
    return origins


@dataclass(frozen=True)
class Settings:
    """What the server runs with.

    Attributes:
        preset: ``small`` (16-filter SegResNetDS2 encoder, 5.7M parameters, CPU friendly) or
            ``vista3d`` (the published 218M-parameter ``vista3d132``).
        weights: checkpoint path; ``official`` (the default of ``vista3d``) downloads the published
            checkpoint (md5 checked) into the app's ``model/`` folder; ``starter`` (the default of
            ``small``) is the checkpoint shipped in ``weights/``; ``none`` means random
            initialisation (a loud warning).
        device: ``auto`` (the current GPU where the installed torch has kernels for it, else the CPU;
            the log says why), ``cpu`` or ``cuda[:N]`` (checked at start, made the current device).
        train_device: where training rounds and scoring run: ``auto`` (the server's device; on a GPU
            only when the round's estimate fits under ``train_gpu_memory_fraction`` and in the free
            memory, else the round is refused with the reason, see ``lib.inference.gpu_memory``),
            ``cpu`` or ``cuda[:N]``.
        gpu_memory_fraction: the share of its GPU's memory the server process may allocate
            (``torch.cuda.set_per_process_memory_fraction``); the rest is for rounds and CUDA contexts.
        train_gpu_memory_fraction: the same cap for a training or scoring process on a GPU.
        auto_gpu_memory_mb: ``auto_memory_mb`` on a GPU (0: a quarter of what the server may allocate).
        threads: torch intra-op threads; defaults to the cores this process may use (its CPU
            affinity, bounded by a cgroup CPU quota).
        precision: the click path's: ``auto`` (default) decides at start-up from the device and a
            one-window measurement (:mod:`.inference.precision`; ``/info`` says what and why),
            ``fp32`` runs it in float32, ``bf16``/``fp16`` run its convolutions and matrix products
            under that autocast (honoured with a loud warning where the device lacks native support).
        auto_precision: the automatic path's, chosen the same way: a reduced precision runs every
            stage but the encoder's full-resolution level in it (see :mod:`.inference.auto_forward`);
            ``fp32`` gives the reference's label map.
        session_cache_mb: memory budget of the per-image session state (preprocessed image,
            previous result, cached encoder features); least recently used images are dropped.
        auto_memory_mb: the stitching buffer of one automatic segmentation; a larger image is
            stitched in blocks (see :mod:`.auto_plan`), so memory stays bounded and time grows.
        train_trigger: a point-branch fine-tune starts once this many ``final`` labels are new
            since the last training (0 turns the automatic loop off; ``/train`` still works).
        train_debounce_s: seconds to wait after the triggering save, so a burst of submits makes
            one training rather than several.
        train_threads: torch threads of a training round (and of scoring); defaults to half the
            cores. Rounds run at the lowest CPU priority, so clicks take every core meanwhile and
            automatic segmentations the rest (``lib.server.threads``).
        train_steps: optimiser steps of one fine-tuning round at most (a ``/train`` request may override).
        train_steps_per_label: a round that trains the shared encoder runs at most this many steps per
            training label (0: no such cap), so that a round on a few labels stops before it has learned
            them by heart (docs/continual-learning.md).
        promote_tolerance: a candidate replaces the served model unless the gate finds it worse than the
            served model by more than this (see ``lib.trainers.gate``).
        train_lr: base peak learning rate of a round (it falls as the served model has learned more labels).
        train_patience: early-stop checks without a better training-label score before a point round
            stops; 0 runs every step and lets the gate decide alone.
        train_holdback: a round's newest final labels (not yet learned by the served version) it keeps
            out of its training, so that the gate judges the candidate on them; the next round trains
            on them (at least 1; see ``lib.trainers.split.hold_back``).
        train_clicks: simulated clicks per object when a round scores the served model and the
            candidate for the gate (1..20; fewer: a faster round on less evidence).
        model_store: folder of learned versions, the validation split and the manifest; default
            ``<studies>/.vista3d/models`` (the app's ``model/`` folder for a DICOMweb datastore).
        auth: ``auto`` (the default: sign-in is required as soon as the user store holds a user),
            ``on`` or ``off``. Serving on a non-loopback address with auth off needs ``auth=off``.
        users: the user store (JSON); default ``users.json`` in the state folder (:func:`state_dir`).
        state: the state store every replica shares (zero-shot names, the training lease): empty for
            SQLite (``state.db`` in the state folder, one machine), or a PostgreSQL URL
            ``postgresql://user@host:port/db`` for replicas on several machines (``lib.state``).
        cors_origins: comma-separated origins allowed to call the server from another site's pages
            (with credentials); none by default, and never ``*``.
        token_hours: lifetime of a sign-in token or session cookie.
        max_points: clicks per request; more get HTTP 400, so that no request holds the server for long.
        zero_shot_names_per_hour: new zero-shot label names one user may create per hour.
        session_idle_s: a user's session on an image (result, clicks) is dropped after this many
            seconds without a request; their next click starts from their last saved label.
        queue_max: inference requests queued or running at once; one more gets HTTP 503.
        queue_wait_s: a request that has not started after this many seconds gets HTTP 503 (with
            ``Retry-After``) instead of waiting on.
        run_limit_s: an automatic segmentation still running after this many seconds stops at its
            next network stage with HTTP 503, so that no request holds the compute slot without end.
    """

    preset: str = "small"
    weights: str = "starter"
    device: str = "auto"
    train_device: str = "auto"
    gpu_memory_fraction: float = 0.5
    train_gpu_memory_fraction: float = 0.45
    auto_gpu_memory_mb: int = 0
    threads: int = field(default_factory=available_cores)
    precision: str = "auto"
    auto_precision: str = "auto"
    session_cache_mb: int = 4096
    auto_memory_mb: int = 2048
    train_trigger: int = 5
    train_debounce_s: float = 30.0
    train_threads: int = field(default_factory=lambda: max(1, available_cores() // 2))
    train_steps: int = 300
    train_steps_per_label: int = 20
    promote_tolerance: float = 0.01
    train_lr: float = 1e-4
    train_patience: int = 3
    train_holdback: int = 1
    train_clicks: int = 5
    model_store: str = ""
    auth: str = "auto"
    users: str = ""
    state: str = field(default="", repr=False)  # may hold a password: logged through redact_url only
    cors_origins: tuple[str, ...] = ()
    token_hours: float = 12.0
    max_points: int = 200
    zero_shot_names_per_hour: int = 20
    session_idle_s: float = 3600.0
    queue_max: int = 16
    queue_wait_s: float = 300.0
    run_limit_s: float = 1800.0

    @classmethod
    def from_conf(cls, conf: dict[str, Any]) -> Settings:
        """Parse MONAI Label's conf dict; unknown keys are left to MONAI Label itself."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in conf.items():
            if key not in known:
                continue
            value = str(raw)
            if key == "preset":
                if value not in PRESETS:
                    raise ValueError(f"--conf preset must be one of {PRESETS}, got {value!r}")
                values[key] = value
            elif key in ("precision", "auto_precision"):
                if value not in PRECISIONS:
                    raise ValueError(f"--conf {key} must be one of {PRECISIONS}, got {value!r}")
                values[key] = value
            elif key == "auth":
                if value not in AUTH_MODES:
                    raise ValueError(f"--conf auth must be one of {AUTH_MODES}, got {value!r}")
                values[key] = value
            elif key in ("device", "train_device"):
                values[key] = _parse_device(key, value)
            elif key in ("gpu_memory_fraction", "train_gpu_memory_fraction"):
                values[key] = _parse_fraction(key, value)
            elif key == "auto_gpu_memory_mb":
                values[key] = _parse_number(key, value, int, minimum=0)
            elif key == "state":
                values[key] = _parse_state(value)
            elif key == "cors_origins":
                values[key] = _parse_origins(value)
            elif key in (
                "threads",
                "session_cache_mb",
                "auto_memory_mb",
                "train_steps",
                "train_threads",
                "train_holdback",
                "max_points",
                "zero_shot_names_per_hour",
                "queue_max",
            ):
                values[key] = _parse_positive_int(key, value)
            elif key == "token_hours":
                values[key] = _parse_number(key, value, float, minimum=0.01)
            elif key in ("session_idle_s", "queue_wait_s", "run_limit_s"):
                values[key] = _parse_number(key, value, float, minimum=1.0)
            elif key == "train_clicks":
                values[key] = _parse_number(key, value, int, minimum=1)
                if values[key] > MAX_TRAIN_CLICKS:
                    raise ValueError(f"--conf {key} must be at most {MAX_TRAIN_CLICKS}, got {values[key]}")
            elif key in ("train_trigger", "train_patience", "train_steps_per_label"):
                values[key] = _parse_number(key, value, int, minimum=0)
            elif key == "train_lr":
                values[key] = _parse_number(key, value, float, minimum=1e-8)
            elif key in ("train_debounce_s", "promote_tolerance"):
                values[key] = _parse_number(key, value, float, minimum=0.0)
            else:
                values[key] = value.strip()
        if "weights" not in values:
            values["weights"] = "official" if values.get("preset", cls.preset) == "vista3d" else "starter"
        return cls(**values)
