#!/usr/bin/env python
"""Why a point round does not fit its own labels: three probes of the shipped starter on sarcoma cases.

1. ``contrast``: the preprocessed image inside each tumour (eroded 2 voxels) against a 4-voxel shell
   around it: how much a voxel's value says about the boundary.
2. ``clicks``: the simulated annotator's session through the served click path, click by click:
   sign, whether the click edited (Algorithm 1), Dice, and the predicted volume.
3. ``response``: what the first-click answer depends on: the click moved 12 voxels along each axis
   in the same window, a negative click alone, a positive and a negative click, and a flat image
   (every voxel 0.5) under the same click, each compared with the answer to the deepest voxel.
4. ``overfit``: one window, one first click, one object: can the point head alone (encoder frozen)
   or the whole network fit it? Dice of the first-click answer every 10 steps, per learning rate.

    cd bench && ../.venv/bin/python point_fit_probe.py [--cases STS_006,STS_007,STS_008] [--overfit-case STS_008]
        [--modes head,full|none] [--lrs 1e-4,1e-3] [--losses dicece,balanced_bce] [--steps 60] [--ce-weight 1.0]

Prints one JSON line and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import DATA, ROOT
from monai.losses import DiceCELoss
from monai.networks.nets.vista3d import VISTA3D
from scipy import ndimage
from tqdm import tqdm

from lib.inference.engine import choose_window, point_labels
from lib.inference.hardware import cpu_isa
from lib.inference.point_head import predict, prepare
from lib.inference.segment import segment_points
from lib.labels import LabelDictionary, load_label_dictionary
from lib.model import STARTER_WEIGHTS, load_model
from lib.prompts import PointPrompt
from lib.simulate import deepest_voxel, dice, model_grid_state, next_click, scoring_engine
from lib.trainers.corpus import sarcoma_volume
from lib.trainers.data import SARCOMA_ID, CachedVolume

logger = logging.getLogger("point_fit_probe")
PATCH = (64, 64, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=STARTER_WEIGHTS)
    p.add_argument("--cases", default="STS_006,STS_007,STS_008,STS_026,STS_027")
    p.add_argument("--clicks", type=int, default=6)
    p.add_argument("--overfit-case", default="STS_008")
    p.add_argument("--modes", default="head,full", help="what trains in the overfit probe (none: skip it)")
    p.add_argument("--lrs", default="1e-4,1e-3")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--losses", default="dicece", help="overfit losses: dicece (--ce-weight), balanced_bce")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "point_fit_probe.json")
    return p.parse_args(argv)


def contrast(vol: CachedVolume) -> dict[str, float]:
    img, truth = vol.image[0].numpy(), vol.label[0].numpy() == SARCOMA_ID
    inner = ndimage.binary_erosion(truth, iterations=2)
    shell = ndimage.binary_dilation(truth, iterations=4) & ~truth
    return {
        "inside_mean": round(float(img[inner].mean()), 4),
        "inside_std": round(float(img[inner].std()), 4),
        "shell_mean": round(float(img[shell].mean()), 4),
        "shell_std": round(float(img[shell].std()), 4),
    }


def click_trace(network: VISTA3D, labels: LabelDictionary, vol: CachedVolume, clicks: int) -> list[dict[str, Any]]:
    engine = scoring_engine(network, "small", labels)
    truth = vol.label[0].numpy() == SARCOMA_ID
    state = model_grid_state(vol.image, engine.patch)
    result = np.zeros(state.original_shape, dtype=np.int16)
    points, positive, trace = [deepest_voxel(truth)], [True], []
    for _ in range(clicks):
        prompt = PointPrompt(np.stack(points).astype(np.int64), np.asarray(positive), SARCOMA_ID)
        edit = segment_points(engine, state, prompt, result)
        result = edit.label
        pred = result == SARCOMA_ID
        trace.append(
            {
                "positive": bool(positive[-1]),
                "at": [int(c) for c in points[-1]],
                "edited": bool(edit.applied[-1]),
                "dice": round(dice(pred, truth), 4),
                "predicted": int(pred.sum()),
            }
        )
        click = next_click(pred, truth)
        if click is None:
            break
        points.append(click[0])
        positive.append(click[1])
    return trace


def click_response(network: VISTA3D, labels: LabelDictionary, vol: CachedVolume) -> dict[str, Any]:
    """How the first-click answer changes with the click's place and sign and with the image (module docstring)."""
    truth = vol.label[0].numpy() == SARCOMA_ID
    click = deepest_voxel(truth)
    start = choose_window(click, vol.image.shape[1:], PATCH, [])
    sl = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
    window = vol.image[(slice(None), *sl)].unsqueeze(0)
    local = click - np.asarray(start)

    def answer(image: torch.Tensor, points: list[np.ndarray], positive: list[bool]) -> np.ndarray:
        with torch.no_grad():
            encoded, _ = network.image_encoder(image, with_point=True, with_label=False)
            coords = torch.as_tensor(np.stack(points)[None], dtype=torch.float32)
            point_label = point_labels(np.asarray(positive), SARCOMA_ID, labels.special).unsqueeze(0)
            logits = predict(network.point_head, prepare(network.point_head, encoded), coords, point_label, SARCOMA_ID)
        return (logits[0, 0] > 0).numpy()

    base = answer(window, [local], [True])
    variants = {f"moved_{axis}": answer(window, [local + 12 * np.eye(3, dtype=int)[i]], [True]) for i, axis in
                enumerate("xyz")}  # fmt: skip
    variants["negative_alone"] = answer(window, [local], [False])
    variants["positive_then_negative"] = answer(window, [local, local + np.asarray([0, 10, 0])], [True, False])
    variants["flat_image"] = answer(torch.full_like(window, 0.5), [local], [True])
    out: dict[str, Any] = {
        "deepest_voxel": {"predicted": int(base.sum()), "dice_vs_truth": round(dice(base, truth[sl]), 4)}
    }
    for name, mask in variants.items():
        out[name] = {"predicted": int(mask.sum()), "dice_vs_deepest_voxel_answer": round(dice(mask, base), 4)}
    return out


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the object's voxels weighted by background/object (at most 50): no soft Dice
    over a window whose background is most of it."""
    weight = ((target.numel() - target.sum()) / target.sum().clamp(min=1)).clamp(max=50)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


def overfit(
    served: VISTA3D,
    labels: LabelDictionary,
    vol: CachedVolume,
    mode: str,
    lr: float,
    steps: int,
    ce: float,
    loss: str = "dicece",
) -> dict[str, Any]:
    """Fit one first-click answer (the deepest voxel's window) with the head or the whole network trainable."""
    import copy

    network = copy.deepcopy(served)
    truth = vol.label[0].numpy() == SARCOMA_ID
    click = deepest_voxel(truth)
    start = choose_window(click, vol.image.shape[1:], PATCH, [])
    sl = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
    window, target = vol.image[(slice(None), *sl)].unsqueeze(0), truth[sl]
    coords = torch.as_tensor((click - np.asarray(start))[None, None], dtype=torch.float32)
    point_label = point_labels(np.asarray([True]), SARCOMA_ID, labels.special).unsqueeze(0)
    for p in network.parameters():
        p.requires_grad_(False)
    params = list(network.point_head.parameters())
    if mode == "full":
        params += list(network.image_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        frozen, _ = network.image_encoder(window, with_point=True, with_label=False)

    def forward() -> torch.Tensor:
        enc = network.image_encoder(window, with_point=True, with_label=False)[0] if mode == "full" else frozen
        return predict(network.point_head, prepare(network.point_head, enc), coords, point_label, SARCOMA_ID)

    def score() -> dict[str, float]:
        with torch.no_grad():
            pred = (forward()[0, 0] > 0).numpy()
        return {"dice": round(dice(pred, target), 4), "predicted": int(pred.sum())}

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(sigmoid=True, lambda_ce=ce) if loss == "dicece" else balanced_bce
    y = torch.from_numpy(target).float()[None, None]
    curve = [{"step": 0, "loss": None, **score()}]
    started = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=f"overfit {mode} lr {lr:g}"):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(forward(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps:
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), **score()})
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "loss": loss,
        "lr": lr,
        "object_in_window": int(target.sum()),
        "seconds": round(seconds, 1),
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    labels = load_label_dictionary()
    served = load_model("small", str(args.weights), Path("/nonexistent"), torch.device("cpu")).network.eval()
    volumes = {n: sarcoma_volume(DATA / "sts", n, labels) for n in args.cases.split(",")}
    result: dict[str, Any] = {"machine": cpu_isa(), "weights": str(args.weights), "window": PATCH[0]}
    result["contrast"] = {n: contrast(v) for n, v in volumes.items()}
    result["clicks"] = {n: click_trace(served, labels, v, args.clicks) for n, v in volumes.items()}
    result["response"] = {n: click_response(served, labels, v) for n, v in volumes.items()}
    target = volumes.get(args.overfit_case) or sarcoma_volume(DATA / "sts", args.overfit_case, labels)
    result["overfit"] = {"case": args.overfit_case, "ce_weight": args.ce_weight, "runs": []}
    for mode in [m for m in args.modes.split(",") if m != "none"]:
        for lr in (float(x) for x in args.lrs.split(",")):
            for loss in args.losses.split(","):
                run = overfit(served, labels, target, mode, lr, args.steps, args.ce_weight, loss)
                logger.info("%s lr %g %s: %s", mode, lr, loss, run["curve"][-1])
                result["overfit"]["runs"].append(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
