"""Training steps on real sarcoma crops: the point step trains the point branch only (class head frozen),
the auto step the class head only, and supervoxels become zero-shot objects of a crop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lib.labels import ZERO_SHOT_FIRST, ZERO_SHOT_LAST, load_label_dictionary
from lib.model import build_network
from lib.trainers.auto_trainer import AutoTrainer
from lib.trainers.data import SARCOMA_ID, VolumeSampler, load_volume, remap_lookup, sts_pair
from lib.trainers.point_trainer import PointTrainConfig, PointTrainer
from lib.trainers.supervoxel_objects import SupervoxelSampling, add_supervoxel_objects

from .conftest import DATA


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())]


# Which parameters a step moves does not depend on the crop's size: 32³ (the smallest a request accepts)
# costs an eighth of the 64³ window.
CROP = 32


@pytest.fixture(scope="module")
def sarcoma_crop():  # type: ignore[no-untyped-def]
    labels = load_label_dictionary()
    vol = load_volume("STS_001", sts_pair(DATA, "STS_001"), remap_lookup({1: SARCOMA_ID}), labels.preprocessing)
    return VolumeSampler([vol], (CROP,) * 3, seed=0).sample()


def test_point_steps_train_point_branch_only(sarcoma_crop) -> None:  # type: ignore[no-untyped-def]
    random.seed(0)
    crop = sarcoma_crop
    assert crop.image.shape == (1, 1, CROP, CROP, CROP) and (crop.label == SARCOMA_ID).any()
    assert crop.label_set == [SARCOMA_ID] and crop.volume_label_set == [SARCOMA_ID]
    network = build_network("small")
    trainer = PointTrainer(network, PointTrainConfig(rounds=2), lr=1e-3, seed=0)
    point_before, class_before = _snapshot(network.point_head), _snapshot(network.class_head)
    auto_decoder_before = _snapshot(network.image_encoder.up_layers_auto)
    losses = [trainer.step(crop) for _ in range(2)]
    assert all(loss is not None and np.isfinite(loss) for loss in losses), losses
    assert _changed(point_before, network.point_head), "point head did not change"
    assert not _changed(class_before, network.class_head), "class head changed"
    assert not _changed(auto_decoder_before, network.image_encoder.up_layers_auto), "automatic decoder changed"


def test_frozen_encoder_stays_put_and_the_point_decoder_learns(sarcoma_crop) -> None:  # type: ignore[no-untyped-def]
    """``train_encoder=false`` is MONAI's ``set_auto_grad(auto_freeze=True)``: what the automatic branch reads stays."""
    network = build_network("small")
    trainer = PointTrainer(network, PointTrainConfig(rounds=1, train_encoder=False), lr=1e-3)
    shared, point_decoder = _snapshot(network.image_encoder.encoder), _snapshot(network.image_encoder.up_layers)
    auto_decoder = _snapshot(network.image_encoder.up_layers_auto)
    assert trainer.step(sarcoma_crop) is not None
    assert not _changed(shared, network.image_encoder.encoder), "shared encoder levels changed"
    assert not _changed(auto_decoder, network.image_encoder.up_layers_auto), "automatic decoder changed"
    assert _changed(point_decoder, network.image_encoder.up_layers), "point decoder did not learn"


def test_auto_step_trains_the_automatic_branch_only(sarcoma_crop) -> None:  # type: ignore[no-untyped-def]
    """The sarcoma id is no class-head class: the step is skipped. With liver (1) the class head and
    the automatic decoder train; the shared encoder, the point decoder and the point head do not."""
    network = build_network("small")
    trainer = AutoTrainer(network, lr=1e-3)
    assert trainer.step(sarcoma_crop) is None
    crop = sarcoma_crop
    liver = type(crop)(crop.volume, crop.image, (crop.label > 0).long(), [1], [1])
    enc = network.image_encoder
    fixed = [network.point_head, enc.encoder, enc.up_layers]
    fixed_before = [_snapshot(m) for m in fixed]
    trained = [network.class_head, enc.up_layers_auto]
    trained_before = [_snapshot(m) for m in trained]
    assert trainer.step(liver) is not None
    assert all(_changed(b, m) for b, m in zip(trained_before, trained, strict=True))
    assert not any(_changed(b, m) for b, m in zip(fixed_before, fixed, strict=True))


