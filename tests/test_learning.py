"""The continual-learning pieces on their own: split, model store, replay, request, loop, rounds and their gate."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.data.datastore import SafeLocalDatastore
from lib.labels import load_label_dictionary
from lib.loop import LearningLoop, pending_labels
from lib.model import STARTER_WEIGHTS, build_network, load_model
from lib.model_store import ModelReloader, ModelStore
from lib.settings import Settings
from lib.trainers.data import CachedVolume
from lib.trainers.labelled import final_labels, load_final_volumes
from lib.trainers.point_loop import replay_weights
from lib.trainers.request import TrainRequest
from lib.trainers.schedule import TrainStats
from lib.trainers.split import ValidationSplit, hold_back
from lib.trainers.tasks import AutoTrainTask, PointTrainTask, Trained

from .conftest import ROOT, STS

SARCOMA = 133
# Simulated clicks per scored object: a first click and one correction exercise the whole scoring path
# (the default 5 only adds corrections), and the starter and random weights are far apart after two.
GATE_CLICKS = 2


def test_split_is_persisted_grows_and_never_reshuffles(tmp_path: Path) -> None:
    split = ValidationSplit(tmp_path / "split.json", fraction=0.2)
    first = split.update(["a"])
    assert first.train == ["a"] and first.validation == []
    second = split.update(["a", "b"])
    assert second.validation == ["b"] and second.train == ["a"]
    ids = [chr(ord("a") + i) for i in range(12)]
    grown = ValidationSplit(tmp_path / "split.json", fraction=0.2).update(list(reversed(ids)))
    assert grown.train[:1] == ["a"] and grown.validation[:1] == ["b"], "earlier assignments moved"
    assert set(grown.train) | set(grown.validation) == set(ids) and not set(grown.train) & set(grown.validation)
    assert len(grown.validation) == round(0.2 * 12)
    assert ValidationSplit(tmp_path / "split.json").load() == grown


def test_store_promotes_atomically_keeps_history_and_rolls_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    assert store.served().version == 0 and store.served().file is None
    net = build_network("small")
    v1 = store.promote(net, {"score": 0.5}, ["x@1"], {"kind": "point"}, seen=["x@1", "y@1"])
    v2 = store.promote(net, {"score": 0.6}, ["x@1", "z@2"], {"kind": "point"}, seen=["z@2"])
    assert (v1.version, v2.version) == (1, 2) and store.served().version == 2
    assert set(store.manifest()["seen"]) == {"x@1", "y@1", "z@2"}
    assert not list((tmp_path / "models").glob("*.tmp")) and not list((tmp_path / "models").glob(".*.tmp"))
    assert store.rollback().version == 1 and store.served().validation == {"score": 0.5}
    for _ in range(6):
        store.promote(net, {"score": 0.7}, [], {"kind": "point"}, seen=[])
    kept = [p.name for p in (tmp_path / "models").glob("v*.pt")]
    assert len(kept) == 5 and "v1.pt" not in kept, kept


def test_reloader_serves_promoted_versions_without_restart(tmp_path: Path) -> None:
    model = load_model("small", "none", tmp_path, torch.device("cpu"))
    store = ModelStore(tmp_path / "models")
    reloader = ModelReloader(model, store)
    assert not reloader.refresh() and model.version == "small:random"
    trained = build_network("small")
    with torch.no_grad():
        next(trained.parameters()).add_(1.0)
    store.promote(trained, {"score": 1.0}, [], {}, seen=[])
    assert reloader.refresh() and model.version == "small:v1" and model.warning is None
    name, param = next(iter(model.network.named_parameters()))
    assert torch.allclose(param, trained.state_dict()[name].half().float())
    assert not reloader.refresh()


def test_replay_gives_new_labels_their_share() -> None:
    vols = [CachedVolume(n, torch.zeros(1), torch.zeros(1)) for n in ("old1", "old2", "old3", "new")]
    w = replay_weights(vols, {"new"}, replay_share=0.5)
    assert w[3] == pytest.approx(0.5) and sum(w[:3]) == pytest.approx(0.5)
    assert replay_weights(vols, set(), 0.5) == [1.0] * 4


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"lr": "fast"}, "lr must be a float"),
        ({"crop": 50}, "crop must be a multiple of 16"),
        ({"train_encoder": "maybe"}, "train_encoder must be a bool"),
        ({"steps": 2.5}, "steps must be a int"),
        ({"holdback": 0}, "holdback must be at least 1"),
        ({"steps_per_label": -1}, "steps_per_label must be >= 0"),
        ({"click_weight": -0.5}, "click_weight must be >= 0"),
        ({"cached": True, "world_size": 2}, "cached rounds run in one process"),
    ],
)
def test_bad_train_requests_name_the_problem(request_: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainRequest.parse(request_, Settings.from_conf({}), 64)


def test_train_request_defaults_come_from_settings_and_the_window() -> None:
    settings = Settings.from_conf({"train_steps": "7", "train_holdback": "2"})
    req = TrainRequest.parse({"model": "point", "train_encoder": "false"}, settings, 128)
    assert req.steps == 7 and req.train_encoder is False and req.tolerance == 0.01 and req.holdback == 2
    assert TrainRequest.parse({}, Settings.from_conf({}), 64).holdback == 1
    with pytest.raises(ValueError, match="train_holdback must be at least 1"):
        Settings.from_conf({"train_holdback": "0"})
    assert req.crop == 128, "crops default to the served window (the point head's positional encoding scale)"


def test_a_round_on_few_labels_runs_fewer_steps() -> None:
    """``train_steps_per_label`` caps the steps of a round that trains the encoder (a full point round) by its
    training labels; ``train_steps`` caps them all."""
    settings = Settings.from_conf({"train_steps": "300", "train_steps_per_label": "30"})
    req = TrainRequest.parse({}, settings, 64)
    assert PointTrainTask.trains_encoder(req)
    assert [req.round_steps(n, True) for n in (0, 1, 3, 10, 11, 50)] == [1, 30, 90, 300, 300, 300]
    uncapped = TrainRequest.parse({"steps_per_label": 0}, settings, 64)
    assert uncapped.round_steps(3, True) == 300
    for frozen in ({"train_encoder": False}, {"cached": True}):
        frozen_req = TrainRequest.parse(frozen, settings, 64)
        assert not PointTrainTask.trains_encoder(frozen_req), f"{frozen}: the encoder does not learn"
        assert frozen_req.round_steps(3, False) == 300
    assert not AutoTrainTask.trains_encoder(req), "an automatic round leaves the encoder alone: never capped"
    with pytest.raises(ValueError, match="train_steps_per_label must be"):
        Settings.from_conf({"train_steps_per_label": "-2"})


def test_loop_debounces_a_burst_into_one_training() -> None:
    pending: list[str] = []
    started: list[float] = []
    busy = threading.Event()

    def start() -> bool:
        if busy.is_set():
            return False
        started.append(time.time())
        pending.clear()
        return True

    loop = LearningLoop(trigger=2, debounce_s=0.3, pending=lambda: list(pending), start_training=start)
    pending.append("a@1")
    loop.on_label_saved()
    time.sleep(0.5)
    assert not started, "one label must not trigger with trigger=2"
    for stamp in ("b@1", "c@1", "d@1"):
        pending.append(stamp)
        loop.on_label_saved()
        time.sleep(0.1)
    time.sleep(0.6)
    assert len(started) == 1, "a burst of saves must start one training"
    busy.set()
    pending.extend(["e@1", "f@1"])
    loop.on_label_saved()
    time.sleep(0.5)
    assert len(started) == 1, "must not start while a training runs"
    busy.clear()
    time.sleep(0.5)
    assert len(started) == 2, "must retry once the running training is done"
    loop.stop()


def test_the_loop_notices_labels_saved_through_another_replica() -> None:
    """No save reaches this loop (the labels came in through other replicas): its poll starts the round,
    and a poll never postpones a debounce that is already running."""
    pending: list[str] = []
    started: list[float] = []

    def start() -> bool:
        started.append(time.time())
        pending.clear()
        return True

    loop = LearningLoop(trigger=2, debounce_s=0.35, pending=lambda: list(pending), start_training=start, poll_s=0.1)
    time.sleep(0.3)
    assert not started
    begin = time.time()
    pending.extend(["a@1", "b@1"])
    time.sleep(1.0)
    loop.stop()
    assert len(started) == 1
    assert started[0] - begin < 0.35 + 0.1 + 0.2, "polls every 0.1 s must not keep restarting the 0.35 s debounce"


def _datastore_with_final_labels(root: Path, cases: list[str], unlabelled: tuple[str, ...] = ()) -> SafeLocalDatastore:
    """Sarcoma CT linked in, GTVs of ``cases`` saved as final labels (in that order) under the zero-shot id 133."""
    root.mkdir(parents=True, exist_ok=True)
    for case in [*cases, *unlabelled]:
        os.symlink(STS / f"{case}_ct.nii.gz", root / f"{case}.nii.gz")
    ds = SafeLocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)
    for case in cases:
        _save_final(ds, root, case)
    return ds


def _save_final(ds: SafeLocalDatastore, root: Path, case: str) -> None:
    gtv = nib.load(str(STS / f"{case}_gtv.nii.gz"))
    label = root.parent / f"{case}_label.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(gtv.dataobj) > 0).astype(np.uint8) * SARCOMA, gtv.affine), label)
    ds.save_label(case, str(label), "final", {})


def _stamp(ds: SafeLocalDatastore, case: str) -> str:
    return f"{case}@{os.stat(ds.get_label_uri(case, 'final')).st_mtime_ns}"


def _round(
    tmp_path: Path, weights: str, cases: tuple[str, ...] = ("STS_001", "STS_002", "STS_003"), unlabelled: tuple = ()
) -> tuple[PointTrainTask, SafeLocalDatastore, ModelStore, ModelReloader]:
    """A point round's task over final labels: STS_002 becomes the one validation label, and of three the
    newest, STS_003, is held back from training."""
    ds = _datastore_with_final_labels(tmp_path / "studies", list(cases), unlabelled)
    settings = Settings.from_conf({"weights": weights, "train_steps": "2"})
    model = load_model("small", weights, tmp_path, torch.device("cpu"))
    store = ModelStore(tmp_path / "studies" / ".vista3d" / "models")
    reloader = ModelReloader(model, store)
    return (
        PointTrainTask(settings, model, store, load_label_dictionary(), str(tmp_path / "studies")),
        ds,
        store,
        reloader,
    )


def _replace_training(task: PointTrainTask, weights: Path | None) -> list[tuple[list[str], set[str]]]:
    """The round's training replaced by loading ``weights`` (None: seeded random ones) into the candidate.

    Returns the list to which each round appends (the image ids it trained on, the new ones among them).
    """
    calls: list[tuple[list[str], set[str]]] = []

    def train(network, volumes, sampling, req, items, new):  # type: ignore[no-untyped-def]
        calls.append(([f.image_id for f in items], set(new)))
        torch.manual_seed(1)
        network.load_state_dict(build_network("small").state_dict() if weights is None else torch.load(weights))
        return Trained(TrainStats(1, 0.0, 1.0, 1.0, False))

    task.train = train  # type: ignore[method-assign]
    return calls


def test_a_clearly_worse_candidate_is_refused_and_recorded(tmp_path: Path) -> None:
    """Served: the shipped starter. The round "breaks" the network (random weights): refused on one
    validation label and the held-back label, nothing written, the round and its evidence recorded."""
    task, ds, store, _ = _round(tmp_path, "starter")
    assert len(pending_labels(ds, store)) == 3
    _replace_training(task, None)
    result = task({"crop": 64, "clicks": GATE_CLICKS}, ds)
    assert result["served_validation"]["images"] == ["STS_002"] and result["served_validation"]["objects"] == 1
    assert result["promoted"] is None and store.served().version == 0 and "worse" in result["reason"]
    gate = result["gate"]
    assert gate["validation"]["objects"] == 1 and gate["pooled"]["objects"] == 2
    assert gate["held_back"]["objects"] == 1 and gate["held_back"]["worse"] == 1
    held = result["held_back"]
    assert held["images"] == ["STS_003"] and set(held["served"]) == set(held["candidate"]) == {"STS_003#133"}
    assert held["candidate"]["STS_003#133"] < held["served"]["STS_003#133"], "the served model's score, recorded"
    assert not list(store.root.glob("v*.pt"))
    assert pending_labels(ds, store) == [], "a finished round has seen every label"
    assert store.manifest()["rounds"][-1]["gate"] == gate


def test_a_clearly_better_candidate_is_promoted_without_learning_its_held_back_label(
    tmp_path: Path, test_weights: Path
) -> None:
    """Served: random weights. The round yields the shipped starter: promoted at once, served next; the
    held-back STS_003 is not among the labels the new version learned from."""
    task, ds, store, reloader = _round(tmp_path, str(test_weights))
    _replace_training(task, STARTER_WEIGHTS)
    result = task({"crop": 64, "clicks": GATE_CLICKS}, ds)
    assert result["promoted"] == 1 and store.served().version == 1, result["reason"]
    assert result["gate"]["validation"]["better"] == 1 and result["gate"]["held_back"]["better"] == 1
    assert store.served().trained_on == [_stamp(ds, "STS_001")], "the held-back STS_003 is not learned"
    assert reloader.refresh() and task.model.version == "small:v1"


def test_a_round_checks_its_training_labels_and_lets_the_gate_decide(tmp_path: Path) -> None:
    task, ds, store, _ = _round(tmp_path, "starter")
    request = {"steps": 2, "check_every": 1, "patience": 1, "crop": 64, "lr": 1e-4, "clicks": GATE_CLICKS}
    result = task(request, ds)
    early = result["early_stop"]
    assert early["images"] == ["STS_001"], "the early stop scores training labels, never the held-back STS_003"
    assert [c[0] for c in early["checks"]][:2] == [0, 1], "a baseline, then a check after each step"
    assert result["lr"] == 1e-4, "no label learned yet: the base rate"
    assert early["best_step"] >= 1, "the best checked state is the candidate, never the untrained one"
    assert early["improved"] == (early["best"] > early["baseline"] + 0.002)
    assert result["gate"]["reason"] == result["reason"], "the gate decides every round"


def test_a_cached_round_trains_the_point_head_and_leaves_what_the_automatic_branch_reads(tmp_path: Path) -> None:
    """``cached`` rounds (encoder frozen, sessions on the served path) through the server's own round."""
    task, ds, _, _ = _round(tmp_path, "starter")
    candidates: list[torch.nn.Module] = []
    train = task.train

    def spy(network, *args):  # type: ignore[no-untyped-def]
        candidates.append(network)
        return train(network, *args)

    task.train = spy  # type: ignore[method-assign]
    result = task({"cached": True, "steps": 2, "patience": 0, "crop": 64, "lr": 1e-4, "clicks": GATE_CLICKS}, ds)
    assert result["steps"] == 2 and result["gate"]["reason"] == result["reason"]
    served, candidate = task.model.network.state_dict(), candidates[0].state_dict()
    changed = {k.split(".")[0] for k in served if not torch.equal(served[k], candidate[k])}
    assert changed == {"point_head"}, "the encoder and the class head are exactly the served ones"


