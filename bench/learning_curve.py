#!/usr/bin/env python
"""The annotation loop, simulated on real CT: how much the served model gains per corrected label.

From the shipped starter (``--weights``, default: the ``small`` preset's starter), cases (by default
ones the starter never saw) are "corrected" one at a time (the ground truth stands in for the
annotator's final label, saved under the zero-shot id 133) into a temporary local datastore; every ``--every``
labels the server's own point round runs in process (:class:`lib.trainers.tasks.PointTrainTask`:
persisted validation split, replay, round learning rate, early stop, gate, model store) and the
served version is reloaded as the server does.

At each ``--measure-at`` label count (default 0, 5, 10, 15, 20; the largest is how many cases are
corrected) every held-out case is segmented by the simulated annotator: Dice after 1, 3 and 5
clicks. Every candidate, promoted or refused, is scored on the held-out cases as well, so each gate
decision can be judged: right when it promoted a candidate at least as good on the held-out cases
(mean Dice over 5 clicks) or refused a worse one; the decisions are tabled at the end. Forgetting:
the automatic branch's Dice on the abdominal scan's organs before and after.

Cases: by default the shared split of ``../shared/data/sts`` (the 20 ``SARCOMA_CURVE`` cases
corrected, the 10 ``SARCOMA_HELDOUT`` held out); ``--train DIR`` and ``--holdout DIR`` take any
folders of ``<case>_ct.nii.gz`` + ``<case>_gtv.nii.gz`` pairs (any label voxel above 0 is the
object; corrected in name order), e.g. 30 labels: ``--train DIR --measure-at 0,10,20,30``.

    .venv/bin/python bench/learning_curve.py [--cached | --frozen-encoder]
    .venv/bin/python bench/learning_curve.py --train my/train --holdout my/holdout --measure-at 0,10,20,30

Prints one JSON line; writes ``learning_curve.json`` and ``learning_curve.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from common import DATA, ROOT, parse_counts, take_cases
from monai.networks.nets.vista3d import VISTA3D

from lib.data.datastore import SafeLocalDatastore
from lib.labels import LabelDictionary, load_label_dictionary
from lib.model import STARTER_WEIGHTS, LoadedModel, load_model
from lib.model_store import ModelReloader, ModelStore
from lib.settings import Settings
from lib.simulate import evaluate_clicks, mean_at, organ_auto_dice, scoring_engine
from lib.trainers.corpus import ABDOMEN, SARCOMA_CURVE, SARCOMA_HELDOUT, abdomen_volume, sarcoma_click_cases
from lib.trainers.data import SARCOMA_ID, CachedVolume
from lib.trainers.request import TrainRequest
from lib.trainers.tasks import PointTrainTask, Trained

logger = logging.getLogger("learning_curve")

PRESET = "small"
CLICKS = (1, 3, 5)
SARCOMA_DIR = DATA / "sts"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=STARTER_WEIGHTS, help="start weights (default: the starter)")
    p.add_argument("--every", type=int, default=5, help="a point round after every k labels")
    p.add_argument("--train", type=Path, help="folder of <case>_ct/_gtv.nii.gz to correct (default: the shared split)")
    p.add_argument("--holdout", type=Path, help="folder of <case>_ct/_gtv.nii.gz held out (default: the shared split)")
    p.add_argument(
        "--measure-at",
        type=parse_counts,
        default="0,5,10,15,20",
        help="label counts at which the holdout is measured; the largest is how many cases are corrected",
    )
    p.add_argument("--steps", type=int, help="optimiser steps per round at most (default: the server's)")
    p.add_argument(
        "--steps-per-label", type=int, help="steps per training label at most (default: the server's; 0: no cap)"
    )
    p.add_argument("--lr", type=float, help="base learning rate (default: the server's)")
    p.add_argument("--tolerance", type=float, help="the promotion gate's tolerance (default: the server's)")
    p.add_argument("--patience", type=int, help="early-stop checks without a better score (default: the server's)")
    p.add_argument(
        "--click-weight", type=float, help="weight of the correction-region loss (default: the server's; 0: off)"
    )
    p.add_argument("--check-every", type=int, help="steps between early-stop checks (default: the server's)")
    kind = p.add_mutually_exclusive_group()  # a cached round trains the head alone whatever train_encoder says
    kind.add_argument("--cached", action="store_true", help="rounds on the served click path (encoder frozen)")
    kind.add_argument(
        "--frozen-encoder", action="store_true", help="rounds with train_encoder=false (point decoder and head only)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-forgetting", action="store_true", help="skip the organs' auto Dice (saves ~2 min)")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "learning_curve")
    return p.parse_args(argv)


def split(args: argparse.Namespace) -> tuple[Path, list[str], Path, list[str]]:
    """The folder and names of the cases to correct (as many as the largest ``--measure-at``) and of the
    held-out ones; SystemExit when a folder has too few or the two share a CT."""
    train_dir, holdout_dir = args.train or SARCOMA_DIR, args.holdout or SARCOMA_DIR
    train = take_cases(train_dir, max(args.measure_at), None if args.train else SARCOMA_CURVE, "--train")
    holdout = take_cases(holdout_dir, None, None if args.holdout else SARCOMA_HELDOUT, "--holdout")
    shared = {(train_dir / f"{c}_ct.nii.gz").resolve() for c in train} & {
        (holdout_dir / f"{c}_ct.nii.gz").resolve() for c in holdout
    }
    if shared:
        raise SystemExit(f"--holdout: {len(shared)} held-out cases are also corrected, e.g. {min(shared)}")
    return train_dir, train, holdout_dir, holdout


def save_final(ds: SafeLocalDatastore, folder: Path, case: str, scratch: Path) -> None:
    """The annotator submits the ground truth as the final label (any voxel above 0 -> zero-shot id 133)."""
    gtv = nib.load(str(folder / f"{case}_gtv.nii.gz"))
    path = scratch / f"{case}_final.nii.gz"
    data = (np.asarray(gtv.dataobj) > 0).astype(np.uint8) * SARCOMA_ID
    nib.save(nib.Nifti1Image(data, gtv.affine), str(path))  # type: ignore[attr-defined]
    ds.save_label(case, str(path), "final", {})


class RecordingTask(PointTrainTask):
    """The server's own point round, keeping each round's candidate so that it can be judged afterwards."""

    candidate: VISTA3D | None = None

    def train(self, network: VISTA3D, *args: Any, **kwargs: Any) -> Trained:
        trained = super().train(network, *args, **kwargs)
        self.candidate = copy.deepcopy(network)
        return trained


def heldout_scores(network: VISTA3D, cases: list, labels: LabelDictionary) -> dict[str, float]:
    """Dice after 1, 3 and 5 clicks on the held-out cases, and ``score``: the mean over clicks 1..5."""
    per_case = evaluate_clicks(scoring_engine(network, PRESET, labels), cases, SARCOMA_ID, max(CLICKS))
    return {**mean_at(per_case, CLICKS), "score": round(float(np.mean(list(per_case.values()))), 4)}


def run_round(task: RecordingTask, ds: SafeLocalDatastore, n: int, args: argparse.Namespace, holdout: list) -> dict:
    """One point round after ``n`` labels, its candidate and the served model scored on the held-out cases."""
    served = heldout_scores(task.model.network, holdout, task.labels)
    request: dict[str, Any] = {"seed": args.seed + n}
    if args.lr is not None:
        request["lr"] = args.lr
    if args.check_every is not None:
        request["check_every"] = args.check_every
    if args.click_weight is not None:
        request["click_weight"] = args.click_weight
    if args.cached:
        request["cached"] = True
    if args.frozen_encoder:
        request["train_encoder"] = False
    result = task(request, ds)
    candidate = heldout_scores(task.candidate, holdout, task.labels) if task.candidate is not None else served
    promoted = result["promoted"] is not None
    right = (candidate["score"] >= served["score"]) == promoted
    logger.info("after %d labels: %s (held-out %.4f -> candidate %.4f: %s)", n, result["reason"], served["score"],
                candidate["score"], "right" if right else "WRONG")  # fmt: skip
    keep = ("promoted", "reason", "lr", "steps", "s_per_step", "seconds", "early_stop", "gate")
    return {"labels": n, **{k: result.get(k) for k in keep}, "served_heldout": served,
            "candidate_heldout": candidate, "decision_right": right}  # fmt: skip


def gate_decisions(rounds: list[dict]) -> list[dict]:
    """One row per point round: what the gate did, the held-out scores it is judged by, right or wrong."""
    return [
        {
            "labels": r["labels"],
            "decision": "promoted" if r["promoted"] is not None else "refused",
            "served": r["served_heldout"]["score"],
            "candidate": r["candidate_heldout"]["score"],
            "verdict": "right" if r["decision_right"] else "wrong",
            "reason": r["reason"],
        }
        for r in rounds
    ]


def decision_table(decisions: list[dict]) -> str:
    """The gate decisions as a Markdown table."""
    lines = ["| labels | gate | served | candidate | verdict | reason |", "|---|---|---|---|---|---|"]
    lines += [f"| {d['labels']} | {d['decision']} | {d['served']:.4f} | {d['candidate']:.4f} | {d['verdict']} | "
              f"{d['reason']} |" for d in decisions]  # fmt: skip
    right = sum(d["verdict"] == "right" for d in decisions)
    return "\n".join([*lines, f"{right} of {len(decisions)} decisions right"])


def organ_dice(model: LoadedModel, labels: LabelDictionary, abdomen: CachedVolume | None) -> dict[str, float] | None:
    if abdomen is None:
        return None
    engine = scoring_engine(model.network, PRESET, labels)
    return organ_auto_dice(engine, labels, abdomen.image, abdomen.label[0].numpy())


def _mean(scores: dict[str, float] | None) -> float | None:
    return round(float(np.mean(list(scores.values()))), 4) if scores else None


def round_kind(args: argparse.Namespace) -> str:
    if args.cached:
        return "cached (served click path, encoder frozen)"
    if args.frozen_encoder:
        return "point branch (point decoder + point head on crops, shared encoder frozen)"
    return "full (encoder + point head)"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="learning_curve_"))
    try:
        return simulate_loop(args, work)
    finally:  # the simulated datastore and model store; the last served weights are kept in --out
        shutil.rmtree(work, ignore_errors=True)


def simulate_loop(args: argparse.Namespace, work: Path) -> int:
    """Corrects the training cases one at a time in a datastore under ``work``, a round every ``--every``."""
    labels = load_label_dictionary()
    measure_at = args.measure_at
    train_dir, train_cases, holdout_dir, holdout_cases = split(args)
    holdout = sarcoma_click_cases(holdout_dir, labels, holdout_cases)
    studies = work / "studies"
    studies.mkdir()
    for case in train_cases:
        os.symlink((train_dir / f"{case}_ct.nii.gz").resolve(), studies / f"{case}.nii.gz")
    ds = SafeLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    conf = {"weights": str(args.weights), "train_threads": str(args.threads)}
    for key, value in (
        ("train_steps", args.steps), ("train_steps_per_label", args.steps_per_label),
        ("promote_tolerance", args.tolerance), ("train_patience", args.patience),
    ):  # fmt: skip
        if value is not None:
            conf[key] = str(value)
    settings = Settings.from_conf(conf)
    model = load_model(PRESET, str(args.weights), work, torch.device("cpu"))
    store = ModelStore(studies / ".vista3d" / "models")
    reloader = ModelReloader(model, store)
    task = RecordingTask(settings, model, store, labels, str(studies))

    abdomen = None if args.no_forgetting else abdomen_volume(DATA, labels)
    organs_before = organ_dice(model, labels, abdomen)
    curve: dict[str, list] = {"labels": [], **{f"dice_{k}": [] for k in CLICKS}, "served_version": []}
    rounds = []
    start = time.perf_counter()
    for n in range(0, len(train_cases) + 1):
        if n > 0:
            save_final(ds, train_dir, train_cases[n - 1], work)
            if n % args.every == 0:
                rounds.append(run_round(task, ds, n, args, holdout))
                reloader.refresh()
        if n in measure_at:
            scores = heldout_scores(model.network, holdout, labels)
            curve["labels"].append(n)
            curve["served_version"].append(model.served_version)
            for k in CLICKS:
                curve[f"dice_{k}"].append(scores[f"dice_{k}"])
            logger.info("%d labels (served v%d): %s", n, model.served_version, scores)
    organs_after = organ_dice(model, labels, abdomen)
    decisions = gate_decisions(rounds)
    logger.info("gate decisions (held-out score: mean Dice over clicks 1..5):\n%s", decision_table(decisions))
    result = {
        **curve,
        "holdout_cases": holdout_cases,
        "corrected_cases": train_cases,
        "train_dir": str(train_dir),
        "holdout_dir": str(holdout_dir),
        "every": args.every,
        "settings": {
            "steps": settings.train_steps,
            "steps_per_label": settings.train_steps_per_label,
            "lr": args.lr or settings.train_lr,
            "tolerance": settings.promote_tolerance,
            "patience": settings.train_patience,
            "check_every": args.check_every or TrainRequest.check_every,
            "click_weight": TrainRequest.click_weight if args.click_weight is None else args.click_weight,
            "round": round_kind(args),
        },  # fmt: skip
        "weights": str(args.weights),
        "rounds": rounds,
        "decisions_right": sum(r["decision_right"] for r in rounds),
        "decisions": len(rounds),
        "gate_decisions": decisions,
        "organs_auto_dice_before": organs_before,
        "organs_auto_dice_after": organs_after,
        "organs_mean_before": _mean(organs_before),
        "organs_mean_after": _mean(organs_after),
        "abdomen": ABDOMEN[0],
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_curve.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "learning_curve.png")
    served = store.path_of(store.served())
    if served is not None:  # e.g. for bench/click_response.py --weights
        shutil.copy(served, args.out / "served.pt")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for k in CLICKS:
        ax.plot(result["labels"], result[f"dice_{k}"], marker="o", label=f"{k} click{'s' * (k > 1)}")
    rounds = result.get("rounds", [])
    ax.scatter([r["labels"] for r in rounds], [r["candidate_heldout"]["score"] for r in rounds], marker="x",
               color="grey", label="candidate (mean over 5 clicks)", zorder=3)  # fmt: skip
    ax.set_xticks(result["labels"])
    ax.set_xlabel("corrected labels (sarcoma, final)")
    ax.set_ylabel(f"held-out Dice ({len(result['holdout_cases'])} cases)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("VISTA3D small: the served model learning from corrections", fontsize=10)
    for n, v in zip(result["labels"], result["served_version"], strict=True):
        ax.annotate(f"v{v}", (n, result["dice_1"][result["labels"].index(n)]), textcoords="offset points",
                    xytext=(0, -12), ha="center", fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
