"""Uncertainty active learning: class-head entropy scored into the datastore, and the strategy that reads it.

Real CT (two sarcoma cases and the abdominal scan) in a temporary MONAI Label ``LocalDatastore``,
scored by a seeded random ``small`` network.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets.vista3d import ClassMappingClassify
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.activelearning.uncertainty import (
    UNCERTAINTY_KEY,
    Uncertainty,
    UncertaintyScoring,
    binary_entropy,
    class_logits,
    image_uncertainty,
    whole_volume_window,
)
from lib.data.imageio import load_image
from lib.inference.preprocess import preprocess
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, build_network, patch_size_for

from .conftest import ABDOMEN_SEG_SM, ABDOMEN_SM, STS

IMAGES = {"STS_001": STS / "STS_001_ct.nii.gz", "STS_002": STS / "STS_002_ct.nii.gz", "abdomen": ABDOMEN_SM}


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(build_network("small").eval(), "small", "/weights/seed0.pt", torch.device("cpu"))


def make_datastore(root: Path) -> LocalDatastore:
    for name, path in IMAGES.items():
        os.symlink(path, root / f"{name}.nii.gz")
    return LocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)


def label_final(datastore: LocalDatastore, image_id: str) -> None:
    # Any label file will do: the strategy and the scorer only ask whether a final label exists.
    datastore.save_label(image_id, str(ABDOMEN_SEG_SM), DefaultLabelTag.FINAL, {})


class CountingScoring(UncertaintyScoring):
    """Records the images it runs the network on (as the files the datastore links to)."""

    def __init__(self, model_provider: Callable[[], LoadedModel]) -> None:
        super().__init__(model_provider)
        self.runs: list[str] = []

    def score_image(self, model: LoadedModel, path: str) -> float:
        self.runs.append(Path(path).resolve().name)
        return super().score_image(model, path)


def test_binary_entropy_matches_definition() -> None:
    z = torch.tensor([-200.0, -30.0, -5.0, -0.3, 0.0, 0.7, 4.0, 17.0, 200.0])
    p = torch.sigmoid(z.double())
    expected = -(p * p.log() + (1 - p) * (1 - p).log()).nan_to_num(0.0)
    got = binary_entropy(z)
    assert torch.all(got >= 0)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert got[4].item() == pytest.approx(math.log(2), rel=1e-7)


def test_class_logits_are_the_networks(model: LoadedModel) -> None:
    """The chunked class products equal MONAI's own forward (the same float32 operations)."""
    ids = sorted(load_label_dictionary().supported)[:37]  # three chunks, the last partial
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        reference = model.network(x, class_vector=torch.tensor(ids).unsqueeze(1), transpose=True)[0]
        chunks = torch.cat(list(class_logits(model.network, x, ids)))
        strided = torch.cat(list(class_logits(model.network, x, ids, region=(20, 32, 9), stride=2)))
    assert torch.allclose(chunks, reference, atol=1e-5)
    assert torch.allclose(strided, reference[:, :20:2, ::2, :9:2], atol=1e-5)


def test_whole_volume_window_shrinks_isotropically_and_pads() -> None:
    big = torch.rand(1, 243, 201, 59)
    window, inner = whole_volume_window(big, (96, 96, 96))
    assert window.shape == (1, 1, 96, 96, 96)
    assert inner == (96, 79, 23)  # one factor, 96/243, on every axis
    assert torch.all(window[..., 79:, :] == 0) and torch.all(window[..., 23:] == 0)
    small = torch.rand(1, 50, 60, 70)
    window, inner = whole_volume_window(small, (96, 96, 96))
    assert inner == (50, 60, 70) and torch.equal(window[0, :, :50, :60, :70], small)  # never enlarged


