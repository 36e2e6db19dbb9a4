"""The real CT the project trains and benchmarks on (``../shared/data``), as cached training volumes.

* the abdominal scan with its TotalSegmentator organ labels mapped to VISTA3D ids;
* sarcoma cases, or any folder laid out like them (``X_ct.nii.gz`` + ``X_gtv.nii.gz``, every label voxel
  above 0 the object), the object as a zero-shot id, or as CT only;
* low-level supervoxels of any CT, computed once and cached as NIfTI beside the other cached files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..labels import LabelDictionary
from ..supervoxels.generate import supervoxels_for_image, write_map
from .data import SARCOMA_ID, CachedVolume, load_volume, remap_lookup, totalseg_lookup

__all__ = [
    "ABDOMEN",
    "SARCOMA_CURVE",
    "SARCOMA_HELDOUT",
    "SARCOMA_STARTER",
    "abdomen_volume",
    "case_names",
    "lowlevel_supervoxels",
    "sarcoma_click_cases",
    "sarcoma_volume",
]

logger = logging.getLogger(__name__)

ABDOMEN = ("totalseg/example_ct.nii.gz", "totalseg/example_seg_fast_force_split.nii.gz")

# The 35 sarcoma cases, split once for every use: the starter weights learn from the first 5, the
# learning curve corrects the next 20 one at a time (labels the starter never saw), and every
# held-out figure (starter, click quality, learning curve) is measured on the last 10.
SARCOMA_STARTER = tuple(f"STS_{i:03d}" for i in range(1, 6))
SARCOMA_CURVE = tuple(f"STS_{i:03d}" for i in range(6, 26))
SARCOMA_HELDOUT = tuple(f"STS_{i:03d}" for i in range(26, 36))


def case_names(folder: Path) -> list[str]:
    """Cases of a folder laid out like ``sts/``: every ``X_ct.nii.gz`` that has an ``X_gtv.nii.gz``."""
    names = sorted(p.name[: -len("_ct.nii.gz")] for p in folder.glob("*_ct.nii.gz"))
    return [n for n in names if (folder / f"{n}_gtv.nii.gz").is_file()]


def lowlevel_supervoxels(image: Path, cache: Path) -> Path:
    """The cached low-level supervoxel map of ``image`` (computed on first use, written atomically)."""
    out = cache / image.name.replace(".nii.gz", "_sv.nii.gz")
    if not out.is_file():
        sv, affine, info = supervoxels_for_image(image)
        write_map(sv, affine, info, out)
        logger.info("lowlevel supervoxels of %s: %d segments in %.1f s", image.name, info["segments"], info["seconds"])
    return out


def abdomen_volume(data: Path, labels: LabelDictionary, supervoxel_cache: Path | None = None) -> CachedVolume:
    """The TotalSegmentator abdominal scan with its organs (and optionally supervoxels)."""
    pair = {"image": str(data / ABDOMEN[0]), "label": str(data / ABDOMEN[1])}
    if supervoxel_cache is not None:
        pair["supervoxels"] = str(lowlevel_supervoxels(data / ABDOMEN[0], supervoxel_cache))
    return load_volume("abdomen", pair, totalseg_lookup(labels), labels.preprocessing)


def sarcoma_volume(
    folder: Path,
    case: str,
    labels: LabelDictionary,
    with_label: bool = True,
    supervoxel_cache: Path | None = None,
    label_id: int = SARCOMA_ID,
) -> CachedVolume:
    """A sarcoma case: the tumour (every label value above 0) as ``label_id``, or the CT alone
    (``with_label=False``)."""
    image = folder / f"{case}_ct.nii.gz"
    pair = {"image": str(image)}
    if with_label:
        pair["label"] = str(folder / f"{case}_gtv.nii.gz")
    if supervoxel_cache is not None:
        pair["supervoxels"] = str(lowlevel_supervoxels(image, supervoxel_cache))
    # load_volume clips label values to the table's 0..255: every value above 0 is the object
    return load_volume(case, pair, remap_lookup(dict.fromkeys(range(1, 256), label_id)), labels.preprocessing)


def sarcoma_click_cases(
    folder: Path, labels: LabelDictionary, cases: Iterable[str] | None = None
) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """Sarcoma cases as :func:`lib.simulate.evaluate_clicks` takes them: (name, preprocessed image,
    tumour mask on the model grid); all cases of ``folder`` unless ``cases`` names some."""
    out = []
    for case in case_names(folder) if cases is None else cases:
        vol = sarcoma_volume(folder, case, labels)
        out.append((case, vol.image, vol.label[0].numpy() == SARCOMA_ID))
    return out
