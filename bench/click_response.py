#!/usr/bin/env python
"""Does a correction click edit? Per click of the simulated annotator: the network's logit at the
clicked voxel, whether the click edited the result (Algorithm 1), and how many voxels changed.

A click that does not edit is wasted: the annotator's next click lands on the same error again. This
tells the two reasons apart: the network answers against the click (a positive click with a negative
logit at its voxel, a negative click with a positive one), or it follows the click but its component
adds or removes nothing. Run on the held-out sarcoma cases by default, through the server's click path:

    cd bench && ../.venv/bin/python click_response.py [--weights PATH] [--clicks 6]

Prints a summary table and one JSON line (per case and click; totals per kind of click) and writes it
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import DATA, ROOT

from lib.atomic import write_json
from lib.inference.engine import Engine, WindowLogits
from lib.inference.hardware import cpu_isa
from lib.inference.segment import segment_points
from lib.labels import load_label_dictionary
from lib.model import STARTER_WEIGHTS, LoadedModel, load_model, patch_size_for
from lib.prompts import PointPrompt
from lib.simulate import deepest_voxel_depth, dice, largest_error, model_grid_state
from lib.trainers.corpus import SARCOMA_HELDOUT, sarcoma_click_cases
from lib.trainers.data import SARCOMA_ID

logger = logging.getLogger("click_response")

PRESET = "small"


class RecordingEngine(Engine):
    """The server's engine, keeping the logits of its last click request."""

    last: WindowLogits | None = None

    def points(self, *args: Any, **kwargs: Any) -> WindowLogits:
        self.last = super().points(*args, **kwargs)
        return self.last


def logit_at(windows: WindowLogits, voxel: np.ndarray) -> float:
    """The stitched logit at ``voxel`` (model grid); NaN outside the computed box."""
    local = [int(c) - lo for c, (lo, _) in zip(voxel, windows.box, strict=True)]
    if any(i < 0 or i >= s for i, s in zip(local, windows.logits.shape, strict=True)):
        return float("nan")
    return float(windows.logits[tuple(local)])


def replay(engine: RecordingEngine, image: torch.Tensor, truth: np.ndarray, clicks: int) -> list[dict[str, Any]]:
    """One session of the simulated annotator (:func:`lib.simulate.next_click`); a row per click."""
    state = model_grid_state(image, engine.patch)
    result = np.zeros(state.original_shape, dtype=np.int16)
    first, first_depth = deepest_voxel_depth(truth)
    points, positive, depths = [first], [True], [first_depth]  # depth: how thick the error is at the click
    rows: list[dict[str, Any]] = []
    for _ in range(clicks):
        prompt = PointPrompt(np.stack(points).astype(np.int64), np.asarray(positive), SARCOMA_ID)
        edit = segment_points(engine, state, prompt, result)
        assert engine.last is not None
        rows.append({
            "positive": positive[-1],
            "logit": round(logit_at(engine.last, points[-1]), 3),
            "edited": bool(edit.applied[-1]),
            "changed": int((edit.label != result).sum()),
            "depth": round(depths[-1], 2),
        })  # fmt: skip
        result = edit.label
        rows[-1]["dice"] = round(dice(result == SARCOMA_ID, truth), 4)
        error = largest_error(result == SARCOMA_ID, truth)
        if error is None:
            break
        click, click_depth = deepest_voxel_depth(error[0])
        points.append(click)
        positive.append(error[1])
        depths.append(click_depth)
    return rows


def describe(row: dict[str, Any]) -> str:
    """``+4.2*(6)``: a positive click, the logit at its voxel, * when it edited, the error's depth there."""
    sign = "+" if row["positive"] else "-"
    return f"{sign}{row['logit']:+.1f}{'*' if row['edited'] else ''}({row['depth']:.0f})"


def totals(per_case: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per kind of correction click (the first click aside): how many, the share that edited, and the
    share the network answered against (logit of the wrong sign at the clicked voxel), and the median
    logit and error depth at the click."""
    out: dict[str, dict[str, float]] = {}
    for kind, sign in (("positive", True), ("negative", False)):
        rows = [r for case in per_case.values() for r in case[1:] if r["positive"] is sign]
        against = [r for r in rows if (r["logit"] <= 0) == sign]
        out[kind] = {
            "clicks": len(rows),
            "edited": round(sum(r["edited"] for r in rows) / max(len(rows), 1), 3),
            "answered_against": round(len(against) / max(len(rows), 1), 3),
            "median_logit": round(float(np.median([r["logit"] for r in rows])), 3) if rows else float("nan"),
            "median_depth": round(float(np.median([r["depth"] for r in rows])), 2) if rows else float("nan"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=STARTER_WEIGHTS)
    p.add_argument("--cases", default=",".join(SARCOMA_HELDOUT), help="sarcoma case names")
    p.add_argument("--clicks", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "click_response.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    labels = load_label_dictionary()
    network = load_model(PRESET, str(args.weights), Path("/nonexistent"), torch.device("cpu")).network
    model = LoadedModel(network.eval(), PRESET, None, torch.device("cpu"))
    engine = RecordingEngine(model, patch_size_for(PRESET), labels.sw_overlap, labels.special, "fp32")
    per_case = {
        name: replay(engine, image, truth, args.clicks)
        for name, image, truth in sarcoma_click_cases(DATA / "sts", labels, args.cases.split(","))
    }
    for name, rows in per_case.items():
        logger.info("%s: %s", name, " ".join(map(describe, rows)))
    result = {"machine": cpu_isa(), "weights": str(args.weights), "totals": totals(per_case), "cases": per_case}
    logger.info("correction clicks: %s", result["totals"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
