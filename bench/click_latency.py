"""Click latency of the app against MONAI's reference point inference, on real CT.

For each case, a simulated annotator makes ``--clicks`` clicks (the first at the object's centre,
then one at the centre of the largest error region of the current result) through

* the reference: ``monai.apps.vista3d.inferer.point_based_window_inferer``, one window centred on
  the newest click with the previous logits as ``prev_mask``, as the published bundle serves clicks;
* the app's interactive path, in process (``lib.inference.segment.segment_points``);
* once, the app through the real MONAI Label server over HTTP (server overhead).

Both sides use the same network object and weights, get the image already preprocessed, and return
a label on the original grid. ``--auto`` instead times whole-volume class inference against MONAI's
``SlidingWindowInferer`` and checks that the label maps agree, per class (``vista3d`` then uses the
trained stand-in of ``bench/auto_standin.py`` unless ``--weights`` is given). ``--protocol cvpr2025``
places every click (the first too) as the CVPR 2025 interactive 3D segmentation challenge does
(:func:`lib.simulate.challenge_click`), 10 clicks unless ``--clicks`` says otherwise, and adds the
challenge's figures, app and reference side by side, under ``cvpr2025``. One JSON line per run on
stdout.

    python bench/click_latency.py --preset small
    python bench/click_latency.py --preset small --quality      # Dice per click: app vs reference
    python bench/click_latency.py --preset small --quality --protocol cvpr2025
    python bench/click_latency.py --preset vista3d --auto --auto-image ../shared/data/totalseg/example_ct_sm.nii.gz
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from auto_standin import HEAD_PATH, standin_network
from common import DATA, Case, multiclass_agreement, parse_case, peak_rss_mb
from http_pass import http_clicks
from monai.apps.vista3d.inferer import point_based_window_inferer
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.inferers import SlidingWindowInferer
from scipy.integrate import trapezoid

from lib.inference.engine import Engine
from lib.inference.geometry import map_points, resample_nearest
from lib.inference.hardware import cpu_isa
from lib.inference.precision import PRECISIONS, TrialCache, choose_precisions
from lib.inference.segment import new_state, segment_points
from lib.labels import load_label_dictionary
from lib.model import LoadedModel, load_model, patch_size_for
from lib.prompts import PointPrompt
from lib.sessions import ImageState
from lib.settings import Settings
from lib.simulate import challenge_click, deepest_voxel, dice, next_click
from lib.trainers.corpus import SARCOMA_CURVE, SARCOMA_HELDOUT

logger = logging.getLogger("click_latency")
LABELS = load_label_dictionary()
DEFAULT_CASES = [
    str(DATA / "sts" / "STS_021_ct.nii.gz"),
    f"{DATA / 'totalseg' / 'example_ct.nii.gz'}:{DATA / 'totalseg' / 'example_seg_fast_force_split.nii.gz'}:5:1",
]


Click = tuple[np.ndarray, bool]
ClickRule = Callable[[int, np.ndarray, np.ndarray], Click | None]


def project_click(k: int, prediction: np.ndarray, truth: np.ndarray) -> Click | None:
    """Click ``k`` (0-based) of the project's annotator: the object's deepest voxel, then :func:`next_click`."""
    return (deepest_voxel(truth), True) if k == 0 else next_click(prediction, truth)


def cvpr2025_click(k: int, prediction: np.ndarray, truth: np.ndarray) -> Click | None:
    """Click ``k`` of the CVPR 2025 challenge's annotator (the first from the empty prediction)."""
    return challenge_click(prediction, truth)


CLICK_RULES: dict[str, ClickRule] = {"project": project_click, "cvpr2025": cvpr2025_click}


def app_run(
    engine: Engine, state: ImageState, truth: np.ndarray, class_id: int, clicks: int, rule: ClickRule = project_click
) -> dict:
    """The app's click path; returns times, Dice after each click and the clicks made."""
    result = np.zeros(state.original_shape, dtype=np.int16)
    points: list[np.ndarray] = []
    positive: list[bool] = []
    times, dices = [], []
    for k in range(clicks):
        click = rule(k, result == class_id, truth)
        if click is None:
            break
        points.append(click[0])
        positive.append(click[1])
        prompt = PointPrompt(np.asarray(points), np.asarray(positive), class_id)
        start = time.perf_counter()
        result = segment_points(engine, state, prompt, result).label
        times.append(time.perf_counter() - start)
        dices.append(dice(result == class_id, truth))
    return {"times": times, "dice": dices, "points": [p.tolist() for p in points], "positive": positive}


