"""Supervoxels on real CT: SAM path (a small random SAM from segment_anything's own classes) and the
low-level fallback, and the datastore CLI (resumable, atomic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from lib.supervoxels.generate import supervoxels_for_image
from lib.supervoxels.slic import SlicConfig, outside_air

from .conftest import ROOT, STS

# SAM's own 1024² input costs a 4096-token attention per slice; the feature code reads the input size
# from the encoder (resize, pad, the valid part of the decoder's features), so 256² runs the same path.
SAM_INPUT = 256


def tiny_sam() -> Sam:
    """SAM's architecture at 256² input with a 2-block, 64-wide encoder: the real code path, fast."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        depth=2,
        embed_dim=64,
        img_size=SAM_INPUT,
        mlp_ratio=2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=False,
        global_attn_indexes=(1,),
        window_size=14,
        out_chans=256,
    )
    prompt = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(SAM_INPUT // 16, SAM_INPUT // 16),
        input_image_size=(SAM_INPUT, SAM_INPUT),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(encoder, prompt, decoder).eval()


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STS_001 at a fifth of its in-plane resolution, 24 slices: a real body outline and outside air."""
    img = nib.load(str(STS / "STS_001_ct.nii.gz"))
    data = np.asarray(img.dataobj)[::5, ::5, 20:44]
    affine = img.affine @ np.diag([5.0, 5.0, 1.0, 1.0])
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, 20]) + img.affine[:3, 3]
    path = tmp_path_factory.mktemp("ct") / "small_ct.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)
    return path


@pytest.mark.parametrize("mode", ["sam", "lowlevel"])
def test_supervoxels_cover_the_body_and_zero_the_air(small_ct: Path, mode: str) -> None:
    img = nib.load(str(small_ct))
    hu = np.asarray(img.dataobj, dtype=np.float32)
    # Random SAM features are not scaled like trained ones: the same compactness as low-level suits them.
    config = SlicConfig(n_segments=60, compactness=0.1, sigma=1.0)
    sv, affine, info = supervoxels_for_image(small_ct, config, sam=tiny_sam() if mode == "sam" else None)
    assert sv.shape == hu.shape and sv.dtype == np.uint16
    np.testing.assert_allclose(affine, img.affine)
    assert info["mode"] == mode and 60 / 2 <= info["segments"] <= 60 * 2, info
    air = outside_air(hu)
    assert air.any() and (sv[air] == 0).all(), "the air around the body must be 0"
    # The 3-voxel closing of the air may take the outermost skin; the body within is all supervoxels.
    body = ndimage.binary_erosion(hu > -200, iterations=4)
    assert body.sum() > 1000 and (sv[body] > 0).all(), "body voxels must belong to a supervoxel"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "supervoxels.py"), *args], capture_output=True, text=True, timeout=600
    )


def test_cli_writes_maps_beside_the_datastore_and_resumes(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    for case in ("STS_001", "STS_002"):
        os.symlink(STS / f"{case}_ct.nii.gz", studies / f"{case}.nii.gz")
    out = studies / ".vista3d" / "supervoxels"
    out.mkdir(parents=True)
    (out / ".STS_009.nii.gz.stray.tmp.nii.gz").write_bytes(b"half a file from a killed run")

    first = _cli("--studies", str(studies), "--n-segments", "100", "--threads", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    for case in ("STS_001", "STS_002"):
        info = json.loads((out / f"{case}.json").read_text())
        assert info["mode"] == "lowlevel" and info["segments"] > 20
        assert nib.load(str(out / f"{case}.nii.gz")).shape == nib.load(str(studies / f"{case}.nii.gz")).shape
    assert "lowlevel supervoxels" in first.stderr
    mtime = (out / "STS_001.nii.gz").stat().st_mtime_ns
    second = _cli("--studies", str(studies))
    assert second.returncode == 0 and "2 images, 0 without supervoxels" in second.stderr
    assert (out / "STS_001.nii.gz").stat().st_mtime_ns == mtime

    missing = _cli("--studies", str(studies), "--sam-checkpoint", str(tmp_path / "nope.pth"))
    assert missing.returncode == 2 and "no SAM checkpoint" in missing.stderr
