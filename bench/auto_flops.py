"""Convolution work of one automatic-path window per stage, and what it bounds.

With the stages of ``lib.auto_forward.FLOAT32_STAGES`` in float32 and the rest in bfloat16, a
window can be at most ``1 / (f + (1 - f) / r)`` times faster than in float32, where ``f`` is the
float32 stages' share of the convolution work and ``r`` how much faster the CPU multiplies in
bfloat16. AVX512-BF16 (this machine: AMD EPYC, no AMX) does 32 bfloat16 products per instruction
where AVX-512 does 16 float32 ones, so ``r`` <= 2 here. Counted on a 32³ window (seconds, one
thread) and scaled to the preset's window: convolution work grows with the voxels.

    .venv/bin/python bench/auto_flops.py
"""

from __future__ import annotations

import json
from typing import Any

import torch
from common import ROOT  # noqa: F401  (puts the app on sys.path)

from lib.auto_forward import FLOAT32_STAGES, stages, window_features
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


def main() -> None:
    torch.set_num_threads(1)
    for preset in ("small", "vista3d"):
        gflops = stage_gflops(preset)
        total = sum(gflops.values())
        share = sum(v for k, v in gflops.items() if k in FLOAT32_STAGES) / total
        bound = {f"r={r}": round(1 / (share + (1 - share) / r), 2) for r in (2, 4, 8)}
        report = {"preset": preset, "window_gflop": round(total), "float32_share": round(share, 3)}
        print(json.dumps({**report, "split_speedup_bound": bound, "by_stage_gflop": gflops}))


if __name__ == "__main__":
    main()
