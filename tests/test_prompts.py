"""Request parameters parsed into prompts; every client mistake is a PromptError naming the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lib.labels import load_label_dictionary
from lib.prompts import AutoPrompt, OutputOptions, PointPrompt, PromptError, parse_output, parse_prompt
from lib.zero_shot import ZeroShotRegistry

LABELS = load_label_dictionary()


@pytest.fixture
def registry(tmp_path: Path) -> ZeroShotRegistry:
    return ZeroShotRegistry(tmp_path / "zero_shot.json")


def parse(params: dict[str, Any], registry: ZeroShotRegistry) -> AutoPrompt | PointPrompt:
    return parse_prompt(params, LABELS, registry)


def test_no_label_prompt_means_everything(registry: ZeroShotRegistry) -> None:
    prompt = parse({}, registry)
    assert isinstance(prompt, AutoPrompt)
    assert len(prompt.class_ids) == 117 and prompt.class_ids == LABELS.everything


def test_groups_expand_and_names_resolve(registry: ZeroShotRegistry) -> None:
    prompt = parse({"label_prompt": [20, "Liver", "3"]}, registry)
    assert isinstance(prompt, AutoPrompt)
    assert prompt.class_ids == (28, 29, 30, 31, 32, 1, 3)


def test_ohif_point_prompt(registry: ZeroShotRegistry) -> None:
    prompt = parse({"points": [[1, 2, 3], [4, 5, 6]], "point_labels": [1, 0], "label_prompt": [6]}, registry)
    assert isinstance(prompt, PointPrompt)
    assert prompt.points.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert prompt.positive.tolist() == [True, False]
    assert prompt.class_id == 6 and not prompt.zero_shot


def test_special_class_point_labels_2_3_are_accepted(registry: ZeroShotRegistry) -> None:
    prompt = parse({"points": [[1, 2, 3], [4, 5, 6]], "point_labels": [3, 2], "label_prompt": [26]}, registry)
    assert isinstance(prompt, PointPrompt)
    assert prompt.positive.tolist() == [True, False]


def test_slicer_form(registry: ZeroShotRegistry) -> None:
    prompt = parse({"label": "spleen", "foreground": [[1, 2, 3]], "background": [[4, 5, 6], [7, 8, 9]]}, registry)
    assert isinstance(prompt, PointPrompt)
    assert prompt.class_id == 3
    assert prompt.positive.tolist() == [True, False, False]


def test_new_name_is_proposed_not_registered(registry: ZeroShotRegistry, tmp_path: Path) -> None:
    """Parsing registers nothing: the infer task reserves the id once the whole request is valid."""
    prompt = parse({"points": [[1, 2, 3]], "point_labels": [1], "label_prompt": ["Sarcoma"]}, registry)
    assert isinstance(prompt, PointPrompt)
    assert prompt.class_id == 133 and prompt.zero_shot and prompt.new_name == "sarcoma"
    assert registry.as_dict() == {} and not (tmp_path / "zero_shot.json").exists()
    registry.assign("sarcoma")
    again = parse({"points": [[1, 2, 3]], "point_labels": [1], "label_prompt": ["SARCOMA "]}, registry)
    assert isinstance(again, PointPrompt) and again.class_id == 133 and again.new_name is None
    other = parse({"points": [[1, 2, 3]], "point_labels": [1], "label_prompt": ["cyst"]}, registry)
    assert isinstance(other, PointPrompt) and other.class_id == 134 and other.new_name == "cyst"


def test_points_per_request_are_capped(registry: ZeroShotRegistry) -> None:
    points = [[1, 2, 3]] * 6
    with pytest.raises(PromptError, match="points has 6 clicks; at most 5 per request"):
        parse_prompt({"points": points, "point_labels": [1] * 6, "label_prompt": [1]}, LABELS, registry, max_points=5)
    slicer = {"label": "liver", "foreground": [[1, 2, 3]] * 3, "background": [[1, 2, 3]] * 3}
    with pytest.raises(PromptError, match="background has 3 clicks; at most 2"):
        parse_prompt(slicer, LABELS, registry, max_points=5)


def test_output_options_come_from_an_allow_list() -> None:
    assert parse_output({}) == OutputOptions(".nii.gz", "uint8", False)
    assert parse_output({"result_extension": ".nrrd", "result_dtype": "uint16"}) == OutputOptions(".nrrd", "uint16")
    for params, message in (
        ({"result_extension": ".txt"}, "result_extension must be one of"),
        ({"result_extension": "/../../x.nii.gz"}, "result_extension must be one of"),
        ({"result_dtype": "evil"}, "result_dtype must be one of"),
        ({"result_compress": "yes"}, "result_compress must be true or false"),
    ):
        with pytest.raises(PromptError, match=message):
            parse_output(params)


BAD = [
    ({"label_prompt": []}, "label_prompt is empty"),
    ({"label_prompt": [1.5]}, "must be an integer"),
    ({"label_prompt": ["abc"]}, "not a VISTA3D class"),
    ({"label_prompt": [16]}, "not supported"),
    ({"label_prompt": [999]}, "not a class id"),
    ({"label_prompt": [0]}, "not a class id"),
    ({"label_prompt": [200]}, "zero-shot ids"),
    ({"points": [[1, 2, 3]], "point_labels": [1, 0], "label_prompt": [1]}, "point_labels has 2"),
    ({"points": [[1, 2, 3]], "point_labels": [5], "label_prompt": [1]}, "must be 1 (positive) or 0"),
    ({"points": [[1, 2]], "point_labels": [1], "label_prompt": [1]}, "points[0] must be [i, j, k]"),
    ({"points": [[1, "x", 3]], "point_labels": [1], "label_prompt": [1]}, "must be an integer"),
    ({"points": "1,2,3", "point_labels": [1], "label_prompt": [1]}, "must be a list"),
    ({"points": [[1, 2, 1e308]], "point_labels": [1], "label_prompt": [1]}, "must be an integer of at most"),
    ({"points": [[1, 2, float("nan")]], "point_labels": [1], "label_prompt": [1]}, "must be an integer"),
    ({"points": [[1, 2, "9" * 5000]], "point_labels": [1], "label_prompt": [1]}, "must be an integer"),
    ({"points": [[1, 2, 3]], "point_labels": [1], "label_prompt": ["x" * 65]}, "at most 64 characters"),
    ({"points": [[1, 2, 3]], "point_labels": [1], "label_prompt": [2]}, "is a group of classes"),
    ({"points": [[1, 2, 3]], "point_labels": [1], "label_prompt": [1, 3]}, "must hold one id"),
    ({"points": [[1, 2, 3]], "point_labels": [1]}, "need one label_prompt"),
    ({"point_labels": [1]}, "point_labels given without points"),
]


@pytest.mark.parametrize(("params", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_params_raise_prompt_error_naming_the_problem(
    params: dict[str, Any], message: str, registry: ZeroShotRegistry
) -> None:
    with pytest.raises(PromptError, match=None) as err:
        parse(params, registry)
    assert message in str(err.value)


def test_points_outside_the_image_are_rejected(registry: ZeroShotRegistry) -> None:
    prompt = parse({"points": [[1, 2, 3], [10, 2, 3]], "point_labels": [1, 1], "label_prompt": [1]}, registry)
    assert isinstance(prompt, PointPrompt)
    prompt.check_inside((11, 5, 5))
    with pytest.raises(PromptError, match=r"point 1 \[10, 2, 3\] lies outside the image of shape \[10, 5, 5\]"):
        prompt.check_inside((10, 5, 5))
    assert np.all(prompt.points >= 0)
