"""The point-branch training step on a real sarcoma crop: finite loss, point head learns, class head frozen."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "vista3d"
DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
sys.path.insert(0, str(APP_DIR))

from lib.labels import load_label_dictionary  # noqa: E402
from lib.model import build_network, patch_size_for  # noqa: E402
from lib.trainers.data import SARCOMA_ID, VolumeSampler, load_volume, remap_lookup, sts_pair  # noqa: E402
from lib.trainers.point_trainer import PointTrainConfig, PointTrainer  # noqa: E402


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())]


@pytest.mark.skipif(not (DATA / "sts" / "STS_001_ct.nii.gz").is_file(), reason="needs ../shared/data")
def test_two_point_steps_train_point_head_only() -> None:
    random.seed(0)
    torch.manual_seed(0)
    labels = load_label_dictionary()
    vol = load_volume("STS_001", sts_pair(DATA, "STS_001"), remap_lookup({1: SARCOMA_ID}), labels.preprocessing)
    _, image, label = VolumeSampler([vol], patch_size_for("small"), seed=0, weights=[1.0]).sample()
    assert image.shape == (1, 1, 96, 96, 96) and (label == SARCOMA_ID).any()

    network = build_network("small")
    trainer = PointTrainer(network, None, PointTrainConfig(rounds=2, special=labels.special), seed=0)  # type: ignore[arg-type]
    trainer.optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-3)
    point_before, class_before = _snapshot(network.point_head), _snapshot(network.class_head)

    losses = [trainer.step(image, label, vol.label_set) for _ in range(2)]

    assert all(loss is not None and torch.isfinite(torch.tensor(loss)) for loss in losses), losses
    assert _changed(point_before, network.point_head), "point head did not change"
    assert not _changed(class_before, network.class_head), "class head changed"
    assert not any(p.requires_grad for p in network.class_head.parameters())
