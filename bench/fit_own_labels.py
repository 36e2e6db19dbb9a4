#!/usr/bin/env python
"""Does a point round fit the labels it trains on? Served-path click Dice on its own labels, step after step.

From the shipped starter, a point round trains on a few corrected sarcoma labels (default the
first 5 of the learning curve's, STS_006..010) and, every ``--every`` steps, the simulated annotator
segments those same objects through the server's click path (:func:`lib.simulate.evaluate_clicks`):
Dice after 1, 3 and 5 clicks. Two kinds of round, side by side from the same start:

* ``full``: today's round (:func:`lib.trainers.point_loop.train_point`): encoder and point head on random
  crops centred anywhere on the object;
* ``head``: the round on the served click path (:mod:`lib.trainers.point_cached`): encoder frozen,
  its windows computed once, click sessions played as the server answers them.

    cd bench && ../.venv/bin/python fit_own_labels.py [--modes full,head] [--steps 100] [--every 20]

Prints one JSON line (per mode: step, seconds, dice_1/3/5) and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import DATA, ROOT
from monai.networks.nets.vista3d import VISTA3D

from lib.atomic import write_json
from lib.inference.hardware import cpu_isa
from lib.labels import LabelDictionary, load_label_dictionary
from lib.model import STARTER_WEIGHTS, load_model
from lib.simulate import evaluate_clicks, mean_at, scoring_engine
from lib.trainers.corpus import SARCOMA_CURVE, sarcoma_click_cases, sarcoma_volume
from lib.trainers.data import SARCOMA_ID
from lib.trainers.point_cached import train_point_head
from lib.trainers.point_loop import train_point
from lib.trainers.request import TrainRequest

logger = logging.getLogger("fit_own_labels")

PRESET = "small"
CLICKS = (1, 3, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=STARTER_WEIGHTS)
    p.add_argument("--cases", default=",".join(SARCOMA_CURVE[:5]), help="the round's labels (sarcoma case names)")
    p.add_argument("--modes", default="full,head")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=20, help="steps between scorings of the round's own labels")
    p.add_argument("--lr", type=float, default=TrainRequest.lr, help="base learning rate (default: the server's)")
    p.add_argument("--rounds", type=int, default=3, help="clicks per training session")
    p.add_argument(
        "--click-weight", type=float, default=TrainRequest.click_weight, help="correction-region loss weight (0: off)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the scoring runs there too)")
    p.add_argument("--max-minutes", type=float, help="end each mode's round after this long")
    p.add_argument("--shift", type=int, default=0, help="voxels a full round's crop may move off its object")
    p.add_argument("--holdout", default="", help="cases nothing trains on, scored beside the own labels")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "fit_own_labels.json")
    return p.parse_args(argv)


class OwnLabels:
    """A round's ``stop_when``: every ``every`` steps, Dice of the simulated annotator on the round's own labels."""

    def __init__(
        self, mode: str, network: VISTA3D, cases: list, labels: LabelDictionary, every: int, steps: int,
        report: Callable[[], None], holdout: list | None = None,
    ):  # fmt: skip
        self.mode, self.network, self.cases, self.labels = mode, network, cases, labels
        self.holdout = holdout or []
        self.every, self.steps, self.report = every, steps, report
        self.curve: list[dict[str, float]] = []
        self.start = time.perf_counter()

    def __call__(self, step: int, force: bool = False) -> bool:
        if step % self.every and step != self.steps and not force:
            return False
        was = self.network.training
        engine = scoring_engine(self.network, PRESET, self.labels)  # float32: the figures compare weights
        dice = mean_at(evaluate_clicks(engine, self.cases, SARCOMA_ID, max(CLICKS)), CLICKS)
        if self.holdout:  # does fitting the own labels carry over to cases nothing trained on?
            unseen = mean_at(evaluate_clicks(engine, self.holdout, SARCOMA_ID, max(CLICKS)), CLICKS)
            dice.update({f"heldout_{k}": v for k, v in unseen.items()})
        self.network.train(was)
        self.curve.append({"step": step, "seconds": round(time.perf_counter() - self.start, 1), **dice})
        logger.info("%s step %d: %s", self.mode, step, self.curve[-1])
        self.report()  # a run cut by its machine's time keeps what it scored
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    labels = load_label_dictionary()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    served = load_model(PRESET, str(args.weights), Path("/nonexistent"), device).network
    names = args.cases.split(",")
    volumes = [sarcoma_volume(DATA / "sts", n, labels) for n in names]
    cases = [(v.name, v.image, v.label[0].numpy() == SARCOMA_ID) for v in volumes]
    holdout = sarcoma_click_cases(DATA / "sts", labels, args.holdout.split(",")) if args.holdout else []
    req = TrainRequest(
        steps=args.steps,
        lr=args.lr,
        rounds=args.rounds,
        crop=64,
        max_minutes=args.max_minutes,
        click_weight=args.click_weight,
    )
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_isa()
    result: dict[str, Any] = {
        "machine": machine, "cases": names, "holdout": args.holdout, "request": req.as_dict(), "shift": args.shift,
        "modes": {},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def report() -> None:
        write_json(args.out, result)

    for mode in args.modes.split(","):
        network = copy.deepcopy(served)
        score = OwnLabels(mode, network, cases, labels, args.every, args.steps, report, holdout)
        result["modes"][mode] = score.curve
        score(0)
        weights = [1.0] * len(volumes)
        if mode == "full":
            stats = train_point(network, volumes, weights, req, labels.special, stop_when=score, shift=args.shift)
        elif mode == "head":
            stats = train_point_head(network, volumes, weights, req, labels.special, stop_when=score)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        if score.curve[-1]["step"] != stats.steps:  # stopped by --max-minutes between two scorings
            score(stats.steps, force=True)
    report()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
