"""Convolution work of one automatic-path window per stage, and what it bounds.

With the stages of ``lib.inference.auto_forward.FLOAT32_STAGES`` in float32 and the rest in bfloat16, a
window can be at most ``1 / (f + (1 - f) / r)`` times faster than in float32, where ``f`` is the
float32 stages' share of the convolution work and ``r`` how much faster the CPU convolves in
bfloat16. AVX512-BF16 (this machine: AMD EPYC, no AMX) does 32 bfloat16 products per instruction
where AVX-512 does 16 float32 ones, so ``r`` is about 2 where arithmetic bounds a convolution (a
little more, as half the bytes move); 2x overall needs ``r`` >= 0.851 / 0.351 = 2.42 for
``vista3d``. The work is counted on a 32³ window (seconds, one thread) and scaled to the preset's
window, as convolution work grows with the voxels; ``r`` is measured on one 3x3x3 convolution of
the preset's full-resolution width and window (2 threads; about 1 % apart between two runs).

    .venv/bin/python bench/auto_flops.py
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import ROOT  # noqa: F401  (puts the app on sys.path)

from lib.inference.auto_forward import FLOAT32_STAGES, stages, window_features
from lib.model import build_network, patch_size_for

COUNT_EDGE = 32


def stage_of_modules(network: Any) -> dict[torch.nn.Module, str]:
    enc = network.image_encoder
    owner: dict[torch.nn.Module, str] = {enc.encoder.conv_init: "init"}
    for i, level in enumerate(enc.encoder.layers):
        owner.update({m: f"down{i}" for m in level.modules()})
    for i, level in enumerate(enc.up_layers_auto):
        owner.update({m: f"up{i}" for m in level.modules()})
    owner.update({m: "head" for m in network.class_head.image_post_mapping.modules()})
    return owner


def stage_gflops(preset: str) -> dict[str, float]:
    """Multiply-adds x 2 of every (transposed) convolution of one window, by stage."""
    network = build_network(preset).eval()
    owner = stage_of_modules(network)
    flops = dict.fromkeys(stages(network), 0.0)

    def count(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        kernel = module.weight.shape
        voxels = output if isinstance(module, torch.nn.Conv3d) else inputs[0]
        flops[owner[module]] += 2.0 * voxels.numel() * kernel[1] * kernel[2] * kernel[3] * kernel[4]

    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
            module.register_forward_hook(count)
    with torch.inference_mode():
        window_features(network, torch.zeros(1, 1, COUNT_EDGE, COUNT_EDGE, COUNT_EDGE), frozenset())
    scale = (patch_size_for(preset)[0] / COUNT_EDGE) ** 3
    return {k: round(v * scale / 1e9, 1) for k, v in flops.items()}


def measured_r(channels: int, edge: int, threads: int = 2) -> float:
    """float32 time / bfloat16 time of one ``channels`` -> ``channels`` 3x3x3 convolution on ``edge``³ (best of 10)."""
    torch.set_num_threads(threads)
    x, w = torch.randn(1, channels, edge, edge, edge), torch.randn(channels, channels, 3, 3, 3)
    times = []
    with torch.inference_mode():
        for a, b in ((x, w), (x.bfloat16(), w.bfloat16())):
            F.conv3d(a, b, padding=1)
            best = float("inf")
            for _ in range(10):
                start = time.perf_counter()
                F.conv3d(a, b, padding=1)
                best = min(best, time.perf_counter() - start)
            times.append(best)
    return times[0] / times[1]


def main() -> None:
    for preset in ("small", "vista3d"):
        torch.set_num_threads(1)
        gflops = stage_gflops(preset)
        total = sum(gflops.values())
        share = sum(v for k, v in gflops.items() if k in FLOAT32_STAGES) / total
        width = build_network(preset).image_encoder.encoder.conv_init.out_channels
        r_here = round(measured_r(width, patch_size_for(preset)[0]), 2)
        bound = {f"r={r}": round(1 / (share + (1 - share) / r), 2) for r in (r_here, 2, 4, 8)}
        report = {"preset": preset, "window_gflop": round(total), "float32_share": round(share, 3)}
        report["r_measured"] = r_here
        print(json.dumps({**report, "split_speedup_bound": bound, "by_stage_gflop": gflops}))


if __name__ == "__main__":
    main()
