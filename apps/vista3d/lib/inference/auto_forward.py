"""The automatic branch's forward pass, stage by stage, each stage in the precision a policy gives it.

``SegResNetDS2.forward`` runs the encoder, then the label decoder (``up_layers_auto``); the class
head's ``image_post_mapping`` follows. Reduced precision helps most where float32 is slow and
hurts agreement most where the output is formed, so the precision is chosen per stage:

* ``init``: the first convolution (full resolution);
* ``down0`` .. ``down{L-1}``: the encoder's levels, full resolution first;
* ``up0`` .. ``up{L-2}``: the label decoder's levels, coarsest first (the last one is full resolution);
* ``head``: the class head's ``image_post_mapping``.

A stage named in the policy runs under reduced-precision autocast (bfloat16: oneDNN's fast path
on CPUs with AVX512-BF16; float16 on GPUs without bfloat16); every other stage runs in float32 on
float32 inputs, its 3D convolutions sent to oneDNN (:class:`OneDNNConvolutions`): PyTorch sends
MONAI's low-resolution ones at batch 1 to its slow reference kernel instead, 35 % of a ``small``
window's time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify
from torch.overrides import TorchFunctionMode

__all__ = [
    "FLOAT32_STAGES",
    "OneDNNConvolutions",
    "StageRunner",
    "decode_auto",
    "reduced_stages",
    "stages",
    "window_features",
]

StageRunner = Callable[[str, torch.nn.Module, torch.Tensor], torch.Tensor]
"""``run(stage, module, x)``: runs one module of the automatic branch as its stage asks."""

# With a reduced ``auto_precision``, the stages kept in float32: the encoder's full-resolution level, which
# reads the image itself. On the trained vista3d stand-in (bench/auto_standin.py) every stage in
# bfloat16 cost its organs up to Dice 0.03 against the float32 reference, and so did keeping only
# the class head in float32; the first convolution alone in float32 left Dice 0.989, this level
# >= 0.994 for every organ of 1000 voxels or more. See the README's automatic-segmentation table.
FLOAT32_STAGES = frozenset({"init", "down0"})


def stages(network: VISTA3D) -> list[str]:
    """The stage names of ``network``'s automatic branch, in execution order."""
    encoder = cast(SegResNetDS2, network.image_encoder)
    levels = len(encoder.encoder.layers)
    return ["init", *[f"down{i}" for i in range(levels)], *[f"up{i}" for i in range(levels - 1)], "head"]


def reduced_stages(network: VISTA3D, reduced: bool) -> frozenset[str]:
    """The stages run in reduced precision: none, or all but :data:`FLOAT32_STAGES`."""
    return frozenset(stages(network)) - FLOAT32_STAGES if reduced else frozenset()


def window_features(
    network: VISTA3D,
    window: torch.Tensor,
    reduced: frozenset[str],
    between: Callable[[], None] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """[1, 1, p, p, p] window -> [C, p, p, p] float32 post-mapped class-head features.

    Equal to ``class_head.image_post_mapping(image_encoder(window)[1])`` when no stage is reduced
    (tested); ``reduced`` names the stages run under ``dtype`` autocast.
    ``between`` is called before every module the pass runs (a few tens of milliseconds apart
    for ``small`` on 2 cores, against 0.3 s for the whole window): the server's scheduler lets
    waiting clicks run there, or stops the request; it may block, or raise.
    """
    encoder = cast(SegResNetDS2, network.image_encoder)
    if encoder.preprocess is not None or encoder.encoder.head_module is not None:
        raise ValueError("the automatic path expects a SegResNetDS2 encoder without preprocess or head module")
    device = window.device.type

    def run(stage: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if between is not None:
            between()
        low = stage in reduced
        onednn = OneDNNConvolutions() if not low and device == "cpu" else contextlib.nullcontext()
        with torch.autocast(device, dtype=dtype, enabled=low), onednn:
            return cast(torch.Tensor, module(x if low else x.float()))

    x = run("init", encoder.encoder.conv_init, window)
    skips: list[torch.Tensor] = []
    for i, level in enumerate(cast(torch.nn.ModuleList, encoder.encoder.layers)):
        level = cast(torch.nn.ModuleDict, level)
        x = run(f"down{i}", level["blocks"], x)
        skips.append(x)
        x = run(f"down{i}", level["downsample"], x)
    out = decode_auto(encoder, skips, run)
    head = cast(ClassMappingClassify, network.class_head)
    return run("head", head.image_post_mapping, out).float()[0]


def decode_auto(encoder: SegResNetDS2, levels: list[torch.Tensor], run: StageRunner | None = None) -> torch.Tensor:
    """``SegResNetDS2.forward``'s automatic decoder on the encoder's levels (finest first).

    ``run(stage, module, x)`` runs each of its modules (``up0`` .. stages, the skip additions
    included); by default plainly, as training on cached levels (:mod:`.trainers.auto_cached`) does.
    """
    run = run or _plain
    skips = list(reversed(levels))
    x = skips.pop(0)
    out = x
    for i, level in enumerate(cast(torch.nn.ModuleList, encoder.up_layers_auto)):
        level = cast(torch.nn.ModuleDict, level)
        stage = f"up{i}"
        x = run(stage, level["upsample"], x)
        x = run(stage, _Add(skips[i]), x)
        x = run(stage, level["blocks"], x)
        if len(encoder.up_layers_auto) - i <= encoder.dsdepth:
            out = run(stage, level["head"], x)
    return out


def _plain(stage: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, module(x))


class _Add(torch.nn.Module):
    """The decoder's skip connection as a module, so that it runs in its stage's precision."""

    def __init__(self, skip: torch.Tensor) -> None:
        super().__init__()
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.skip


class OneDNNConvolutions(TorchFunctionMode):
    """Within it, the float32 CPU ``F.conv3d`` calls PyTorch would keep off oneDNN run on it.

    PyTorch picks its own reference kernel over oneDNN for a float32 convolution when batch x
    channels x the first two spatial sizes is at most 20480 ("for some case, native is faster", in
    ``ConvParams::use_mkldnn``): MONAI's 3D convolutions on 16³ and 8³ inputs at batch 1 (``small``'s
    low-resolution levels) and the one-channel first convolution. For those, and only those,
    ``torch.mkldnn_convolution`` is called instead: the same answer to float rounding (largest
    difference 8e-6 on features of magnitude 9), and a ``small`` window takes 0.195 s instead of
    0.27 s on 2 cores. Anything else (larger inputs, other dtypes, string padding, gradients)
    falls through to ``F.conv3d`` unchanged. The mode is per thread: a click served between two
    stages of an automatic segmentation is not in it.
    """

    NATIVE_LIMIT = 20480

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.conv3d and len(args) == 7 and not kwargs:
            x, weight, bias, stride, padding, dilation, groups = args
            if (
                x.dtype == torch.float32
                and x.device.type == "cpu"
                and x.dim() == 5
                and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= self.NATIVE_LIMIT
                and isinstance(padding, tuple)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            ):
                return torch.mkldnn_convolution(x.contiguous(), weight, bias, padding, stride, dilation, groups)
        return func(*args, **kwargs)