class _Label:
    """What :func:`hold_back` reads of a final label."""

    def __init__(self, image_id: str, mtime_ns: int) -> None:
        self.image_id, self.mtime_ns, self.stamp = image_id, mtime_ns, f"{image_id}@{mtime_ns}"


def test_hold_back_keeps_the_newest_unlearned_labels_out_of_training() -> None:
    items = [_Label("a", 1), _Label("c", 5), _Label("b", 3), _Label("d", 2)]
    held, train = hold_back(items, {"c@5"}, 1)  # type: ignore[arg-type]
    assert [f.image_id for f in held] == ["b"], "c is newer but learned"
    assert [f.image_id for f in train] == ["a", "c", "d"], "the rest, in their order"
    held, train = hold_back(items, {"c@5"}, 2)  # type: ignore[arg-type]
    assert [f.image_id for f in held] == ["d", "b"] and [f.image_id for f in train] == ["a", "c"]
    held, train = hold_back(items, {f.stamp for f in items}, 1)  # type: ignore[arg-type]
    assert held == [] and len(train) == 4, "nothing new, nothing held back"
    with pytest.raises(ValueError, match="at least 1"):
        hold_back(items, set(), 0)  # type: ignore[arg-type]


def _score_by_model(task: PointTrainTask) -> None:
    """Scoring replaced: 0.5 per object for the served network, 0.6 for a candidate (no images are read)."""

    def score(network, items, req):  # type: ignore[no-untyped-def]
        value = 0.5 if network is task.model.network else 0.6
        per_object = {f"{f.image_id}#{SARCOMA}": value for f in items}
        return {"images": sorted(f.image_id for f in items), "objects": len(items), "per_object": per_object}

    task.score = score  # type: ignore[method-assign]


