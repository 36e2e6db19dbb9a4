"""A point round on the served click path itself: the encoder frozen, its windows computed once, the point head trained.

A full round (:mod:`.point_trainer`) trains the encoder and the point head on random 64³ crops
centred anywhere on an object, with the clicks placed inside that crop. The server answers a
click differently: a window centred on the click (or an earlier window within a quarter window
that holds it, :func:`lib.inference.engine.can_reuse`), the encoder's features of that window, the
point head with every click of the object that lies in it, and an edit that only the new click
makes (Algorithm 1). The two differ in where the object sits in the window, how much of it the
window holds and which clicks the head sees, and a full round did not fit the labels it trained on.

Here a step plays one click session exactly as the server answers it, on the model grid of a
final label: the first click at the object's deepest voxel (sometimes a random voxel of it), each
later click at the centre of the largest error region of the edited result, each answered in the
window the server would choose, through :func:`lib.inference.point_head.prepare` and
:func:`~lib.inference.point_head.predict`, the server's own head code. The loss is DiceCE of every
answer against the object inside its window, summed over the session.

With the encoder frozen, a window's encoder output depends only on the image, so it is computed
once (:class:`EncodedWindows`, bounded in memory) and the automatic branch (which reads only the
encoder) cannot change at all. The network's share of a step is then the point head alone, but the
simulated annotator's whole-volume distance transforms and component labelling still cost about
8 s a step on 2 cores (``docs/point-rounds.md``): restricting them to the window is what is left.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets.vista3d import VISTA3D, PointMappingSAM

from ..inference.engine import choose_window, pad_to_patch, point_labels
from ..inference.point_head import predict, prepare
from ..inference.precision import autocast_dtype
from ..inference.refine import apply_clicks
from ..simulate import largest_error
from .data import CachedVolume
from .point_trainer import PointTrainConfig, ResumableTrainer, click_region_loss, pick_voxel
from .request import TrainRequest
from .schedule import TrainStats, run_steps, seed_everything
from .validation import MAX_OBJECTS_PER_IMAGE, largest_objects

__all__ = [
    "ClickCase",
    "ClickCaseSampler",
    "EncodedWindows",
    "HeadTrainer",
    "click_cases",
    "freeze_all_but_head",
    "train_point_head",
]

logger = logging.getLogger(__name__)

Start = tuple[int, int, int]


@dataclass(frozen=True)
class ClickCase:
    """One object of a final label on the model grid.

    Attributes:
        volume: the image id.
        index: the volume's position in the round's list (its windows are cached under it).
        image: [1, h, w, d] preprocessed image, padded to at least one window.
        truth: [h, w, d] bool, the object (padded like the image).
        class_id: the object's global id.
    """

    volume: str
    index: int
    image: torch.Tensor
    truth: np.ndarray
    class_id: int


def click_cases(
    volumes: Sequence[CachedVolume], patch: Sequence[int], max_objects: int = MAX_OBJECTS_PER_IMAGE
) -> list[ClickCase]:
    """The objects of each volume a round plays sessions on: its ``max_objects`` largest, as validation scores them."""
    out = []
    for index, vol in enumerate(volumes):
        image = pad_to_patch(vol.image, patch)
        label = pad_to_patch(vol.label, patch)[0].numpy()
        for class_id in largest_objects(label, max_objects):
            out.append(ClickCase(vol.name, index, image, label == class_id, class_id))
    return out


class ClickCaseSampler:
    """Draws a case for each step, a volume by its weight then one of its objects, reproducibly."""

    def __init__(self, cases: Sequence[ClickCase], weights: Sequence[float], seed: int) -> None:
        if not cases:
            raise ValueError("no labelled object to train on")
        self.cases = list(cases)
        by_volume = np.asarray([weights[c.index] for c in self.cases], dtype=np.float64)
        per_volume = np.bincount([c.index for c in self.cases])
        p = by_volume / per_volume[[c.index for c in self.cases]]
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self) -> ClickCase:
        return self.cases[int(self.rng.choice(len(self.cases), p=self.p))]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class EncodedWindows:
    """The frozen encoder's output ([1, C, p, p, p]) for the windows clicks land in, least recently used dropped.

    Computed as the server computes it (in the click path's ``precision``) and kept in that dtype.
    """

    def __init__(self, network: VISTA3D, patch: Sequence[int], precision: str, budget_mb: int = 2048) -> None:
        self.network = network
        self.patch = tuple(int(p) for p in patch)
        self.dtype = autocast_dtype(precision)
        self.budget = budget_mb * 2**20
        self._windows: OrderedDict[tuple[int, Start], torch.Tensor] = OrderedDict()
        self.computed = 0

    def starts(self, index: int) -> list[Start]:
        """Windows cached for volume ``index``, oldest first (the server's per-image cache)."""
        return [s for i, s in self._windows if i == index]

    def get(self, case: ClickCase, start: Start) -> torch.Tensor:
        key = (case.index, start)
        if key in self._windows:
            self._windows.move_to_end(key)
            return self._windows[key]
        sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))
        device = next(self.network.parameters()).device
        window = case.image[(slice(None), *sl)].unsqueeze(0).to(device)
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None),
        ):
            encoded, _ = self.network.image_encoder(window, with_point=True, with_label=False)
        self._windows[key] = encoded.detach()
        self.computed += 1
        while sum(t.element_size() * t.nelement() for t in self._windows.values()) > self.budget:
            self._windows.popitem(last=False)
        return self._windows[key]


