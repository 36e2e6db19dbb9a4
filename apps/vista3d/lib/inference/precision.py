"""Which precision each path runs in, decided on the machine at start-up, with the reason shown.

``--conf precision`` (clicks) and ``--conf auto_precision`` (automatic segmentation) default to
``auto``: a reduced precision is tried where the device has kernels for it (:mod:`.hardware`),
measured on one window pass each way (:mod:`.precision_probe`) and kept only where it is at
least :data:`MIN_SPEEDUP` times faster than float32 and agrees with it at least as well as the
tests pin on real CT (:data:`MIN_AGREEMENT`: clicks' masks at Dice 0.98, automatic label maps at
0.99). Else the path runs in float32. Measurements are cached per machine and weights
(:class:`TrialCache`), so a restart, and every training or scoring process the server starts,
decides at once and the same way.

An explicit ``bf16`` or ``fp16`` is honoured, with a loud warning where the device has no native
support. Scoring (uncertainty, the gate's and early stop's simulated clicks) runs the whole
encoder in one precision as clicks do, and follows the click path; training runs in float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from ..atomic import write_json
from ..model import LoadedModel
from ..settings import PRECISIONS
from .hardware import Support, fingerprint, reduced_support

__all__ = [
    "MIN_AGREEMENT",
    "MIN_SPEEDUP",
    "PATHS",
    "PRECISIONS",
    "RESOLVED",
    "Choice",
    "Precisions",
    "Trial",
    "TrialCache",
    "autocast_dtype",
    "choose",
    "choose_precisions",
]

logger = logging.getLogger(__name__)

RESOLVED = ("fp32", "bf16", "fp16")  # what a path runs in
PATHS = ("click", "auto")  # the paths measured; scoring and training follow from them
MIN_SPEEDUP = 1.1
# Dice against float32, as tests/test_point_head.py and tests/test_auto_infer.py pin them.
MIN_AGREEMENT = {"click": 0.98, "auto": 0.99}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CONF_KEY = {"click": "precision", "auto": "auto_precision"}

Measure = Callable[[str, Support], "Trial"]
"""``measure(path, support)`` -> the trial of ``support.precision`` against float32 on ``path``."""


@dataclass(frozen=True)
class Trial:
    """A reduced precision against float32 on one window pass of one path.

    Attributes:
        fp32_s, reduced_s: the fastest pass of each, in seconds.
        agreement: Dice of the two answers' foreground (1.0 when both are empty).
    """

    fp32_s: float
    reduced_s: float
    agreement: float

    @property
    def speedup(self) -> float:
        return self.fp32_s / max(self.reduced_s, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fp32_s": round(self.fp32_s, 4),
            "reduced_s": round(self.reduced_s, 4),
            "speedup": round(self.speedup, 3),
            "agreement": round(self.agreement, 4),
        }


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for float32."""
    return _DTYPES.get(precision)


@dataclass(frozen=True)
class Choice:
    """A path's precision and why (shown in ``/info`` and the log); ``warning`` when it is against the device."""

    precision: str
    reason: str
    trial: dict[str, Any] | None = None
    warning: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"precision": self.precision, "reason": self.reason}
        if self.trial is not None:
            out["trial"] = self.trial
        if self.warning:
            out["warning"] = True
        return out


@dataclass(frozen=True)
class Precisions:
    """What each path of the served network runs in."""

    click: Choice
    auto: Choice
    scoring: Choice
    training: Choice

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {p: getattr(self, p).as_dict() for p in ("click", "auto", "scoring", "training")}

    def log(self) -> None:
        for path, choice in self.as_dict().items():
            if choice.get("warning"):
                logger.warning(
                    "!" * 20 + " Precision of %s: %s (%s) " + "!" * 20, path, choice["precision"], choice["reason"]
                )
            else:
                logger.info("Precision of %s: %s (%s)", path, choice["precision"], choice["reason"])


