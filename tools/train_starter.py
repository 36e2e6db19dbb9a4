#!/usr/bin/env python
"""Train the ``small`` preset's starter weights on the shared real CT (fixed seeds), resumably.

1. Point branch + encoder: the ``starter`` recipe of :mod:`lib.trainers.recipes` (the abdominal
   scan's organ labels, and the tumours of the sarcoma cases ``SARCOMA_STARTER`` as zero-shot id
   133), with click sessions simulated as the server answers them; from a seeded random start, or
   further from ``--init`` weights.
2. Automatic branch (its decoder and the class head): the abdominal scan's organ labels, on cached
   encoder outputs of random crops (encoder and point branch frozen, so clicks are unchanged;
   :mod:`lib.trainers.auto_cached`).
3. Figures: clicks-to-Dice on the held-out sarcoma cases ``SARCOMA_HELDOUT`` (zero-shot id, the
   server's click path) and the organs' auto Dice on the abdominal scan (its training scan: a sanity check).

Writes a float16 state dict and a JSON report (command, data, figures) beside it. With
``--checkpoint`` a long run can be done in pieces: stop it at any time (Ctrl-C, a lost machine) and
run the same command again; it resumes at the last checkpoint (every 50 steps) and ends where an
uninterrupted run would. ``--device cuda`` trains on a GPU.

    .venv/bin/python tools/train_starter.py --steps 1200 --rounds 3 --auto-steps 1500 --checkpoint .cache/starter.ckpt
    .venv/bin/python tools/train_starter.py --point-weights apps/vista3d/weights/small_starter.pt --auto-steps 1500
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets.vista3d import VISTA3D

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "vista3d"
sys.path.insert(0, str(APP_DIR))

from lib.atomic import write_json  # noqa: E402
from lib.labels import load_label_dictionary  # noqa: E402
from lib.model import build_network, load_state, patch_size_for, save_state  # noqa: E402
from lib.simulate import evaluate_clicks, mean_at, organ_auto_dice, scoring_engine  # noqa: E402
from lib.trainers.auto_cached import organ_crops, train_auto_cached  # noqa: E402
from lib.trainers.corpus import (  # noqa: E402
    ABDOMEN,
    SARCOMA_HELDOUT,
    SARCOMA_STARTER,
    abdomen_volume,
    sarcoma_click_cases,
)
from lib.trainers.data import SARCOMA_ID  # noqa: E402
from lib.trainers.recipes import RecipeConfig, train_point_recipe  # noqa: E402
from lib.trainers.schedule import Checkpoint  # noqa: E402

logger = logging.getLogger("train_starter")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=(ROOT / ".." / "shared" / "data").resolve())
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "supervoxels" / "lowlevel")
    p.add_argument("--out", type=Path, default=APP_DIR / "weights" / "small_starter.pt")
    p.add_argument("--steps", type=int, default=600, help="point-branch steps")
    p.add_argument("--auto-steps", type=int, default=1500, help="automatic-branch steps")
    p.add_argument("--auto-crops", type=int, default=32, help="cached 64³ crops the automatic branch trains on")
    p.add_argument("--auto-lr", type=float, default=1e-3, help="peak learning rate of the automatic branch")
    p.add_argument("--auto-anywhere", type=float, default=0.0, help="share of crops not centred on an organ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--point-weights", type=Path, help="reuse a trained encoder + point branch (no point training)")
    p.add_argument("--init", type=Path, help="train the point branch further from these weights")
    p.add_argument("--rounds", type=int, default=3, help="click rounds simulated per point step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the point branch")
    p.add_argument("--checkpoint", type=Path, help="resume from / write the point run's checkpoint here")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--before", type=Path, help="earlier starter weights to score on the same held-out cases")
    p.add_argument("--shift", type=int, default=0, help="voxels a point crop may move off its object voxel")
    p.add_argument("--max-minutes", type=float, help="end the point phase after this long (its rate decays over it)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures (a machine without the held-out CT)")
    p.add_argument("--evaluate", type=Path, help="only the figures of these weights (no training)")
    return p.parse_args(argv)


def small_network(weights: Path) -> VISTA3D:
    """A ``small`` network holding ``weights`` (a float16 state dict such as the starter's)."""
    network = build_network("small")
    load_state(network, weights)
    return network


@torch.inference_mode()
def organ_dice(network: VISTA3D, data: Path) -> dict[str, float]:
    """Auto Dice per organ on the abdominal scan (the training scan: a sanity check, not generalisation)."""
    labels = load_label_dictionary()
    volume = abdomen_volume(data, labels)
    return organ_auto_dice(scoring_engine(network, "small", labels), labels, volume.image, volume.label[0].numpy())


@torch.inference_mode()
def heldout_sarcoma_dice(network: VISTA3D, data: Path) -> dict[str, float]:
    """Dice after 1, 3 and 5 simulated clicks on the sarcoma cases the starter never saw."""
    labels = load_label_dictionary()
    folder = data / "sts"
    cases = sarcoma_click_cases(folder, labels, SARCOMA_HELDOUT)
    scores = mean_at(evaluate_clicks(scoring_engine(network, "small", labels), cases, SARCOMA_ID, 5), (1, 3, 5))
    return {**scores, "cases": len(cases)}


def train_auto_branch(network: VISTA3D, args: argparse.Namespace) -> dict:
    """The automatic branch on cached crops of the abdominal scan, centred on an organ (but ``--auto-anywhere``)."""
    volume = abdomen_volume(args.data, load_label_dictionary())
    rng = np.random.default_rng(args.seed)
    size = patch_size_for("small")[0]
    crops = organ_crops(volume.image, volume.label, args.auto_crops, size, rng, anywhere=args.auto_anywhere)
    stats = train_auto_cached(network, crops, args.auto_steps, args.auto_lr, seed=args.seed)
    return {
        "steps": stats.steps, "crops": len(crops), "anywhere": args.auto_anywhere, "lr": args.auto_lr,
        "seconds": round(stats.seconds, 1),
        "loss_first": round(stats.loss_first, 4), "loss_last": round(stats.loss_last, 4),
        "how": "cached encoder outputs, encoder and point branch frozen (lib/trainers/auto_cached.py)",
    }  # fmt: skip


def reused_point_branch(weights: Path) -> tuple[dict, dict]:
    """Provenance of a reused point branch: the report of the run that trained it, when beside it."""
    earlier = weights.with_suffix(".json")
    if not earlier.is_file():
        return {"from": str(weights)}, {"abdomen": list(ABDOMEN), "point_branch_from": str(weights)}
    old = json.loads(earlier.read_text())
    point = old["point"] if "command" in old["point"] else {"command": old["command"], **old["point"]}
    return {**point, "from": str(weights)}, old["trained_on"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: autotuned convolutions pay off
    if args.evaluate:
        return evaluate(args)
    config = RecipeConfig(
        data=args.data, cache=args.cache, steps=args.steps, seed=args.seed, lr=args.lr, rounds=args.rounds,
        device=args.device, shift=args.shift, max_minutes=args.max_minutes,
        time_schedule=args.max_minutes is not None,
    )  # fmt: skip
    args_given = sys.argv[1:] if argv is None else argv
    report: dict = {"command": shlex.join([".venv/bin/python", "tools/train_starter.py", *args_given])}
    if args.point_weights:
        network = small_network(args.point_weights)
        logger.info("Encoder and point branch from %s", args.point_weights)
        report["point"], trained_on = reused_point_branch(args.point_weights)
    else:
        checkpoint = Checkpoint(args.checkpoint) if args.checkpoint else None
        network, stats = train_point_recipe(config, "starter", init=args.init, checkpoint=checkpoint)
        report["point"] = {
            "steps": stats.steps, "seconds": round(stats.seconds, 1), "loss_first": round(stats.loss_first, 4),
            "loss_last": round(stats.loss_last, 4), "rounds": args.rounds, "lr": args.lr,
            "init": str(args.init) if args.init else "seeded random", "shift": args.shift,
            "device": args.device, "stopped_by_time": stats.stopped_early,
        }  # fmt: skip
        trained_on = {"abdomen": list(ABDOMEN), "sarcoma_as_zero_shot_133": list(SARCOMA_STARTER)}
    report["auto"] = train_auto_branch(network, args)
    report["trained_on"] = trained_on
    network.cpu()
    save_state(network, args.out)  # before the figures: a run cut short keeps its weights
    if not args.no_figures:
        report.update(figures(network, args))
    write_json(args.out.with_suffix(".json"), report)
    print(json.dumps(report), flush=True)
    return 0


def figures(network: VISTA3D, args: argparse.Namespace) -> dict:
    """Held-out clicks (and ``--before``'s on the same cases) and the organs' auto Dice, on the CPU
    (the server's default device; the figures do not depend on where the weights were trained)."""
    out: dict = {"sarcoma_heldout": heldout_sarcoma_dice(network, args.data)}
    if args.before:
        before = small_network(args.before)
        out["sarcoma_heldout_before"] = {**heldout_sarcoma_dice(before, args.data), "weights": str(args.before)}
    organs = organ_dice(network, args.data)
    out["organs_auto_dice_on_training_scan"] = organs
    out["organs_mean"] = round(float(np.mean(list(organs.values()))), 4)
    return out


def evaluate(args: argparse.Namespace) -> int:
    """``--evaluate W``: the figures of trained weights, added to the report beside them."""
    network = small_network(args.evaluate)
    report_path = args.evaluate.with_suffix(".json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update(figures(network, args))
    write_json(report_path, report)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
