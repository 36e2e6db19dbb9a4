"""The benchmarks' case folders (bench/common.py; listed by lib.trainers.corpus.case_names): which pairs a
folder holds, and the failures that name the fix."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.common import parse_counts, take_cases
from lib.trainers.corpus import case_names


def _folder(tmp_path: Path, files: list[str]) -> Path:
    for name in files:
        (tmp_path / name).touch()  # the listing looks at names only
    return tmp_path


def test_case_names_lists_cases_with_both_files_sorted(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        ["b_ct.nii.gz", "b_gtv.nii.gz", "a_ct.nii.gz", "a_gtv.nii.gz", "ct_only_ct.nii.gz", "gtv_only_gtv.nii.gz",
         "c_ct.nii", "c_gtv.nii.gz", "notes.txt"],
    )  # fmt: skip
    assert case_names(folder) == ["a", "b"]


def test_take_cases_first_n_in_name_order(tmp_path: Path) -> None:
    folder = _folder(tmp_path, [f"P{i:02d}_{k}.nii.gz" for i in range(12) for k in ("ct", "gtv")])
    assert take_cases(folder, 3, flag="--train") == ["P00", "P01", "P02"]
    assert take_cases(folder, None, flag="--holdout") == [f"P{i:02d}" for i in range(12)]
    assert take_cases(folder, 2, names=["P05", "P01", "P09"]) == ["P05", "P01"]


def test_take_cases_too_few_names_the_flag_and_counts(tmp_path: Path) -> None:
    folder = _folder(tmp_path, [f"P{i}_{k}.nii.gz" for i in range(4) for k in ("ct", "gtv")])
    with pytest.raises(SystemExit, match=r"--train: 30 cases needed, .* has 4; give --train a folder with at least 30"):
        take_cases(folder, 30, flag="--train")
    with pytest.raises(SystemExit, match=r"--train: 30 cases needed, .* has 2 in the default split"):
        take_cases(folder, 30, names=["P0", "P1"], flag="--train")


def test_take_cases_empty_folder_and_missing_named_case(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--holdout: 1 cases needed, .* has 0"):
        take_cases(tmp_path, None, flag="--holdout")
    folder = _folder(tmp_path, ["P0_ct.nii.gz", "P0_gtv.nii.gz", "P1_ct.nii.gz"])
    with pytest.raises(SystemExit, match=r"lacks <case>_ct.nii.gz / <case>_gtv.nii.gz for P1, P2$"):
        take_cases(folder, 1, names=["P0", "P1", "P2"], flag="--train")


@pytest.mark.parametrize(
    ("text", "expected"), [("0,5,10,15,20", [0, 5, 10, 15, 20]), ("30", [30]), ("0, 10 ,30", [0, 10, 30])]
)
def test_parse_counts(text: str, expected: list[int]) -> None:
    assert parse_counts(text) == expected


@pytest.mark.parametrize("text", ["0,5,x", "", "10,5", "0,0,5", "-5,0"])
def test_parse_counts_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        parse_counts(text)