def test_scores_stored_per_version(model: LoadedModel, tmp_path: Path) -> None:
    datastore = make_datastore(tmp_path)
    served = model
    scoring = CountingScoring(lambda: served)
    result = scoring({}, datastore)
    assert sorted(result["scored"]) == sorted(IMAGES) and result["failed"] == {}
    assert sorted(scoring.runs) == sorted(path.resolve().name for path in IMAGES.values())
    scores = {i: result["scored"][i]["score"] for i in IMAGES}
    assert all(math.isfinite(s) and 0 <= s <= math.log(2) for s in scores.values()), scores
    assert len({round(s, 4) for s in scores.values()}) == len(scores), f"scores do not tell images apart: {scores}"

    # Stored in the datastore's file with the weights version: a fresh datastore object reads them back.
    reopened = LocalDatastore(str(tmp_path), extensions=["*.nii.gz"], auto_reload=False)
    for image_id, score in scores.items():
        stored = reopened.get_image_info(image_id)[UNCERTAINTY_KEY]
        assert stored["score"] == score and stored["version"] == "small:seed0.pt"

    # Same version: nothing runs, nothing is rewritten.
    scoring.runs.clear()
    again = scoring({}, datastore)
    assert scoring.runs == [] and again["scored"] == {} and sorted(again["skipped"]) == sorted(IMAGES)
    assert datastore.get_image_info("STS_001")[UNCERTAINTY_KEY] == result["scored"]["STS_001"]

    # A labelled image is not scored; a new version rescores the others, with the same network the same score.
    label_final(datastore, "STS_002")
    served = dataclasses.replace(model, served_version=1)
    third = scoring({}, datastore)
    assert sorted(scoring.runs) == sorted(IMAGES[i].resolve().name for i in ("STS_001", "abdomen"))
    assert sorted(third["scored"]) == ["STS_001", "abdomen"] and third["version"] == "small:v1"
    assert datastore.get_image_info("STS_001")[UNCERTAINTY_KEY]["version"] == "small:v1"
    assert datastore.get_image_info("STS_002")[UNCERTAINTY_KEY]["version"] == "small:seed0.pt"
    assert third["scored"]["abdomen"]["score"] == scores["abdomen"]


def test_all_zero_logits_give_ln2(model: LoadedModel) -> None:
    """A class head whose class embeddings are all zero outputs logit 0, p = 1/2: entropy ln 2 in every voxel."""
    network = copy.deepcopy(model.network)
    head = network.class_head
    assert isinstance(head, ClassMappingClassify)
    last = head.mlp[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    image = preprocess(load_image(str(ABDOMEN_SM)), load_label_dictionary().preprocessing).as_tensor()
    ids = sorted(load_label_dictionary().supported)
    score = image_uncertainty(network, image, ids, patch_size_for("small"))
    assert score == pytest.approx(math.log(2), rel=1e-6)
    # The unchanged network is far from that bound on the same image.
    assert image_uncertainty(model.network, image, ids, patch_size_for("small")) < 0.6


def set_scores(datastore: LocalDatastore, scores: dict[str, float]) -> None:
    for image_id, score in scores.items():
        datastore.update_image_info(image_id, {UNCERTAINTY_KEY: {"score": score, "version": "small:v1"}})


def test_strategy_serves_most_uncertain_unlabelled(tmp_path: Path) -> None:
    datastore = make_datastore(tmp_path)
    strategy = Uncertainty()
    # Not scored yet: most uncertain of all, first in id order.
    set_scores(datastore, {"STS_001": 0.2, "STS_002": 0.5})
    assert strategy({}, datastore) == {"id": "abdomen", "uncertainty": None}
    set_scores(datastore, {"abdomen": 0.3})
    assert strategy({}, datastore) == {"id": "STS_002", "uncertainty": 0.5}
    label_final(datastore, "STS_002")
    assert strategy({}, datastore) == {"id": "abdomen", "uncertainty": 0.3}
    # Served by this strategy a moment ago (MONAI Label's endpoint records it): another annotator gets the next.
    datastore.update_image_info("abdomen", {"strategy": {"uncertainty": {"ts": int(time.time())}}})
    assert strategy({"strategy": "uncertainty"}, datastore)["id"] == "STS_001"
    assert strategy({"strategy": "random"}, datastore)["id"] == "abdomen"
    label_final(datastore, "STS_001")
    assert strategy({"strategy": "uncertainty"}, datastore)["id"] == "abdomen"  # nothing else left
    label_final(datastore, "abdomen")
    assert strategy({}, datastore) == {}


def test_strategy_on_empty_datastore(model: LoadedModel, tmp_path: Path) -> None:
    datastore = LocalDatastore(str(tmp_path), extensions=["*.nii.gz"], auto_reload=False)
    assert Uncertainty()({}, datastore) == {}
    assert UncertaintyScoring(lambda: model)({}, datastore)["scored"] == {}


def test_rejects_bad_arguments(model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="precision"):
        UncertaintyScoring(lambda: model, precision="fp8")
    with pytest.raises(ValueError, match="class_ids"):
        UncertaintyScoring(lambda: model, class_ids=[])
    with pytest.raises(ValueError, match="no classes"):
        image_uncertainty(model.network, torch.zeros(1, 8, 8, 8), [], (96, 96, 96))
    assert np.isfinite(image_uncertainty(model.network, torch.zeros(1, 8, 8, 8), [1], (16, 16, 16)))
