"""The GPU checks of the CUDA code read (``docs/gpu.md``), smallest first, within a time limit.

On a CUDA machine it runs, in order, each within what is left of ``--limit-s``:

1. ``startup_precision``: what the server chooses at start for each path with ``precision`` and
   ``auto_precision`` left at ``auto`` (the measured trials, the reason), per preset;
2. ``window``: one window (encoder + point head) of each preset in every precision the GPU offers,
   cuDNN autotuning on (review #5, #10, #19), and the first window's time (the cold start);
3. ``click`` of ``small``, then of ``vista3d``: six simulated clicks on STS_021 per precision, with
   Dice against the same run on the CPU in float32 (#19) and each click's latency;
4. ``auto_small``: an automatic segmentation of nine organs of ``example_ct`` against the CPU;
5. ``click_during_auto``: a click's latency while an auto holds the compute slot, through the
   server's scheduler (#8);
6. ``two_rank_round``: ``PointTrainTask._train_distributed`` with ``world_size`` 2 (#2): on one GPU
   the refusal, on two the round;
7. ``point_step_peak``: peak GPU memory of one ``vista3d`` point-training step at 128³, against the
   estimate that decides whether a round may share the server's GPU (#3);
8. ``auto_everything_peak``: peak GPU memory of a ``vista3d`` "everything" auto of ``example_ct`` (#15);
9. ``auto_vista3d``: the nine organs with ``vista3d`` against the CPU (slowest: its CPU reference).

It imports nothing of MONAI Label's server (only ``two_rank_round`` does, and only on two GPUs), so
it runs where just torch, MONAI, nibabel and pydicom are installed; ``VISTA3D_DATA`` names the data
folder when ``../shared/data`` is not beside the checkout (``tools/gpu_session.sh``).

It writes one JSON (``artifacts/gpu_check.json`` by default), after every check. Without CUDA it says so, writes a JSON
that says so, and exits 0. ``vista3d`` runs on ``--vista3d-weights`` (random weights when absent:
times and memory are the same, agreement with the CPU still means something, Dice to truth does not).

    .venv/bin/python bench/gpu_check.py --limit-s 540
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from click_latency import DEFAULT_CASES, app_run
from common import DATA, ROOT, multiclass_agreement, parse_case

from lib.atomic import write_json
from lib.inference.engine import Engine
from lib.inference.gpu_memory import round_gpu_bytes
from lib.inference.hardware import reduced_support, select_device, use_device
from lib.inference.precision import TrialCache, choose_precisions
from lib.inference.segment import new_state
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, build_network, load_model, patch_size_for
from lib.trainers.distributed import check_world_size
from lib.trainers.request import TrainRequest

logger = logging.getLogger("gpu_check")
LABELS = load_label_dictionary()
ORGANS = [1, 3, 4, 5, 6, 7, 10, 12, 14]
AUTO_IMAGE = Path(DEFAULT_CASES[1].split(":")[0])
Check = Callable[[], dict[str, Any]]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _model(preset: str, weights: str | None, device: torch.device) -> LoadedModel:
    name = weights or ("starter" if preset == "small" else "none")
    return load_model(preset, name, ROOT / "apps" / "vista3d" / "model", device)


def _engine(model: LoadedModel, precision: str) -> Engine:
    patch = patch_size_for(model.preset)
    return Engine(model, patch, LABELS.sw_overlap, LABELS.special, precision, 4096, auto_precision=precision)


def _precisions(device: torch.device) -> list[str]:
    return ["fp32", *(s.precision for s in reduced_support(device) if s.usable)]


def startup_precision(preset: str, weights: str | None, device: torch.device) -> dict[str, Any]:
    """What the server would choose at start on this GPU (``precision`` and ``auto_precision`` left at
    ``auto``): each path's precision, the reason and the measured trial, as ``/info`` shows them."""
    model = _model(preset, weights, device)
    precisions = choose_precisions(
        {"click": "auto", "auto": "auto"},
        model,
        patch_size_for(preset),
        LABELS.preprocessing.hu_window,
        LABELS.everything,
        TrialCache(None),
    )
    return precisions.as_dict()


