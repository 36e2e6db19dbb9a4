"""Data-parallel point rounds through the server's own path (``PointTrainTask._train_distributed``).

Two gloo ranks on the CPU must end where one process ends that averages the gradients of both ranks'
batches before every step (the definition of data-parallel SGD), and away from where one rank alone
ends. Kept cheap: a synthetic 48³ volume, 32³ crops, two steps, one torch thread per rank.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lib.labels import load_label_dictionary
from lib.model import LoadedModel, build_network
from lib.model_store import ModelStore
from lib.settings import Settings
from lib.trainers.data import CachedVolume
from lib.trainers.distributed import _buckets, backend_for, check_world_size, rank_device
from lib.trainers.point_loop import train_point
from lib.trainers.request import TrainRequest
from lib.trainers.schedule import _set_rng_state, rng_state
from lib.trainers.tasks import PointTrainTask

REQ = TrainRequest(steps=2, crop=32, rounds=2, lr=1e-2, world_size=2, seed=3)
# gloo sums two float32 gradients exactly as a + b does in process, so the runs agree to the bit;
# 1e-6 leaves room for another reduction order (e.g. a ring over more ranks).
ATOL = 1e-6


def _volume() -> CachedVolume:
    """A bright ball of liver (id 1) in noise: an object in every 32³ crop drawn around it."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*(torch.arange(48.0),) * 3, indexing="ij"))
    ball = ((grid - 24) ** 2).sum(0) < 12**2
    image = (0.3 + 0.05 * torch.randn(48, 48, 48, generator=g) + 0.4 * ball)[None]
    return CachedVolume("ball", image.float(), ball.to(torch.int16)[None], [1])


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("small")


def _state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


class _InProcessRanks:
    """``world`` ranks as threads of one process taking turns, their gradients averaged in memory.

    Each rank has its own network copy and its own global RNG state (Python, NumPy, torch: MONAI's
    prompt sampler draws from them), swapped in when its turn comes, so every rank draws exactly the
    crops and clicks it draws in a process of its own.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self.turn = 0
        self.cond = threading.Condition()
        self.grads: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        self.rng: dict[int, dict[str, Any]] = {}
        self.steps = [0] * world
        self.errors: list[BaseException] = []

    def _wait(self, ready: Callable[[], bool]) -> None:
        if not self.cond.wait_for(lambda: ready() or bool(self.errors), timeout=120) or self.errors:
            raise RuntimeError("the other in-process rank failed or hung")

    def _pass_turn(self, rank: int) -> None:
        self.turn = (rank + 1) % self.world
        self.cond.notify_all()

    def _posted(self, step: int) -> bool:
        return all((step, r) in self.grads for r in range(self.world))

    def sync(self, rank: int) -> Callable[[list[torch.nn.Parameter]], None]:
        def average(params: list[torch.nn.Parameter]) -> None:
            with self.cond:
                step = self.steps[rank]
                self.grads[(step, rank)] = [None if p.grad is None else p.grad.clone() for p in params]
                self.rng[rank] = rng_state()
                self._pass_turn(rank)
                self._wait(lambda: self.turn == rank and self._posted(step))
                for i, p in enumerate(params):
                    if p.grad is not None:
                        p.grad.copy_(sum(self.grads[(step, r)][i] for r in range(self.world)) / self.world)
                _set_rng_state(self.rng[rank])
                self.steps[rank] += 1

        return average

    def run(self, rank: int, network: torch.nn.Module, volume: CachedVolume, special: frozenset[int]) -> None:
        try:
            with self.cond:
                self._wait(lambda: self.turn == rank)
            train_point(network, [volume], [1.0], REQ, special, rank, self.world, grad_sync=self.sync(rank))
        except BaseException as e:  # re-raised in the test's thread
            self.errors.append(e)
        with self.cond:
            self._pass_turn(rank)


def _in_process(volume: CachedVolume, special: frozenset[int]) -> list[dict[str, torch.Tensor]]:
    ranks = _InProcessRanks(2)
    networks = [_network() for _ in range(2)]
    threads = [threading.Thread(target=ranks.run, args=(r, networks[r], volume, special)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if ranks.errors:
        raise ranks.errors[0]
    return [_state(n) for n in networks]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_gloo_ranks_train_like_one_process_on_both_batches(tmp_path: Path) -> None:
    """The server's path: a CPU candidate, ``_train_distributed`` with world_size 2 (gloo)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: train_threads 2 over 2 ranks
    try:
        labels = load_label_dictionary()
        volume = _volume()
        served = _network()
        model = LoadedModel(served, "small", None, torch.device("cpu"))
        task = PointTrainTask(Settings(train_threads=2), model, ModelStore(tmp_path / "models"), labels, None)
        before = _state(served)
        candidate = _network()
        trained = task._train_distributed(candidate, [volume], [1.0], REQ)
        ranks = _state(candidate)
        reference = _in_process(volume, labels.special)
        alone = _network()
        train_point(alone, [volume], [1.0], REQ, labels.special, rank=0, world=1)
    finally:
        torch.set_num_threads(threads)
    assert trained.stats.steps == REQ.steps
    assert _max_diff(ranks, before) > 1e-4, "the round changed nothing"
    assert _max_diff(reference[0], reference[1]) == 0.0, "averaged gradients keep in-process ranks identical"
    assert _max_diff(ranks, reference[0]) <= ATOL, "two processes must train like one on both batches"
    assert _max_diff(ranks, _state(alone)) > 1e-4, "a single rank's batches alone end elsewhere"
    assert (
        _state(served).keys() == before.keys() and _max_diff(_state(served), before) == 0.0
    ), "the served network must not be touched by the ranks"
    assert not (tmp_path / "models" / ".distributed-candidate.tmp").exists()


def test_backend_and_device_follow_the_network() -> None:
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
    assert rank_device("cuda", 1) == torch.device("cuda", 1)
    assert rank_device("cpu", 1) == torch.device("cpu")


def test_more_ranks_than_gpus_is_refused() -> None:
    check_world_size(4, "cpu", gpus=0)  # gloo ranks share the CPU
    check_world_size(2, "cuda", gpus=2)
    with pytest.raises(ValueError, match="world_size 2 needs 2 GPUs"):
        check_world_size(2, "cuda", gpus=1)


def test_gradients_are_reduced_in_buckets_of_one_dtype() -> None:
    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(3, dtype=torch.float16), torch.zeros(2)]
    assert [len(b) for b in _buckets(grads)] == [2, 1, 1]
