"""Uncertainty sampling: label next the image on which the served network is least sure of its classes.

An image's uncertainty is the mean binary entropy of the class head's sigmoid outputs, over the
classes scored and the voxels of the image, from one encoder pass on the whole volume: the
preprocessed image is shrunk isotropically (never enlarged) until it fits one model window and
zero padded to it, as the server pads its windows. Padding voxels are not scored. Entropy lies in
[0, ln 2]; ln 2 means every class is a coin toss everywhere.

Disagreement with a flipped input is not scored: it doubles the cost, and VISTA3D's lateral
classes (left/right kidney, lung lobes...) swap under a left-right flip, so a perfect model would
"disagree" with itself there.

:class:`UncertaintyScoring` stores the score in each unlabelled image's info under
:data:`UNCERTAINTY_KEY`, with the weights version; :class:`Uncertainty` serves the most uncertain.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from ..data.imageio import ImageError, load_image
from ..inference.precision import RESOLVED, autocast_dtype
from ..inference.preprocess import preprocess
from ..labels import LabelDictionary, load_label_dictionary
from ..model import LoadedModel, patch_size_for

__all__ = [
    "COOLDOWN_S",
    "UNCERTAINTY_KEY",
    "Uncertainty",
    "UncertaintyScoring",
    "binary_entropy",
    "class_logits",
    "image_uncertainty",
    "ranked",
    "whole_volume_window",
]

logger = logging.getLogger(__name__)

UNCERTAINTY_KEY = "vista3d_uncertainty"
COOLDOWN_S = 3600.0  # an image handed out this recently goes to the back of the queue
# Classes whose logits are held at once: bounds memory (127 classes of a 96³ window are 450 MB in float32).
CLASS_CHUNK = 16


def whole_volume_window(image: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The whole volume in one model window.

    Args:
        image: [1, h, w, d] preprocessed image (model grid).
        patch: the model window, e.g. (96, 96, 96).

    Returns:
        [1, 1, *patch] window (the image, shrunk by one factor on all axes when larger than ``patch``,
        at the window's origin; zeros elsewhere) and the size the image occupies in it.
    """
    size = image.shape[1:]
    scale = min(1.0, *(p / s for p, s in zip(patch, size, strict=True)))
    inner = tuple(max(1, min(p, math.floor(s * scale))) for p, s in zip(patch, size, strict=True))
    x = image.unsqueeze(0).float()
    if inner != tuple(size):
        x = F.interpolate(x, size=inner, mode="trilinear", align_corners=False)
    pad: list[int] = []
    for n, p in reversed(list(zip(inner, patch, strict=True))):
        pad.extend([0, p - n])
    return F.pad(x, pad), inner  # type: ignore[return-value]


