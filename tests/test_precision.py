"""Precision from the machine: the policy, its cache, the CPU check, and a server on a CPU without bfloat16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import torch

from lib.inference import precision as precision_module
from lib.inference.hardware import Support
from lib.inference.precision import Choice, Trial, TrialCache, choose, choose_precisions
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, build_network, patch_size_for

from .conftest import APP_DIR, Server, running_server
from .helpers import needs_bf16

NO_BF16_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
NATIVE = Support("bf16", "native", "bfloat16 instructions: test CPU")
NONE = Support("bf16", "none", "oneDNN has no bfloat16 kernels on this CPU: test CPU")
AUTO = {"click": "auto", "auto": "auto"}


def measuring(trials: dict[tuple[str, str], Trial]) -> tuple[list[tuple[str, str]], object]:
    calls: list[tuple[str, str]] = []

    def measure(path: str, support: Support) -> Trial:
        calls.append((path, support.precision))
        return trials[(path, support.precision)]

    return calls, measure


def test_no_kernels_means_float32_without_measuring() -> None:
    calls, measure = measuring({})
    chosen = choose(AUTO, [NONE], measure)  # type: ignore[arg-type]
    assert calls == []
    assert chosen.click.precision == chosen.auto.precision == chosen.scoring.precision == "fp32"
    assert "no bfloat16 kernels" in chosen.click.reason and "no bfloat16 kernels" in chosen.auto.reason
    assert chosen.training.precision == "fp32"


def test_a_reduced_precision_is_kept_only_where_it_is_faster_and_agrees() -> None:
    calls, measure = measuring(
        {
            ("click", "bf16"): Trial(0.5, 0.2, 0.985),  # 2.5x, agrees as clicks are pinned (0.98)
            ("auto", "bf16"): Trial(0.6, 0.4, 0.97),  # 1.5x, but below the automatic path's 0.99
        }
    )
    chosen = choose(AUTO, [NATIVE], measure)  # type: ignore[arg-type]
    assert calls == [("click", "bf16"), ("auto", "bf16")]
    assert chosen.click.precision == "bf16" and "2.50x faster" in chosen.click.reason
    assert chosen.click.trial is not None and chosen.click.trial["speedup"] == 2.5
    assert chosen.auto.precision == "fp32" and "agreement 0.970" in chosen.auto.reason
    assert chosen.scoring.precision == "bf16"  # scoring follows clicks


def test_a_slower_reduced_precision_is_not_kept() -> None:
    _, measure = measuring({("click", "bf16"): Trial(0.5, 0.49, 1.0), ("auto", "bf16"): Trial(0.5, 0.9, 1.0)})
    chosen = choose(AUTO, [Support("bf16", "emulated", "oneDNN emulates bfloat16")], measure)  # type: ignore[arg-type]
    assert chosen.click.precision == chosen.auto.precision == "fp32"
    assert "1.02x float32's speed" in chosen.click.reason


def test_gpus_fall_back_to_float16_where_bfloat16_is_emulated() -> None:
    """CUDA's rule (no GPU here: the supports a pre-Ampere card reports, and trials, are given)."""
    supports = [
        Support("bf16", "emulated", "T4 (sm_75): bfloat16 emulated"),
        Support("fp16", "native", "T4: tensor cores"),
    ]
    _, measure = measuring(
        {
            ("click", "bf16"): Trial(0.1, 0.3, 1.0),
            ("click", "fp16"): Trial(0.1, 0.04, 0.995),
            ("auto", "bf16"): Trial(0.1, 0.3, 1.0),
            ("auto", "fp16"): Trial(0.1, 0.05, 0.9),  # float16 disagrees here: float32
        }
    )
    chosen = choose(AUTO, supports, measure)  # type: ignore[arg-type]
    assert chosen.click.precision == "fp16"
    assert chosen.auto.precision == "fp32" and "fp16 measured" in chosen.auto.reason


def test_an_explicit_bf16_is_honoured_with_a_warning_where_unsupported(caplog: pytest.LogCaptureFixture) -> None:
    calls, measure = measuring({})
    chosen = choose({"click": "bf16", "auto": "fp32"}, [NONE], measure)  # type: ignore[arg-type]
    assert calls == []
    assert chosen.click == Choice(
        "bf16",
        "set by --conf precision bf16 although oneDNN has no bfloat16 kernels on this CPU: test CPU: "
        "expect it to be slower than float32",
        warning=True,
    )
    assert chosen.auto.precision == "fp32" and chosen.auto.reason == "set by --conf auto_precision fp32"
    with caplog.at_level("WARNING"):
        chosen.log()
    assert "!!!" in caplog.text and "Precision of click: bf16" in caplog.text


@pytest.fixture
def small_model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(build_network("small").eval(), "small", None, torch.device("cpu"))


