"""One automatic-path window on OpenVINO against the app's PyTorch path: the figures behind the
README's decision not to use it.

Each module that ``lib.inference.auto_forward.window_features`` runs separately (so that the server can let
clicks in between) is converted and compiled on its own, in the precision the app gives its stage
(``--mode split``: the full-resolution level float32, the rest bfloat16), then one window is timed
through PyTorch (float32 and split) and through OpenVINO, with the largest difference relative to
the float32 features. OpenVINO is not a dependency of the app: install it first.

    .venv/bin/pip install openvino==2026.4.1
    .venv/bin/python bench/openvino_probe.py --preset vista3d --mode split   # stand-in weights, ~4 min
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, cast

import torch
from auto_standin import standin_network
from common import ROOT

from lib.inference.auto_forward import FLOAT32_STAGES, reduced_stages, window_features
from lib.model import load_model, patch_size_for


class _Down(torch.nn.Module):
    def __init__(self, level: Any) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.level["blocks"](x)
        return y, self.level["downsample"](y)


class _Up(torch.nn.Module):
    def __init__(self, level: Any, head: bool) -> None:
        super().__init__()
        self.level, self.head = level, head

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.level["blocks"](self.level["upsample"](x) + skip)
        return x, (self.level["head"](x) if self.head else x)


def compiled_stages(network: torch.nn.Module, window: torch.Tensor, mode: str, threads: int) -> tuple[dict, float]:
    """Every stage converted on its real inputs and compiled; returns them and the seconds it took."""
    import openvino

    enc = cast(Any, network).image_encoder
    levels = len(enc.encoder.layers)
    core, out, start = openvino.Core(), {}, time.perf_counter()

    def compile_(name: str, module: torch.nn.Module, example: Any) -> None:
        precision = "f32" if mode == "f32" or (mode == "split" and name in FLOAT32_STAGES) else "bf16"
        model = openvino.convert_model(module, example_input=example)
        config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads}
        out[name] = core.compile_model(model, "CPU", config)

    with torch.no_grad():
        x = enc.encoder.conv_init(window)
        compile_("init", enc.encoder.conv_init, window)
        skips = []
        for i in range(levels):
            down = _Down(enc.encoder.layers[i])
            compile_(f"down{i}", down, x)
            skip, x = down(x)
            skips.append(skip)
        x = skips[-1]
        head_input = x
        for i in range(levels - 1):
            up = _Up(enc.up_layers_auto[i], levels - 1 - i <= enc.dsdepth)
            compile_(f"up{i}", up, (x, skips[levels - 2 - i]))
            x, head_input = up(x, skips[levels - 2 - i])
        compile_("head", network.class_head.image_post_mapping, head_input)
    return out, time.perf_counter() - start


def run_compiled(stages: dict, levels: int, window: torch.Tensor) -> torch.Tensor:
    def call(name: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        result = stages[name]({i: t.numpy() for i, t in enumerate(inputs)})
        return [torch.from_numpy(result[k]) for k in range(len(result))]

    (x,) = call("init", window)
    skips = []
    for i in range(levels):
        skip, x = call(f"down{i}", x)
        skips.append(skip)
    x = head_input = skips[-1]
    for i in range(levels - 1):
        x, head_input = call(f"up{i}", x, skips[levels - 2 - i])
    return call("head", head_input)[0][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["small", "vista3d"], default="vista3d")
    p.add_argument("--mode", choices=["split", "f32", "bf16"], default="split")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.preset == "small":
        network = load_model("small", "starter", ROOT / "nonexistent", torch.device("cpu")).network
    else:
        network = standin_network()
    edge = patch_size_for(args.preset)[0]
    torch.manual_seed(0)
    windows = [torch.rand(1, 1, edge, edge, edge) * 2 - 1 for _ in range(2)]
    stages, convert_s = compiled_stages(network, windows[0], args.mode, args.threads)
    levels = len(cast(Any, network).image_encoder.encoder.layers)
    report: dict[str, Any] = {"preset": args.preset, "mode": args.mode, "threads": args.threads}
    report["convert_and_compile_s"] = round(convert_s, 1)
    with torch.inference_mode():
        reference = window_features(network, windows[0], frozenset())
        timed = {
            "torch_fp32_s": lambda w: window_features(network, w, frozenset()),
            "torch_split_s": lambda w: window_features(network, w, reduced_stages(network, True)),
            "openvino_s": lambda w: run_compiled(stages, levels, w),
        }
        for name, fn in timed.items():
            fn(windows[0])
            start = time.perf_counter()
            fn(windows[1])
            report[name] = round(time.perf_counter() - start, 3)
        got = run_compiled(stages, levels, windows[0])
    report["openvino_relative_error"] = float((got - reference).abs().max() / reference.abs().max())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
