"""One training step of VISTA3D's point branch, simulating the click sessions the server answers.

The server answers clicks with ``image_encoder(..., with_point=True)`` followed by ``point_head``; this
module trains exactly that path, on sessions that play out as they do at serving time:

1. first clicks: mostly one positive click at each object's deepest voxel (the simulated
   annotator's first click); otherwise MONAI's ``sample_prompt_pairs`` (a few positive and negative
   clicks anywhere on and around the object, labels 2/3 for special classes, ids above 132 read
   through the zero-shot token), so the head keeps handling clicks from any client;
2. after each prediction, the result is edited exactly as the server edits it (Algorithm 1,
   :func:`lib.inference.refine.apply_clicks`: only the new click's component changes), and the next click goes
   where the annotator clicks on that edited result: the centre of its largest error region,
   positive on missed foreground, negative on a false positive (:func:`lib.simulate.largest_error`).

The DiceCE losses of all ``rounds`` predictions are summed, so the head learns to answer a
correction, not only a first click. A correction is served only where it lands (Algorithm 1 takes the
new prediction's component at the click), yet a whole-mask Dice hardly notices a region a few
percent of the object's size: ``click_weight`` > 0 adds, for each correction's answer, that weight
times the mean cross-entropy over the error region its click was placed in (:func:`click_region_loss`).
It is off by default: at weight 1 a 150-step round from the starter gained no Dice over the round
without it, on its own labels or on unseen ones (docs/point-rounds.md).

The encoder runs once per step (its features are shared by the rounds), and clicks are derived from
detached predictions, so a round costs one point-head forward/backward only.

The automatic branch (its decoder and the class head) is frozen: this trainer only teaches the point
branch, i.e. the point decoder (``image_encoder.up_layers``) and the point head. The shared encoder
levels train too unless ``train_encoder`` is off, which is MONAI's
``set_auto_grad(auto_freeze=True)``: then nothing the automatic branch reads can change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.vista3d.sampler import sample_prompt_pairs
from monai.losses import DiceCELoss
from monai.networks.nets.vista3d import VISTA3D

from ..inference.refine import apply_clicks
from ..simulate import deepest_voxel, largest_error
from .auto_trainer import auto_branch
from .data import Crop

__all__ = [
    "ClickSession",
    "PointTrainConfig",
    "PointTrainer",
    "Prompts",
    "ResumableTrainer",
    "click_region_loss",
    "freeze_for_point_training",
    "initial_prompts",
    "pick_voxel",
]

logger = logging.getLogger(__name__)

PAD_LABEL = -1  # "not a point" for the point head


@dataclass(frozen=True)
class PointTrainConfig:
    """Knobs of the point-branch step.

    Attributes:
        rounds: predictions per step (1 = no click simulation).
        max_objects: objects prompted per step (the point head batches them).
        max_point: cap of initial clicks per object in ``sample_prompt_pairs``.
        first_click_centre_prob: chance that a step starts as the annotator does, with one positive
            click at each object's deepest voxel, rather than with ``sample_prompt_pairs``' clicks.
        centre_click_prob: chance that a correction click is the error region's deepest voxel
            (what an annotator clicks) rather than a random voxel of it.
        special: class ids whose clicks use labels 2/3.
        grad_clip: max gradient norm (from scratch, early steps can spike).
        train_encoder: whether the shared encoder levels learn as well (off: the point decoder and head only).
        ce_weight: weight of the cross-entropy term beside Dice; from scratch a full-weight CE term
            pulls every voxel to background before the clicks mean anything.
        click_weight: weight of the cross-entropy over each correction's error region (0: off).
    """

    rounds: int = 3
    max_objects: int = 3
    max_point: int = 4
    first_click_centre_prob: float = 0.7
    centre_click_prob: float = 0.7
    special: frozenset[int] = frozenset({23, 24, 25, 26, 27, 57, 128})
    grad_clip: float = 1.0
    train_encoder: bool = True
    ce_weight: float = 0.1
    click_weight: float = 0.0


@dataclass
class Prompts:
    """Clicks of B objects: coords [B,N,3] float (window voxels), labels [B,N] long, classes [B,1] long."""

    coords: torch.Tensor
    labels: torch.Tensor
    classes: torch.Tensor


def freeze_for_point_training(network: VISTA3D, train_encoder: bool) -> list[torch.nn.Parameter]:
    """Freeze the automatic branch (and the shared encoder levels unless trained); return what is left to train."""
    for p in network.parameters():
        p.requires_grad_(True)
    shared = cast(torch.nn.Module, network.image_encoder.encoder)
    frozen = auto_branch(network) if train_encoder else [*auto_branch(network), shared]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return [p for p in network.parameters() if p.requires_grad]


def click_region_loss(logits: torch.Tensor, target: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Mean over objects of the cross-entropy averaged over each one's clicked error region.

    Args:
        logits: [B, 1, H, W, D] the answer to the correction click.
        target: [B, 1, H, W, D] the objects' masks.
        regions: [B, H, W, D] bool, the error region each object's last click was placed in (empty
            for an object that was not clicked: it adds nothing).

    Every region counts the same whatever its size: a small missed lobe is what a correction is for.
    """
    weight = regions[:, None].to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    per_object = ce.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1.0)
    clicked = weight.flatten(1).amax(1)
    return (per_object * clicked).sum() / clicked.sum().clamp(min=1.0)


