"""The gate checks of a detector candidate, and how detections stand in for labels.

Feedback is image labels, not boxes, so the detector's checks judge the
candidate on its own detections and on the version's reference set:

- ``class_balance`` counts the classes of the parent's confident detections;
  *confident* means a score of at least :func:`confident_score`: 0.5, or the
  parent's median best score on its reference set when that is lower (a weak
  detector's scores rarely reach 0.5);
- ``map_reference``: the candidate's COCO mAP@[.5:.95] on the reference set
  may not fall more than ``accuracy_tolerance`` below the parent's. There is
  no labelled traffic to decide instead, so it always gates;
- ``detects_objects``: on the held-out traffic the candidate makes at least
  :data:`MIN_DETECTION_SHARE` of the confident detections per image the parent
  makes on its reference set. Without labels this is what tells images with
  objects from garbage: statistics of noise images mixed with enough of the
  source keep the reference mAP and clear the drift alarm, and detect nothing;
- ``parity`` needs no labels: inference-mode detections on held-out traffic,
  under the statistics re-estimated on the traffic (before any mixing with the
  source: a mix differs from batch statistics by design), are scored (mAP@.5)
  against the training-mode detections with score >= 0.5 as ground truth
  (judged from :data:`MIN_PARITY_BOXES` of them). Statistics that do not
  describe the traffic make the two modes disagree; the gap is 1 - agreement.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from calibration.gate import GateCheck, largest_share, says
from training.detection.data import DetectionDataset, DetectionSample
from training.detection.evaluate import DetectionMetrics, predict
from training.detection.reference import score_outputs

#: The highest score threshold that makes a detection *confident* (:func:`confident_score`).
CONFIDENT_SCORE = 0.5
#: Fewest training-mode detections with score >= CONFIDENT_SCORE that parity is judged on.
#: Parity uses 0.5 itself, not a weak detector's lower bar: detections of middling score
#: flip between the modes from batch to batch, whatever the statistics.
MIN_PARITY_BOXES = 10
#: Confident detections per held-out traffic image, as a share of the parent's per
#: reference image, below which the traffic is taken for images without objects.
MIN_DETECTION_SHARE = 0.25
#: Default largest parity gap (1 - agreement); ``parity_threshold`` overrides it.
DEFAULT_PARITY_GAP = 0.1

Outputs = dict[str, np.ndarray]


def confident_score(reference_outputs: Outputs) -> float:
    """:data:`CONFIDENT_SCORE`, or the median best score per reference image if lower."""
    best = reference_outputs["detection_scores"][:, 0]
    return float(min(CONFIDENT_SCORE, np.median(best))) if len(best) else CONFIDENT_SCORE


def _as_ground_truth(
    outputs: Outputs, shape: tuple[int, int], labels: list[str], min_score: float
) -> DetectionDataset:
    """Confident detections as a labelled set of model-input-sized images (pseudo labels)."""
    h, w = shape
    samples = []
    for i in range(len(outputs["num_detections"])):
        n = int(outputs["num_detections"][i])
        keep = outputs["detection_scores"][i, :n] >= min_score
        boxes = outputs["detection_boxes"][i, :n][keep] * np.array([h, w, h, w], np.float32)
        samples.append(
            DetectionSample(
                image_id=i + 1,
                path=Path(f"traffic/{i}"),
                height=h,
                width=w,
                boxes=boxes.astype(np.float32),
                classes=outputs["detection_classes"][i, :n][keep].astype(np.int64),
                crowd=np.zeros(int(keep.sum()), bool),
            )
        )
    return DetectionDataset(list(labels), list(range(1, len(labels) + 1)), samples)


def mode_agreement(
    model: keras.Model,
    postprocess: Callable,
    x: np.ndarray,
    labels: list[str],
    min_score: float,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """mAP@.5 of inference-mode detections against training-mode ones >= ``min_score``."""
    trn = predict(model, postprocess, x, training=True, batch_size=batch_size)
    inf = predict(model, postprocess, x, batch_size=batch_size)
    truth = _as_ground_truth(trn, x.shape[1:3], labels, min_score)
    boxes = truth.num_boxes()
    agreement = score_outputs(inf, truth).map_50 if boxes else None
    return {
        "agreement_map_50": agreement,
        "training_mode_boxes": boxes,
        "images": len(x),
        "confident_score": min_score,
    }


def confident_classes(outputs: Outputs, min_score: float) -> np.ndarray:
    """The classes of every detection scoring at least ``min_score``, over all images."""
    classes = []
    for i in range(len(outputs["num_detections"])):
        n = int(outputs["num_detections"][i])
        keep = outputs["detection_scores"][i, :n] >= min_score
        classes.append(outputs["detection_classes"][i, :n][keep].astype(np.int64))
    return np.concatenate(classes) if classes else np.zeros(0, np.int64)


def class_balance_check(
    parent_classes: np.ndarray, labels: list[str], confident: float, limit: float
) -> GateCheck:
    """``class_balance`` on the parent's confident detections (reported only without any)."""
    share, top = largest_share(parent_classes)
    counted = len(parent_classes) > 0
    return GateCheck(
        "class_balance",
        share <= limit,
        counted,
        says(
            share <= limit,
            "one class dominates the samples (statistics of one class are not a domain)",
            f"{share:.0%} of the parent's {len(parent_classes)} detections with score >= "
            f"{confident:.2f} are {labels[top] if top is not None else '?'} "
            f"(limit {limit:.0%})",
        )
        if counted
        else f"not checked: the parent detects nothing with score >= {confident:.2f}",
        {
            "largest_share": share,
            "class": top,
            "source": "parent_detections",
            "confident_score": confident,
            "detections": int(len(parent_classes)),
            "limit": limit,
        },
    )


