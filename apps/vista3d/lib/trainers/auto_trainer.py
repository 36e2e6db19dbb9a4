"""One training step of VISTA3D's automatic (class-prompted) branch on partially labelled crops.

The automatic branch learns: the encoder's own decoder for it (``up_layers_auto``) and the class
head, as MONAI's ``SegResNetDS2.set_auto_grad(point_freeze=True)`` leaves them. The shared encoder
and the point branch (its decoder and head) are frozen, so clicks behave exactly as before.

Labels are partial (a team labels some structures, not all 127), so a step supervises only the
classes the volume is known to have: those in the crop as foreground, and those absent from the
crop (but labelled elsewhere in the volume) as empty. A class nobody labelled is never taught to be
background.
"""

from __future__ import annotations

import random
from typing import Any, cast

import torch
from monai.losses import DiceCELoss
from monai.networks.nets.vista3d import VISTA3D

from .data import Crop

LAST_CLASS = 132  # ids above read the zero-shot token; the class head has no embedding for them

__all__ = ["AutoTrainer", "auto_branch", "freeze_for_auto_training"]


def auto_branch(network: VISTA3D) -> list[torch.nn.Module]:
    """The modules only the automatic path uses: its decoder and the class head."""
    return [cast(torch.nn.Module, network.image_encoder.up_layers_auto), network.class_head]


def freeze_for_auto_training(network: VISTA3D) -> list[torch.nn.Parameter]:
    """Freeze everything but the automatic branch; return its parameters."""
    for p in network.parameters():
        p.requires_grad_(False)
    params = [p for module in auto_branch(network) for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


class AutoTrainer:
    """Optimises the automatic branch with sigmoid DiceCE per supervised class."""

    def __init__(self, network: VISTA3D, lr: float, max_classes: int = 8, ce_weight: float = 1.0):
        """``ce_weight`` < 1 for a branch trained from scratch: full-weight cross-entropy drove a fresh
        automatic branch to all-background in 150 steps (organ Dice 0.0 on its own training scan)."""
        self.network = network
        self.max_classes = max_classes
        self.loss_fn = DiceCELoss(sigmoid=True, lambda_ce=ce_weight)
        self.params = freeze_for_auto_training(network)
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-4)

    def state_dict(self) -> dict[str, Any]:
        """Network and optimiser: what a resumed run needs (class order draws from ``random``, saved by the loop)."""
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])

    def classes_for(self, crop: Crop) -> list[int]:
        """Present classes first, then a few known-absent ones, at most ``max_classes``."""
        present = [c for c in crop.label_set if c <= LAST_CLASS]
        absent = [c for c in crop.volume_label_set if c not in present and c <= LAST_CLASS]
        random.shuffle(present)
        random.shuffle(absent)
        return (present + absent[: max(1, len(present) // 2)])[: self.max_classes]

    def step(self, crop: Crop) -> float | None:
        """One optimiser step; None when the crop's volume has no class to supervise."""
        classes = self.classes_for(crop)
        if not classes:
            return None
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Frozen encoder weights need no gradient, so backward stops where the automatic decoder starts.
        device = next(self.network.parameters()).device
        _, features = self.network.image_encoder(crop.image.to(device), with_point=False, with_label=True)
        class_vector = torch.tensor(classes, device=device).unsqueeze(1)
        logits, _ = self.network.class_head(features, class_vector)
        label = crop.label.to(device)
        target = torch.cat([(label == c).float() for c in classes], dim=0)
        loss = self.loss_fn(logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return float(loss.detach())
