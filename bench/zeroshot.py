#!/usr/bin/env python
"""The paper's supervoxel ablation on real CT: what supervoxels add to zero-shot clicks.

Every arm trains the ``small`` preset's point branch from the same random initialisation, with the
same steps, seed and crops of the abdominal scan's organ labels; the ``lowlevel`` arm adds low-level
supervoxels of every CT in ``--data`` as extra objects (the sarcoma labels are never used), the
``sam`` arm needs SAM supervoxels (a SAM checkpoint; none can be downloaded here). Each arm is
then scored on every case of ``--holdout``: the tumour is prompted with a zero-shot id and corrected
by the simulated annotator (:mod:`lib.simulate`), Dice after 1, 3 and 5 clicks.

    .venv/bin/python bench/zeroshot.py --steps 600 --threads 2
    .venv/bin/python bench/zeroshot.py --score-only      # re-score the saved arms

Prints one JSON line per arm (``mode``, ``dice_1``, ``dice_3``, ``dice_5``, training figures);
writes each arm's weights and figures (``<mode>.pt``, ``<mode>.json``, per case) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from common import DATA, ROOT
from monai.networks.nets.vista3d import VISTA3D

from lib.labels import load_label_dictionary
from lib.model import build_network, load_state, save_state
from lib.simulate import evaluate_clicks, mean_at, scoring_engine
from lib.supervoxels.slic import LOWLEVEL_CONFIG
from lib.trainers.corpus import sarcoma_click_cases
from lib.trainers.data import SARCOMA_ID
from lib.trainers.recipes import RecipeConfig, train_point_recipe

logger = logging.getLogger("zeroshot")

PRESET = "small"
CLICKS = (1, 3, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="the shared real-CT folder")
    p.add_argument("--holdout", type=Path, default=DATA / "sts", help="X_ct.nii.gz + X_gtv.nii.gz cases")
    p.add_argument("--arms", default="organs,lowlevel", help="comma list of organs, lowlevel, sam")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--score-only", action="store_true", help="score the arms' saved <out>/<mode>.pt, no training")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--abdomen-share", type=float, default=0.3, help="share of steps on the labelled scan")
    p.add_argument("--max-minutes", type=float, default=None, help="per-arm safety stop (reported)")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "zeroshot")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "supervoxels" / "lowlevel")
    return p.parse_args(argv)


def train_arm(args: argparse.Namespace, mode: str) -> tuple[VISTA3D, dict]:
    """Train one arm from scratch; its weights go to ``<out>/<mode>.pt``."""
    if mode == "sam":
        raise SystemExit("the sam arm needs a SAM checkpoint to make supervoxels; none can be downloaded here")
    config = RecipeConfig(
        data=args.data,
        cache=args.cache,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        abdomen_share=args.abdomen_share,
        max_minutes=args.max_minutes,
    )
    network, stats = train_point_recipe(config, mode)
    save_state(network, args.out / f"{mode}.pt")
    figures = {
        "steps": stats.steps,
        "train_s": round(stats.seconds, 1),
        "s_per_step": round(stats.s_per_step, 3),
        "loss_first": round(stats.loss_first, 4),
        "loss_last": round(stats.loss_last, 4),
        "seed": args.seed,
        "crop": config.crop,
        "supervoxels": {"n_segments": LOWLEVEL_CONFIG.n_segments} if mode == "lowlevel" else None,
    }
    return network, figures


def saved_arm(args: argparse.Namespace, mode: str) -> tuple[VISTA3D, dict]:
    """An arm trained by an earlier run: its weights, and its training figures from ``<mode>.json``."""
    network = build_network(PRESET)
    load_state(network, args.out / f"{mode}.pt")
    report = args.out / f"{mode}.json"
    keep = ("steps", "train_s", "s_per_step", "loss_first", "loss_last", "seed", "crop", "supervoxels")
    figures = {k: v for k, v in json.loads(report.read_text()).items() if k in keep} if report.exists() else {}
    return network, figures


@torch.inference_mode()
def score_arm(network: VISTA3D, mode: str, holdout: list) -> dict:
    """Clicks-to-Dice of one arm on the holdout, through the server's click path at the served window."""
    engine = scoring_engine(network, PRESET, load_label_dictionary())
    start = time.perf_counter()
    per_case = evaluate_clicks(engine, holdout, SARCOMA_ID, max(CLICKS))
    return {
        **mean_at(per_case, CLICKS),
        "cases": len(per_case),
        "window": engine.patch[0],
        "eval_s": round(time.perf_counter() - start, 1),
        "per_case": {k: [round(x, 4) for x in v] for k, v in per_case.items()},
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    holdout = sarcoma_click_cases(args.holdout, load_label_dictionary())
    results = []
    for mode in args.arms.split(","):
        network, figures = saved_arm(args, mode) if args.score_only else train_arm(args, mode)
        result = {"mode": mode, **score_arm(network, mode, holdout), **figures}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "per_case"}), flush=True)
        (args.out / f"{mode}.json").write_text(json.dumps(result, indent=1) + "\n")
    if len(results) > 1 and results[0]["dice_5"] > 0:
        logger.info("lowlevel / organs at 5 clicks: %.2fx", results[1]["dice_5"] / results[0]["dice_5"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