def map_reference_check(
    parent: DetectionMetrics,
    candidate: DetectionMetrics,
    reference: tuple[int, int],
    tolerance: float,
    drifted: bool,
) -> GateCheck:
    """``map_reference``: mAP@[.5:.95] on the ``(images, boxes)`` reference set vs the parent."""
    ok = candidate.map_50_95 >= parent.map_50_95 - tolerance
    return GateCheck(
        "map_reference",
        ok,
        True,
        says(
            ok,
            "worse than the parent on the version's reference set",
            f"mAP@[.5:.95] on {reference[0]} reference images {candidate.map_50_95:.3f} vs "
            f"parent {parent.map_50_95:.3f} (tolerance {tolerance}); mAP@.5 "
            f"{candidate.map_50:.3f} vs {parent.map_50:.3f}",
        ),
        {
            "parent": parent.to_dict(),
            "candidate": candidate.to_dict(),
            "images": reference[0],
            "boxes": reference[1],
            "tolerance": tolerance,
            "traffic_drifted": drifted,
        },
    )


def detects_objects_check(
    candidate_rate: float, parent_rate: float, confident: float, images: int
) -> GateCheck:
    """``detects_objects``: confident detections per held-out image vs the parent's reference."""
    ok = candidate_rate >= MIN_DETECTION_SHARE * parent_rate
    return GateCheck(
        "detects_objects",
        ok,
        True,
        says(
            ok,
            "the candidate finds (almost) no objects in the traffic",
            f"{candidate_rate:.2f} detections with score >= {confident:.2f} per held-out image "
            f"vs the parent's {parent_rate:.2f} per reference image "
            f"(at least {MIN_DETECTION_SHARE:.0%} of it)",
        ),
        {
            "candidate_per_image": candidate_rate,
            "parent_reference_per_image": parent_rate,
            "min_share": MIN_DETECTION_SHARE,
            "confident_score": confident,
            "images": images,
        },
    )


def parity_check(
    agreement: dict[str, Any], threshold: float | None
) -> tuple[GateCheck, dict[str, Any]]:
    """``parity`` from :func:`mode_agreement`; also the card's ``metrics.parity``."""
    limit = threshold if threshold is not None else DEFAULT_PARITY_GAP
    boxes = agreement["training_mode_boxes"]
    checkable = boxes >= MIN_PARITY_BOXES
    gap = 1.0 - agreement["agreement_map_50"] if checkable else None
    parity = {
        **agreement,
        "gap": gap,
        "threshold": limit,
        "passed": bool(checkable and gap <= limit),
    }
    reason = (
        says(
            parity["passed"],
            "inference mode disagrees with training mode on the traffic",
            f"inference-mode detections match {boxes} confident training-mode ones at mAP@.5 "
            f"{agreement['agreement_map_50']:.3f} on {agreement['images']} held-out images "
            f"under the statistics re-estimated on the traffic (gap {gap:.3f}, limit {limit})",
        )
        if checkable and gap is not None
        else f"not checked: {boxes} training-mode detections "
        f"with score >= {CONFIDENT_SCORE} (fewer than {MIN_PARITY_BOXES})"
    )
    check = GateCheck("parity", parity["passed"] if checkable else True, checkable, reason, parity)
    return check, parity
