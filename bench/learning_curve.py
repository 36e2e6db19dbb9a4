#!/usr/bin/env python
"""The annotation loop, simulated on real CT: how much the point branch gains per corrected label.

Cases of ``--train`` are "corrected" one at a time (the ground truth stands in for the annotator's
final label, saved under the zero-shot id 133) into a temporary local datastore; every ``--every``
labels the server's own point round runs in process (:class:`lib.trainers.tasks.PointTrainTask`:
persisted validation split, replay, promotion gate, model store) and the served version is
reloaded as the server does. After 0, 5, 10 and 20 labels every ``--holdout`` case is segmented
by the simulated annotator: Dice after 1, 3 and 5 clicks. Forgetting: the automatic branch's
Dice on the abdominal scan's organs before and after.

    .venv/bin/python bench/learning_curve.py --weights artifacts/zeroshot/lowlevel.pt

Without ``--train``/``--holdout``, ``../shared/data/sts`` is split: STS_001..020 train, 021..035 holdout.
Prints one JSON line; writes ``learning_curve.json`` and ``learning_curve.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import DATA, ROOT

from lib.datastore import SafeLocalDatastore
from lib.engine import Engine
from lib.labels import load_label_dictionary
from lib.model import load_model, patch_size_for
from lib.model_store import ModelReloader, ModelStore
from lib.settings import Settings
from lib.simulate import evaluate_clicks, mean_at, organ_auto_dice
from lib.trainers.corpus import ABDOMEN, abdomen_volume, case_names, sarcoma_click_cases
from lib.trainers.data import SARCOMA_ID
from lib.trainers.tasks import PointTrainTask

logger = logging.getLogger("learning_curve")

PRESET = "small"
CLICKS = (1, 3, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, help="X_ct.nii.gz + X_gtv.nii.gz cases to correct, in name order")
    p.add_argument("--holdout", type=Path, help="cases to measure on")
    p.add_argument("--weights", type=Path, default=ROOT / "artifacts" / "zeroshot" / "lowlevel.pt")
    p.add_argument("--every", type=int, default=5, help="a point round after every k labels")
    p.add_argument("--measure-at", default="0,5,10,20", help="label counts at which the holdout is measured")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps per round")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--tolerance", type=float, default=0.01, help="the promotion gate's tolerance")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-forgetting", action="store_true", help="skip the organs' auto Dice (saves ~2 min)")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "learning_curve")
    return p.parse_args(argv)


def default_split(root: Path) -> tuple[Path, Path]:
    """STS_001..020 / STS_021..035 of the shared data, as folders of links."""
    sts = DATA / "sts"
    out = []
    for name, cases in (("train", range(1, 21)), ("holdout", range(21, 36))):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in cases:
            for kind in ("ct", "gtv"):
                (folder / f"STS_{i:03d}_{kind}.nii.gz").symlink_to(sts / f"STS_{i:03d}_{kind}.nii.gz")
        out.append(folder)
    return out[0], out[1]


def save_final(ds: SafeLocalDatastore, folder: Path, case: str, scratch: Path) -> None:
    """The annotator submits the ground truth as the final label (tumour = zero-shot id 133)."""
    gtv = nib.load(str(folder / f"{case}_gtv.nii.gz"))
    path = scratch / f"{case}_final.nii.gz"
    data = (np.asarray(gtv.dataobj) > 0).astype(np.uint8) * SARCOMA_ID
    nib.save(nib.Nifti1Image(data, gtv.affine), str(path))  # type: ignore[attr-defined]
    ds.save_label(case, str(path), "final", {})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = load_label_dictionary()
    measure_at = [int(x) for x in args.measure_at.split(",")]
    work = Path(tempfile.mkdtemp(prefix="learning_curve_"))
    train_dir, holdout_dir = (args.train, args.holdout) if args.train else default_split(work / "cases")
    train_cases = case_names(train_dir)[: max(measure_at)]
    holdout = sarcoma_click_cases(holdout_dir, labels)

    studies = work / "studies"
    studies.mkdir()
    for case in train_cases:
        os.symlink((train_dir / f"{case}_ct.nii.gz").resolve(), studies / f"{case}.nii.gz")
    ds = SafeLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    conf = {"weights": str(args.weights), "train_steps": str(args.steps), "train_threads": str(args.threads)}
    settings = Settings.from_conf({**conf, "promote_tolerance": str(args.tolerance)})
    model = load_model(PRESET, str(args.weights), work, torch.device("cpu"))
    store = ModelStore(studies / ".vista3d" / "models")
    reloader = ModelReloader(model, store)
    task = PointTrainTask(settings, model, store, labels, str(studies))
    engine = Engine(model, patch_size_for(PRESET), labels.sw_overlap, labels.special, precision="bf16")

    abdomen = None if args.no_forgetting else abdomen_volume(DATA, labels)
    organs_before = (
        organ_auto_dice(engine, labels, abdomen.image, abdomen.label[0].numpy()) if abdomen is not None else None
    )
    curve: dict[str, list] = {"labels": [], **{f"dice_{k}": [] for k in CLICKS}, "served_version": []}
    rounds = []
    start = time.perf_counter()
    for n in range(0, len(train_cases) + 1):
        if n > 0:
            save_final(ds, train_dir, train_cases[n - 1], work)
            if n % args.every == 0:
                result = task({"lr": args.lr, "seed": args.seed + n}, ds)
                rounds.append({k: result[k] for k in ("promoted", "reason", "steps", "s_per_step", "seconds")})
                logger.info("after %d labels: %s", n, result["reason"])
                reloader.refresh()
        if n in measure_at:
            scores = mean_at(evaluate_clicks(engine, holdout, SARCOMA_ID, max(CLICKS)), CLICKS)
            curve["labels"].append(n)
            curve["served_version"].append(model.served_version)
            for k in CLICKS:
                curve[f"dice_{k}"].append(scores[f"dice_{k}"])
            logger.info("%d labels (served v%d): %s", n, model.served_version, scores)
    organs_after = (
        organ_auto_dice(engine, labels, abdomen.image, abdomen.label[0].numpy()) if abdomen is not None else None
    )
    result = {
        **curve,
        "holdout_cases": len(holdout),
        "train_cases": len(train_cases),
        "every": args.every,
        "steps_per_round": args.steps,
        "weights": str(args.weights),
        "rounds": rounds,
        "organs_auto_dice_before": organs_before,
        "organs_auto_dice_after": organs_after,
        "organs_mean_before": round(float(np.mean(list(organs_before.values()))), 4) if organs_before else None,
        "organs_mean_after": round(float(np.mean(list(organs_after.values()))), 4) if organs_after else None,
        "abdomen": ABDOMEN[0],
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_curve.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "learning_curve.png")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for k in CLICKS:
        ax.plot(result["labels"], result[f"dice_{k}"], marker="o", label=f"{k} click{'s' * (k > 1)}")
    ax.set_xlabel("corrected labels (sarcoma, final)")
    ax.set_ylabel(f"holdout Dice ({result['holdout_cases']} cases)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("VISTA3D small: point branch learning from corrections", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
