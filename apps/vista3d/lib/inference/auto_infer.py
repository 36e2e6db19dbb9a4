"""Automatic (class-prompted) segmentation: MONAI's sliding-window answer, faster and in bounded memory.

The answer is the one of ``SlidingWindowInferer`` (constant weights, the bundle's overlap) followed
by ``VistaPostTransformd``: per voxel, the class whose window-averaged logit is largest, where it
is positive. What makes it cheaper without changing it:

* The class head is linear after its class-independent ``image_post_mapping``: a class's logit is
  its embedding (``[C]``) dotted with the post-mapped features. So a window is encoded once for
  all classes, and when more classes are asked than the head has feature channels (``C`` = 16
  for ``small``, 48 for ``vista3d``; "everything" is 117) the features are stitched instead of
  the logits. Averaging commutes with the dot product, so this is exact up to float rounding.
* Stitching streams along axis 0: once every window of a row of windows is added, the voxels
  before the next row's start are final and turned into labels, so the buffer holds one window's
  depth of the volume instead of all of it. Where even that exceeds the memory budget, the
  volume is cut into blocks across axes 1 and 2 (:mod:`.auto_plan`), at the cost of encoding the
  windows on a block edge once per block.
* With a reduced precision (``dtype``; :mod:`.precision` chooses it on the machine) the network
  runs stage by stage (:mod:`.auto_forward`): the full-resolution level that reads the image in
  float32, the rest under bfloat16 (or float16) autocast (on CPUs with AVX512-BF16 every
  convolution then takes oneDNN's fast path, which float32 misses for MONAI's small
  low-resolution 3D inputs at batch 1).
* Small windows are computed several at once, a thread each (:func:`window_workers`), and added
  in MONAI's order all the same.

The logit sum is never divided by the window count: that changes neither the sign nor the order
of the classes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar, cast

import torch
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify

from .auto_forward import reduced_stages, window_features
from .auto_plan import AutoPlan, Block, plan_blocks

__all__ = ["OnWindow", "auto_segment", "class_embeddings", "window_workers"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

OnWindow = Callable[[int, int], None]
"""Called as ``on_window(i, n)`` before window pass ``i`` of ``n`` and again between the pass's stages
(so several times with the same ``i``); it may block, or raise to cancel."""

MAX_WINDOW_WORKERS = 4
_FINALISE_VALUES = 1 << 24  # logits computed at once when turning stitched features into labels


def class_embeddings(head: ClassMappingClassify, class_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """[K, C] float32 class embeddings, as ``ClassMappingClassify.forward`` computes them."""
    vector = torch.tensor(list(class_ids), device=device).unsqueeze(1)
    emb = head.class_embeddings(vector)
    if head.use_mlp:
        emb = head.mlp(emb)
    return emb.reshape(len(class_ids), -1).float()


class _Stitcher:
    """One block's streaming sum over windows (logits, or features when they are fewer) and its labels."""

    def __init__(self, emb: torch.Tensor, ids: torch.Tensor, depth: int, block: Block) -> None:
        self.emb = emb
        self.ids = ids
        self.stitch_logits = emb.shape[0] <= emb.shape[1]
        self.block = block
        channels = min(emb.shape)
        shape = (channels, depth, block.hi[0] - block.lo[0], block.hi[1] - block.lo[1])
        self.buffer = torch.zeros(shape, device=emb.device)

    def add(self, features: torch.Tensor, start: tuple[int, int, int]) -> None:
        """Add a window's [C, p, p, p] features (projected to logits when those are stitched) over the block."""
        lo, hi = self.block.lo, self.block.hi
        a1, b1 = max(start[1], lo[0]), min(start[1] + features.shape[2], hi[0])
        a2, b2 = max(start[2], lo[1]), min(start[2] + features.shape[3], hi[1])
        part = features[:, :, a1 - start[1] : b1 - start[1], a2 - start[2] : b2 - start[2]]
        if self.stitch_logits:
            part = (self.emb @ part.reshape(part.shape[0], -1)).reshape(-1, *part.shape[1:])
        self.buffer[:, :, a1 - lo[0] : b1 - lo[0], a2 - lo[1] : b2 - lo[1]] += part

    def labels(self, planes: int) -> torch.Tensor:
        """[planes, h, w] int16 ids of the buffer's first ``planes`` planes, which no later window adds to."""
        _, _, h, w = self.buffer.shape
        out = torch.empty((planes, h, w), dtype=torch.int16)
        step = max(1, _FINALISE_VALUES // (h * w * self.emb.shape[0]))
        for a in range(0, planes, step):
            b = min(a + step, planes)
            flat = self.buffer[:, a:b].reshape(self.buffer.shape[0], -1)
            logits = flat if self.stitch_logits else self.emb @ flat
            best, arg = logits.max(0)
            ids = self.ids[arg]
            ids[best <= 0] = 0
            out[a:b] = ids.reshape(-1, h, w).cpu()
        return out

    def shift(self, planes: int) -> None:
        """Drop the first ``planes`` planes (labelled): the buffer then starts where the next row does."""
        depth = self.buffer.shape[1]
        for c in range(self.buffer.shape[0]):  # a channel at a time: the copy overlaps its source
            self.buffer[c, : depth - planes] = self.buffer[c, planes:].clone()
        self.buffer[:, depth - planes :] = 0


class _Gate:
    """The window workers' way to the scheduler and to the cores.

    ``on_window`` is called by one worker at a time; once a call has raised, every later call
    raises the same exception without calling it (a cancelled request stays cancelled). Before each
    window pass, :meth:`window` asks ``threads()`` what the segmentation may use now: at most that
    many windows run at once, each with an equal share of the threads, so the busy threads never
    add up to more than the budget, which follows what runs beside (a scoring process that ends
    gives its core back at the next window). A call between stages restores the worker's share
    (the scheduler sets the job's threads when it hands the slot back after clicks).
    """

    def __init__(self, on_window: OnWindow | None, total: int, threads: Callable[[], int], workers: int) -> None:
        self._on_window = on_window
        self._total = total
        self._threads = threads
        self._workers = workers
        self._lock = threading.Lock()
        self._places = threading.Condition()
        self._running = 0
        self._share = 1
        self._error: BaseException | None = None

    def __call__(self, i: int) -> None:
        if self._on_window is not None:
            with self._lock:
                if self._error is not None:
                    raise self._error
                try:
                    self._on_window(i, self._total)
                except BaseException as e:
                    self._error = e
                    raise
        if torch.get_num_threads() != self._share:
            torch.set_num_threads(self._share)

    @contextlib.contextmanager
    def window(self, i: int) -> Iterator[None]:
        """Around window pass ``i``: a checkpoint, then a place within the thread budget of now."""
        self(i)
        with self._places:
            while True:
                budget = max(1, self._threads())
                concurrent = min(self._workers, budget)
                if self._running < concurrent:
                    break
                self._places.wait(timeout=0.05)
            self._running += 1
            self._share = max(1, budget // concurrent)
        if torch.get_num_threads() != self._share:
            torch.set_num_threads(self._share)
        try:
            yield
        finally:
            with self._places:
                self._running -= 1
                self._places.notify_all()


def _in_order(items: Sequence[T], compute: Callable[[T], R], workers: int) -> Iterator[tuple[T, R]]:
    """``(item, compute(item))`` in the order of ``items``, ``workers`` computed at once."""
    if workers == 1:
        yield from ((item, compute(item)) for item in items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="auto-window") as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        rest = iter(items)
        try:
            for item in itertools.islice(rest, workers):
                pending.append((item, pool.submit(compute, item)))
            while pending:
                item, future = pending.popleft()
                result = future.result()
                following = next(rest, None)
                if following is not None:
                    pending.append((following, pool.submit(compute, following)))
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()


def _segment_block(
    network: VISTA3D,
    image: torch.Tensor,
    plan: AutoPlan,
    stitcher: _Stitcher,
    out: torch.Tensor,
    reduced: frozenset[str],
    dtype: torch.dtype,
    done: int,
    gate: _Gate,
    workers: int,
) -> int:
    """Stitch one block row by row into ``out``; returns the number of window passes made so far
    (``done`` before it)."""
    block, p = stitcher.block, plan.patch
    rows = plan.starts[0]
    device = stitcher.buffer.device

    def features(item: tuple[int, tuple[int, int, int]]) -> torch.Tensor:
        i, start = item
        sl = tuple(slice(s, s + q) for s, q in zip(start, p, strict=True))
        # grad mode is per thread: a window worker sets its own
        with gate.window(i), torch.inference_mode():
            window = image[(slice(None), *sl)].unsqueeze(0).to(device)
            return window_features(network, window, reduced, functools.partial(gate, i), dtype)

    def finish(r: int) -> None:
        """Label row ``r``'s planes that no later window adds to, and move the buffer on."""
        s0 = rows[r]
        planes = (rows[r + 1] if r + 1 < len(rows) else s0 + p[0]) - s0
        out[s0 : s0 + planes, block.lo[0] : block.hi[0], block.lo[1] : block.hi[1]] = stitcher.labels(planes)
        if r + 1 < len(rows):
            stitcher.shift(planes)

    windows = list(enumerate(plan.windows_in(block), start=done))  # in row order
    row = 0
    for (_, start), feats in _in_order(windows, features, workers):
        while start[0] != rows[row]:
            finish(row)
            row += 1
        stitcher.add(feats, start)
    for r in range(row, len(rows)):
        finish(r)
    return done + len(windows)


@torch.inference_mode()
def auto_segment(
    network: VISTA3D,
    image: torch.Tensor,
    class_ids: Sequence[int],
    patch: tuple[int, int, int],
    overlap: float,
    *,
    dtype: torch.dtype | None,
    budget_bytes: int,
    on_window: OnWindow | None = None,
    workers: int = 1,
    threads: Callable[[], int] | None = None,
) -> torch.Tensor:
    """[1, h, w, d] preprocessed image (at least one window on every axis) -> [h, w, d] int16 global ids.

    Args:
        network: the served VISTA3D; only read.
        image: the preprocessed image, padded to at least one window.
        class_ids: global ids asked for; a voxel gets the id of its largest positive logit, else 0.
        patch: window size.
        overlap: fraction of a window shared with the next (the bundle's 0.3), as MONAI's.
        dtype: run the stages of :func:`.auto_forward.reduced_stages` under autocast to this
            reduced precision (``torch.bfloat16``, ``torch.float16``); None runs all in float32.
        budget_bytes: the stitching buffer's size limit (see :func:`.auto_plan.plan_blocks`).
        on_window: called before every window pass and between its stages (:data:`OnWindow`); an
            exception it raises propagates, and no state of the request outlives this call.
        workers: windows computed at once at most (:func:`window_workers`), each with an equal
            share of the threads; the windows are still added in MONAI's order, so the answer
            does not depend on it.
        threads: the torch threads it may use now, asked before every window pass (the server's
            thread budget); by default the caller's torch threads, fixed.
    """
    device = next(network.parameters()).device
    emb = class_embeddings(cast(ClassMappingClassify, network.class_head), class_ids, device)
    size = tuple(int(s) for s in image.shape[1:])
    plan = plan_blocks(size, patch, overlap, min(emb.shape), budget_bytes)
    logger.info(
        "Auto: %d classes, %d window passes in %d block(s), stitching %s in %.0f MB (budget %.0f MB)",
        len(class_ids),
        plan.window_passes,
        len(plan.blocks),
        "logits" if emb.shape[0] <= emb.shape[1] else "features",
        plan.buffer_bytes / 2**20,
        budget_bytes / 2**20,
    )
    ids = torch.tensor(list(class_ids), dtype=torch.int16, device=device)
    out = torch.zeros(size, dtype=torch.int16)
    done = 0
    reduced = reduced_stages(network, dtype is not None)
    fixed = torch.get_num_threads()
    gate = _Gate(on_window, plan.window_passes, threads or (lambda: fixed), workers)
    try:
        for block in plan.blocks:
            stitcher = _Stitcher(emb, ids, patch[0], block)
            done = _segment_block(
                network, image, plan, stitcher, out, reduced, dtype or torch.float32, done, gate, workers
            )
    finally:
        torch.set_num_threads(fixed)  # this thread's count, as the caller left it
    return out


def window_workers(patch: Sequence[int], threads: int, device: torch.device | None = None) -> int:
    """How many windows to compute at once: one per thread (at most 4) for windows of 64³ or less.

    A ``small`` window's low-resolution levels (8³ and 4³ at batch 1) cannot keep two threads busy:
    on 2 cores one window at a time took 144 ms per window with 2 threads, two at once 120 ms with
    one thread each. ``vista3d``'s 128³ windows keep every thread busy (and two would double the
    working memory), so they are computed one at a time. On a GPU the windows' kernels run one after
    another on one stream whatever the threads: one worker.
    """
    if math.prod(patch) > 64**3 or (device is not None and device.type == "cuda"):
        return 1
    return max(1, min(threads, MAX_WINDOW_WORKERS))
