"""Two training processes over gloo (the CPU backend of torch.distributed) train in lockstep."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lib.labels import load_label_dictionary
from lib.model import build_network
from lib.trainers.corpus import sarcoma_volume
from lib.trainers.distributed import spawn
from lib.trainers.request import TrainRequest
from lib.trainers.tasks import train_point

from .conftest import STS


def _fingerprint(network: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for v in network.state_dict().values():
        h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()


def _rank(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    labels = load_label_dictionary()
    volume = sarcoma_volume(STS, "STS_001", labels)
    torch.manual_seed(0)
    network = build_network("small")
    before = _fingerprint(network)
    req = TrainRequest(steps=2, crop=64, rounds=2, lr=1e-3)
    stats = train_point(network, [volume], [1.0], req, labels.special, rank=rank, world=world)
    Path(out, f"rank{rank}.txt").write_text(f"{before} {_fingerprint(network)} {stats.steps}")


def test_two_gloo_processes_average_gradients(tmp_path: Path) -> None:
    spawn(2, _rank, str(tmp_path))
    results = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    (before0, after0, steps0), (before1, after1, steps1) = results
    assert before0 == before1, "both ranks start from the same weights"
    assert after0 != before0, "training changed nothing"
    assert after0 == after1, "ranks drew different crops; only averaged gradients keep them identical"
    assert steps0 == steps1 == "2"


def test_without_averaging_the_ranks_drift(tmp_path: Path) -> None:
    """The control: the same two runs without the process group end with different weights."""
    for rank in (0, 1):
        _rank(rank, 1, str(tmp_path))
    (_, after0, _), (_, after1, _) = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert after0 != after1
