#!/usr/bin/env python
"""Train the ``small`` preset's starter weights from scratch on the shared real CT (fixed seeds).

1. Point branch + encoder: the ``lowlevel`` recipe of :mod:`lib.trainers.recipes` (the abdominal
   scan's organ labels plus low-level supervoxels of every CT as zero-shot objects; no sarcoma label).
2. Class head: the abdominal scan's organ labels (encoder and point branch frozen).

``bench/zeroshot.py``'s ``lowlevel`` arm is step 1 exactly; pass its weights with ``--point-weights``
to skip retraining. Writes a float16 state dict and a JSON report beside it.

    .venv/bin/python tools/train_starter.py --steps 600 --auto-steps 150 --threads 2
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

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "vista3d"
sys.path.insert(0, str(APP_DIR))

from lib.atomic import save_state, write_json  # noqa: E402
from lib.engine import Engine  # noqa: E402
from lib.labels import load_label_dictionary  # noqa: E402
from lib.model import LoadedModel, build_network, load_state, patch_size_for  # noqa: E402
from lib.simulate import organ_auto_dice  # noqa: E402
from lib.trainers.corpus import ABDOMEN, abdomen_volume  # noqa: E402
from lib.trainers.recipes import RecipeConfig, train_auto_recipe, train_point_recipe  # noqa: E402

logger = logging.getLogger("train_starter")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=(ROOT / ".." / "shared" / "data").resolve())
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "supervoxels" / "lowlevel")
    p.add_argument("--out", type=Path, default=APP_DIR / "weights" / "small_starter.pt")
    p.add_argument("--steps", type=int, default=600, help="point-branch steps (the zeroshot lowlevel arm's)")
    p.add_argument("--auto-steps", type=int, default=150, help="class-head steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--point-weights", type=Path, help="reuse a trained point branch (bench/zeroshot.py lowlevel.pt)")
    return p.parse_args(argv)


@torch.inference_mode()
def organ_dice(network: torch.nn.Module, data: Path) -> dict[str, float]:
    """Auto Dice per organ on the abdominal scan (the training scan: a sanity check, not generalisation)."""
    labels = load_label_dictionary()
    volume = abdomen_volume(data, labels)
    model = LoadedModel(network.eval(), "small", None, torch.device("cpu"))  # type: ignore[arg-type]
    engine = Engine(model, patch_size_for("small"), labels.sw_overlap, labels.special)
    return organ_auto_dice(engine, labels, volume.image, volume.label[0].numpy())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = RecipeConfig(data=args.data, cache=args.cache, steps=args.steps, seed=args.seed)
    report: dict = {"command": shlex.join([sys.executable, *(sys.argv if argv is None else ["", *argv])[1:]])}
    if args.point_weights:
        network = build_network("small")
        load_state(network, args.point_weights)
        report["point"] = {"from": str(args.point_weights)}
        logger.info("Point branch from %s", args.point_weights)
    else:
        network, stats = train_point_recipe(config, "lowlevel")
        report["point"] = {"steps": stats.steps, "seconds": round(stats.seconds, 1), "loss_last": stats.loss_last}
    auto = train_auto_recipe(network, config, args.auto_steps)
    report["auto"] = {"steps": auto.steps, "seconds": round(auto.seconds, 1), "loss_last": round(auto.loss_last, 4)}
    organs = organ_dice(network, args.data)
    report["organs_auto_dice_on_training_scan"] = organs
    report["organs_mean"] = round(float(np.mean(list(organs.values()))), 4)
    report["trained_on"] = {"abdomen": list(ABDOMEN), "supervoxels_of": "every CT of shared/data/sts (no labels)"}
    save_state(network, args.out)
    write_json(args.out.with_suffix(".json"), report)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
