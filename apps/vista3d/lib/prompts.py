"""Request parameters from OHIF, Slicer or the REST API parsed once into typed prompts.

Everything a client can get wrong is checked here and reported as :class:`PromptError`, which the
infer task turns into HTTP 400 with the message unchanged.

Accepted forms:
    * OHIF auto tab:   ``{"label_prompt": [1, 3, ...]}`` (no ``label_prompt`` = everything).
    * OHIF point tab:  ``{"points": [[i, j, k], ...], "point_labels": [1, ..., 0, ...], "label_prompt": [id]}``.
    * 3D Slicer:       ``{"label": "name", "foreground": [[i, j, k], ...], "background": [[i, j, k], ...]}``.
Points are voxel indices of the original image (OHIF sends ``worldToIndex`` of the click).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST, LabelDictionary
from .zero_shot import ZeroShotRegistry

__all__ = ["AutoPrompt", "PointPrompt", "PromptError", "parse_prompt"]


class PromptError(ValueError):
    """A request parameter is malformed or not supported; the message names it."""


@dataclass(frozen=True)
class AutoPrompt:
    """Segment these classes everywhere with the class head."""

    class_ids: tuple[int, ...]


@dataclass(frozen=True)
class PointPrompt:
    """Clicks for one object.

    Attributes:
        points: [N, 3] voxel indices (i, j, k) in the original image.
        positive: [N] True for a positive click.
        class_id: global id of the object; above 132 the point head runs zero-shot.
        new_name: set when a name unknown to VISTA3D was mapped to ``class_id`` by this request.
    """

    points: np.ndarray
    positive: np.ndarray
    class_id: int
    new_name: str | None = None

    @property
    def zero_shot(self) -> bool:
        return self.class_id >= ZERO_SHOT_FIRST

    def check_inside(self, shape: Sequence[int]) -> None:
        """Reject points outside an image of the given spatial shape."""
        for n, p in enumerate(self.points):
            if any(c < 0 or c >= s for c, s in zip(p, shape, strict=False)):
                raise PromptError(f"point {n} {p.tolist()} lies outside the image of shape {list(shape)}")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PromptError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, str):
        value = value.strip()
        if not value.lstrip("-").isdigit():
            raise PromptError(f"{what} must be an integer, got {value!r}")
        return int(value)
    if isinstance(value, float) and not value.is_integer():
        raise PromptError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _parse_points(raw: Any, what: str) -> np.ndarray:
    if not isinstance(raw, (list, tuple)):
        raise PromptError(f"{what} must be a list of [i, j, k] voxel indices, got {raw!r}")
    out = []
    for n, p in enumerate(raw):
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise PromptError(f"{what}[{n}] must be [i, j, k], got {p!r}")
        out.append([_as_int(c, f"{what}[{n}]") for c in p])
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


class _Resolver:
    """Turns ids and names into global ids, knowing which are served."""

    def __init__(self, labels: LabelDictionary, registry: ZeroShotRegistry) -> None:
        self.labels = labels
        self.registry = registry

    def class_id(self, raw: Any, what: str, allow_new_name: bool) -> tuple[int, str | None]:
        if isinstance(raw, str) and not raw.strip().lstrip("-").isdigit():
            known = self.labels.id_for_name(raw)
            if known is not None:
                return self._check_served(known, what), None
            if not allow_new_name:
                raise PromptError(f"{what} {raw!r} is not a VISTA3D class; unseen structures need point prompts")
            existing = self.registry.lookup(raw)
            if existing is not None:
                return existing, None
            return self.registry.assign(raw), raw.strip().lower()
        return self._check_served(_as_int(raw, what), what), None

    def _check_served(self, i: int, what: str) -> int:
        if i in self.labels.unsupported:
            raise PromptError(f"{what} {i} ({self.labels.classes[i]}) is not supported by VISTA3D")
        if i in self.labels.classes or ZERO_SHOT_FIRST <= i <= ZERO_SHOT_LAST:
            return i
        raise PromptError(
            f"{what} {i} is not a class id: use 1..132 for VISTA3D classes or "
            f"{ZERO_SHOT_FIRST}..{ZERO_SHOT_LAST} for zero-shot structures"
        )


def _parse_auto(params: Mapping[str, Any], resolver: _Resolver) -> AutoPrompt:
    raw = params.get("label_prompt")
    labels = resolver.labels
    if raw is None:
        return AutoPrompt(labels.everything)
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    if len(raw) == 0:
        raise PromptError("label_prompt is empty: list class ids, or leave it out to segment everything")
    ids = [resolver.class_id(r, f"label_prompt[{n}]", allow_new_name=False)[0] for n, r in enumerate(raw)]
    zero_shot = [i for i in ids if i >= ZERO_SHOT_FIRST]
    if zero_shot:
        raise PromptError(f"label_prompt {zero_shot} are zero-shot ids: they need point prompts")
    return AutoPrompt(tuple(labels.expand_groups(ids)))


def _parse_point_labels(raw: Any, n_points: int) -> np.ndarray:
    if not isinstance(raw, (list, tuple)):
        raise PromptError(f"point_labels must be a list of 0/1 (one per point), got {raw!r}")
    if len(raw) != n_points:
        raise PromptError(f"points has {n_points} entries but point_labels has {len(raw)}: give one label per point")
    values = [_as_int(v, f"point_labels[{n}]") for n, v in enumerate(raw)]
    bad = [v for v in values if v not in (0, 1, 2, 3)]
    if bad:
        raise PromptError(f"point_labels must be 1 (positive) or 0 (negative), got {bad}")
    return np.asarray([v in (1, 3) for v in values], dtype=bool)


def _parse_points_prompt(params: Mapping[str, Any], resolver: _Resolver) -> PointPrompt:
    if "foreground" in params or "background" in params:  # 3D Slicer's MONAI Label module
        fg = _parse_points(params.get("foreground") or [], "foreground")
        bg = _parse_points(params.get("background") or [], "background")
        points = np.concatenate([fg, bg])
        positive = np.asarray([True] * len(fg) + [False] * len(bg), dtype=bool)
        raw_label = params.get("label_prompt", params.get("label"))
    else:
        points = _parse_points(params["points"], "points")
        positive = _parse_point_labels(params.get("point_labels"), len(points))
        raw_label = params.get("label_prompt")
    if len(points) == 0:
        raise PromptError("no points given: send at least one click")
    if raw_label is None:
        raise PromptError("point prompts need one label_prompt (the object's class id or a name)")
    if isinstance(raw_label, (list, tuple)):
        if len(raw_label) != 1:
            raise PromptError(f"point prompts segment one object: label_prompt must hold one id, got {list(raw_label)}")
        raw_label = raw_label[0]
    class_id, new_name = resolver.class_id(raw_label, "label_prompt", allow_new_name=True)
    if class_id in resolver.labels.groups:
        members = list(resolver.labels.groups[class_id])
        raise PromptError(f"label_prompt {class_id} is a group of classes {members}: click on one of them instead")
    return PointPrompt(points, positive, class_id, new_name)


def parse_prompt(
    params: Mapping[str, Any], labels: LabelDictionary, registry: ZeroShotRegistry
) -> AutoPrompt | PointPrompt:
    """Parse an infer request's parameters; points make it interactive, otherwise it is automatic."""
    resolver = _Resolver(labels, registry)
    has_points = any(params.get(k) not in (None, []) for k in ("points", "foreground", "background"))
    if has_points:
        return _parse_points_prompt(params, resolver)
    if params.get("point_labels"):
        raise PromptError("point_labels given without points")
    return _parse_auto(params, resolver)
