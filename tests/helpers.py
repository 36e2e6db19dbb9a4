"""Small helpers shared by the tests: reading results, ground-truth centres, raw OHIF-style requests."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
import torch

from lib import simulate
from lib.inference.hardware import reduced_support

CPU_BF16 = reduced_support(torch.device("cpu"))[0]
# Tests that pin the bfloat16 path run where this CPU has bfloat16 instructions; the float32 path is
# tested everywhere. `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` makes any x86 CPU one without.
needs_bf16 = pytest.mark.skipif(CPU_BF16.level != "native", reason=f"no native bfloat16: {CPU_BF16.detail}")
# The precision the mechanics tests (tiling, workers, cancelling) run the automatic path in: the fast
# one where the CPU has it, as the server would choose.
MACHINE_PRECISION = "bf16" if CPU_BF16.level == "native" else "fp32"


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def deepest_voxel(mask: np.ndarray) -> list[int]:
    """The simulated annotator's first click (:func:`lib.simulate.deepest_voxel`) as a JSON-ready list."""
    return [int(c) for c in simulate.deepest_voxel(mask)]


def ohif_infer(url: str, model: str, image: str, params: dict[str, Any], timeout: float = 300) -> requests.Response:
    """The request MONAI Label's OHIF panel sends: params as a JSON form field, the label back as NRRD."""
    return requests.post(
        f"{url}/infer/{model}",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(params))},
        timeout=timeout,
    )


def read_nrrd(content: bytes) -> tuple[np.ndarray, dict]:
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        f.write(content)
        f.flush()
        data, header = nrrd.read(f.name)
    return data, header


def infer_json(
    url: str, image: str, params: dict[str, Any], files: dict | None = None, headers: dict[str, str] | None = None
) -> requests.Response:
    """An infer request answered with the result JSON only (fast checks of status and messages)."""
    return requests.post(
        f"{url}/infer/vista3d",
        params={"image": image, "output": "json"},
        files={"params": (None, json.dumps(params)), **(files or {})},
        headers=headers,
        timeout=300,
    )


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    buf = io.BytesIO()
    img = nib.Nifti1Image(data, affine)
    file_map = img.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    import gzip

    return gzip.compress(buf.getvalue())
