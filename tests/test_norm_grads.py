"""Training follows the loss's true gradient on the CPU: instance norms guarded, checked by finite differences.

Without :func:`lib.norm_grads.guard_instance_norms`, PyTorch 2.14.1's CPU instance norm gets the
input gradient wrong for a batch of 1 and a channels-last gradient, and the point branch's loss
gradient for the encoder disagreed in sign with finite differences (``docs/point-rounds.md``).
"""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from lib.model import build_network
from lib.norm_grads import guard_instance_norms


def reference_instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm written with elementwise ops and reductions only (their gradients are layout-proof)."""
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = x.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def input_gradient(f: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    f(x).backward(grad)
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_guarded_instance_norm_takes_a_channels_last_gradient(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6, 6, dtype=dtype)
    grad = torch.randn(1, 8, 6, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    expected = input_gradient(reference_instance_norm, x, grad)  # type: ignore[arg-type]
    guarded = guard_instance_norms(nn.Sequential(nn.InstanceNorm3d(8))).to(dtype)
    torch.testing.assert_close(input_gradient(guarded, x, grad), expected)


def test_guard_is_added_once() -> None:
    network = guard_instance_norms(build_network("small"))  # build_network guards already
    norms = [m for m in network.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(len(m._forward_hooks) == 1 for m in norms)


def point_loss(network: nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A point round's loss for one positive click at the object's centre (float64)."""
    feats, _ = network.image_encoder(image, with_point=True, with_label=False)
    coords = torch.tensor([[[16.0, 16.0, 16.0]]])
    logits = network.point_head(feats, coords, torch.tensor([[1]]), class_vector=torch.tensor([[3]]))
    return DiceCELoss(sigmoid=True, lambda_ce=0.1)(logits, target)


def test_point_loss_gradient_matches_finite_differences() -> None:
    """The encoder's and the point head's gradients agree with central differences along a random direction.

    The point head's positional encoding casts click coordinates to float32, so the network runs
    float64 except that layer (its matrix and output are float32 and promote in the sums).
    """
    torch.manual_seed(0)
    network = build_network("small").double().train()
    pe = network.point_head.pe_layer
    pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
    image = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    target = torch.zeros(1, 1, 32, 32, 32, dtype=torch.float64)
    target[..., 10:22, 12:20, 8:24] = 1
    groups = {
        "encoder": [*network.image_encoder.encoder.parameters(), *network.image_encoder.up_layers.parameters()],
        "point head downsampling": list(network.point_head.feat_downsample.parameters()),
    }
    for name, params in groups.items():
        grads = torch.autograd.grad(point_loss(network, image, target), params)
        direction = [torch.randn_like(p) * p.detach().abs().mean() for p in params]
        analytic = sum(float((g * v).sum()) for g, v in zip(grads, direction, strict=True))
        eps = 1e-6
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p.add_(eps * v)
            plus = float(point_loss(network, image, target))
            for p, v in zip(params, direction, strict=True):
                p.sub_(2 * eps * v)
            minus = float(point_loss(network, image, target))
            for p, v in zip(params, direction, strict=True):
                p.add_(eps * v)
        numeric = (plus - minus) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=1e-3), name


def test_guard_leaves_inference_alone() -> None:
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(4)
    guarded = guard_instance_norms(nn.Sequential(nn.InstanceNorm3d(4)))
    x = torch.randn(1, 4, 5, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(guarded(x), norm(x))
