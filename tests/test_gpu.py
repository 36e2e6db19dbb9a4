"""The GPU path on a machine without one: device selection, memory placement, out-of-memory answers.

There is no GPU in CI, so CUDA is a fake (:class:`lib.inference.hardware.CudaView`) and a GPU
out-of-memory error is simulated by raising ``torch.OutOfMemoryError`` (which is what PyTorch raises
for a CUDA allocation that fails). ``bench/gpu_check.py`` runs the real checks on a GPU.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib.inference import gpu_memory
from lib.inference.gpu_memory import auto_budget_mb, background_placement, free_on_oom, round_gpu_bytes
from lib.inference.hardware import CudaView, DeviceChoice, has_kernels, select_device, use_device
from lib.infers.vista3d import Vista3DInfer
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, build_network
from lib.model_store import ModelStore
from lib.server.errors import install_error_handlers
from lib.settings import Settings
from lib.trainers.tasks import PointTrainTask

GiB = 2**30
# What torch 2.14.1+cu130 (this project's pin) reports: no sm_70 (Volta).
CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
GPUS = {"V100": (7, 0), "T4": (7, 5), "A10": (8, 6), "H100": (9, 0)}


def _cuda(gpu: str = "H100", count: int = 1, current: int = 0, available: bool = True) -> CudaView:
    return CudaView(
        available=available,
        count=count,
        arch_list=CU130 if available else (),
        capability=lambda i: GPUS[gpu],
        name=lambda i: f"NVIDIA {gpu}",
        current=current,
        build="13.0",
    )


@pytest.mark.parametrize(
    ("capability", "archs", "expected"),
    [
        ((7, 0), CU130, False),  # V100 on a CUDA 13 build: CUDA is there, kernels are not
        ((7, 5), CU130, True),
        ((8, 9), ("sm_80",), True),  # a cubin runs on later minors of its major
        ((8, 0), ("sm_86",), False),  # not on earlier ones
        ((10, 0), ("sm_90a",), False),  # architecture-specific: exactly sm_90 only
        ((10, 0), ("compute_90",), True),  # PTX is compiled for later GPUs
    ],
)
def test_kernels_are_matched_to_the_capability(
    capability: tuple[int, int], archs: tuple[str, ...], expected: bool
) -> None:
    assert has_kernels(capability, archs) is expected


def test_auto_takes_a_gpu_only_with_kernels_for_it() -> None:
    assert select_device("auto", _cuda("H100", count=2, current=1)).device == torch.device("cuda", 1)
    volta = select_device("auto", _cuda("V100"))
    assert volta.device == torch.device("cpu")
    assert "sm_70" in volta.reason and "cu126" in volta.reason
    none = select_device("auto", _cuda(available=False))
    assert none.device == torch.device("cpu") and "no CUDA device" in none.reason


def test_an_explicit_gpu_is_checked_at_start() -> None:
    assert select_device("cuda", _cuda(count=2, current=1)).device == torch.device("cuda", 1)
    assert select_device("cuda:1", _cuda(count=2)).device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        select_device("cuda:1", _cuda(count=1))
    with pytest.raises(ValueError, match="sees no CUDA device"):
        select_device("cuda:0", _cuda(available=False))
    with pytest.raises(ValueError, match="sm_70"):
        select_device("cuda:0", _cuda("V100"))


def test_a_gpu_becomes_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    use_device(DeviceChoice(torch.device("cuda", 1), "test"))
    assert calls == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark is True
    use_device(DeviceChoice(torch.device("cpu"), "test"))
    assert len(calls) == 1


def test_device_settings_are_parsed_once() -> None:
    s = Settings.from_conf({"train_device": "cuda:1", "gpu_memory_fraction": "0.7", "auto_gpu_memory_mb": "4096"})
    assert (s.train_device, s.gpu_memory_fraction, s.auto_gpu_memory_mb) == ("cuda:1", 0.7, 4096)
    for key, bad in (("train_device", "gpu0"), ("device", "cuda:x"), ("train_gpu_memory_fraction", "1.5")):
        with pytest.raises(ValueError, match=key):
            Settings.from_conf({key: bad})


def test_a_vista3d_round_estimate_is_the_code_reads() -> None:
    """The review's estimate: ~14 GiB of point-head activations at 128³ (x 1.5 for the encoder) plus
    the weights' copies; a small round at 64³ is far below a GiB."""
    vista = round_gpu_bytes("vista3d", 128, 218_000_000)
    assert 20 * GiB < vista < 30 * GiB
    assert round_gpu_bytes("small", 64, 5_700_000) < GiB


