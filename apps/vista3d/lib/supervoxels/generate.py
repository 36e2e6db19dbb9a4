"""Supervoxel maps for the images of a datastore: ``<studies>/.vista3d/supervoxels/<image id>.nii.gz``.

Resumable (existing maps are skipped), atomic (temp file, then rename: a killed run leaves no half
map), with a JSON sidecar saying which mode ("sam" or "lowlevel") and settings produced each map.
The point trainer picks the maps up as zero-shot objects (:mod:`lib.trainers.supervoxel_objects`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ..atomic import write_json
from .slic import LOWLEVEL_CONFIG, SlicConfig, lowlevel_features, supervoxels_from_features

__all__ = ["datastore_images", "generate", "output_path", "supervoxels_for_image"]

logger = logging.getLogger(__name__)

EXTENSIONS = (".nii.gz", ".nii")


def image_id(path: Path) -> str:
    """MONAI Label's local image id: the file name without its extension."""
    for ext in EXTENSIONS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def datastore_images(studies: Path) -> Iterator[Path]:
    """The NIfTI images of a local datastore folder (not its labels or hidden folders)."""
    for p in sorted(studies.iterdir()):
        if p.is_file() and p.name.endswith(EXTENSIONS):
            yield p


def output_path(studies: Path, image: Path, out: Path | None = None) -> Path:
    return (out or studies / ".vista3d" / "supervoxels") / f"{image_id(image)}.nii.gz"


def supervoxels_for_image(
    path: str | Path, config: SlicConfig | None = None, sam: Any = None, slices_per_batch: int = 8
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(uint16 supervoxels on the image grid, its affine, info): SAM features when ``sam`` is given."""
    start = time.perf_counter()
    img = cast(nib.Nifti1Image, nib.load(str(path)))
    hu = np.asarray(img.dataobj, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"{path}: a 3D CT is needed, got shape {hu.shape}")
    if sam is not None:
        from .sam_features import sam_feature_volume

        mode, cfg = "sam", config or SlicConfig()
        features = sam_feature_volume(hu, sam, slices_per_batch)
    else:
        mode, cfg = "lowlevel", config or LOWLEVEL_CONFIG
        features = lowlevel_features(hu)
    sv = supervoxels_from_features(features, hu, cfg)
    info = {
        "mode": mode,
        "n_segments": cfg.n_segments,
        "compactness": cfg.compactness,
        "sigma": cfg.sigma,
        "segments": int(len(np.unique(sv)) - (1 if (sv == 0).any() else 0)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return sv, np.asarray(img.affine), info


def write_map(sv: np.ndarray, affine: np.ndarray, info: dict[str, Any], out: Path) -> None:
    """The map and its sidecar, each written to a temp file and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp.nii.gz")
    os.close(fd)
    try:
        nib.save(nib.Nifti1Image(sv, affine), tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_json(out.with_name(out.name.replace(".nii.gz", ".json")), info)


def generate(
    studies: Path, config: SlicConfig | None = None, sam: Any = None, out: Path | None = None, slices_per_batch: int = 8
) -> list[dict[str, Any]]:
    """Maps for every image without one; returns the info of those made."""
    images = list(datastore_images(studies))
    todo = [p for p in images if not output_path(studies, p, out).is_file()]
    logger.info("%d images, %d without supervoxels (mode %s)", len(images), len(todo), "sam" if sam else "lowlevel")
    made = []
    bar = tqdm(todo, desc="supervoxels", unit="volume", file=sys.stderr)
    for path in bar:
        sv, affine, info = supervoxels_for_image(path, config, sam, slices_per_batch)
        write_map(sv, affine, {**info, "image": path.name}, output_path(studies, path, out))
        bar.set_postfix(s_per_volume=info["seconds"], segments=info["segments"])
        logger.info(
            "%s: %s supervoxels, %d segments in %.1f s", path.name, info["mode"], info["segments"], info["seconds"]
        )
        made.append(info)
    return made
