"""Network presets and checkpoint loading.

Both presets are MONAI's ``VISTA3D`` class: ``vista3d`` is the published ``vista3d132``; ``small``
puts the same heads on a 16-filter, 4-level SegResNetDS2 so that a CPU answers a click in about
a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM, vista3d132

from .atomic import replace_with
from .labels import official_checkpoint
from .norm_grads import guard_instance_norms

__all__ = ["LoadedModel", "build_network", "load_model", "patch_size_for", "save_state"]

logger = logging.getLogger(__name__)

SMALL_FILTERS = 16
OFFICIAL_FILENAME = "model_vista3d.pt"
# Trained with tools/train_starter.py; see weights/small_starter.json for data, command and figures.
STARTER_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "small_starter.pt"


def build_network(preset: str) -> VISTA3D:
    """A freshly initialised network of the given preset, its instance norms' CPU gradients guarded
    (see :mod:`.norm_grads`: without it, CPU training follows wrong gradients)."""
    return guard_instance_norms(_unguarded_network(preset))


def _unguarded_network(preset: str) -> VISTA3D:
    if preset == "vista3d":
        return vista3d132()
    if preset == "small":
        encoder = SegResNetDS2(
            in_channels=1,
            blocks_down=(1, 2, 2, 4),
            norm="instance",
            out_channels=SMALL_FILTERS,
            init_filters=SMALL_FILTERS,
            dsdepth=1,
        )
        return VISTA3D(
            image_encoder=encoder,
            class_head=ClassMappingClassify(n_classes=512, feature_size=SMALL_FILTERS, use_mlp=True),
            point_head=PointMappingSAM(feature_size=SMALL_FILTERS, n_classes=512, last_supported=132),
        )
    raise ValueError(f"unknown preset {preset!r}")


def patch_size_for(preset: str) -> tuple[int, int, int]:
    """Window size: the bundle's 128³ for ``vista3d``, 64³ for ``small``.

    A network must be served at the window edge it was trained at: the point head's positional
    encoding is normalised by the window, so a click's reach in voxels scales with it. The ``small``
    starter trains on 64³ crops; served at 96³ the same weights scored Dice@1 0.28 instead of 0.51 on
    the held-out sarcoma cases.
    """
    return (128, 128, 128) if preset == "vista3d" else (64, 64, 64)


def md5sum(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_official(model_dir: str | Path) -> Path:
    """Download the published checkpoint into ``model_dir`` unless a copy with the right md5 is there."""
    url, md5 = official_checkpoint()
    dest = Path(model_dir) / OFFICIAL_FILENAME
    if dest.exists() and md5sum(dest) == md5:
        return dest
    from monai.apps import download_url  # checks the hash and writes through a temporary file

    logger.info("Downloading the official VISTA3D checkpoint from %s to %s", url, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    download_url(url=url, filepath=str(dest), hash_val=md5, hash_type="md5")
    return dest


def extract_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: plain, or under ``model``/``state_dict``, DDP prefixes removed."""
    sd = checkpoint
    if isinstance(sd, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("checkpoint holds no state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_state(network: torch.nn.Module, path: str | Path) -> None:
    """Load weights strictly; a mismatch names the missing and unexpected keys."""
    sd = extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this preset: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    network.load_state_dict(sd, strict=True)


@dataclass
class LoadedModel:
    """The served network and where its weights came from (shown in ``/info`` and the log)."""

    network: VISTA3D
    preset: str
    weights: str | None
    device: torch.device
    warning: str | None = None
    served_version: int = 0  # 0: the configured weights; n: the n-th promoted version (see .model_store)

    @property
    def version(self) -> str:
        name = os.path.basename(self.weights) if self.weights else "random"
        return f"{self.preset}:{name}" if self.served_version == 0 else f"{self.preset}:v{self.served_version}"


def load_model(preset: str, weights: str, model_dir: str | Path, device: torch.device) -> LoadedModel:
    """Build the preset and load its weights; with none, warn loudly and keep random weights."""
    network = build_network(preset)
    path: Path | None = None
    if weights == "official":
        path = download_official(model_dir)
    elif weights == "starter":
        if preset != "small":
            raise ValueError("the starter weights are for preset 'small'")
        path = STARTER_WEIGHTS if STARTER_WEIGHTS.is_file() else None
    elif weights and weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--conf weights {weights}: no such file")
    warning = None
    if path is None:
        warning = (
            f"NO WEIGHTS LOADED: preset {preset!r} runs with RANDOM weights, its segmentations are "
            "meaningless. Pass --conf weights <checkpoint> (or 'official' for the published VISTA3D)."
        )
        logger.warning("!" * 20 + " " + warning + " " + "!" * 20)
    else:
        load_state(network, path)
        logger.info("Loaded %s weights from %s", preset, path)
    network.to(device).eval()
    n = sum(p.numel() for p in network.parameters())
    logger.info("Network %s: %.1fM parameters on %s", preset, n / 1e6, device)
    return LoadedModel(network, preset, str(path) if path else None, device, warning)


def save_state(network: torch.nn.Module, path: str | Path, half: bool = True) -> Path:
    """Write ``network``'s state dict atomically (float16 by default: a 5.7M network is 11 MB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in network.state_dict().items()
    }
    replace_with(path, lambda tmp: torch.save(sd, tmp))
    return path
