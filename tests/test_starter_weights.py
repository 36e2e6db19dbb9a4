"""The shipped ``small`` starter checkpoint: it loads as the default weights, its report says what it
was trained on, and it still does what the report measured (a regression guard on fixed weights and
fixed real CT, not an accuracy benchmark: ``tools/train_starter.py`` measures that)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lib.inference.engine import Engine
from lib.labels import load_label_dictionary
from lib.model import STARTER_WEIGHTS, load_model, patch_size_for
from lib.simulate import clicks_to_dice, model_grid_state
from lib.trainers.corpus import SARCOMA_STARTER, sarcoma_volume
from lib.trainers.data import SARCOMA_ID

from .conftest import STS
from .helpers import MACHINE_PRECISION

REPORT = STARTER_WEIGHTS.with_suffix(".json")
HELDOUT_CASE = "STS_033"  # never seen by the starter (it trains on STS_001..005), nor by the learning curve
MIN_HELDOUT_DICE = 0.5  # measured 0.670 when the weights were made (bf16, 1 thread)


def test_starter_is_the_small_default_and_its_report_names_its_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert STARTER_WEIGHTS.is_file() and STARTER_WEIGHTS.stat().st_size < 20 * 2**20
    caplog.set_level(logging.INFO, logger="lib.model")
    model = load_model("small", "starter", tmp_path, torch.device("cpu"))
    assert model.warning is None and model.version == "small:small_starter.pt"
    assert str(STARTER_WEIGHTS) in caplog.text, "the log must name the weights it loaded"
    report = json.loads(REPORT.read_text())
    assert "tools/train_starter.py" in report["command"]
    seen = set(report["trained_on"]["sarcoma_as_zero_shot_133"])
    assert HELDOUT_CASE not in seen and seen == set(SARCOMA_STARTER)


def test_starter_segments_a_heldout_sarcoma_from_one_click(tmp_path: Path) -> None:
    """One click at the tumour's centre (zero-shot id 133), on a case the starter never saw."""
    labels = load_label_dictionary()
    model = load_model("small", "starter", tmp_path, torch.device("cpu"))
    engine = Engine(model, patch_size_for("small"), labels.sw_overlap, labels.special, precision=MACHINE_PRECISION)
    vol = sarcoma_volume(STS, HELDOUT_CASE, labels)
    truth = vol.label[0].numpy() == SARCOMA_ID
    with torch.inference_mode():
        dice = clicks_to_dice(engine, model_grid_state(vol.image, engine.patch), truth, SARCOMA_ID, 1)[0]
    assert dice > MIN_HELDOUT_DICE, f"starter Dice@1 on {HELDOUT_CASE} fell to {dice:.3f}"