def test_trials_are_cached_per_machine_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_model: LoadedModel
) -> None:
    """The server measures once; a restart, or a training process, finds the trial and decides the same way.

    The trials are stand-ins (bfloat16 on a CPU without its kernels takes minutes a pass): what is
    tested is what gets measured, kept and measured again. The real passes: the test below.
    """
    import lib.inference.precision_probe as probe

    measured: list[str] = []

    def trial(path: str) -> object:
        def run(*_: object) -> Trial:
            measured.append(path)
            return Trial(0.5, 0.25, 0.995)

        return run

    monkeypatch.setattr(probe, "click_trial", trial("click"))
    monkeypatch.setattr(probe, "auto_trial", trial("auto"))
    monkeypatch.setattr(precision_module, "reduced_support", lambda device: [NATIVE])
    labels = load_label_dictionary()
    cache = TrialCache(tmp_path / "trials.json")
    args = (small_model, patch_size_for("small"), labels.preprocessing.hu_window, labels.everything[:10], cache)
    first = choose_precisions(AUTO, *args)
    assert measured == ["click", "auto"] and first.click.precision == first.auto.precision == "bf16"
    stored = json.loads((tmp_path / "trials.json").read_text())
    assert len(stored) == 2 and all(k.endswith((":click:bf16", ":auto:bf16")) for k in stored)
    assert all(v["speedup"] == 2.0 and v["agreement"] == 0.995 for v in stored.values())

    again = choose_precisions(AUTO, *args)
    assert measured == ["click", "auto"], "measured again"
    assert again.as_dict() == first.as_dict()

    with torch.no_grad():  # other weights: their agreement is not known yet
        next(small_model.network.parameters()).add_(1.0)
    choose_precisions(AUTO, *args)
    assert measured == ["click", "auto"] * 2


@needs_bf16
def test_the_probe_measures_one_window_pass_each_way(small_model: LoadedModel) -> None:
    """The real passes, where bfloat16 is native: both ways timed, answers compared."""
    from lib.inference.precision_probe import auto_trial, click_trial, phantom

    labels = load_label_dictionary()
    window = phantom(patch_size_for("small"), labels.preprocessing.hu_window)
    for trial in (
        click_trial(small_model, patch_size_for("small"), window, "bf16"),
        auto_trial(small_model, window, labels.everything[:10], torch.bfloat16),
    ):
        assert trial.fp32_s > 0 and trial.reduced_s > 0 and 0 <= trial.agreement <= 1, trial


def test_an_unreadable_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "trials.json"
    path.write_text("{half a file")
    cache = TrialCache(path)
    assert cache.get("anything") is None
    cache.put("key", {"fp32_s": 1.0})
    assert json.loads(path.read_text()) == {"key": {"fp32_s": 1.0}}


def test_onednn_capped_at_avx2_has_no_bf16() -> None:
    """The variables that reproduce a CPU without bfloat16 anywhere are seen as such."""
    code = (
        "import torch; from lib.inference.hardware import reduced_support; "
        "s = reduced_support(torch.device('cpu'))[0]; print(s.level, '|', s.detail)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **NO_BF16_ENV, "PYTHONPATH": str(APP_DIR)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    level, detail = (s.strip() for s in out.split("|"))
    assert level == "none", out
    assert "ONEDNN_MAX_CPU_ISA" in detail and "ATen AVX2" in detail


@pytest.fixture(scope="module")
def no_bf16_server(test_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default server on a CPU made to look like one without bfloat16."""
    studies = tmp_path_factory.mktemp("no-bf16-studies")
    from .conftest import ABDOMEN_SM

    os.symlink(ABDOMEN_SM, studies / "abdomen.nii.gz")
    log = tmp_path_factory.mktemp("no-bf16") / "server.log"
    with running_server(str(studies), log, test_weights, {"train_trigger": "0"}, **NO_BF16_ENV) as server:
        yield server


def test_a_server_without_bf16_serves_float32_and_says_why(no_bf16_server: Server) -> None:
    info = requests.get(f"{no_bf16_server.url}/info/", timeout=30).json()
    precision = info["models"]["vista3d"]["precision"]
    for path in ("click", "auto", "scoring", "training"):
        assert precision[path]["precision"] == "fp32", precision
    for path in ("click", "auto"):
        assert "no bfloat16 kernels" in precision[path]["reason"], precision
        assert "ONEDNN_MAX_CPU_ISA" in precision[path]["reason"]
    log = no_bf16_server.log_text()
    assert "Precision of click: fp32" in log and "Precision of auto: fp32" in log
    params = {"label_prompt": [1, 3, 5]}
    response = requests.post(
        f"{no_bf16_server.url}/infer/vista3d",
        params={"image": "abdomen", "output": "json"},
        data={"params": json.dumps(params)},
        timeout=300,
    )
    assert response.status_code == 200, response.text


def test_a_gpu_trial_times_passes_after_an_untimed_warm_up() -> None:
    """On a GPU the first pass of a precision autotunes cuDNN: timed, it rated bfloat16 at 0.02x float32
    on an H200. With ``warm_up`` the slow first pass is not the figure; without it, it is (a CPU's trial
    keeps one pass when that pass is slow, as before)."""
    from lib.inference.precision_probe import REPEAT_BELOW_S, _fastest

    def first_pass_slow() -> Callable[[], torch.Tensor]:
        calls = iter([REPEAT_BELOW_S + 0.5, 0.01, 0.01])

        def once() -> torch.Tensor:
            time.sleep(next(calls))
            return torch.zeros(1)

        return once

    warmed, _ = _fastest(first_pass_slow(), warm_up=True)
    cold, _ = _fastest(first_pass_slow())
    assert warmed < 0.5 and cold > REPEAT_BELOW_S
