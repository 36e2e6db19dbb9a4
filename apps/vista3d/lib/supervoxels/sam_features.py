"""SAM's features of every CT slice in the three views, summed into one 3D feature volume.

As the public VISTA script (``vista3d/scripts/slic_process_sam.py``): each slice's -1000..1000 HU
window is scaled to 0..255, replicated to RGB, resized so its long side is 1024 and padded to
square (SAM's own ``preprocess``), encoded by SAM's image encoder, and passed through the mask
decoder's ``output_upscaling`` (32 channels at 256²); the valid part is resized back to the slice.
The axial, coronal and sagittal volumes are summed.

Memory: 32 float32 channels of a 512x512x300 CT are 10 GB, and SLIC works on a float64 copy, so
each slice's 32 channels are projected at once onto ``channels`` (default 6) fixed orthonormal
directions (seeded): the accumulator is 1.9 GB and SLIC's copy 3.8 GB, inside 8 GB. SLIC
clusters by Euclidean feature distance, which a random orthonormal projection approximately
preserves (Johnson-Lindenstrauss), so the clusters follow the same SAM boundaries.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

__all__ = ["SAM_KINDS", "load_sam", "projection", "sam_feature_volume"]

logger = logging.getLogger(__name__)

SAM_KINDS = ("vit_b", "vit_l", "vit_h")
DECODER_CHANNELS = 32


def load_sam(kind: str, checkpoint: str | Path | None, device: str = "cpu") -> Sam:
    """A SAM backbone; ``checkpoint=None`` gives random weights (tests, timing)."""
    if kind not in SAM_KINDS:
        raise ValueError(f"SAM model must be one of {SAM_KINDS}, got {kind!r}")
    sam = sam_model_registry[kind](checkpoint=str(checkpoint) if checkpoint else None)
    logger.info("SAM %s from %s", kind, checkpoint or "random initialisation")
    return sam.to(device).eval()


def projection(channels: int, seed: int = 0) -> torch.Tensor:
    """[channels, 32] fixed orthonormal rows."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DECODER_CHANNELS, channels, generator=g))
    return q.T.contiguous()


@torch.inference_mode()
def _slice_features(sam: Sam, slices: np.ndarray, proj: torch.Tensor) -> torch.Tensor:
    """[B, H, W] HU slices -> [B, C, H, W] projected decoder features."""
    device = next(sam.parameters()).device
    h, w = slices.shape[1:]
    x = torch.from_numpy(np.clip((slices + 1000.0) / 2000.0, 0, 1) * 255.0).float().to(device)
    scale = sam.image_encoder.img_size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(x[:, None], size=(nh, nw), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    embedding = sam.image_encoder(sam.preprocess(x))
    feats = sam.mask_decoder.output_upscaling(embedding)  # [B, 32, 256, 256]
    size = feats.shape[-1]
    valid = feats[..., : round(nh * size / sam.image_encoder.img_size), : round(nw * size / sam.image_encoder.img_size)]
    feats = F.interpolate(valid, size=(h, w), mode="bilinear", align_corners=False)
    return torch.einsum("cd,bdhw->bchw", proj.to(device), feats).float().cpu()


def sam_feature_volume(hu: np.ndarray, sam: Sam, slices_per_batch: int = 8, channels: int = 6) -> np.ndarray:
    """[channels, X, Y, Z] float32 feature volume of ``hu`` [X, Y, Z] (the sum of the three views)."""
    proj = projection(channels)
    out = np.zeros((channels, *hu.shape), dtype=np.float32)
    for axis in range(3):
        moved = np.moveaxis(hu, axis, 0)  # view: slices along ``axis``
        target = np.moveaxis(out, axis + 1, 1)  # [C, n, H, W] view of ``out``
        for start in range(0, moved.shape[0], slices_per_batch):
            batch = np.ascontiguousarray(moved[start : start + slices_per_batch], dtype=np.float32)
            feats = _slice_features(sam, batch, proj).numpy()  # [B, C, H, W]
            target[:, start : start + len(batch)] += feats.transpose(1, 0, 2, 3)
    return out