def window_check(preset: str, weights: str | None, device: torch.device) -> dict[str, Any]:
    """Median seconds of one window (encoder + point head) per precision; the first one cold."""
    network = _model(preset, weights, device).network
    patch = patch_size_for(preset)
    x = torch.rand(1, 1, *patch, device=device)
    point = torch.tensor([[[p // 2 for p in patch]]], dtype=torch.float32, device=device)
    label = torch.ones(1, 1, dtype=torch.long, device=device)
    out: dict[str, Any] = {}
    for precision in _precisions(device):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        times = []
        for _ in range(6):
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=bool(dtype)):
                feats, _ = network.image_encoder(x, with_point=True, with_label=False)
                network.point_head(feats, point, label)
            _sync()
            times.append(time.perf_counter() - start)
        out[precision] = {"first_s": round(times[0], 4), "median_s": round(statistics.median(times[1:]), 4)}
    return out


def _clicks(preset: str, weights: str | None, device: torch.device, precision: str) -> tuple[np.ndarray, np.ndarray]:
    case = parse_case(DEFAULT_CASES[0])
    engine = _engine(_model(preset, weights, device), precision)
    state = new_state(str(case.image), LABELS.preprocessing, patch_size_for(preset))
    truth = case.ground_truth()
    run = app_run(engine, state, truth, case.class_id, 6)
    return np.asarray(run["dice"]), np.asarray(run["times"])


def click_check(preset: str, weights: str | None, device: torch.device) -> dict[str, Any]:
    """Six clicks on STS_021 per precision on the GPU, and once on the CPU in float32: Dice to the
    truth after each click and the gap to the CPU's."""
    cpu_dice, _ = _clicks(preset, weights, torch.device("cpu"), "fp32")
    out: dict[str, Any] = {"cpu_fp32_dice": cpu_dice.round(4).tolist()}
    for precision in _precisions(device):
        gpu_dice, times = _clicks(preset, weights, device, precision)
        n = min(len(gpu_dice), len(cpu_dice))
        out[precision] = {
            "dice": gpu_dice.round(4).tolist(),
            "max_gap_to_cpu": round(float(np.abs(gpu_dice[:n] - cpu_dice[:n]).max()), 4) if n else None,
            "first_s": round(float(times[0]), 3),
            "later_median_s": round(float(np.median(times[1:])), 3) if len(times) > 1 else None,
        }
    return out


def _auto(model: LoadedModel, precision: str, classes: list[int]) -> tuple[np.ndarray, float]:
    engine = _engine(model, precision)
    state = new_state(str(AUTO_IMAGE), LABELS.preprocessing, patch_size_for(model.preset))
    start = time.perf_counter()
    labels = engine.auto(state.image, classes).numpy()
    _sync()
    return labels, time.perf_counter() - start


def auto_check(preset: str, weights: str | None, device: torch.device) -> dict[str, Any]:
    """Nine organs of example_ct per precision on the GPU against the CPU in float32."""
    reference, cpu_s = _auto(_model(preset, weights, torch.device("cpu")), "fp32", ORGANS)
    out: dict[str, Any] = {"cpu_fp32_s": round(cpu_s, 2)}
    model = _model(preset, weights, device)
    for precision in _precisions(device):
        labels, seconds = _auto(model, precision, ORGANS)
        out[precision] = {"s": round(seconds, 2), "agreement_dice": round(multiclass_agreement(reference, labels), 5)}
    return out


def point_step_peak(weights: str | None, device: torch.device) -> dict[str, Any]:
    """Peak GPU memory of one vista3d point-training step at 128³ against the placement estimate."""
    from lib.trainers.corpus import abdomen_volume
    from lib.trainers.point_loop import train_point

    network = _model("vista3d", weights, device).network
    # The abdomen's 60 organs: every step prompts the most objects a round does (3); a sarcoma case
    # has one, and the first H200 run measured that (15.4 GiB against an estimate for 3 objects).
    volume = abdomen_volume(DATA, LABELS)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_point(network, [volume], [1.0], TrainRequest(steps=1, crop=128, rounds=3), LABELS.special)
    _sync()
    n = sum(p.numel() for p in network.parameters())
    return {
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "estimate_gib": round(round_gpu_bytes("vista3d", 128, n) / 2**30, 2),
        "step_s": round(time.perf_counter() - start, 2),
    }


def auto_everything_peak(weights: str | None, device: torch.device) -> dict[str, Any]:
    """Peak GPU memory and time of a vista3d "everything" auto of example_ct (float32)."""
    model = _model("vista3d", weights, device)
    torch.cuda.reset_peak_memory_stats(device)
    _, seconds = _auto(model, "fp32", list(LABELS.everything))
    return {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2), "s": round(seconds, 2)}


def click_during_auto(weights: str | None, device: torch.device) -> dict[str, Any]:
    """A small click alone, and sent once an auto of the same engine holds the server's compute slot.

    Each click gets its own image state (a repeated click on one state answers from its cache: the
    first H200 run measured 0.001 s that way), and the auto is "everything" on ``example_ct`` so that
    it is still running when the click comes (``auto_running``)."""
    from lib.inference.segment import segment_points
    from lib.prompts import PointPrompt
    from lib.server.scheduler import Kind, Scheduler

    model = _model("small", weights, device)
    engine = _engine(model, "fp32")
    case = parse_case(DEFAULT_CASES[0])
    auto_state = new_state(str(AUTO_IMAGE), LABELS.preprocessing, patch_size_for("small"))
    point = np.argwhere(case.ground_truth())[0]
    prompt = PointPrompt(point[None], np.asarray([True]), case.class_id)

    states = [new_state(str(case.image), LABELS.preprocessing, patch_size_for("small")) for _ in range(3)]

    def click(job: object) -> float:
        state = states.pop()
        previous = np.zeros(state.original_shape, dtype=np.int16)
        start = time.perf_counter()
        segment_points(engine, state, prompt, previous)
        _sync()
        return time.perf_counter() - start

    click(None)  # warm-up: cuDNN autotuning
    alone = click(None)
    scheduler = Scheduler(4, 600)
    started = threading.Event()

    auto_began: list[float] = []

    def auto(job: Any) -> Any:
        auto_began.append(time.perf_counter())
        started.set()
        return engine.auto(auto_state.image, list(LABELS.everything), lambda i, n: scheduler.checkpoint(job))

    _, auto_future = scheduler.submit(Kind.AUTO, "a", "auto", auto)
    started.wait()
    time.sleep(0.2)
    auto_running = not auto_future.done()
    sent = time.perf_counter()
    _, future = scheduler.submit(Kind.CLICK, "b", "click", click)
    compute = future.result()
    waited = time.perf_counter() - sent
    auto_future.result()
    auto_s = time.perf_counter() - auto_began[0]
    return {
        "alone_s": round(alone, 3), "during_auto_s": round(waited, 3), "compute_s": round(compute, 3),
        "auto_running": auto_running, "auto_s": round(auto_s, 2),
    }  # fmt: skip


def two_rank_round(device: torch.device) -> dict[str, Any]:
    """world_size 2 through the server's path: refused on one GPU, a round on two."""
    try:
        check_world_size(2, "cuda")
    except ValueError as e:
        return {"gpus": torch.cuda.device_count(), "refused": str(e)}
    from lib.model_store import ModelStore
    from lib.settings import Settings
    from lib.trainers.corpus import sarcoma_volume
    from lib.trainers.tasks import PointTrainTask

    model = _model("small", None, device)
    store = ModelStore(ROOT / "artifacts" / "gpu_check_store")
    task = PointTrainTask(Settings(), model, store, LABELS, None)
    volume = sarcoma_volume(parse_case(DEFAULT_CASES[0]).image.parent, "STS_021", LABELS)
    candidate = build_network("small").to(device)
    candidate.load_state_dict(model.network.state_dict())
    start = time.perf_counter()
    trained = task._train_distributed(candidate, [volume], [1.0], TrainRequest(steps=4, crop=64, world_size=2))
    return {"gpus": torch.cuda.device_count(), "steps": trained.stats.steps, "s": round(time.perf_counter() - start, 1)}


def checks(args: argparse.Namespace, device: torch.device) -> list[tuple[str, Check]]:
    """Smallest first: the time limit cuts the largest."""
    w = args.vista3d_weights
    return [
        ("startup_precision_small", lambda: startup_precision("small", None, device)),
        ("startup_precision_vista3d", lambda: startup_precision("vista3d", w, device)),
        ("window_small", lambda: window_check("small", None, device)),
        ("window_vista3d", lambda: window_check("vista3d", w, device)),
        ("click_small", lambda: click_check("small", None, device)),
        ("click_vista3d", lambda: click_check("vista3d", w, device)),
        ("auto_small", lambda: auto_check("small", None, device)),
        ("click_during_auto", lambda: click_during_auto(None, device)),
        ("two_rank_round", lambda: two_rank_round(device)),
        ("point_step_peak", lambda: point_step_peak(w, device)),
        ("auto_everything_peak", lambda: auto_everything_peak(w, device)),
        ("auto_vista3d", lambda: auto_check("vista3d", w, device)),
    ]


def _write(path: Path, report: dict[str, Any]) -> None:
    """After every check: a run killed by its caller's time limit keeps the figures it has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        reason = select_device("auto").reason
        print(f"gpu_check: no CUDA device here ({reason}); nothing to check")
        return {"cuda": False, "reason": reason}
    choice = select_device(args.device)
    use_device(choice)
    device = choice.device
    index = device.index or 0
    report: dict[str, Any] = {
        "cuda": True,
        "device": choice.reason,
        "torch": torch.__version__,
        "memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
        "checks": {},
    }
    deadline = time.monotonic() + args.limit_s
    for name, check in checks(args, device):
        if time.monotonic() > deadline:
            report["checks"][name] = {"skipped": "time limit"}
            continue
        start = time.perf_counter()
        try:
            result = check()
        except Exception as e:  # one failing check must not hide the others' figures
            logger.exception("%s failed", name)
            result = {"error": f"{type(e).__name__}: {e}"}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = result
        print(f"gpu_check: {name}: {json.dumps(result)}", flush=True)
        _write(args.out, report)
        torch.cuda.empty_cache()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-s", type=float, default=540.0, help="no check starts after this many seconds")
    parser.add_argument("--device", default="auto", help="auto or cuda:N")
    parser.add_argument("--vista3d-weights", default=None, help="a vista3d checkpoint (default: random weights)")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "gpu_check.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = run(args)
    _write(args.out, report)
    print(f"gpu_check: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