def _click_labels(class_id: int, special: frozenset[int]) -> tuple[int, int]:
    """(negative, positive) point labels of a class: 2/3 for special classes, else 0/1."""
    return (2, 3) if class_id in special else (0, 1)


def pick_voxel(region: np.ndarray, rng: np.random.Generator, centre_prob: float) -> np.ndarray:
    """The deepest voxel of ``region`` (where an annotator clicks), else a random one of its voxels."""
    if rng.random() < centre_prob:
        return deepest_voxel(region)
    voxels = np.argwhere(region)
    return voxels[int(rng.integers(len(voxels)))]


def initial_prompts(
    label: torch.Tensor, label_set: Sequence[int], config: PointTrainConfig, rng: np.random.Generator
) -> Prompts | None:
    """First clicks for up to ``max_objects`` objects of ``label`` [1,1,H,W,D] (see the module docstring).

    None when none of ``label_set`` is present.
    """
    present = [int(c) for c in label_set if (label == int(c)).any()]
    if not present:
        return None
    if rng.random() < config.first_click_centre_prob:
        classes = [present[i] for i in rng.permutation(len(present))[: config.max_objects]]
        truth = label[0, 0].cpu().numpy()
        coords = torch.tensor(np.stack([deepest_voxel(truth == c) for c in classes]), dtype=torch.float32)
        labels = torch.tensor([[_click_labels(c, config.special)[1]] for c in classes], dtype=torch.long)
        return Prompts(coords[:, None], labels, torch.tensor(classes, dtype=torch.long)[:, None])
    _, point, point_label, prompt_class = sample_prompt_pairs(
        label,
        present,
        max_foreprompt=config.max_objects,
        max_backprompt=0,
        max_point=config.max_point,
        drop_label_prob=0.0,
        drop_point_prob=0.0,
    )
    if point is None or prompt_class is None or point_label is None:
        return None
    return Prompts(point.float().cpu(), point_label.long().cpu(), prompt_class.long().cpu())


