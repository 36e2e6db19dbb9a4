"""Training the automatic branch on cached encoder outputs (how the ``small`` starter's was trained).

On real CT (the abdominal scan): the branch learns, and nothing else of the network moves, which
is why the starter's clicks did not change when its automatic branch was trained further.
"""

from __future__ import annotations

import numpy as np
import torch

from lib.inference.auto_forward import decode_auto
from lib.labels import load_label_dictionary
from lib.model import build_network
from lib.trainers.auto_cached import ORGAN_CLASSES, organ_crops, train_auto_cached
from lib.trainers.auto_trainer import auto_branch
from lib.trainers.corpus import abdomen_volume

from .conftest import DATA


def test_only_the_automatic_branch_learns_on_organ_crops() -> None:
    torch.manual_seed(0)
    network = build_network("small")
    volume = abdomen_volume(DATA, load_label_dictionary())
    crops = organ_crops(volume.image, volume.label, 2, 32, np.random.default_rng(0))
    assert all(any(bool((y == c).any()) for c in ORGAN_CLASSES) for _, y in crops)  # centred on organs
    learned = {id(p) for m in auto_branch(network) for p in m.parameters()}
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    stats = train_auto_cached(network, crops, steps=3, lr=1e-3)
    assert stats.steps == 3 and np.isfinite(stats.loss_last)
    for name, p in network.named_parameters():
        moved = not torch.equal(p, before[name])
        if id(p) not in learned:
            assert not moved, f"{name} is outside the automatic branch and must not change"
    assert any(not torch.equal(p, before[n]) for n, p in network.named_parameters() if id(p) in learned)


@torch.inference_mode()
def test_decode_auto_is_the_encoders_own_decoder() -> None:
    torch.manual_seed(0)
    encoder = build_network("small").image_encoder.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    _, expected = encoder(x, with_point=False, with_label=True)
    assert torch.allclose(decode_auto(encoder, encoder.encoder(x)), expected, atol=1e-6)