def test_supervoxels_become_zero_shot_objects() -> None:
    """A grid of 8 cubic supervoxels, one organ (id 5) filling one cube."""
    sv = torch.zeros(1, 1, 32, 32, 32, dtype=torch.int32)
    for n, (i, j, k) in enumerate(np.ndindex(2, 2, 2)):
        sv[..., 16 * i : 16 * i + 16, 16 * j : 16 * j + 16, 16 * k : 16 * k + 16] = n + 1
    label = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    label[..., :16, :16, :16] = 5
    cfg = SupervoxelSampling(new_object_prob=1.0, edit_object_prob=0.0, max_new=2, max_merge=1, min_voxels=100)
    out, ids = add_supervoxel_objects(label, sv, [5], cfg, np.random.default_rng(0))
    new = [i for i in ids if i != 5]
    assert 5 in ids and new and all(ZERO_SHOT_FIRST <= i <= ZERO_SHOT_LAST for i in new)
    for i in new:  # each new object is exactly one unlabelled supervoxel
        mask = (out == i)[0, 0].numpy()
        assert mask.sum() == 16**3 and len(np.unique(sv[0, 0].numpy()[mask])) == 1
        assert not (label[0, 0].numpy()[mask] > 0).any()
    assert torch.equal(label, label.clone()) and (label == 5).sum() == 16**3, "the input was modified"

    edit = SupervoxelSampling(new_object_prob=0.0, edit_object_prob=1.0, min_voxels=100)
    out, ids = add_supervoxel_objects(label, sv, [5], edit, np.random.default_rng(1))
    assert 5 not in ids and len(ids) == 1, "the organ is replaced by its edited version"
    assert (out == ids[0]).sum() == 2 * 16**3, "organ plus one adjacent supervoxel"


def test_click_session_edits_and_clicks_as_the_server_and_annotator_do() -> None:
    """After a prediction the result is edited by Algorithm 1 and the next click lands on its largest error."""
    from lib.simulate import deepest_voxel
    from lib.trainers.point_trainer import ClickSession, Prompts

    truth = np.zeros((1, 16, 16, 16), bool)
    truth[0, 2:8, 2:8, 2:8] = True
    session = ClickSession(truth)
    first = Prompts(torch.tensor([[[4.0, 4.0, 4.0]]]), torch.tensor([[1]]), torch.tensor([[133]]))
    logits = torch.full((1, 1, 16, 16, 16), -5.0)
    logits[0, 0, 2:14, 2:8, 2:8] = 5.0  # the object, grown by a false-positive slab...
    logits[0, 0, 12:15, 12:15, 12:15] = 5.0  # ...and a blob the click does not touch
    session.edit(first, logits)
    expected = np.zeros((16, 16, 16), np.int16)
    expected[2:14, 2:8, 2:8] = 1
    assert np.array_equal(session.results[0], expected), "only the clicked component is kept"
    prompts = session.next_clicks(first, frozenset(), np.random.default_rng(0), centre_prob=1.0)
    false_positive = np.zeros((16, 16, 16), bool)
    false_positive[8:14, 2:8, 2:8] = True
    assert np.array_equal(session.regions[0], false_positive), "the session keeps the region the click corrects"
    assert prompts.labels.tolist() == [[1, 0]], "the largest error is the false positive: a negative click"
    assert prompts.coords[0, 1].tolist() == deepest_voxel(false_positive).tolist()
    logits2 = logits.clone()
    logits2[0, 0, 8:14] = -5.0  # the network follows the negative click
    logits2[0, 0, 3:5, 3:5, 3:5] = -5.0  # and drops a hole elsewhere: a negative click there removes nothing
    session.edit(prompts, logits2)
    expected[8:14] = 0
    assert np.array_equal(session.results[0], expected), "the negative click removed its component only"


def test_click_region_loss_is_the_mean_cross_entropy_over_each_clicked_region() -> None:
    """Each clicked object's region counts the same whatever its size; an object not clicked adds nothing."""
    from lib.trainers.point_trainer import click_region_loss

    target = torch.zeros(3, 1, 8, 8, 8)
    target[:, :, :4] = 1.0
    logits = torch.randn(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    regions = torch.zeros(3, 8, 8, 8, dtype=torch.bool)
    regions[0, :2] = True  # a large missed region
    regions[1, 5, 5, 5] = True  # a one-voxel false positive
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")[:, 0]
    expected = (ce[0][regions[0]].mean() + ce[1][regions[1]].mean()) / 2
    assert torch.allclose(click_region_loss(logits, target, regions), expected)
    assert click_region_loss(logits, target, torch.zeros_like(regions)) == 0.0
    right = torch.where(target > 0, 20.0, -20.0)
    assert click_region_loss(right, target, regions) < 1e-6, "a correction answered right costs nothing"
