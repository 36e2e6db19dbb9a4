"""The point round on the served click path (:mod:`lib.trainers.point_cached`) on real sarcoma CT.

It answers a click as the server does (same window, same head code, same logits) and trains the
point head alone. Whether it fits the labels it trains on is measured by ``bench/fit_own_labels.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.inference.engine import choose_window, window_start
from lib.labels import load_label_dictionary
from lib.model import STARTER_WEIGHTS, LoadedModel, load_model
from lib.simulate import deepest_voxel, model_grid_state, scoring_engine
from lib.trainers.corpus import SARCOMA_CURVE, sarcoma_volume
from lib.trainers.data import SARCOMA_ID, CachedVolume
from lib.trainers.point_cached import (
    ClickCaseSampler,
    EncodedWindows,
    HeadTrainer,
    click_cases,
    train_point_head,
)
from lib.trainers.point_trainer import PointTrainConfig
from lib.trainers.request import TrainRequest

from .conftest import DATA

PATCH = (64, 64, 64)
FIT_CASES = SARCOMA_CURVE[:3]  # STS_006..008: labels the starter never saw


@pytest.fixture(scope="module")
def starter() -> LoadedModel:
    return load_model("small", str(STARTER_WEIGHTS), "/nonexistent", torch.device("cpu"))


@pytest.fixture(scope="module")
def volumes() -> list[CachedVolume]:
    labels = load_label_dictionary()
    return [sarcoma_volume(DATA / "sts", case, labels) for case in FIT_CASES]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_first_click_is_answered_as_the_server_answers_it(starter: LoadedModel, volumes: list) -> None:
    """Same window and, in eval mode, the same logits as :meth:`lib.inference.engine.Engine.points`."""
    labels = load_label_dictionary()
    case = click_cases(volumes[:1], PATCH)[0]
    point = deepest_voxel(case.truth)
    start = choose_window(point, case.image.shape[1:], PATCH, [])
    assert start == window_start(point, case.image.shape[1:], PATCH)

    engine = scoring_engine(starter.network, "small", labels)
    served = engine.points(model_grid_state(case.image, PATCH), point[None], np.asarray([True]), SARCOMA_ID, [0])
    assert served.box == tuple((s, s + p) for s, p in zip(start, PATCH, strict=True))

    trainer = HeadTrainer(starter.network, EncodedWindows(starter.network, PATCH, "fp32"), PointTrainConfig(), lr=0.0)
    with torch.no_grad():
        starter.network.eval()
        logits = trainer.answer(case, [point], [True], start)
    torch.testing.assert_close(logits[0, 0], served.logits, atol=1e-4, rtol=1e-4)


def test_cases_are_the_objects_validation_scores_drawn_by_weight(volumes: list) -> None:
    cases = click_cases(volumes, PATCH)
    assert [c.volume for c in cases] == list(FIT_CASES) and all(c.class_id == SARCOMA_ID for c in cases)
    assert all(c.truth.any() and c.truth.shape == c.image.shape[1:] for c in cases)
    sampler = ClickCaseSampler(cases, [0.0, 0.0, 1.0], seed=0)
    assert {sampler.sample().volume for _ in range(20)} == {FIT_CASES[2]}


def test_a_head_round_changes_the_point_head_only(volumes: list) -> None:
    """The encoder and the class head (all the automatic branch reads) do not change by a bit."""
    labels = load_label_dictionary()
    network = load_model("small", str(STARTER_WEIGHTS), "/nonexistent", torch.device("cpu")).network
    head, encoder, class_head = (_snapshot(m) for m in (network.point_head, network.image_encoder, network.class_head))
    req = TrainRequest(steps=2, lr=1e-3, rounds=2)
    stats = train_point_head(network, volumes[:1], [1.0], req, labels.special)
    assert stats.steps == 2 and np.isfinite(stats.loss_last)
    assert any(not torch.equal(v, network.point_head.state_dict()[k]) for k, v in head.items())
    assert all(torch.equal(v, network.image_encoder.state_dict()[k]) for k, v in encoder.items())
    assert all(torch.equal(v, network.class_head.state_dict()[k]) for k, v in class_head.items())
