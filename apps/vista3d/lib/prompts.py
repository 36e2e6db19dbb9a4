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

__all__ = [
    "DEFAULT_MAX_POINTS",
    "AutoPrompt",
    "OutputOptions",
    "PointPrompt",
    "PromptError",
    "is_interactive",
    "parse_output",
    "parse_prompt",
]

DEFAULT_MAX_POINTS = 200
MAX_NAME = 64
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32")


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


# Voxel indices and class ids are far below this; larger numbers (1e308) are refused, not overflowed.
_MAX_ABS = 2**31 - 1


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PromptError(f"{what} must be an integer, got {_short(value)}")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("-").isdigit() or len(text) > 11:
            raise PromptError(f"{what} must be an integer, got {_short(value)}")
        value = int(text)
    elif isinstance(value, float) and not value.is_integer():  # also NaN and infinities
        raise PromptError(f"{what} must be an integer, got {_short(value)}")
    if abs(value) > _MAX_ABS:
        raise PromptError(f"{what} must be an integer of at most {_MAX_ABS} in magnitude, got {_short(value)}")
    return int(value)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages quote what the client sent, not megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _parse_points(raw: Any, what: str, max_points: int) -> np.ndarray:
    if not isinstance(raw, (list, tuple)):
        raise PromptError(f"{what} must be a list of [i, j, k] voxel indices, got {_short(raw)}")
    if len(raw) > max_points:
        raise PromptError(f"{what} has {len(raw)} clicks; at most {max_points} per request (--conf max_points)")
    out = []
    for n, p in enumerate(raw):
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise PromptError(f"{what}[{n}] must be [i, j, k], got {_short(p)}")
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
                raise PromptError(f"{what} {_short(raw)} is not a VISTA3D class; unseen structures need point prompts")
            existing = self.registry.lookup(raw)
            if existing is not None:
                return existing, None
            name = raw.strip().lower()
            if len(name) > MAX_NAME:
                raise PromptError(f"{what}: zero-shot names have at most {MAX_NAME} characters, got {len(name)}")
            return self.registry.peek(name), name
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
        raise PromptError(f"point_labels must be a list of 0/1 (one per point), got {_short(raw)}")
    if len(raw) != n_points:
        raise PromptError(f"points has {n_points} entries but point_labels has {len(raw)}: give one label per point")
    values = [_as_int(v, f"point_labels[{n}]") for n, v in enumerate(raw)]
    bad = [v for v in values if v not in (0, 1, 2, 3)]
    if bad:
        raise PromptError(f"point_labels must be 1 (positive) or 0 (negative), got {bad}")
    return np.asarray([v in (1, 3) for v in values], dtype=bool)


def _parse_points_prompt(params: Mapping[str, Any], resolver: _Resolver, max_points: int) -> PointPrompt:
    if "foreground" in params or "background" in params:  # 3D Slicer's MONAI Label module
        fg = _parse_points(params.get("foreground") or [], "foreground", max_points)
        bg = _parse_points(params.get("background") or [], "background", max_points - len(fg))
        points = np.concatenate([fg, bg])
        positive = np.asarray([True] * len(fg) + [False] * len(bg), dtype=bool)
        raw_label = params.get("label_prompt", params.get("label"))
    else:
        points = _parse_points(params["points"], "points", max_points)
        positive = _parse_point_labels(params.get("point_labels"), len(points))
        raw_label = params.get("label_prompt")
    if len(points) == 0:
        raise PromptError("no points given: send at least one click")
    if raw_label is None:
        raise PromptError("point prompts need one label_prompt (the object's class id or a name)")
    if isinstance(raw_label, (list, tuple)):
        if len(raw_label) != 1:
            raise PromptError(
                f"point prompts segment one object: label_prompt must hold one id, got {_short(raw_label)}"
            )
        raw_label = raw_label[0]
    class_id, new_name = resolver.class_id(raw_label, "label_prompt", allow_new_name=True)
    if class_id in resolver.labels.groups:
        members = list(resolver.labels.groups[class_id])
        raise PromptError(f"label_prompt {class_id} is a group of classes {members}: click on one of them instead")
    return PointPrompt(points, positive, class_id, new_name)


def is_interactive(params: Mapping[str, Any]) -> bool:
    """Whether a request carries clicks (then it is interactive; otherwise automatic)."""
    return any(params.get(k) not in (None, []) for k in ("points", "foreground", "background"))


def parse_prompt(
    params: Mapping[str, Any], labels: LabelDictionary, registry: ZeroShotRegistry, max_points: int = DEFAULT_MAX_POINTS
) -> AutoPrompt | PointPrompt:
    """Parse an infer request's parameters; points make it interactive, otherwise it is automatic.

    Nothing is registered here: a new zero-shot name comes back as ``new_name`` with the id it
    would get now, and the caller reserves it (:meth:`.ZeroShotRegistry.reserve`) once the request
    is known to be valid.
    """
    resolver = _Resolver(labels, registry)
    if is_interactive(params):
        return _parse_points_prompt(params, resolver, max_points)
    if params.get("point_labels"):
        raise PromptError("point_labels given without points")
    return _parse_auto(params, resolver)


@dataclass(frozen=True)
class OutputOptions:
    """How the result file is written: extension and dtype from an allow-list (they become a file name and a cast)."""

    extension: str = RESULT_EXTENSIONS[0]
    dtype: str = RESULT_DTYPES[0]
    compress: bool = False


def parse_output(params: Mapping[str, Any]) -> OutputOptions:
    """``result_extension``, ``result_dtype`` and ``result_compress`` of a request (absent: the defaults)."""
    extension = params.get("result_extension") or RESULT_EXTENSIONS[0]
    if extension not in RESULT_EXTENSIONS:
        raise PromptError(f"result_extension must be one of {list(RESULT_EXTENSIONS)}, got {_short(extension)}")
    dtype = params.get("result_dtype") or RESULT_DTYPES[0]
    if dtype not in RESULT_DTYPES:
        raise PromptError(f"result_dtype must be one of {list(RESULT_DTYPES)}, got {_short(dtype)}")
    compress = params.get("result_compress", False)
    if not isinstance(compress, bool):
        raise PromptError(f"result_compress must be true or false, got {_short(compress)}")
    return OutputOptions(str(extension), str(dtype), compress)