def freeze_all_but_head(network: VISTA3D) -> list[torch.nn.Parameter]:
    """Only the point head trains: the encoder (shared with the automatic branch) and the class head stay."""
    for p in network.parameters():
        p.requires_grad_(False)
    params = list(network.point_head.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


class HeadTrainer(ResumableTrainer):
    """Optimises the point head on click sessions played as the server answers them (module docstring)."""

    def __init__(
        self, network: VISTA3D, windows: EncodedWindows, config: PointTrainConfig, lr: float, seed: int = 0
    ) -> None:
        self.network = network
        self.windows = windows
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.loss_fn = DiceCELoss(sigmoid=True, lambda_ce=config.ce_weight)
        self.params = freeze_all_but_head(network)
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-4)

    @property
    def head(self) -> PointMappingSAM:
        return self.network.point_head

    def answer(
        self, case: ClickCase, points: Sequence[np.ndarray], positive: Sequence[bool], start: Start
    ) -> torch.Tensor:
        """[1, 1, p, p, p] logits of the window at ``start`` for the clicks inside it, as the server computes them."""
        local = np.stack(points) - np.asarray(start)
        inside = np.all((local >= 0) & (local < np.asarray(self.windows.patch)), axis=1)
        encoded = self.windows.get(case, start)
        device = encoded.device
        coords = torch.as_tensor(local[inside], dtype=torch.float32, device=device).unsqueeze(0)
        labels = point_labels(np.asarray(positive)[inside], case.class_id, self.config.special)
        labels = labels.unsqueeze(0).to(device)
        return predict(self.head, prepare(self.head, encoded.float()), coords, labels, case.class_id)

    def session_loss(self, case: ClickCase) -> torch.Tensor:
        """Summed DiceCE of a click session's answers, each in the window the server would compute."""
        patch = self.windows.patch
        points = [pick_voxel(case.truth, self.rng, self.config.first_click_centre_prob)]
        positive = [True]
        result = np.zeros(case.truth.shape, dtype=np.int16)
        session: list[Start] = [*self.windows.starts(case.index)]
        total = torch.zeros(())
        region: np.ndarray | None = None  # the error region of the newest correction click
        for r in range(self.config.rounds):
            start = choose_window(points[-1], case.image.shape[1:], patch, session)
            session.append(start)
            logits = self.answer(case, points, positive, start)
            sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
            target = torch.from_numpy(case.truth[sl]).float()[None, None].to(logits.device)
            total = total + self.loss_fn(logits, target).cpu()
            if region is not None and self.config.click_weight > 0:
                clicked = torch.from_numpy(region[sl])[None].to(logits.device)
                total = total + self.config.click_weight * click_region_loss(logits, target, clicked).cpu()
            if r + 1 == self.config.rounds:
                break
            editing = np.zeros(len(points), dtype=bool)
            editing[-1] = True
            prediction = (logits.detach()[0, 0] > 0).cpu().numpy()
            local = np.stack(points) - np.asarray(start)
            result[sl], _ = apply_clicks(
                result[sl], prediction, np.ones_like(prediction), local, np.asarray(positive), 1, editing=editing
            )
            error = largest_error(result == 1, case.truth)
            if error is None:  # perfect: nothing left to click
                break
            region = error[0]
            points.append(pick_voxel(error[0], self.rng, self.config.centre_click_prob))
            positive.append(error[1])
        return total

    def step(self, case: ClickCase) -> float:
        """One optimiser step on one click session; the summed loss."""
        self.network.point_head.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.session_loss(case)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())


def train_point_head(
    network: VISTA3D,
    volumes: Sequence[CachedVolume],
    weights: Sequence[float],
    req: TrainRequest,
    special: frozenset[int],
    precision: str = "fp32",
    stop_when: Callable[[int], bool] | None = None,
) -> TrainStats:
    """A point round's loop with the encoder frozen (see the module docstring); the network's point head changes."""
    seed_everything(req.seed)
    patch = (req.crop,) * 3
    config = PointTrainConfig(rounds=req.rounds, special=special, click_weight=req.click_weight)
    windows = EncodedWindows(network, patch, precision)
    network.eval()  # the frozen parts run as served
    trainer = HeadTrainer(network, windows, config, lr=req.lr, seed=req.seed)
    sampler = ClickCaseSampler(click_cases(volumes, patch), weights, req.seed)
    max_s = 60 * req.max_minutes if req.max_minutes else None
    stats = run_steps(
        trainer, sampler, req.steps, max(1, req.steps // 10), desc="point[head]", max_seconds=max_s, stop_when=stop_when
    )
    logger.info("point[head]: %d encoder windows computed for %d steps", windows.computed, stats.steps)
    network.eval()
    return stats