def _memory(free_gib: float, total_gib: float) -> Any:
    return lambda index: (int(free_gib * GiB), int(total_gib * GiB))


def test_a_round_shares_the_gpu_only_when_it_fits() -> None:
    h100, t4 = _cuda("H100"), _cuda("T4")
    settings = Settings(preset="vista3d")
    fits = background_placement(settings, "vista3d", 218_000_000, 128, h100, _memory(70, 80))
    assert fits.choice.device == torch.device("cuda", 0) and fits.refused is None
    full = background_placement(settings, "vista3d", 218_000_000, 128, t4, _memory(12, 16))
    assert full.choice.device == torch.device("cpu")
    assert full.refused is not None and "GiB" in full.refused and "train_device" in full.refused
    busy = background_placement(settings, "vista3d", 218_000_000, 128, h100, _memory(10, 80))
    assert busy.refused is not None, "a GPU the server has filled refuses the round"
    assert background_placement(Settings(), "small", 5_700_000, 64, t4, _memory(12, 16)).refused is None
    on_cpu = background_placement(Settings(train_device="cpu"), "vista3d", 218_000_000, 128, h100, _memory(70, 80))
    assert on_cpu.choice.device == torch.device("cpu") and on_cpu.refused is None


def test_host_and_gpu_budgets_are_separate() -> None:
    settings = Settings(auto_memory_mb=3000, gpu_memory_fraction=0.5)
    assert auto_budget_mb(settings, torch.device("cpu")) == 3000
    assert auto_budget_mb(settings, torch.device("cuda", 0), total=lambda i: 16 * GiB) == 2048
    assert auto_budget_mb(Settings(auto_gpu_memory_mb=9000), torch.device("cuda", 0), total=lambda i: GiB) == 9000


class _Datastore:
    def get_labeled_images(self, tag: str) -> list[str]:
        return []


def test_a_refused_round_says_why_in_the_learning_status(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    model = LoadedModel(build_network("small"), "small", None, torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        task = PointTrainTask(Settings(), model, store, load_label_dictionary(), None, refused="refused: no room")
        result = task({}, _Datastore())  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    assert result["promoted"] is None
    assert store.summary()["last_round"]["reason"] == "refused: no room"


def _oom_app(monkeypatch: pytest.MonkeyPatch, freed: list[str]) -> tuple[TestClient, list[weakref.ref]]:
    """A FastAPI app with the server's error handlers around :meth:`Vista3DInfer.__call__`, whose
    segmentation allocates a tensor and then raises ``torch.OutOfMemoryError`` (simulated)."""
    held: list[weakref.ref] = []

    def segment(self: Vista3DInfer, request: dict[str, Any]) -> Any:
        activations = torch.zeros(1 << 20)
        held.append(weakref.ref(activations))
        if request["fail"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return None, {"ok": True}

    monkeypatch.setattr(Vista3DInfer, "segment", segment)
    monkeypatch.setattr(gpu_memory, "release_cached_memory", lambda: (gc.collect(), freed.append("freed")))
    infer = object.__new__(Vista3DInfer)
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/infer")
    def run(fail: bool) -> dict[str, Any]:
        return infer({"fail": fail})[1]

    return TestClient(app), held


def test_gpu_out_of_memory_answers_503_frees_and_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: ``torch.OutOfMemoryError`` raised inside the request, as a CUDA allocation raises it."""
    freed: list[str] = []
    client, held = _oom_app(monkeypatch, freed)
    answer = client.post("/infer", params={"fail": True})
    assert answer.status_code == 503
    assert int(answer.headers["retry-after"]) > 0
    assert "out of memory" in answer.json()["detail"]
    assert freed == ["freed"]
    gc.collect()
    assert held[0]() is None, "the failed request's tensors must not outlive its answer"
    assert client.post("/infer", params={"fail": False}).json() == {"ok": True}


def test_other_errors_pass_through_unchanged() -> None:
    with pytest.raises(KeyError):
        free_on_oom(lambda: {}["x"])


def test_gpu_check_says_there_is_no_gpu_and_exits_0(tmp_path: Path) -> None:
    """``bench/gpu_check.py`` with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``), as on a CPU machine."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "gpu_check.py", "--out", str(out)]
    done = subprocess.run(command, cwd=bench, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stdout
    assert json.loads(out.read_text()) == {"cuda": False, "reason": "device=auto: no CUDA device is visible"}
