#!/usr/bin/env python
"""Train starter weights for the ``small`` preset's point branch on the shared real CT.

Without the official checkpoint the ``small`` preset has random weights and a click returns noise.
This trains encoder + point head from scratch (fixed seeds) on STS_001..STS_020 (sarcoma as zero-shot
id 133) plus the TotalSegmentator abdominal scan (organs mapped to VISTA3D ids), then evaluates one
centre click per held-out case STS_021..STS_035 and writes a float16 state dict plus a JSON report.

    .venv/bin/python tools/train_starter.py --steps 350 --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "vista3d"
sys.path.insert(0, str(APP_DIR))

from lib.engine import pad_to_patch, window_start  # noqa: E402
from lib.labels import load_label_dictionary  # noqa: E402
from lib.model import build_network, patch_size_for  # noqa: E402
from lib.trainers.data import (  # noqa: E402
    SARCOMA_ID,
    CachedVolume,
    VolumeSampler,
    load_volume,
    remap_lookup,
    sts_pair,
    totalseg_lookup,
)
from lib.trainers.point_trainer import PointTrainConfig, PointTrainer  # noqa: E402

logger = logging.getLogger("train_starter")

PRESET = "small"
DEFAULT_DATA = (ROOT / ".." / "shared" / "data").resolve()
TRAIN_CASES = [f"STS_{i:03d}" for i in range(1, 21)]
HOLDOUT_CASES = [f"STS_{i:03d}" for i in range(21, 36)]
ABDOMEN = ("totalseg/example_ct.nii.gz", "totalseg/example_seg_fast_force_split.nii.gz")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=350, help="optimiser steps (~5 s each on 2 CPU threads)")
    p.add_argument("--out", type=Path, default=APP_DIR / "weights" / "small_starter.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared real-CT folder")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps before the cosine decay")
    p.add_argument("--rounds", type=int, default=3, help="click-simulation rounds per step")
    p.add_argument("--abdomen-weight", type=float, default=0.15, help="share of steps on the abdominal scan")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="safety stop: end training early after this many minutes (logged; steps done are reported)",
    )
    p.add_argument("--skip-eval", action="store_true", help="no held-out evaluation (smoke runs)")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs (sample_prompt_pairs draws from ``random``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_training_set(data: Path) -> list[CachedVolume]:
    """The preprocessed training volumes, cached in memory (a few MB each)."""
    labels = load_label_dictionary()
    sts = remap_lookup({1: SARCOMA_ID})
    volumes = [load_volume(c, sts_pair(data, c), sts, labels.preprocessing) for c in TRAIN_CASES]
    pair = {"image": str(data / ABDOMEN[0]), "label": str(data / ABDOMEN[1])}
    volumes.append(load_volume("abdomen", pair, totalseg_lookup(labels), labels.preprocessing))
    return volumes


def lr_lambda(warmup: int, steps: int):
    """Linear warm-up, then cosine decay to 5% of the base rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def train(args: argparse.Namespace, volumes: list[CachedVolume]) -> tuple[torch.nn.Module, float, float]:
    """Train; returns the network, the wall time and the mean seconds per step."""
    labels = load_label_dictionary()
    network = build_network(PRESET)
    config = PointTrainConfig(rounds=args.rounds, special=labels.special)
    trainer = PointTrainer(network, None, config, seed=args.seed)  # type: ignore[arg-type]
    params = [p for p in network.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_lambda(args.warmup, args.steps))
    n_sts = len(volumes) - 1
    weights = [(1 - args.abdomen_weight) / n_sts] * n_sts + [args.abdomen_weight]
    sampler = VolumeSampler(volumes, patch_size_for(PRESET), args.seed, weights)
    start, losses, done = time.perf_counter(), [], 0
    bar = tqdm(total=args.steps, desc="train", unit="step", file=sys.stderr, mininterval=5)
    while done < args.steps:
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            logger.warning(
                "--max-minutes %.1f reached: stopping after %d of %d steps", args.max_minutes, done, args.steps
            )
            break
        vol, image, label = sampler.sample()
        loss = trainer.step(image, label, vol.label_set)
        if loss is None:
            continue
        sched.step()
        done += 1
        losses.append(loss)
        rate = (time.perf_counter() - start) / done
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", s_per_step=f"{rate:.2f}", vol=vol.name)
        bar.update(1)
        if done % 25 == 0:
            logger.info("step %d/%d loss(avg20) %.4f %.2f s/step", done, args.steps, np.mean(losses[-20:]), rate)
    bar.close()
    elapsed = time.perf_counter() - start
    args.steps_done = done
    return network, elapsed, elapsed / max(done, 1)


def save_fp16(network: torch.nn.Module, out: Path) -> None:
    """Write a float16 state dict atomically (temp file in the same folder, then os.replace)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in network.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(sd, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("Wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denom) if denom else 1.0


@torch.inference_mode()
def one_click_dice(network: torch.nn.Module, vol: CachedVolume) -> float:
    """Dice within the 96³ window of one positive click at the GTV's deepest voxel (as the server runs it)."""
    patch = patch_size_for(PRESET)
    image = pad_to_patch(vol.image, patch)
    label = pad_to_patch(vol.label, patch)[0].numpy() > 0
    dist = ndimage.distance_transform_edt(np.pad(label, 1))[1:-1, 1:-1, 1:-1]
    centre = np.asarray(np.unravel_index(int(np.argmax(dist)), label.shape))
    start = window_start(centre, label.shape, patch)
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=False))
    feats, _ = network.image_encoder(image[(slice(None), *sl)].unsqueeze(0), with_point=True, with_label=False)
    coords = torch.as_tensor(centre - np.asarray(start), dtype=torch.float32).view(1, 1, 3)
    logits = network.point_head(
        feats, coords, torch.ones(1, 1, dtype=torch.long), class_vector=torch.tensor([[SARCOMA_ID]])
    )
    return dice(logits[0, 0].numpy() > 0, label[sl])


def evaluate(network: torch.nn.Module, data: Path) -> list[dict[str, object]]:
    """One-click Dice for every held-out case."""
    labels = load_label_dictionary()
    network.eval()
    sts = remap_lookup({1: SARCOMA_ID})
    out = []
    for case in tqdm(HOLDOUT_CASES, desc="holdout", file=sys.stderr):
        vol = load_volume(case, sts_pair(data, case), sts, labels.preprocessing)
        out.append({"case": case, "dice": round(one_click_dice(network, vol), 4)})
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    volumes = load_training_set(args.data)
    network, train_s, rate = train(args, volumes)
    save_fp16(network, args.out)
    per_case = [] if args.skip_eval else evaluate(network, args.data)
    result = {
        "steps": args.steps_done,
        "train_s": round(train_s, 1),
        "s_per_step": round(rate, 3),
        "holdout_dice_1click_mean": round(float(np.mean([c["dice"] for c in per_case])), 4) if per_case else None,
        "per_case": per_case,
    }
    print(json.dumps(result), flush=True)
    report = {
        **result,
        "preset": PRESET,
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["train_starter.py", *argv]),
        "seed": args.seed,
        "threads": args.threads,
        "train_data": {"sts": TRAIN_CASES, "sts_label_id": SARCOMA_ID, "abdomen": list(ABDOMEN)},
        "holdout_data": HOLDOUT_CASES,
        "weights": str(args.out.name),
    }
    report_path = args.out.with_suffix(".json")
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, report_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