def class_logits(
    network: VISTA3D,
    window: torch.Tensor,
    class_ids: Sequence[int],
    region: Sequence[int] | None = None,
    stride: int = 1,
    dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """Class-head logits (before sigmoid) of ``window`` [1, 1, *patch], [n, h', w', d'] per chunk of classes.

    The computation of ``network(window, class_vector=...)`` (``ClassMappingClassify.forward``), with
    the image features mapped once and the class products made a chunk at a time, only on the first
    ``region`` voxels of each axis (default: all) and every ``stride``-th voxel of them. With a
    ``dtype`` the encoder and the feature mapping run under that autocast; the products are float32.
    """
    head = network.class_head
    if not isinstance(head, ClassMappingClassify):
        raise TypeError(f"expected VISTA3D's ClassMappingClassify head, got {type(head).__name__}")
    with torch.autocast(window.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        _, features = network.image_encoder(window, with_point=False, with_label=True)
        src = head.image_post_mapping(features)
    extent = region or src.shape[2:]
    src = src[0, :, : extent[0] : stride, : extent[1] : stride, : extent[2] : stride].float()
    c, *spatial = src.shape
    flat = src.reshape(c, -1)
    vector = torch.as_tensor(list(class_ids), device=window.device).unsqueeze(1)  # [B, 1]
    embedding = head.class_embeddings(vector)  # [B, 1, c]
    if head.use_mlp:
        embedding = head.mlp(embedding)
    embedding = embedding[:, 0]
    for lo in range(0, len(class_ids), CLASS_CHUNK):
        yield (embedding[lo : lo + CLASS_CHUNK] @ flat).reshape(-1, *spatial)


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise, in [0, ln 2]; exactly ln 2 at logit 0.

    ``softplus(z) - z * sigmoid(z)`` is the entropy without the logs of 0 that the probabilities give.
    """
    return (F.softplus(logits) - logits * torch.sigmoid(logits)).clamp_min(0.0)


@torch.inference_mode()
def image_uncertainty(
    network: VISTA3D,
    image: torch.Tensor,
    class_ids: Sequence[int],
    patch: Sequence[int],
    stride: int = 2,
    dtype: torch.dtype | None = None,
) -> float:
    """Mean binary entropy of the class head over ``class_ids`` and the image's voxels.

    Args:
        network: VISTA3D (only the encoder and class head run).
        image: [1, h, w, d] preprocessed image (:func:`lib.inference.preprocess.preprocess`).
        class_ids: global class ids to score.
        patch: the model window the whole volume is fitted into.
        stride: score every ``stride``-th voxel of each axis (2: an eighth of the voxels).
        dtype: run the encoder under this autocast (:class:`UncertaintyScoring` says what it costs);
            None runs it in float32.
    """
    if not class_ids:
        raise ValueError("no classes to score")
    device = next(network.parameters()).device
    window, inner = whole_volume_window(image, patch)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for logits in class_logits(network, window.to(device), class_ids, inner, stride, dtype):
        # float64 sums: a mean of identical entropies is that entropy exactly.
        total += binary_entropy(logits).sum(dtype=torch.float64).cpu()
        count += logits.numel()
    return float(total / count)


class UncertaintyScoring(ScoringMethod):
    """Scores every image without a ``final`` label with :func:`image_uncertainty`.

    Stores ``{"vista3d_uncertainty": {"score", "version", "seconds"}}`` in the image's info and skips
    images already scored with the served weights version (request ``{"force": true}`` rescores all).
    Unreadable images are logged and left unscored.

    Args:
        model_provider: returns the served model (called once per run; all images use that model).
        dictionary: label dictionary (preprocessing, class ids); the packaged one by default.
        class_ids: classes to score; by default all the dictionary's supported classes.
        precision: ``bf16``/``fp16`` run the encoder under that autocast, ``fp32`` does not (pass
            the app's scoring precision, :mod:`lib.inference.precision`).
        stride: score every ``stride``-th voxel of each axis.

    Cost (``small``, STS_001, one torch thread on a 2-core AMD EPYC with AVX512-BF16 while other
    jobs ran): fp32 every voxel 5.2 s; fp32 stride 2 (the default stride) 2.6 s; bf16 every voxel
    3.8 s; bf16 stride 2 1.0 s, 1.0-1.6 s per image with reading and preprocessing. With random weights bf16 moved
    scores by ~1e-4 and stride 2 lowered them by 0.005-0.03, keeping their order on five real CTs;
    differences between images were 0.004-0.15.
    """

    def __init__(
        self,
        model_provider: Callable[[], LoadedModel],
        dictionary: LabelDictionary | None = None,
        class_ids: Sequence[int] | None = None,
        precision: str = "fp32",
        stride: int = 2,
    ) -> None:
        super().__init__("Uncertainty: mean binary entropy of VISTA3D's class head over the whole image")
        if precision not in RESOLVED:
            raise ValueError(f"precision must be one of {RESOLVED}, got {precision!r}")
        if stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        self.model_provider = model_provider
        self.dictionary = dictionary or load_label_dictionary()
        self.class_ids = tuple(class_ids) if class_ids is not None else tuple(sorted(self.dictionary.supported))
        if not self.class_ids:
            raise ValueError("class_ids must name at least one class")
        self.dtype = autocast_dtype(precision)
        self.stride = stride

    def score_image(self, model: LoadedModel, path: str) -> float:
        """Uncertainty of the image file at ``path`` under ``model``."""
        image = preprocess(load_image(path), self.dictionary.preprocessing)
        patch = patch_size_for(model.preset)
        return image_uncertainty(model.network, image.as_tensor(), self.class_ids, patch, self.stride, self.dtype)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        model = self.model_provider()
        force = bool(request.get("force", False))
        scored: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        failed: dict[str, str] = {}
        start = time.perf_counter()
        for image_id in sorted(datastore.get_unlabeled_images()):
            stored = datastore.get_image_info(image_id).get(UNCERTAINTY_KEY) or {}
            if not force and stored.get("version") == model.version:
                skipped.append(image_id)
                continue
            t0 = time.perf_counter()
            try:
                score = self.score_image(model, datastore.get_image_uri(image_id))
            except ImageError as e:
                logger.warning("Uncertainty %s: not scored: %s", image_id, e)
                failed[image_id] = str(e)
                continue
            info = {"score": round(score, 6), "version": model.version, "seconds": round(time.perf_counter() - t0, 3)}
            datastore.update_image_info(image_id, {UNCERTAINTY_KEY: info})
            scored[image_id] = info
            logger.info("Uncertainty %s: %.5f (%.2f s, %s)", image_id, score, info["seconds"], model.version)
        seconds = time.perf_counter() - start
        rate = len(scored) / seconds if scored and seconds > 0 else 0.0
        logger.info(
            "Uncertainty: scored %d images in %.1f s (%.2f images/s), %d already scored with %s, %d failed",
            len(scored),
            seconds,
            rate,
            len(skipped),
            model.version,
            len(failed),
        )
        return {"version": model.version, "scored": scored, "skipped": skipped, "failed": failed, "images_per_s": rate}


def ranked(datastore: Datastore, images: Sequence[str], strategy: str | None, cooldown_s: float) -> list[str]:
    """``images`` in the order :class:`Uncertainty` hands them out (the dashboard shows this queue).

    Not served by ``strategy`` within ``cooldown_s`` first, then unscored, then highest score, then id.
    """
    now = time.time()

    def rank(image_id: str) -> tuple[bool, bool, float, str]:
        info = datastore.get_image_info(image_id)
        served = info.get("strategy", {}).get(strategy, {}).get("ts", 0) if strategy else 0
        score = (info.get(UNCERTAINTY_KEY) or {}).get("score")
        return (now - served < cooldown_s, score is not None, -(score or 0.0), image_id)

    return sorted(images, key=rank)


class Uncertainty(Strategy):
    """Serves the unlabelled image (no ``final`` label) with the highest stored uncertainty.

    Images not scored yet rank above every scored one (in id order, so the choice is reproducible):
    the model knows nothing about them, and serving them gets them scored after the next training.
    Scores from older weights versions are used as they are until the scorer replaces them. An image
    this strategy served within ``cooldown_s`` (MONAI Label records when, per strategy) ranks below
    all others, so two annotators asking at once get different images.
    """

    def __init__(self, cooldown_s: float = COOLDOWN_S) -> None:
        super().__init__("Most uncertain unlabelled image (class-head entropy); unscored images first")
        self.cooldown_s = cooldown_s

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return {}
        best = ranked(datastore, images, request.get("strategy"), self.cooldown_s)[0]
        score = (datastore.get_image_info(best).get(UNCERTAINTY_KEY) or {}).get("score")
        logger.info("Uncertainty: selected %s (score %s) among %d unlabelled images", best, score, len(images))
        return {"id": best, "uncertainty": score}
