"""A point round fits the labels it trains on: their served-path click Dice rises check after check.

The round is the server's (:func:`lib.trainers.point_loop.train_point`, default learning rate,
encoder and point head), on five corrected sarcoma labels from the shipped starter; between its
steps the simulated annotator segments those same five objects through the click path the server
answers with (:func:`lib.simulate.evaluate_clicks`). Before the instance-norm guard
(:mod:`lib.norm_grads`), CPU rounds un-learned their own labels: 0.441 -> 0.331 Dice@1 by step 150.
The long version of this (hundreds of steps, held-out cases beside) is ``bench/fit_own_labels.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.labels import load_label_dictionary
from lib.model import load_model
from lib.simulate import evaluate_clicks, mean_at, scoring_engine
from lib.trainers.corpus import SARCOMA_CURVE, sarcoma_volume
from lib.trainers.data import SARCOMA_ID
from lib.trainers.point_loop import train_point
from lib.trainers.request import TrainRequest

from .conftest import STS

STEPS = 40
CHECKS = (20, 40)
CLICKS = 3
NOISE = 0.01  # a check may dip this much below the previous one
GAIN = 0.05  # at least this far above the starter at the end, mean of Dice@1 and Dice@3


@pytest.fixture(scope="module")
def fit_curve(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Mean Dice@1/@3 on the round's own five labels at step 0 and at each of ``CHECKS``."""
    torch.manual_seed(0)
    labels = load_label_dictionary()
    network = load_model("small", "starter", tmp_path_factory.mktemp("models"), torch.device("cpu")).network
    volumes = [sarcoma_volume(STS, name, labels) for name in SARCOMA_CURVE[:5]]
    cases = [(v.name, v.image, v.label[0].numpy() == SARCOMA_ID) for v in volumes]
    curve: list[float] = []

    def score(step: int) -> bool:
        if step == 0 or step in CHECKS:
            was = network.training
            dice = mean_at(evaluate_clicks(scoring_engine(network, "small", labels), cases, SARCOMA_ID, CLICKS), (1, 3))
            network.train(was)
            curve.append(float(np.mean(list(dice.values()))))
        return False

    score(0)
    req = TrainRequest(steps=STEPS, crop=64)  # the server's round otherwise: its lr, clicks per session, seed
    train_point(network, volumes, [1.0] * len(volumes), req, labels.special, stop_when=score)
    return curve


def test_a_round_raises_its_own_labels_dice_check_after_check(fit_curve: list[float]) -> None:
    print(f"own labels' mean Dice@1/@3 at steps 0, {CHECKS}: {fit_curve}")
    start, *checks = fit_curve
    assert len(checks) == len(CHECKS), fit_curve
    for before, after in zip(fit_curve, checks, strict=False):
        assert after >= before - NOISE, f"the round fell on its own labels: {fit_curve}"
    assert checks[-1] >= start + GAIN, f"the round did not fit its own labels: {fit_curve}"
