"""A trained stand-in for ``vista3d`` weights, for measuring the automatic path's agreement.

The published checkpoint cannot be downloaded here and random weights are the worst case for any
reduced-precision comparison: their logits sit near zero everywhere, so every voxel is close to a
decision boundary. A trained network's logits are large away from organ edges. The stand-in is the
seed-0 random ``vista3d132`` (encoder and decoders as initialised) with its class head
(``image_post_mapping``, class embeddings and MLP) trained on the abdominal scan's organs, on
cached encoder outputs of random 64³ crops. Its logits form coherent, confident regions with
sharp edges, as a trained head's do; the encoder stays random, so its features carry the same
bfloat16 rounding as any encoder of that size.

Only the class head is saved (about 1 MB); :func:`standin_network` rebuilds the whole network.

    cd bench && ../.venv/bin/python auto_standin.py --threads 1     # 16 minutes on a busy core
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from common import DATA, ROOT

from lib.atomic import write_json
from lib.labels import load_label_dictionary
from lib.model import build_network
from lib.trainers.auto_cached import ORGAN_CLASSES, organ_crops, organ_loss
from lib.trainers.corpus import abdomen_volume

logger = logging.getLogger("auto_standin")
HEAD_PATH = ROOT / "bench" / "weights" / "vista3d_standin_class_head.pt"
SEED = 0


def standin_network(head_path: Path = HEAD_PATH) -> torch.nn.Module:
    """Seed-0 random ``vista3d132`` with the trained class head loaded."""
    torch.manual_seed(SEED)
    network = build_network("vista3d").eval()
    network.class_head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
    return network


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", type=int, default=12)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HEAD_PATH)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    network = build_network("vista3d").eval()
    volume = abdomen_volume(DATA, load_label_dictionary())
    data = []
    with torch.no_grad():  # not inference mode: the features are inputs of the head's training graph
        for x, y in organ_crops(volume.image, volume.label, args.crops, args.crop, np.random.default_rng(SEED)):
            _, out_auto = network.image_encoder(x, with_point=False, with_label=True)
            data.append((out_auto.clone(), y))
    logger.info("Encoded %d crops in %.0f s", len(data), time.perf_counter() - start)
    head = network.class_head.train()
    optimiser = torch.optim.Adam(head.parameters(), lr=args.lr)
    vector = torch.tensor(ORGAN_CLASSES).unsqueeze(1)
    losses = []
    for step in range(args.steps):
        features, label = data[step % len(data)]
        logits, _ = head(features, vector)
        loss = organ_loss(logits, label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 10 == 0:
            logger.info("step %d loss %.4f", step, np.mean(losses[-10:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    torch.save({k: v.detach().clone() for k, v in head.state_dict().items()}, tmp)
    tmp.replace(args.out)
    report = {
        "what": "seed-0 random vista3d132 with its class head trained on the abdominal scan's organs",
        "command": "bench/auto_standin.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "classes": list(ORGAN_CLASSES),
        "loss_first10": round(float(np.mean(losses[:10])), 4),
        "loss_last10": round(float(np.mean(losses[-10:])), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(args.out.with_suffix(".json"), report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
