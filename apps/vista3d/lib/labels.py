"""The VISTA3D label dictionary: class ids, groups, special classes and preprocessing constants.

Every constant about classes is read from ``vista3d_labels.json`` (a copy of the published bundle's
``metadata.json``/``inference.json`` values) so that no two modules can disagree about them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ZERO_SHOT_FIRST", "ZERO_SHOT_LAST", "LabelDictionary", "Preprocessing", "load_label_dictionary"]

LABELS_JSON = Path(__file__).with_name("vista3d_labels.json")

# Class ids above the last supported class (132) are read by the point head as "zero-shot";
# 254 keeps every id representable in the uint8 label maps that OHIF reads.
ZERO_SHOT_FIRST = 133
ZERO_SHOT_LAST = 254


@dataclass(frozen=True)
class Preprocessing:
    """Image preprocessing of the published bundle."""

    spacing_mm: tuple[float, float, float]
    orientation: str
    hu_window: tuple[float, float]
    crop_margin: int


@dataclass(frozen=True)
class LabelDictionary:
    """VISTA3D's global class ids and their roles.

    Attributes:
        classes: global id -> name (lower case), all 132 trained ids.
        unsupported: ids the published model does not segment reliably; rejected in requests.
        special: ids whose point prompts use labels 2/3 instead of 0/1 (tumours, vessels...).
        groups: group id -> member ids (kidney, lung, bone); auto requests expand them.
        everything: ids segmented when an auto request names no class.
        preprocessing: the bundle's preprocessing constants.
        patch_size: the bundle's sliding-window patch.
        sw_overlap: the bundle's sliding-window overlap.
    """

    classes: dict[int, str]
    unsupported: frozenset[int]
    special: frozenset[int]
    groups: dict[int, tuple[int, ...]]
    everything: tuple[int, ...]
    preprocessing: Preprocessing
    patch_size: tuple[int, int, int]
    sw_overlap: float

    @property
    def supported(self) -> dict[int, str]:
        """Ids a client may ask for by class (the 127 served classes)."""
        return {i: n for i, n in self.classes.items() if i not in self.unsupported}

    def served_labels(self) -> dict[str, int]:
        """Lower-case name -> global id, as MONAI Label's ``/info`` and the OHIF panel expect."""
        return {name: i for i, name in sorted(self.supported.items())}

    def id_for_name(self, name: str) -> int | None:
        """Global id of a class name (case-insensitive), None when it is not a VISTA3D class."""
        wanted = name.strip().lower()
        for i, n in self.classes.items():
            if n == wanted:
                return i
        return None

    def expand_groups(self, ids: list[int]) -> list[int]:
        """Replace group ids by their members, keeping order and dropping duplicates."""
        out: list[int] = []
        for i in ids:
            for j in self.groups.get(i, (i,)):
                if j not in out:
                    out.append(j)
        return out


def _parse(raw: dict) -> LabelDictionary:
    pre = raw["preprocessing"]
    return LabelDictionary(
        classes={int(k): v.lower() for k, v in raw["classes"].items()},
        unsupported=frozenset(int(i) for i in raw["unsupported"]),
        special=frozenset(int(i) for i in raw["special_point_classes"]),
        groups={int(k): tuple(int(i) for i in v) for k, v in raw["groups"].items()},
        everything=tuple(int(i) for i in raw["everything"]),
        preprocessing=Preprocessing(
            spacing_mm=tuple(float(s) for s in pre["spacing_mm"]),  # type: ignore[arg-type]
            orientation=str(pre["orientation"]),
            hu_window=(float(pre["intensity_window_hu"][0]), float(pre["intensity_window_hu"][1])),
            crop_margin=int(pre["crop_foreground_margin"]),
        ),
        patch_size=tuple(int(s) for s in raw["inference"]["patch_size"]),  # type: ignore[arg-type]
        sw_overlap=float(raw["inference"]["sliding_window_overlap"]),
    )


@lru_cache(maxsize=1)
def load_label_dictionary(path: str | None = None) -> LabelDictionary:
    """Read the label dictionary (the packaged copy unless ``path`` is given)."""
    with open(path or LABELS_JSON) as f:
        return _parse(json.load(f))


def official_checkpoint(path: str | None = None) -> tuple[str, str]:
    """URL and md5 of the published ``vista3d132`` checkpoint."""
    with open(path or LABELS_JSON) as f:
        ck = json.load(f)["official_checkpoint"]
    return str(ck["url"]), str(ck["md5"])
