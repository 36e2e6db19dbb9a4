"""The shared training loop: a run interrupted and resumed from its checkpoint ends where an uninterrupted one does."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from lib.labels import load_label_dictionary
from lib.model import build_network
from lib.trainers.data import SARCOMA_ID, CachedVolume, VolumeSampler, load_volume, remap_lookup, sts_pair
from lib.trainers.point_trainer import PointTrainConfig, PointTrainer
from lib.trainers.schedule import Checkpoint, run_steps, seed_everything

from .conftest import DATA

STEPS = 4
# Resuming is about state, not scale: 32³ crops (the smallest a request accepts) hold the same objects,
# clicks and optimiser moments as the 64³ window, at an eighth of the work.
CROP = 32


@pytest.fixture(scope="module")
def volume() -> CachedVolume:
    labels = load_label_dictionary()
    return load_volume("STS_001", sts_pair(DATA, "STS_001"), remap_lookup({1: SARCOMA_ID}), labels.preprocessing)


class Interrupted(Exception):
    pass


def _run(volume: CachedVolume, checkpoint: Checkpoint | None = None, stop_at: int | None = None) -> torch.nn.Module:
    """A fresh seeded network, trainer and sampler, trained for STEPS steps (or killed after ``stop_at``)."""
    seed_everything(0)
    network = build_network("small")
    trainer = PointTrainer(network, PointTrainConfig(rounds=2, max_objects=1), lr=1e-3, seed=0)
    sampler = VolumeSampler([volume], (CROP,) * 3, seed=0)

    def on_step(n: int, loss: float) -> None:
        if n == stop_at:
            raise Interrupted

    with contextlib.suppress(Interrupted):
        run_steps(trainer, sampler, STEPS, warmup=1, on_step=on_step, checkpoint=checkpoint)
    return network


def test_resumed_run_matches_an_uninterrupted_one(volume: CachedVolume, tmp_path: Path) -> None:
    reference = _run(volume)
    checkpoint = Checkpoint(tmp_path / "run.ckpt", every=2)
    stopped = _run(volume, checkpoint, stop_at=3)  # killed after step 3: the checkpoint holds step 2
    assert torch.load(checkpoint.path, weights_only=False)["losses"].__len__() == 2
    resumed = _run(volume, checkpoint)  # a new process: fresh objects, same seeds, resumes at step 2
    assert len(torch.load(checkpoint.path, weights_only=False)["losses"]) == STEPS
    ref, res, mid = reference.state_dict(), resumed.state_dict(), stopped.state_dict()
    # Same crops, clicks and optimiser state: equal up to float rounding of the restored moments.
    for key in ref:
        torch.testing.assert_close(res[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(mid[k], ref[k]) for k in ref), "the killed run stopped short of the end"
