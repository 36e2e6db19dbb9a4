"""The automatic path against MONAI's reference on real CT with the trained starter weights.

The reference is what the published bundle runs: ``SlidingWindowInferer`` (constant weights, the
bundle's 0.3 overlap) over ``VISTA3D.forward``, then ``VistaPostTransformd``. The CT is a crop of
the abdominal scan (the starter's automatic branch was trained on its organs, so its logits are
those of a trained network there), small enough for the whole module to run in well under a minute.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval

from lib.inference.auto_forward import OneDNNConvolutions, stages, window_features
from lib.inference.auto_infer import auto_segment, window_workers
from lib.inference.auto_plan import axis_starts, plan_blocks
from lib.inference.engine import Engine
from lib.inference.precision import autocast_dtype
from lib.inference.segment import new_state
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, load_model, patch_size_for
from lib.settings import Settings

from .conftest import DATA
from .helpers import MACHINE_PRECISION, needs_bf16

LABELS = load_label_dictionary()
PATCH = patch_size_for("small")
ORGANS = [1, 3, 4, 5, 6, 7, 10, 12, 14]
MIN_CLASS_VOXELS = 1000  # smaller "classes" are specks where any rounding flips a voxel or two


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model("small", "starter", Path("/nonexistent"), torch.device("cpu"))


@pytest.fixture(scope="module")
def crop() -> torch.Tensor:
    """110 x 100 x 90 voxels of the abdominal scan's model grid around liver, kidney and spleen (12 windows)."""
    state = new_state(str(DATA / "totalseg" / "example_ct.nii.gz"), LABELS.preprocessing, PATCH)
    return state.image[:, 60:170, 40:140, 60:150].contiguous()


@pytest.fixture(scope="module")
def small_crop(crop: torch.Tensor) -> torch.Tensor:
    """64 x 100 x 70 voxels (4 windows) for the tests that run the path several times."""
    return crop[:, 20:84, :, :70].contiguous()


def reference(model: LoadedModel, image: torch.Tensor, classes: list[int]) -> np.ndarray:
    vector = torch.tensor(classes).unsqueeze(1)
    inferer = SlidingWindowInferer(roi_size=PATCH, overlap=LABELS.sw_overlap, sw_batch_size=1)
    with torch.no_grad():
        logits = inferer(image.unsqueeze(0), lambda x: model.network(x, class_vector=vector, transpose=True))
        pred = VistaPostTransformd(keys="pred")({"pred": logits[0], "label_prompt": torch.tensor(classes)})["pred"]
    return pred[0].numpy().astype(np.int16)


@pytest.fixture(scope="module")
def organs_reference(model: LoadedModel, crop: torch.Tensor) -> np.ndarray:
    return reference(model, crop, ORGANS)


@pytest.fixture(scope="module")
def small_crop_machine(model: LoadedModel, small_crop: torch.Tensor) -> torch.Tensor:
    return engine(model, MACHINE_PRECISION).auto(small_crop, ORGANS)


def engine(model: LoadedModel, precision: str, auto_memory_mb: int = 2048) -> Engine:
    return Engine(model, PATCH, LABELS.sw_overlap, LABELS.special, precision, auto_memory_mb)


def per_class_dice(ref: np.ndarray, got: np.ndarray) -> dict[int, tuple[float, int]]:
    out = {}
    for c in np.unique(ref[ref > 0]):
        a, b = ref == c, got == c
        out[int(c)] = (2.0 * int((a & b).sum()) / (int(a.sum()) + int(b.sum())), int(a.sum()))
    return out


@pytest.mark.parametrize("size", [64, 65, 100, 128, 243])
@pytest.mark.parametrize("overlap", [0.0, 0.3, 0.5])
def test_window_starts_are_monai_s(size: int, overlap: float) -> None:
    image_size, patch = (size, 70, 64), (64, 64, 64)
    monai = dense_patch_slices(image_size, patch, _get_scan_interval(image_size, patch, 3, (overlap,) * 3))
    assert sorted({s[0].start for s in monai}) == axis_starts(size, 64, overlap)


def test_plan_tiles_the_volume_within_the_budget() -> None:
    size, patch = (243, 201, 223), (128, 128, 128)
    roomy = plan_blocks(size, patch, 0.3, 48, 4 << 30)
    assert len(roomy.blocks) == 1 and roomy.window_passes == 3 * 2 * 3
    tight = plan_blocks(size, patch, 0.3, 48, 256 << 20)
    assert tight.buffer_bytes <= 256 << 20 < roomy.buffer_bytes
    covered = np.zeros(size[1:], dtype=np.int32)
    for b in tight.blocks:
        covered[b.lo[0] : b.hi[0], b.lo[1] : b.hi[1]] += 1
    assert (covered == 1).all()  # the blocks partition axes 1 and 2
    assert tight.window_passes > roomy.window_passes  # windows on a block edge are encoded per block


