"""Where the automatic path's windows go and how the volume is split to stay within a memory budget.

The windows are exactly those of MONAI's ``SlidingWindowInferer`` (same starts on every axis), so
that averaging their outputs gives the reference's answer. Along axis 0 the stitching always
streams (see :mod:`.auto_infer`), which costs nothing; the volume is cut into blocks across axes 1
and 2 only when the streaming buffer would still exceed the budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MIN_BLOCK", "AutoPlan", "Block", "axis_starts", "plan_blocks"]

_BYTES_PER_VALUE = 4  # float32 stitching
MIN_BLOCK = 16  # voxels: the narrowest block side a budget may ask for


def axis_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI's ``_get_scan_interval`` and ``dense_patch_slices``.

    The interval is ``int(patch * (1 - overlap))`` (at least 1, the whole patch when the axis is
    one patch long); the last window is shifted back to end at the volume's edge.
    """
    if size < patch:
        raise ValueError(f"axis of {size} voxels is shorter than the window ({patch}); pad it first")
    interval = patch if size == patch else max(int(patch * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / interval)) if d * interval + patch >= size) + 1
    return [min(i * interval, size - patch) for i in range(count)]


@dataclass(frozen=True)
class Block:
    """A box across axes 1 and 2 (all of axis 0) stitched on its own.

    Attributes:
        lo: first voxel on axes 1 and 2.
        hi: one past the last voxel on axes 1 and 2.
    """

    lo: tuple[int, int]
    hi: tuple[int, int]


@dataclass(frozen=True)
class AutoPlan:
    """Windows and blocks of one automatic request.

    Attributes:
        starts: window starts per axis; the windows are their product.
        blocks: boxes stitched one after the other; a window overlapping k blocks is computed k times.
        patch: window size.
        buffer_bytes: the largest block's stitching buffer.
    """

    starts: tuple[list[int], list[int], list[int]]
    blocks: list[Block]
    patch: tuple[int, int, int]
    buffer_bytes: int

    def windows_in(self, block: Block) -> list[tuple[int, int, int]]:
        """Window starts whose window overlaps ``block``, in row order (axis 0 slowest), as MONAI visits them."""
        s0, s1, s2 = self.starts
        p = self.patch
        cols1 = [s for s in s1 if s < block.hi[0] and s + p[1] > block.lo[0]]
        cols2 = [s for s in s2 if s < block.hi[1] and s + p[2] > block.lo[1]]
        return [(a, b, c) for a in s0 for b in cols1 for c in cols2]

    @property
    def window_passes(self) -> int:
        """Network passes the request will make (windows counted once per block they overlap)."""
        return sum(len(self.windows_in(b)) for b in self.blocks)


def _splits(size: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * size / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def plan_blocks(
    size: Sequence[int], patch: Sequence[int], overlap: float, channels: int, budget_bytes: int
) -> AutoPlan:
    """The fewest blocks whose stitching buffer (``channels`` x ``patch[0]`` x block, float32) fits ``budget_bytes``.

    The longer block side is halved first. Blocks narrower than a window are allowed (windows on
    a block edge are then encoded once per block: time grows, memory does not), down to
    :data:`MIN_BLOCK` voxels; a budget smaller than that is met as closely as it allows.
    """
    starts = (
        axis_starts(size[0], patch[0], overlap),
        axis_starts(size[1], patch[1], overlap),
        axis_starts(size[2], patch[2], overlap),
    )
    per_voxel = channels * patch[0] * _BYTES_PER_VALUE
    n1 = n2 = 1

    def side(n: int, axis: int) -> int:
        return math.ceil(size[axis] / n)

    while per_voxel * side(n1, 1) * side(n2, 2) > budget_bytes:
        if side(n1, 1) >= side(n2, 2) and side(n1 + 1, 1) >= MIN_BLOCK:
            n1 += 1
        elif side(n2 + 1, 2) >= MIN_BLOCK:
            n2 += 1
        elif side(n1 + 1, 1) >= MIN_BLOCK:
            n1 += 1
        else:
            break
    blocks = [Block((a1, a2), (b1, b2)) for a1, b1 in _splits(size[1], n1) for a2, b2 in _splits(size[2], n2)]
    buffer = per_voxel * side(n1, 1) * side(n2, 2)
    return AutoPlan(starts, blocks, (patch[0], patch[1], patch[2]), buffer)
