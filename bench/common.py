"""What the benchmarks share: case parsing, the simulated annotator, Dice, the app's library on the path."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
sys.path.insert(0, str(ROOT / "apps" / "vista3d"))

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Case:
    """A CT and the one object to segment in it.

    The object is the voxels of ``label`` equal to ``value`` (any non-zero voxel when None); it is
    prompted with global id ``class_id`` (default: the first zero-shot id, for structures such as
    sarcoma that are not VISTA3D classes).
    """

    name: str
    image: Path
    label: Path
    value: int | None = None
    class_id: int = 133

    def ground_truth(self) -> np.ndarray:
        data = np.asarray(nib.load(str(self.label)).dataobj)
        return data == self.value if self.value is not None else data > 0


def parse_case(spec: str) -> Case:
    """A case from ``X_ct.nii.gz`` (label ``X_gtv.nii.gz`` beside it) or ``image:label[:value[:class_id]]``."""
    parts = spec.split(":")
    image = Path(parts[0])
    if len(parts) == 1:
        if "_ct" not in image.name:
            raise SystemExit(f"{spec}: name the label as image:label, or use the X_ct / X_gtv naming")
        label = image.with_name(image.name.replace("_ct", "_gtv"))
        return Case(image.name.split("_ct")[0], image, label)
    value = int(parts[2]) if len(parts) > 2 else None
    class_id = int(parts[3]) if len(parts) > 3 else 133
    name = image.name.split(".")[0] + (f"#{value}" if value is not None else "")
    return Case(name, image, Path(parts[1]), value, class_id)


def deepest_voxel(mask: np.ndarray) -> np.ndarray:
    """The voxel farthest from the mask's boundary: where an annotator clicks."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return np.asarray(np.unravel_index(int(np.argmax(dist)), mask.shape))


def next_click(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The simulated annotator: a click at the centre of the largest error region.

    Positive when that region is missed foreground, negative when it is a false positive.
    """
    best: tuple[int, np.ndarray, bool] | None = None
    for region, positive in ((truth & ~prediction, True), (prediction & ~truth, False)):
        labelled, n = ndimage.label(region, structure=STRUCTURE_26)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), labelled == k + 1, positive)
    if best is None:
        return None
    return deepest_voxel(best[1]), best[2]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def multiclass_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two label maps over all foreground classes at once (same id in both counts)."""
    total = int((a > 0).sum()) + int((b > 0).sum())
    return 1.0 if total == 0 else 2.0 * int(((a == b) & (a > 0)).sum()) / total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
