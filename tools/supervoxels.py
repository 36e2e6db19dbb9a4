#!/usr/bin/env python
"""Supervoxels for every image of a local datastore (resumable): SAM features with a checkpoint,
low-level features without one. Maps go to ``<studies>/.vista3d/supervoxels/<id>.nii.gz``.

    .venv/bin/python tools/supervoxels.py --studies ./studies
    .venv/bin/python tools/supervoxels.py --studies ./studies --sam-checkpoint sam_vit_b_01ec64.pth --sam-model vit_b
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vista3d"))

from lib.supervoxels.generate import generate
from lib.supervoxels.slic import LOWLEVEL_CONFIG, SlicConfig


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=Path, required=True)
    p.add_argument("--out", type=Path, help="output folder (default <studies>/.vista3d/supervoxels)")
    p.add_argument("--sam-checkpoint", type=Path, help="SAM weights; without, the low-level mode runs")
    p.add_argument("--sam-model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    p.add_argument("--n-segments", type=int, default=400)
    p.add_argument("--sigma", type=float, default=3.0)
    p.add_argument("--compactness", type=float, help="default 0.01 (sam) / 0.1 (lowlevel)")
    p.add_argument("--slices-per-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto", help="SAM's device: auto (a GPU torch has kernels for), cpu, cuda:N")
    args = p.parse_args(argv)
    if not args.studies.is_dir():
        p.error(f"no datastore folder {args.studies}")
    if args.threads:
        import torch  # only here and for SAM: the low-level mode runs without loading it

        torch.set_num_threads(args.threads)
    sam = None
    if args.sam_checkpoint:
        if not args.sam_checkpoint.is_file():
            p.error(f"no SAM checkpoint at {args.sam_checkpoint}")
        from lib.inference.hardware import select_device, use_device
        from lib.supervoxels.sam_features import load_sam

        choice = select_device(args.device)
        use_device(choice)
        sam = load_sam(args.sam_model, args.sam_checkpoint, str(choice.device))
    default = SlicConfig() if sam else LOWLEVEL_CONFIG
    compactness = args.compactness if args.compactness is not None else default.compactness
    config = SlicConfig(n_segments=args.n_segments, compactness=compactness, sigma=args.sigma)
    generate(args.studies, config, sam, args.out, args.slices_per_batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
