"""VISTA3D's point head split into a click-independent part (cached per window) and a per-click part.

MONAI's ``PointMappingSAM.forward`` recomputes everything on every click. Two things make a click
cheap here, both exact up to float rounding (tested against MONAI's forward):

* the downsampled encoder features and their positional encoding do not depend on the clicks, so
  :func:`prepare` computes them once per window;
* the head's last convolution is linear and is followed by a projection with the per-click
  hyper-network vector, so the two fold into one single-output convolution: 48x less work on the
  full-resolution window, where most of the head's cost was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.nets.vista3d import PointMappingSAM
from torch import nn

__all__ = ["HeadFeatures", "predict", "prepare"]


@dataclass(frozen=True)
class HeadFeatures:
    """Click-independent inputs of the point head for one window.

    Attributes:
        low: [1, C, h, w, d] downsampled encoder features.
        pos: [1, C, h, w, d] positional encoding of the downsampled grid (the same tensor for
            every window of a shape, so it is not counted in :meth:`nbytes`).
        shape: spatial shape of the full-resolution window.
    """

    low: torch.Tensor
    pos: torch.Tensor
    shape: tuple[int, int, int]

    def nbytes(self) -> int:
        return self.low.element_size() * self.low.nelement()


def _full_precision(like: torch.Tensor) -> torch.autocast:
    """Positional encodings take sin/cos of products of coordinates: bfloat16 would shift their phases."""
    return torch.autocast(like.device.type, enabled=False)


def prepare(head: PointMappingSAM, feats: torch.Tensor, pos: torch.Tensor | None = None) -> HeadFeatures:
    """[1, C, H, W, D] encoder output -> the head's click-independent features.

    ``pos`` is the positional encoding from an earlier window of the same shape, when there is one.
    """
    low = head.feat_downsample(feats)
    if pos is None:
        with _full_precision(low):
            pos = head.pe_layer(tuple(low.shape[-3:])).unsqueeze(0)
    return HeadFeatures(low, pos, tuple(int(s) for s in feats.shape[-3:]))  # type: ignore[arg-type]


def _tokens(
    head: PointMappingSAM, coords: torch.Tensor, labels: torch.Tensor, class_id: int, shape: tuple[int, int, int]
) -> torch.Tensor:
    """Prompt tokens as in ``PointMappingSAM.forward`` for one object: [1, 1 + N + 1, C]."""
    emb = head.pe_layer.forward_with_coords(coords + 0.5, shape)  # shift to the voxel centre
    emb[labels == -1] = 0.0
    emb[labels == -1] += head.not_a_point_embed.weight
    negative, positive = (cast(nn.Embedding, e).weight for e in head.point_embeddings)
    special = head.special_class_embed.weight
    emb[labels == 0] += negative
    emb[labels == 1] += positive
    emb[labels == 2] += negative + special
    emb[labels == 3] += positive + special
    class_token = head.zeroshot_embed.weight if class_id > head.last_supported else head.supported_embed.weight
    return torch.cat([head.mask_tokens.weight.unsqueeze(0), emb, class_token.unsqueeze(0)], dim=1)


def predict(
    head: PointMappingSAM, features: HeadFeatures, coords: torch.Tensor, labels: torch.Tensor, class_id: int
) -> torch.Tensor:
    """Logits of one object from clicks.

    Args:
        head: the network's point head.
        features: from :func:`prepare` for this window.
        coords: [1, N, 3] click coordinates in window voxels.
        labels: [1, N] point labels (0/1, or 2/3 for special classes).
        class_id: global class id; above ``head.last_supported`` the zero-shot token is used.

    Returns:
        [1, 1, H, W, D] logits (before sigmoid).
    """
    with _full_precision(coords):
        tokens = _tokens(head, coords, labels, class_id, features.shape)
    hs, src = head.transformer(features.low, features.pos, tokens)
    hyper = head.output_hypernetworks_mlps(hs[:, :1, :])[0, 0]  # [C]
    b, c, h, w, d = features.low.shape
    src = src.transpose(1, 2).reshape(b, c, h, w, d)
    upscale = head.output_upscaling
    x = upscale[2](upscale[1](upscale[0](src)))  # transposed conv, instance norm, GELU
    # A single-output convolution runs about twice as fast on channels-last input on CPU; unmeasured
    # on a GPU (cuDNN may add transposes), so kept to the CPU.
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    last = cast(nn.Conv3d, upscale[3])
    weight = torch.einsum("c,cixyz->ixyz", hyper, last.weight).unsqueeze(0)  # fold the projection in
    bias = (hyper @ last.bias).reshape(1)
    return F.conv3d(x, weight, bias, padding=cast(tuple[int, int, int], last.padding))
