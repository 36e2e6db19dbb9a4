"""Right gradients through instance norms on the CPU, whatever layout the gradient arrives in.

PyTorch 2.14.1's CPU instance norm computes wrong input gradients when its batch is 1 and the
gradient reaching its output is channels-last strided (float64, float32 and bfloat16, any thread
count; with a batch of 2, or a contiguous gradient, they are right). VISTA3D's point head feeds its
normalised features to the transformer as ``flatten(2).permute(0, 2, 1)``, so the gradient that
reaches ``point_head.feat_downsample``'s last instance norm has exactly that layout: every gradient
below it, the downsampling's and the whole image encoder's, pointed elsewhere than the loss's
(finite differences disagreed in sign). That is why point rounds un-learned their own labels on a
CPU while the same rounds on a GPU, whose kernels differ, fitted them (``docs/point-rounds.md``).

:func:`guard_instance_norms` makes the gradient contiguous before the norm's backward reads it:
a copy of one gradient per norm when it is strided, nothing at inference (no gradient is tracked).
``tests/test_norm_grads.py`` checks the network's gradient against finite differences.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["guard_instance_norms"]

M = TypeVar("M", bound=nn.Module)


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _guard(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    """Forward hook: the gradient that flows back into ``output`` is made contiguous first."""
    if output.requires_grad and output.device.type == "cpu":
        output.register_hook(_contiguous)


def guard_instance_norms(network: M) -> M:
    """Hook every instance norm of ``network`` (once) so that its CPU backward sees a contiguous gradient."""
    for module in network.modules():
        if isinstance(module, _InstanceNorm) and _guard not in module._forward_hooks.values():
            module.register_forward_hook(_guard)
    return network