def _no_volumes(labels, pre, studies):  # type: ignore[no-untyped-def]
    return [CachedVolume(f.image_id, torch.zeros(1), torch.zeros(1)) for f in labels]


def test_a_held_back_label_is_trained_on_in_the_next_round(
    tmp_path: Path, test_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 1 holds back its newest label (STS_003) and trains without it; round 2, after STS_004 is
    submitted, trains on STS_003 and holds back STS_004."""
    monkeypatch.setattr("lib.trainers.tasks.load_final_volumes", _no_volumes)
    task, ds, store, reloader = _round(tmp_path, str(test_weights), unlabelled=("STS_004",))
    calls = _replace_training(task, STARTER_WEIGHTS)
    _score_by_model(task)
    first = task({"crop": 64}, ds)
    assert calls[0] == (["STS_001"], {"STS_001"}) and first["promoted"] == 1, first["reason"]
    assert first["held_back"] == {
        "images": ["STS_003"],
        "served": {"STS_003#133": 0.5},
        "candidate": {"STS_003#133": 0.6},
    }
    assert first["train_labels"] == 1 and first["new_labels"] == 1
    assert pending_labels(ds, store) == [], "held back is seen: it does not trigger a round by itself"

    assert reloader.refresh(), "the server serves v1 before the next round"
    _save_final(ds, tmp_path / "studies", "STS_004")
    second = task({"crop": 64}, ds)
    assert calls[1] == (["STS_001", "STS_003"], {"STS_003"}), "the held-back label is new in the next round"
    assert second["held_back"]["images"] == ["STS_004"] and second["promoted"] == 2
    assert set(store.served().trained_on) == {_stamp(ds, "STS_001"), _stamp(ds, "STS_003")}


def test_a_round_whose_only_new_label_is_held_back_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One training label (STS_002 is validation): it is scored by the served model, nothing trains."""
    monkeypatch.setattr("lib.trainers.tasks.load_final_volumes", _no_volumes)
    task, ds, store, _ = _round(tmp_path, "none", cases=("STS_001", "STS_002"))
    calls = _replace_training(task, None)
    _score_by_model(task)
    result = task({"crop": 64}, ds)
    assert calls == [] and result["promoted"] is None and store.served().version == 0
    assert result["reason"].startswith("skipped") and "STS_001" in result["reason"]
    assert result["held_back"] == {"images": ["STS_001"], "served": {"STS_001#133": 0.5}, "candidate": None}
    assert store.manifest()["rounds"][-1]["reason"] == result["reason"] and pending_labels(ds, store) == []


def test_rollback_tool_serves_the_previous_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "studies" / ".vista3d" / "models")
    net = build_network("small")
    for score in (0.5, 0.6):
        store.promote(net, {"score": score}, [], {}, seen=[])
    tool = [sys.executable, str(ROOT / "tools" / "model_store.py")]
    out = subprocess.run([*tool, "rollback", "--studies", str(tmp_path / "studies")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"served_version": 1' in out.stdout and store.served().version == 1
    out = subprocess.run([*tool, "rollback", "--studies", str(tmp_path / "studies")], capture_output=True, text=True)
    assert store.served().version == 0
    out = subprocess.run([*tool, "rollback", "--studies", str(tmp_path / "studies")], capture_output=True, text=True)
    assert out.returncode == 2 and "no version older than v0" in out.stderr


def test_final_volumes_carry_generated_supervoxels(tmp_path: Path) -> None:
    """A map at <studies>/.vista3d/supervoxels/<id>.nii.gz (tools/supervoxels.py) joins the training volume."""
    ds = _datastore_with_final_labels(tmp_path / "studies", ["STS_001", "STS_002"])
    sv_dir = tmp_path / "studies" / ".vista3d" / "supervoxels"
    sv_dir.mkdir(parents=True)
    gtv = nib.load(str(STS / "STS_001_gtv.nii.gz"))
    nib.save(
        nib.Nifti1Image((np.asarray(gtv.dataobj) > 0).astype(np.uint16) * 7 + 1, gtv.affine), sv_dir / "STS_001.nii.gz"
    )
    vols = {
        v.name: v
        for v in load_final_volumes(final_labels(ds), load_label_dictionary().preprocessing, str(tmp_path / "studies"))
    }
    assert vols["STS_002"].supervoxels is None
    sv = vols["STS_001"].supervoxels
    assert sv is not None and sv.shape == vols["STS_001"].label.shape
    assert set(np.unique(sv.numpy())) <= {0, 1, 8} and ((sv == 8) == (vols["STS_001"].label == SARCOMA)).all()
