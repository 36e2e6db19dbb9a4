"""The automatic branch trained on cached encoder outputs: the shared encoder frozen, clicks unchanged.

The automatic branch (``up_layers_auto`` and the class head) reads only the encoder's levels, so
with the encoder frozen those levels can be computed once per crop and every step runs the decoder
alone: a third of a full step on a CPU. Crops are centred on a voxel of a random organ; a share of
them (``anywhere``) may be centred anywhere in the scan instead, but half that way taught the
``small`` starter's branch to predict nothing (a soft Dice loss scores an empty crop as perfect), so
the starter was trained on organ-centred crops alone.

The loss is per-class binary cross-entropy plus soft Dice over the organs asked for; a class not
in the crop is taught to be empty there, which is right for the abdominal scan, whose organs are
all labelled.

Used by ``tools/train_auto_branch.py`` (the ``small`` starter) and ``bench/auto_standin.py`` (the
``vista3d`` stand-in, which trains the class head alone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D
from tqdm import tqdm

from ..inference.auto_forward import decode_auto

__all__ = ["ORGAN_CLASSES", "AutoCachedStats", "organ_crops", "organ_loss", "train_auto_cached"]

logger = logging.getLogger(__name__)

# VISTA3D ids of the abdominal scan's organs: liver, spleen, pancreas, right kidney, aorta, inferior
# vena cava, gallbladder, stomach, left kidney.
ORGAN_CLASSES = (1, 3, 4, 5, 6, 7, 10, 12, 14)

Crop = tuple[torch.Tensor, torch.Tensor]  # [1, 1, p, p, p] image, [1, p, p, p] global ids


def organ_crops(
    image: torch.Tensor,
    label: torch.Tensor,
    n: int,
    size: int,
    rng: np.random.Generator,
    classes: Sequence[int] = ORGAN_CLASSES,
    anywhere: float = 0.0,
) -> list[Crop]:
    """``n`` crops of a [1, h, w, d] image: centred on a voxel of a random class of ``classes``, or,
    with probability ``anywhere``, on any voxel."""
    out = []
    lab = label[0].numpy()
    for _ in range(n):
        if anywhere > 0 and rng.random() < anywhere:  # (no draw otherwise: the stand-in's crops stay)
            centre = np.asarray([rng.integers(s) for s in lab.shape])
        else:
            where = np.argwhere(lab == int(rng.choice(classes)))
            centre = where[rng.integers(len(where))] if len(where) else np.asarray(lab.shape) // 2
        start = [int(np.clip(x - size // 2, 0, s - size)) for x, s in zip(centre, lab.shape, strict=True)]
        sl = tuple(slice(s, s + size) for s in start)
        out.append((image[(slice(None), *sl)].unsqueeze(0), label[(slice(None), *sl)]))
    return out


def organ_loss(logits: torch.Tensor, label: torch.Tensor, classes: Sequence[int] = ORGAN_CLASSES) -> torch.Tensor:
    """[K, 1, p, p, p] logits against [1, p, p, p] ids: binary cross-entropy plus soft Dice per class."""
    target = torch.stack([(label == c).float() for c in classes])
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3, 4))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3, 4)) + target.sum(dim=(1, 2, 3, 4)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


@dataclass(frozen=True)
class AutoCachedStats:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float


def _encoder(network: VISTA3D) -> SegResNetDS2:
    return cast(SegResNetDS2, network.image_encoder)


def train_auto_cached(
    network: VISTA3D,
    crops: list[Crop],
    steps: int,
    lr: float,
    seed: int = 0,
    classes: Sequence[int] = ORGAN_CLASSES,
) -> AutoCachedStats:
    """Train ``up_layers_auto`` and the class head (one-cycle schedule); the rest is frozen and unchanged."""
    start = time.perf_counter()
    encoder = _encoder(network)
    device = next(network.parameters()).device  # crops, cached levels and the class vector follow it
    network.eval()
    with torch.no_grad():  # inputs of the decoder's training graph, computed once
        cached = [
            ([t.clone() for t in encoder.encoder(x.to(device))], y.to(device))
            for x, y in tqdm(crops, desc="encode", unit="crop")
        ]
    logger.info("Encoded %d crops in %.0f s", len(cached), time.perf_counter() - start)
    params = [p for m in (encoder.up_layers_auto, network.class_head) for p in m.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    vector = torch.tensor(list(classes), device=device).unsqueeze(1)
    rng = np.random.default_rng(seed)
    encoder.up_layers_auto.train()
    network.class_head.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="train[auto, cached]", unit="step")
    for _ in bar:
        levels, label = cached[int(rng.integers(len(cached)))]
        logits, _ = network.class_head(decode_auto(encoder, levels), vector)
        loss = organ_loss(logits, label, classes)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    network.eval()
    return AutoCachedStats(
        steps, time.perf_counter() - start, float(np.mean(losses[:50])), float(np.mean(losses[-50:]))
    )