class ClickSession:
    """The edited result of each prompted object, as the server keeps it between clicks.

    Attributes:
        truth: [B, H, W, D] bool, the objects' masks.
        results: [B, H, W, D] int16, 1 where the edited result holds the object.
        answered: clicks already applied per object (the first ``answered`` of the prompts).
        regions: [B, H, W, D] bool, the error region each object's newest click was placed in.
    """

    def __init__(self, truth: np.ndarray) -> None:
        self.truth = truth
        self.results = np.zeros(truth.shape, dtype=np.int16)
        self.answered = 0
        self.regions = np.zeros(truth.shape, dtype=bool)

    def edit(self, prompts: Prompts, logits: torch.Tensor) -> None:
        """Apply the clicks added since the last edit to each object's result (Algorithm 1)."""
        prediction = (logits.detach() > 0).cpu().numpy()[:, 0]
        coords = prompts.coords.round().long().cpu().numpy()
        labels = prompts.labels.cpu().numpy()
        editing = np.zeros(labels.shape[1], dtype=bool)
        editing[self.answered :] = True
        everywhere = np.ones(prediction.shape[1:], dtype=bool)
        for b in range(len(prediction)):
            valid = labels[b] != PAD_LABEL
            self.results[b], _ = apply_clicks(
                self.results[b], prediction[b], everywhere, coords[b][valid], np.isin(labels[b][valid], (1, 3)),
                1, editing=editing[valid],
            )  # fmt: skip
        self.answered = labels.shape[1]

    def next_clicks(
        self, prompts: Prompts, special: frozenset[int], rng: np.random.Generator, centre_prob: float
    ) -> Prompts:
        """Prompts plus, per object, the annotator's next click on its edited result (padding when perfect)."""
        coords = torch.zeros(len(self.truth), 1, 3)
        labels = torch.full((len(self.truth), 1), PAD_LABEL, dtype=torch.long)
        self.regions[:] = False
        for b in range(len(self.truth)):
            error = largest_error(self.results[b] == 1, self.truth[b])
            if error is None:
                continue
            self.regions[b] = error[0]
            coords[b, 0] = torch.from_numpy(pick_voxel(error[0], rng, centre_prob).astype(np.float32))
            negative, positive = _click_labels(int(prompts.classes[b, 0]), special)
            labels[b, 0] = positive if error[1] else negative
        return Prompts(
            torch.cat([prompts.coords, coords.to(prompts.coords)], dim=1),
            torch.cat([prompts.labels, labels.to(prompts.labels.device)], dim=1),
            prompts.classes,
        )


class ResumableTrainer:
    """A trainer with a network, an optimiser and a click generator: what a resumed run restores."""

    network: VISTA3D
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator

    def state_dict(self) -> dict[str, Any]:
        """Network, optimiser and click generator: what a resumed run needs to continue this one."""
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]


class PointTrainer(ResumableTrainer):
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
        return torch.cat([(label == int(c)).float() for c in prompts.classes[:, 0].tolist()], dim=0)

    def session_loss(self, feats: torch.Tensor, prompts: Prompts, target: torch.Tensor) -> torch.Tensor:
        """Summed DiceCE over ``rounds`` predictions, the annotator's next click between them, plus
        each correction's :func:`click_region_loss`."""
        device = feats.device
        session = ClickSession(target.cpu().numpy()[:, 0] > 0.5)
        total = feats.new_zeros(())
        for r in range(self.config.rounds):
            logits = self.network.point_head(
                feats, prompts.coords.to(device), prompts.labels.to(device), class_vector=prompts.classes.to(device)
            )
            total = total + self.loss_fn(logits, target)
            if r > 0 and self.config.click_weight > 0:
                regions = torch.from_numpy(session.regions).to(device)
                total = total + self.config.click_weight * click_region_loss(logits, target, regions)
            if r + 1 < self.config.rounds:
                session.edit(prompts, logits)
                prompts = session.next_clicks(prompts, self.config.special, self.rng, self.config.centre_click_prob)
        return total

    def step(self, crop: Crop) -> float | None:
        """One optimiser step on a crop; the summed loss, or None when the crop has no object (skipped)."""
        device = next(self.network.parameters()).device
        image, label = crop.image.to(device), crop.label.to(device)
        prompts = initial_prompts(crop.label, crop.label_set, self.config, self.rng)
        if prompts is None:
            return None
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        feats, _ = self.network.image_encoder(image, with_point=True, with_label=False)  # frozen levels: no graph
        loss = self.session_loss(feats, prompts, self.targets(label, prompts))
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())