def test_auto_memory_setting_is_parsed_at_the_edge() -> None:
    assert Settings.from_conf({}).auto_memory_mb == 2048
    assert Settings.from_conf({"auto_memory_mb": "512"}).auto_memory_mb == 512
    with pytest.raises(ValueError, match="auto_memory_mb"):
        Settings.from_conf({"auto_memory_mb": "0"})


@torch.inference_mode()
def test_staged_forward_in_float32_is_the_network_s(model: LoadedModel, small_crop: torch.Tensor) -> None:
    window = small_crop[:, :, :64, :64].unsqueeze(0)
    _, out_auto = model.network.image_encoder(window, with_point=False, with_label=True)
    expected = model.network.class_head.image_post_mapping(out_auto)[0]
    assert stages(model.network)[0] == "init" and stages(model.network)[-1] == "head"
    scale = float(expected.abs().max())  # oneDNN's float32 sums differ from PyTorch's in the last bits
    assert torch.allclose(window_features(model.network, window, frozenset()), expected, atol=1e-6 * scale)


@pytest.mark.parametrize("shape", [(1, 64, 16, 16, 16), (1, 1, 24, 24, 24)])
def test_onednn_convolutions_give_pytorchs_answer_and_leave_training_alone(shape: tuple[int, ...]) -> None:
    conv = torch.nn.Conv3d(shape[1], 8, 3, padding=1)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = conv(x)
        with OneDNNConvolutions(), torch.profiler.profile() as prof:
            got = conv(x)
    assert "aten::mkldnn_convolution" in {e.key for e in prof.key_averages()}
    assert torch.allclose(got, expected, atol=1e-5)
    with OneDNNConvolutions():
        conv(x.requires_grad_()).sum().backward()  # falls through to F.conv3d: gradients as usual
    assert x.grad is not None and conv.weight.grad is not None


def test_fp32_is_the_reference(model: LoadedModel, crop: torch.Tensor, organs_reference: np.ndarray) -> None:
    app = engine(model, "fp32").auto(crop, ORGANS).numpy()
    # Same windows, same float32 network; only the order of float sums (and oneDNN's kernels) differs.
    assert (app == organs_reference).mean() >= 0.99999


@needs_bf16
def test_bf16_agrees_with_the_reference_per_class(
    model: LoadedModel, crop: torch.Tensor, organs_reference: np.ndarray
) -> None:
    """What ``auto_precision auto`` keeps on a CPU with bfloat16: every organ of the crop at Dice >= 0.99 against
    the float32 reference, with the starter whose automatic branch was trained on cached crops
    (its predecessor, whose organ logits sat near zero, left the spleen at 0.983 on the whole scan)."""
    app = engine(model, MACHINE_PRECISION).auto(crop, ORGANS).numpy()
    dice = per_class_dice(organs_reference, app)
    present = {c: d for c, (d, n) in dice.items() if n >= MIN_CLASS_VOXELS}
    assert len(present) >= 3, dice  # the crop holds organs the starter finds
    assert min(present.values()) >= 0.99, present
    assert (app == organs_reference).mean() >= 0.998
    assert Settings.from_conf({}).auto_precision == "auto"
    assert Settings.from_conf({"preset": "vista3d"}).auto_precision == "auto"


def test_window_workers_for_small_windows_only() -> None:
    assert window_workers((64, 64, 64), 2) == 2
    assert window_workers((64, 64, 64), 16) == 4
    assert window_workers((64, 64, 64), 1) == 1
    assert window_workers((128, 128, 128), 16) == 1


def test_parallel_windows_give_the_sequential_answer(model: LoadedModel, small_crop: torch.Tensor) -> None:
    classes = [1, 3, 5, 6, 14]
    kwargs = {"dtype": autocast_dtype(MACHINE_PRECISION), "budget_bytes": 2**30}
    one = auto_segment(model.network, small_crop, classes, PATCH, LABELS.sw_overlap, workers=1, **kwargs)
    two = auto_segment(model.network, small_crop, classes, PATCH, LABELS.sw_overlap, workers=2, **kwargs)
    assert torch.equal(one, two)  # windows are added in MONAI's order whichever worker computed them


def test_more_classes_than_features_stitch_features(model: LoadedModel, small_crop: torch.Tensor) -> None:
    classes = list(LABELS.everything[:20])  # 20 classes > the head's 16 feature channels
    app = engine(model, "fp32").auto(small_crop, classes).numpy()
    assert (app == reference(model, small_crop, classes)).mean() >= 0.99999