def reference_run(
    model: LoadedModel,
    state: ImageState,
    truth: np.ndarray,
    class_id: int,
    clicks: int,
    patch,
    rule: ClickRule = project_click,
) -> dict:
    """MONAI's point inferer, one window on the newest click, previous logits as prev_mask."""
    h, w, d = state.original_shape
    image = state.image.unsqueeze(0)
    size = np.asarray(state.image.shape[1:])
    prev: torch.Tensor | None = None
    mask = np.zeros((h, w, d), dtype=bool)
    points: list[np.ndarray] = []
    labels: list[int] = []
    times, dices = [], []
    offset = 2 if class_id in LABELS.special else 0
    for k in range(clicks):
        click = rule(k, mask, truth)
        if click is None:
            break
        model_point = np.clip(
            np.round(map_points(click[0][None], state.original_affine, state.model_affine)[0]), 0, size - 1
        )
        points.append(model_point)
        labels.append(int(click[1]) + offset)
        start = time.perf_counter()
        with torch.no_grad():
            prev = point_based_window_inferer(
                inputs=image,
                roi_size=patch,
                predictor=model.network,
                point_coords=torch.as_tensor(np.asarray(points), dtype=torch.float32)[None],
                point_labels=torch.as_tensor(labels)[None],
                class_vector=None,
                prompt_class=torch.tensor([[class_id]]),
                prev_mask=prev,
                point_start=len(points) - 1,
                transpose=True,
            )
        logits = torch.nan_to_num(prev[0, 0].as_tensor() if hasattr(prev, "as_tensor") else prev[0, 0], nan=-1.0)
        mask = (
            resample_nearest((logits > 0)[None].to(torch.uint8), state.model_affine, state.original_affine, (h, w, d))[
                0
            ]
            > 0
        )
        times.append(time.perf_counter() - start)
        dices.append(dice(mask, truth))
    return {"times": times, "dice": dices}


def later(times: list[float]) -> float:
    return statistics.median(times[1:]) if len(times) > 1 else float("nan")


# The click-quality case set (--quality): the 30 sarcoma cases the starter never saw (the learning
# curve's and the held-out ones) and five abdominal organs (TotalSegmentator value -> VISTA3D id:
# liver, spleen, right kidney, left kidney, stomach).
ORGANS = ((5, 1), (1, 3), (2, 5), (3, 14), (6, 12))
QUALITY_CASES = [
    *(str(DATA / "sts" / f"{c}_ct.nii.gz") for c in (*SARCOMA_CURVE, *SARCOMA_HELDOUT)),
    *(f"{DATA / 'totalseg' / 'example_ct.nii.gz'}:{DATA / 'totalseg' / 'example_seg_fast_force_split.nii.gz'}:{v}:{i}"
      for v, i in ORGANS),
]  # fmt: skip


def _padded(dices: list[float], clicks: int) -> list[float]:
    """A session that ended early (perfect result) keeps its last Dice for the clicks it did not need."""
    return dices + [dices[-1]] * (clicks - len(dices)) if dices else [0.0] * clicks


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """The case groups reported: sarcoma cases, the held-out ones among them, organs (empty ones left out)."""
    groups = {"sarcoma": [r for r in rows if r["class_id"] > 132],
              "sarcoma_heldout": [r for r in rows if r["case"] in SARCOMA_HELDOUT],
              "organs": [r for r in rows if r["class_id"] <= 132]}  # fmt: skip
    return {name: rows_ for name, rows_ in groups.items() if rows_}


def _curves(rows: list[dict], side: str, clicks: int) -> np.ndarray:
    """Dice after each click, [cases, clicks], of one side (``reference`` or ``app``)."""
    return np.asarray([_padded(r[f"{side}_dice"], clicks) for r in rows])


def dice_per_click(rows: list[dict], clicks: int) -> dict[str, dict]:
    """Mean Dice after each click, reference and app, per group."""
    return {
        group: {
            "cases": len(rows_),
            **{
                side: [round(float(x), 4) for x in _curves(rows_, side, clicks).mean(0)]
                for side in ("reference", "app")
            },
        }
        for group, rows_ in _groups(rows).items()
    }


CVPR2025_AT = (1, 3, 5, 10)


