"""One training step of VISTA3D's point branch with SAM-style iterative click simulation.

The server answers clicks with ``image_encoder(..., with_point=True)`` followed by ``point_head``; this
module trains exactly that path. A step samples initial clicks for the objects in the crop (MONAI's
``sample_prompt_pairs``: positive/negative clicks, labels 2/3 for special classes, ids above 132 read
through the zero-shot token), then runs up to ``rounds`` predictions; after each one it adds, per
object, a positive click in the largest false-negative region and a negative click in the largest
false-positive region, as an annotator correcting the result would. The DiceCE losses of all rounds
are summed. The encoder runs once per step (its features are shared by the rounds), and the clicks
are derived from detached predictions, so a round costs one point-head forward/backward only.

The automatic branch (its decoder and the class head) is frozen: this trainer only teaches the point branch. The encoder
trains too unless ``train_encoder`` is off (then the automatic branch cannot change at all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.apps.vista3d.sampler import sample_prompt_pairs
from monai.losses import DiceCELoss
from monai.networks.nets.vista3d import VISTA3D
from scipy import ndimage

from .auto_trainer import auto_branch
from .data import Crop

__all__ = ["PointTrainConfig", "PointTrainer", "Prompts", "error_click", "freeze_for_point_training", "initial_prompts"]

logger = logging.getLogger(__name__)

PAD_LABEL = -1  # "not a point" for the point head


@dataclass(frozen=True)
class PointTrainConfig:
    """Knobs of the point-branch step.

    Attributes:
        rounds: predictions per step (1 = no click simulation).
        max_objects: objects prompted per step (the point head batches them).
        max_point: cap of initial clicks per object in ``sample_prompt_pairs``.
        centre_click_prob: chance that a correction click is the error region's deepest voxel
            (what an annotator clicks) rather than a random voxel of it.
        special: class ids whose clicks use labels 2/3.
        grad_clip: max gradient norm (from scratch, early steps can spike).
        train_encoder: whether the shared image encoder learns as well (off: only the point head).
        ce_weight: weight of the cross-entropy term beside Dice; from scratch a full-weight CE term
            pulls every voxel to background before the clicks mean anything.
    """

    rounds: int = 2
    max_objects: int = 3
    max_point: int = 4
    centre_click_prob: float = 0.5
    special: frozenset[int] = frozenset({23, 24, 25, 26, 27, 57, 128})
    grad_clip: float = 1.0
    train_encoder: bool = True
    ce_weight: float = 0.1


@dataclass
class Prompts:
    """Clicks of B objects: coords [B,N,3] float (window voxels), labels [B,N] long, classes [B,1] long."""

    coords: torch.Tensor
    labels: torch.Tensor
    classes: torch.Tensor


def freeze_for_point_training(network: VISTA3D, train_encoder: bool) -> list[torch.nn.Parameter]:
    """Freeze the automatic branch (and the encoder unless trained); return the parameters left to train."""
    for p in network.parameters():
        p.requires_grad_(True)
    frozen = auto_branch(network) if train_encoder else [*auto_branch(network), network.image_encoder]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return [p for p in network.parameters() if p.requires_grad]


def initial_prompts(label: torch.Tensor, label_set: Sequence[int], config: PointTrainConfig) -> Prompts | None:
    """First clicks for the objects of ``label`` [1,1,H,W,D]; None when none of ``label_set`` is present."""
    _, point, point_label, prompt_class = sample_prompt_pairs(
        label,
        list(label_set),
        max_foreprompt=config.max_objects,
        max_backprompt=0,
        max_point=config.max_point,
        drop_label_prob=0.0,
        drop_point_prob=0.0,
    )
    if point is None or prompt_class is None or point_label is None:
        return None
    return Prompts(point.float(), point_label.long(), prompt_class.long())


def error_click(region: np.ndarray, rng: np.random.Generator, centre_prob: float) -> np.ndarray | None:
    """A voxel of the largest connected component of ``region`` (its deepest voxel or a random one)."""
    if not region.any():
        return None
    comp, n = ndimage.label(region)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    index = int(np.argmax(sizes)) + 1
    box = ndimage.find_objects(comp, max_label=index)[index - 1]
    largest = comp[box] == index
    if rng.random() < centre_prob:
        dist = ndimage.distance_transform_edt(np.pad(largest, 1))[1:-1, 1:-1, 1:-1]
        local = np.unravel_index(int(np.argmax(dist)), largest.shape)
    else:
        voxels = np.argwhere(largest)
        local = tuple(voxels[int(rng.integers(len(voxels)))])
    return np.asarray([s.start + c for s, c in zip(box, local, strict=False)], dtype=np.float32)


def _click_labels(class_id: int, special: frozenset[int]) -> tuple[int, int]:
    """(negative, positive) point labels of a class: 2/3 for special classes, else 0/1."""
    return (2, 3) if class_id in special else (0, 1)


def correction_clicks(
    prompts: Prompts, logits: torch.Tensor, target: torch.Tensor, config: PointTrainConfig, rng: np.random.Generator
) -> Prompts:
    """Prompts plus one positive click (false negatives) and one negative (false positives) per object."""
    pred = (logits.detach() > 0).cpu().numpy()[:, 0]
    truth = target.cpu().numpy()[:, 0] > 0.5
    coords = torch.zeros(len(pred), 2, 3)
    labels = torch.full((len(pred), 2), PAD_LABEL, dtype=torch.long)
    for b in range(len(pred)):
        neg, pos = _click_labels(int(prompts.classes[b, 0]), config.special)
        for j, (region, lab) in enumerate(((truth[b] & ~pred[b], pos), (pred[b] & ~truth[b], neg))):
            click = error_click(region, rng, config.centre_click_prob)
            if click is not None:
                coords[b, j] = torch.from_numpy(click)
                labels[b, j] = lab
    return Prompts(
        torch.cat([prompts.coords, coords.to(prompts.coords)], dim=1),
        torch.cat([prompts.labels, labels.to(prompts.labels.device)], dim=1),
        prompts.classes,
    )


class PointTrainer:
    """Optimises encoder + point head of a VISTA3D network with simulated click sessions."""

    def __init__(
        self,
        network: VISTA3D,
        config: PointTrainConfig,
        lr: float,
        seed: int = 0,
        grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    ):
        self.network = network
        self.grad_sync = grad_sync  # averages gradients over processes (see .distributed)
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.loss_fn = DiceCELoss(sigmoid=True, lambda_ce=config.ce_weight)
        self.params = freeze_for_point_training(network, config.train_encoder)
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-4)

    def targets(self, label: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """Binary masks [B,1,H,W,D] of the prompted classes."""
        return torch.cat([(label == int(c)).float() for c in prompts.classes[:, 0]], dim=0)

    def session_loss(self, feats: torch.Tensor, prompts: Prompts, target: torch.Tensor) -> torch.Tensor:
        """Summed DiceCE over ``rounds`` predictions, adding correction clicks between them."""
        total = feats.new_zeros(())
        for r in range(self.config.rounds):
            logits = self.network.point_head(feats, prompts.coords, prompts.labels, class_vector=prompts.classes)
            total = total + self.loss_fn(logits, target)
            if r + 1 < self.config.rounds:
                prompts = correction_clicks(prompts, logits, target, self.config, self.rng)
        return total

    def step(self, crop: Crop) -> float | None:
        """One optimiser step on a crop; the summed loss, or None when the crop has no object (skipped)."""
        image, label = crop.image, crop.label
        prompts = initial_prompts(label, crop.label_set, self.config)
        if prompts is None:
            return None
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(self.config.train_encoder):
            feats, _ = self.network.image_encoder(image, with_point=True, with_label=False)
        loss = self.session_loss(feats, prompts, self.targets(label, prompts))
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())