def test_a_tight_budget_gives_the_same_answer(
    model: LoadedModel, small_crop: torch.Tensor, small_crop_machine: torch.Tensor
) -> None:
    calls: list[tuple[int, int]] = []
    budget = 10 << 20  # 9 classes x 64 planes x 100 x 70 x 4 bytes = 16 MB in one block: 2 blocks
    assert len(plan_blocks(small_crop.shape[1:], PATCH, LABELS.sw_overlap, 9, budget).blocks) == 2
    tight = auto_segment(
        model.network,
        small_crop,
        ORGANS,
        PATCH,
        LABELS.sw_overlap,
        dtype=autocast_dtype(MACHINE_PRECISION),
        budget_bytes=budget,
        on_window=lambda i, n: calls.append((i, n)),
    )
    assert calls[-1] == (7, 8)  # every window overlaps both blocks here, so each ran twice
    assert torch.equal(small_crop_machine, tight)


class Cancelled(Exception):
    pass


def test_a_raising_on_window_cancels(model: LoadedModel, small_crop: torch.Tensor) -> None:
    eng = engine(model, MACHINE_PRECISION)
    calls: list[tuple[int, int]] = []

    def cancel_at_two(i: int, n: int) -> None:
        calls.append((i, n))
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        eng.auto(small_crop, ORGANS, on_window=cancel_at_two)
    assert list(dict.fromkeys(calls)) == [(0, 4), (1, 4), (2, 4)]  # window 2 never ran, nor any after it
    assert calls.count((2, 4)) == 1, "it stopped before window 2's first stage"
    assert eng.auto(small_crop, ORGANS).shape == small_crop.shape[1:]  # the engine serves on


def test_a_blocking_on_window_only_delays(
    model: LoadedModel, small_crop: torch.Tensor, small_crop_machine: torch.Tensor
) -> None:
    eng = engine(model, MACHINE_PRECISION)
    release = threading.Event()
    threading.Timer(0.5, release.set).start()
    calls: list[tuple[int, int]] = []

    def wait_at_one(i: int, n: int) -> None:
        calls.append((i, n))
        if i == 1:
            release.wait(10)

    start = time.perf_counter()
    got = eng.auto(small_crop, ORGANS, on_window=wait_at_one)
    assert time.perf_counter() - start >= 0.5
    assert list(dict.fromkeys(calls)) == [(i, 4) for i in range(4)]
    assert torch.equal(got, small_crop_machine)


def test_on_window_is_also_called_between_a_passs_stages(model: LoadedModel, small_crop: torch.Tensor) -> None:
    """The scheduler gets the compute slot back for a waiting click within one stage, not one whole window."""
    calls: list[tuple[int, int]] = []
    engine(model, MACHINE_PRECISION).auto(small_crop, ORGANS, on_window=lambda i, n: calls.append((i, n)))
    per_window = [calls.count((i, 4)) for i in range(4)]
    assert min(per_window) > len(stages(model.network)), per_window


def test_the_thread_budget_is_asked_before_every_window(model: LoadedModel, small_crop: torch.Tensor) -> None:
    """An auto started beside a background process (1 thread) takes both cores once it has ended."""
    budget = iter([1, 1, 2, 2])
    seen: list[tuple[int, int]] = []
    auto_segment(
        model.network,
        small_crop,
        ORGANS,
        PATCH,
        LABELS.sw_overlap,
        dtype=None,
        budget_bytes=2**30,
        on_window=lambda i, n: seen.append((i, torch.get_num_threads())),
        workers=1,
        threads=lambda: next(budget),
    )
    per_window = dict(seen)  # per window, the thread count its last stage ran with
    assert per_window == {0: 1, 1: 1, 2: 2, 3: 2}, seen


def test_windows_at_once_never_exceed_the_budget() -> None:
    """Two workers, a budget of one thread: one window at a time; a budget of two: two at once, one thread each."""
    from lib.inference.auto_infer import _Gate

    budget = [1]
    gate = _Gate(None, 4, lambda: budget[0], workers=2)
    inside, most, shares = [0], [0], []
    lock = threading.Lock()

    def window(i: int) -> None:
        with gate.window(i):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                shares.append(torch.get_num_threads())
            time.sleep(0.2)
            with lock:
                inside[0] -= 1

    def run_two() -> None:
        workers = [threading.Thread(target=window, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    before = torch.get_num_threads()
    try:
        run_two()
        assert most[0] == 1 and shares == [1, 1]
        budget[0], most[0], shares[:] = 2, 0, []
        run_two()
        assert most[0] == 2 and shares == [1, 1]
    finally:
        torch.set_num_threads(before)