def cvpr2025_figures(rows: list[dict], clicks: int) -> dict[str, dict]:
    """The challenge's figures per group, reference and app: mean Dice after 1, 3, 5 and 10 clicks (those
    made), ``dsc_auc`` as the challenge computes it per case (trapezoid over the Dice after clicks 1..N at
    unit spacing, so 0..N-1) and ``dice_mean``, its normalised form (mean Dice over clicks 1..N, 0..1)."""
    out: dict[str, dict] = {}
    for group, rows_ in _groups(rows).items():
        out[group] = {"cases": len(rows_), "clicks": clicks}
        for side in ("reference", "app"):
            curves = _curves(rows_, side, clicks)
            out[group][side] = {
                **{f"dice_{k}": round(float(curves[:, k - 1].mean()), 4) for k in CVPR2025_AT if k <= clicks},
                "dsc_auc": round(float(trapezoid(curves, axis=1).mean()), 4),
                "dice_mean": round(float(curves.mean()), 4),
            }
    return out


def click_benchmark(args: argparse.Namespace, model: LoadedModel, engine: Engine) -> dict:
    patch = patch_size_for(args.preset)
    rows = []
    for spec in args.cases:
        case: Case = parse_case(spec)
        truth = case.ground_truth()
        logger.info("Case %s: %s voxels of object", case.name, int(truth.sum()))
        start = time.perf_counter()
        state = new_state(str(case.image), LABELS.preprocessing, patch)
        preprocess_s = time.perf_counter() - start
        rule = CLICK_RULES[args.protocol]
        ref = reference_run(model, state, truth, case.class_id, args.clicks, patch, rule)
        state.features.clear()
        app = app_run(engine, state, truth, case.class_id, args.clicks, rule)
        row = {
            "case": case.name,
            "class_id": case.class_id,
            "preprocess_s": round(preprocess_s, 3),
            "reference_s": [round(t, 3) for t in ref["times"]],
            "app_s": [round(t, 3) for t in app["times"]],
            "reference_dice": [round(x, 4) for x in ref["dice"]],
            "app_dice": [round(x, 4) for x in app["dice"]],
        }
        if not args.no_http and not rows:
            http = http_clicks(case, app["points"], app["positive"], model.network, args)
            row.update(http)
        rows.append(row)
        logger.info("%s", json.dumps(row))
    ref_first = statistics.median(r["reference_s"][0] for r in rows)
    app_first = statistics.median(r["app_s"][0] for r in rows)
    ref_later = statistics.median(t for r in rows for t in r["reference_s"][1:])
    app_later = statistics.median(t for r in rows for t in r["app_s"][1:])
    out = {
        "preset": args.preset,
        "weights": model.version,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "machine": cpu_isa(),
        "reference_first_s": round(ref_first, 3),
        "reference_later_s": round(ref_later, 3),
        "app_first_s": round(app_first, 3),
        "app_later_s": round(app_later, 3),
        "speedup_first": round(ref_first / app_first, 2),
        "speedup_later": round(ref_later / app_later, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "protocol": args.protocol,
        "dice_per_click": dice_per_click(rows, args.clicks),
        "cases": rows,
    }
    if args.protocol == "cvpr2025":
        out["cvpr2025"] = cvpr2025_figures(rows, args.clicks)
    http_rows = [r for r in rows if "http_s" in r]
    if http_rows:
        out["http_first_s"] = http_rows[0]["http_s"][0]
        out["http_later_s"] = round(later(http_rows[0]["http_s"]), 3)
    return out


MIN_CLASS_VOXELS = 1000  # a class "present" for the agreement criterion: at least 3.4 cm³ at 1.5 mm


def per_class_agreement(reference: np.ndarray, app: np.ndarray, classes: list[int]) -> dict[str, dict]:
    """Dice per class present in the reference (voxel counts beside it, so specks can be told apart)."""
    out = {}
    for c in classes:
        ref, got = reference == c, app == c
        n_ref, n_app = int(ref.sum()), int(got.sum())
        if n_ref:
            dice = 2.0 * int((ref & got).sum()) / (n_ref + n_app)
            out[str(c)] = {"dice": round(dice, 5), "reference_voxels": n_ref, "app_voxels": n_app}
    return out


def auto_weights(args: argparse.Namespace, model: LoadedModel) -> None:
    """``vista3d`` without ``--weights``: the trained stand-in (bench/auto_standin.py), not random weights."""
    if args.preset == "vista3d" and args.weights == "none":
        model.network = standin_network()
        model.weights = str(HEAD_PATH)


def auto_benchmark(args: argparse.Namespace, model: LoadedModel, engine: Engine) -> dict:
    """Whole-volume class inference: MONAI's SlidingWindowInferer + VistaPostTransformd, then the app's path."""
    patch = patch_size_for(args.preset)
    state = new_state(str(args.auto_image), LABELS.preprocessing, patch)
    image = state.image
    everything = args.auto_classes == "everything"
    classes = list(LABELS.everything) if everything else [int(c) for c in args.auto_classes.split(",")]
    out: dict = {
        "mode": "auto",
        "preset": args.preset,
        "weights": model.version,
        "precision": engine.auto_precision,
        "machine": cpu_isa(),
        "threads": torch.get_num_threads(),
        "auto_memory_mb": engine.auto_memory_mb,
        "image": Path(args.auto_image).name,
        "model_grid": list(image.shape[1:]),
        "classes": classes if len(classes) < 20 else f"{len(classes)} classes",
    }
    reference = None
    if not args.auto_app_only:
        class_vector = torch.tensor(classes).unsqueeze(1)
        inferer = SlidingWindowInferer(roi_size=patch, overlap=LABELS.sw_overlap, sw_batch_size=1)
        start = time.perf_counter()
        with torch.no_grad():
            logits = inferer(image.unsqueeze(0), lambda x: model.network(x, class_vector=class_vector, transpose=True))
            post = VistaPostTransformd(keys="pred")({"pred": logits[0], "label_prompt": torch.tensor(classes)})
        out["reference_s"] = round(time.perf_counter() - start, 2)
        reference = post["pred"][0].numpy().astype(np.int16)
        del logits, post
    start = time.perf_counter()
    app = engine.auto(image, classes).numpy()
    out["app_s"] = round(time.perf_counter() - start, 2)
    if reference is not None:
        agreement = per_class_agreement(reference, app, classes)
        present = [a["dice"] for a in agreement.values() if a["reference_voxels"] >= MIN_CLASS_VOXELS]
        out["speedup"] = round(out["reference_s"] / out["app_s"], 2)
        out["agreement_dice"] = round(multiclass_agreement(reference, app), 5)
        out["agreement_min_class_dice"] = min(present) if present else None
        out["min_class_voxels"] = MIN_CLASS_VOXELS
        out["agreement_per_class"] = agreement
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["small", "vista3d"], default="small")
    parser.add_argument(
        "--weights", default=None, help="checkpoint (default: the preset's starter, or random for vista3d)"
    )
    parser.add_argument(
        "--cases", nargs="+", default=DEFAULT_CASES, help="X_ct.nii.gz or image:label[:value[:class_id]]"
    )
    parser.add_argument("--clicks", type=int, default=None, help="clicks per case (default: 6, cvpr2025: 10)")
    parser.add_argument(
        "--protocol",
        choices=sorted(CLICK_RULES),
        default="project",
        help="where clicks go: the project's annotator, or the CVPR 2025 challenge's (adds its figures, no HTTP pass)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=Settings().precision,
        help="the click path's precision (default: the server's, chosen on this machine)",
    )
    parser.add_argument("--no-http", action="store_true", help="skip the pass through the HTTP server")
    parser.add_argument(
        "--quality", action="store_true", help="click quality: 30 unseen sarcoma cases and 5 organs, no HTTP pass"
    )
    parser.add_argument("--auto", action="store_true", help="time automatic segmentation instead of clicks")
    parser.add_argument("--auto-image", default=str(DATA / "totalseg" / "example_ct.nii.gz"))
    parser.add_argument("--auto-classes", default="1,3,4,5,6,7,10,12,14", help="ids, or 'everything'")
    parser.add_argument("--auto-app-only", action="store_true", help="skip the reference (peak RSS of the app alone)")
    parser.add_argument("--auto-memory-mb", type=int, default=Settings().auto_memory_mb)
    parser.add_argument(
        "--auto-precision", choices=PRECISIONS, default=Settings().auto_precision, help="default: the server's"
    )
    args = parser.parse_args()
    if args.quality:
        args.cases, args.no_http = QUALITY_CASES, True
    if args.clicks is None:
        args.clicks = 10 if args.protocol == "cvpr2025" else 6
    args.no_http = args.no_http or args.protocol == "cvpr2025"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    weights = args.weights or ("starter" if args.preset == "small" else "none")
    args.weights = weights
    model = load_model(args.preset, weights, Path("/nonexistent"), torch.device("cpu"))
    if args.auto:
        auto_weights(args, model)
    precisions = choose_precisions(
        {"click": args.precision, "auto": args.auto_precision},
        model,
        patch_size_for(args.preset),
        LABELS.preprocessing.hu_window,
        LABELS.everything,
        TrialCache(None),
    )
    precisions.log()
    args.precision = precisions.click.precision  # what the HTTP pass asks the server for, too
    engine = Engine(
        model,
        patch_size_for(args.preset),
        LABELS.sw_overlap,
        LABELS.special,
        precisions.click.precision,
        args.auto_memory_mb,
        auto_precision=precisions.auto.precision,
    )
    result = auto_benchmark(args, model, engine) if args.auto else click_benchmark(args, model, engine)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
