"""The same clicks through the real MONAI Label server (behind the serving edge, as `make serve` runs it),
to measure what HTTP and the server add."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import requests
import torch
from common import Case, serve


def _wait_for_scoring(url: str, limit_s: float = 300.0) -> None:
    """Wait for the scoring MONAI Label starts with the server: it takes a core, and a click timed
    while it runs measures the two sharing the CPU (0.25-0.31 s instead of 0.16 s for `small`)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if requests.get(f"{url}/scoring/", params={"check_if_running": "true"}, timeout=5).status_code == 404:
            return
        time.sleep(1.0)


def http_clicks(
    case: Case, points: list[list[int]], positive: list[bool], network: torch.nn.Module, args: argparse.Namespace
) -> dict:
    """Send the clicks one request at a time, as OHIF does (all clicks so far in every request).

    The server gets the in-process network's weights, random ones included, so both see the same model.
    """
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        os.symlink(case.image.resolve(), studies / case.image.name)
        image_id = case.image.name.split(".")[0]
        weights = Path(tmp) / "weights.pt"
        torch.save(network.state_dict(), weights)
        conf = {
            "preset": args.preset,
            "weights": str(weights),
            "threads": str(args.threads),
            "precision": args.precision,
        }
        with serve(studies, conf, Path(tmp) / "server.log") as (url, _):
            _wait_for_scoring(url)
            times = []
            for k in range(1, len(points) + 1):
                params = {
                    "points": points[:k],
                    "point_labels": [int(p) for p in positive[:k]],
                    "label_prompt": [case.class_id],
                    "result_extension": ".nrrd",
                    "result_dtype": "uint8",
                }
                start = time.perf_counter()
                response = requests.post(
                    f"{url}/infer/vista3d",
                    params={"image": image_id, "output": "image"},
                    files={"params": (None, json.dumps(params))},
                    timeout=600,
                )
                response.raise_for_status()
                times.append(round(time.perf_counter() - start, 3))
            return {"http_s": times}
