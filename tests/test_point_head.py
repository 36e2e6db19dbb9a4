"""The split point head (cached click-independent part + folded last convolution) equals MONAI's forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.inference.engine import Engine, can_reuse
from lib.inference.point_head import predict, prepare
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, build_network
from lib.sessions import ImageState

from .helpers import needs_bf16


@pytest.mark.parametrize("preset", ["small", "vista3d"])
@pytest.mark.parametrize(("class_id", "labels"), [(3, [1, 0]), (26, [3, 2]), (140, [1, 1])])
def test_predict_matches_monai_forward(preset: str, class_id: int, labels: list[int]) -> None:
    torch.manual_seed(0)
    head = build_network(preset).point_head.eval()
    channels = head.feat_downsample[0].in_channels
    feats = torch.randn(1, channels, 32, 32, 32)
    coords = torch.tensor([[[16.0, 16.0, 16.0], [3.0, 20.0, 30.0]]])
    point_labels = torch.tensor([labels])
    with torch.inference_mode():
        reference = head(feats, coords, point_labels, class_vector=torch.tensor([[class_id]]))
        mine = predict(head, prepare(head, feats), coords, point_labels, class_id)
    # float32 rounding differs with the order of the folded sums; logits are O(1).
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)


def test_window_reuse_needs_containment_and_a_nearby_centred_window() -> None:
    size, patch = (300, 300, 100), (96, 96, 96)
    assert can_reuse(np.array([60, 60, 50]), (10, 10, 4), size, patch)
    assert can_reuse(np.array([82, 60, 50]), (10, 10, 4), size, patch), "centred window 24 voxels away"
    assert not can_reuse(np.array([95, 60, 50]), (10, 10, 4), size, patch), "centred window 37 voxels away"
    assert not can_reuse(np.array([5, 60, 50]), (10, 10, 4), size, patch), "outside the window"
    assert can_reuse(np.array([60, 60, 99]), (10, 10, 4), size, patch), "the volume edge clamps the centred window"


def test_nearby_clicks_share_a_window_far_clicks_do_not() -> None:
    torch.manual_seed(0)
    model = LoadedModel(build_network("small").eval(), "small", "test.pt", torch.device("cpu"))
    engine = Engine(model, (96, 96, 96), 0.3, load_label_dictionary().special)
    state = ImageState(
        image=torch.rand(1, 200, 120, 96),
        model_affine=np.eye(4),
        original_affine=np.eye(4),
        original_shape=(200, 120, 96),
    )
    points = np.array([[60.0, 60.0, 48.0], [70.0, 55.0, 40.0], [170.0, 60.0, 48.0]])
    positive = np.array([True, True, True])
    engine.points(state, points[:1], positive[:1], 3, np.array([0]))
    engine.points(state, points[:2], positive[:2], 3, np.array([1]))
    assert len(state.features) == 1, "the second click reused the first window"
    engine.points(state, points, positive, 3, np.array([2]))
    assert len(state.features) == 2


@needs_bf16
def test_bf16_masks_agree_with_fp32_on_real_ct() -> None:
    """bfloat16 autocast changes logits by ~1e-2; only voxels with near-zero logits flip sign."""
    from lib.inference.segment import new_state

    from .conftest import STS

    torch.manual_seed(0)
    labels = load_label_dictionary()
    model = LoadedModel(build_network("small").eval(), "small", "test.pt", torch.device("cpu"))
    state = new_state(str(STS / "STS_001_ct.nii.gz"), labels.preprocessing, (96, 96, 96))
    points, positive = np.array([[60.0, 60.0, 50.0], [70.0, 40.0, 50.0]]), np.array([True, False])
    masks = {}
    for precision in ("fp32", "bf16"):
        state.features.clear()
        engine = Engine(model, (96, 96, 96), 0.3, labels.special, precision)
        masks[precision] = engine.points(state, points, positive, 3, np.array([0, 1])).foreground
    a, b = masks["fp32"], masks["bf16"]
    assert a.any()
    # Random weights put many logits near zero, the worst case for agreement (trained heads are sharper).
    assert 2 * (a & b).sum().item() / (a.sum() + b.sum()).item() > 0.98
