"""Schemathesis hooks for the contract test (loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``).

A schema can say that an upload is a binary file named ``*.nii.gz``, not that it holds a readable 3D
volume on its image's grid. The document gives upload parts the media type ``application/gzip``;
here that media type is generated as a real gzipped NIfTI of :data:`SHAPE` (the contract server's
image ``tiny`` has that grid), so schema-valid uploads and labels are valid in fact and reach the
code that stores them. Schema-invalid (negative) uploads stay Schemathesis's own.
"""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import schemathesis
from hypothesis import strategies as st

SHAPE = (48, 48, 24)


def volume(shape: tuple[int, int, int] = SHAPE, fill: int = 1) -> bytes:
    """A gzipped NIfTI of ``shape`` (identity affine, uint8) with a small cube of ``fill``."""
    data = np.zeros(shape, dtype=np.uint8)
    data[20:28, 20:28, 10:14] = fill
    image = nib.Nifti1Image(data, np.eye(4))
    buf = io.BytesIO()
    image.to_file_map(image.make_file_map({"image": buf, "header": buf}))
    return gzip.compress(buf.getvalue(), mtime=0)


schemathesis.openapi.media_type("application/gzip", st.sampled_from([volume(fill=1), volume(fill=3)]))


# What a schema cannot say of an infer request's params, the prompt rules do (docs/rest-api.md): clicks lie inside
# the image, point_labels has one label per click, clicks segment one object that is not a group, automatic
# segmentation takes VISTA3D's served classes. A schema-valid request that breaks them is answered 400, which
# tests/test_bad_input.py tests rule by rule. Positive cases on the contract server's image keep to them, so that
# positive_data_acceptance checks the real claim: a request that keeps every documented rule is served.
_RULES: tuple[object, object] | None = None


def _prompt_rules() -> tuple[object, object]:
    global _RULES
    if _RULES is None:
        from lib.labels import load_label_dictionary
        from lib.zero_shot import ZeroShotRegistry

        _RULES = (load_label_dictionary(), ZeroShotRegistry(None))
    return _RULES


def keeps_prompt_rules(params: object, shape: tuple[int, int, int] = SHAPE) -> bool:
    from lib.prompts import PointPrompt, PromptError, parse_output, parse_prompt

    if not isinstance(params, dict):
        return False
    labels, registry = _prompt_rules()
    try:
        prompt = parse_prompt(params, labels, registry)  # type: ignore[arg-type]
        parse_output(params)
        if isinstance(prompt, PointPrompt):
            prompt.check_inside(shape)
    except (PromptError, KeyError, TypeError, ValueError):
        return False
    return True


@schemathesis.hook("filter_case").apply_to(method="POST", path="/infer/{model}")
def infer_on_the_image_keeps_the_rules(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or (case.query or {}).get("image") != "tiny":
        return True
    body = case.body if isinstance(case.body, dict) else {}
    return keeps_prompt_rules(body.get("params", {}))