def _explicit(path: str, wanted: str, supports: Sequence[Support]) -> Choice:
    key = f"--conf {_CONF_KEY[path]} {wanted}"
    if wanted == "fp32":
        return Choice("fp32", f"set by {key}")
    support = next((s for s in supports if s.precision == wanted), None)
    if support is not None and support.level == "native":
        return Choice(wanted, f"set by {key}; {support.detail}")
    detail = support.detail if support is not None else "it is not tried on this device"
    return Choice(wanted, f"set by {key} although {detail}: expect it to be slower than float32", warning=True)


def _measured(path: str, supports: Sequence[Support], measure: Measure) -> Choice:
    why: list[str] = []
    for support in supports:
        if not support.usable:
            why.append(support.detail)
            continue
        trial = measure(path, support)
        name = support.precision
        if trial.speedup >= MIN_SPEEDUP and trial.agreement >= MIN_AGREEMENT[path]:
            reason = (
                f"{name} measured {trial.speedup:.2f}x faster than float32 on one window pass, "
                f"agreement {trial.agreement:.3f} ({support.detail})"
            )
            return Choice(name, reason, trial.as_dict())
        why.append(
            f"{name} measured {trial.speedup:.2f}x float32's speed at agreement {trial.agreement:.3f} "
            f"(kept only at >= {MIN_SPEEDUP}x and >= {MIN_AGREEMENT[path]}; {support.detail})"
        )
    return Choice("fp32", "; ".join(why) or "no reduced precision to try")


def choose(requested: dict[str, str], supports: Sequence[Support], measure: Measure) -> Precisions:
    """The policy of the module docstring: ``requested`` maps ``click``/``auto`` to a ``--conf`` value."""
    chosen = {
        path: _measured(path, supports, measure)
        if requested[path] == "auto"
        else _explicit(path, requested[path], supports)
        for path in PATHS
    }
    click = chosen["click"]
    scoring = Choice(
        click.precision, f"as clicks (the whole encoder in one precision): {click.reason}", None, click.warning
    )
    training = Choice("fp32", "rounds train in float32 on every device; their early stop and gate score as clicks do")
    return Precisions(click, chosen["auto"], scoring, training)


class TrialCache:
    """Measured trials in a JSON file, keyed by machine, network and path; None keeps nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            logger.warning("Ignoring the unreadable precision trials in %s: %s", self.path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        value = self._read().get(key)
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Replicas starting together each add their own trials.
            with FileLock(str(self.path.with_name(f".{self.path.name}.lock"))):
                write_json(self.path, {**self._read(), key: value})
        except OSError as e:
            logger.warning("Could not keep the precision trials in %s: %s", self.path, e)


def weights_digest(network: torch.nn.Module) -> str:
    """A digest of the network's weights: a trial's agreement belongs to these weights."""
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def choose_precisions(
    requested: dict[str, str],
    model: LoadedModel,
    patch: tuple[int, int, int],
    hu_window: tuple[float, float],
    class_ids: Sequence[int],
    cache: TrialCache,
) -> Precisions:
    """Decide every path's precision for ``model`` on its device (measuring what the cache lacks)."""
    from .precision_probe import auto_trial, click_trial, phantom  # the probe runs the engine, which imports this

    supports = reduced_support(model.device)
    base = f"{fingerprint(model.device)}:{model.preset}:{weights_digest(model.network)}"
    window: list[torch.Tensor] = []

    def measure(path: str, support: Support) -> Trial:
        key = f"{base}:{path}:{support.precision}"
        cached = cache.get(key)
        if cached is not None:
            return Trial(cached["fp32_s"], cached["reduced_s"], cached["agreement"])
        window[:] = window or [phantom(patch, hu_window)]
        start = time.perf_counter()
        if path == "click":
            trial = click_trial(model, patch, window[0], support.precision)
        else:
            trial = auto_trial(model, window[0], class_ids, _DTYPES[support.precision])
        logger.info(
            "Measured %s on the %s path in %.1f s (%d threads): %s",
            support.precision,
            path,
            time.perf_counter() - start,
            torch.get_num_threads(),
            trial.as_dict(),
        )
        cache.put(key, {**trial.as_dict(), "threads": torch.get_num_threads(), "pid": os.getpid()})
        return trial

    return choose(requested, supports, measure)
