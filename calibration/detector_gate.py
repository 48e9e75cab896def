"""The gate checks of a detector candidate, and how detections stand in for labels.

Without box feedback the detector's checks judge the candidate on its own
detections and on the version's reference set:

- ``class_balance`` counts the classes of the parent's confident detections;
  *confident* means a score of at least :func:`confident_score`: 0.5, or the
  parent's median best score on its reference set when that is lower (a weak
  detector's scores rarely reach 0.5);
- ``map_reference``: the candidate's COCO mAP@[.5:.95] on the reference set
  may not fall more than ``accuracy_tolerance`` below the parent's. Without
  box feedback there is no labelled traffic to decide instead, so it gates;
  with box feedback it gates unless the traffic raised the parent's drift
  alarm (the classifier's rule: the traffic's own boxes then decide);
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

With box feedback (the candidate was fine-tuned on it, :mod:`calibration.detector_fine_tune`):

- ``map_traffic``: the candidate's COCO mAP@[.5:.95] on the box-labelled
  held-out samples (trained on by neither) must beat the parent's;
- ``feedback_agreement``: the parent's mAP@.5 against the feedback boxes on
  every box-labelled sample is at least :data:`MIN_FEEDBACK_AGREEMENT` of its
  mAP@.5 on its reference set. A shift costs the parent part of its mAP; boxes
  it cannot find at all are not the objects of the images (random boxes,
  labels of another task). Judged on the parent, which trained on none of them;
- ``feedback_class_balance``: the classes of the feedback boxes, as
  ``class_balance`` counts the parent's detections. Feedback that calls every
  object one class teaches the model one class, and the held-out part of the
  same feedback would approve it.
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
#: The parent's mAP@.5 against the box feedback, as a share of its reference-set mAP@.5,
#: below which the feedback is taken for boxes of something else than the images' objects.
MIN_FEEDBACK_AGREEMENT = 0.25

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


def feedback_class_balance_check(
    feedback_classes: np.ndarray, labels: list[str], limit: float
) -> GateCheck:
    """``feedback_class_balance``: the largest share of one class among the feedback boxes.

    Gating whenever the feedback has boxes: a candidate fine-tuned on it learns
    what it says.
    """
    share, top = largest_share(feedback_classes)
    counted = len(feedback_classes) > 0
    return GateCheck(
        "feedback_class_balance",
        share <= limit,
        counted,
        says(
            share <= limit,
            "one class dominates the box feedback",
            f"{share:.0%} of the {len(feedback_classes)} feedback boxes are "
            f"{labels[top] if top is not None else '?'} (limit {limit:.0%})",
        )
        if counted
        else "not checked: the box feedback has no boxes",
        {
            "largest_share": share,
            "class": top,
            "source": "box_feedback",
            "boxes": int(len(feedback_classes)),
            "limit": limit,
        },
    )


def feedback_agreement_check(
    parent_feedback: DetectionMetrics, parent_reference: DetectionMetrics, boxes: int
) -> GateCheck:
    """``feedback_agreement``: the parent's mAP@.5 against the feedback vs on its reference set."""
    floor = MIN_FEEDBACK_AGREEMENT * parent_reference.map_50
    ok = parent_feedback.map_50 >= floor
    return GateCheck(
        "feedback_agreement",
        ok,
        True,
        says(
            ok,
            "the parent finds almost none of the feedback boxes (not the images' objects?)",
            f"the parent's mAP@.5 against {boxes} feedback boxes on {parent_feedback.images} "
            f"images {parent_feedback.map_50:.3f} vs {parent_reference.map_50:.3f} on its "
            f"reference set (at least {MIN_FEEDBACK_AGREEMENT:.0%} of it)",
        ),
        {
            "parent_on_feedback": parent_feedback.to_dict(),
            "parent_reference_map_50": parent_reference.map_50,
            "min_share": MIN_FEEDBACK_AGREEMENT,
            "boxes": boxes,
        },
    )


def map_traffic_check(
    parent: DetectionMetrics, candidate: DetectionMetrics, boxes: int
) -> GateCheck:
    """``map_traffic``: mAP@[.5:.95] on the box-labelled held-out samples must improve."""
    ok = candidate.map_50_95 > parent.map_50_95
    return GateCheck(
        "map_traffic",
        ok,
        True,
        says(
            ok,
            "no better than the parent on the box-labelled held-out traffic",
            f"mAP@[.5:.95] on {candidate.images} box-labelled held-out images ({boxes} boxes) "
            f"{candidate.map_50_95:.3f} vs parent {parent.map_50_95:.3f}; mAP@.5 "
            f"{candidate.map_50:.3f} vs {parent.map_50:.3f}",
        ),
        {
            "parent": parent.to_dict(),
            "candidate": candidate.to_dict(),
            "images": candidate.images,
            "boxes": boxes,
        },
    )


def map_reference_check(
    parent: DetectionMetrics,
    candidate: DetectionMetrics,
    reference: tuple[int, int],
    tolerance: float,
    drifted: bool,
    *,
    box_feedback: bool = False,
) -> GateCheck:
    """``map_reference``: mAP@[.5:.95] on the ``(images, boxes)`` reference set vs the parent.

    Gating, except when box feedback from traffic past the drift alarm decides
    instead (``box_feedback`` and ``drifted``).
    """
    ok = candidate.map_50_95 >= parent.map_50_95 - tolerance
    gates = not (box_feedback and drifted)
    notes = (
        ""
        if gates
        else "; informational: the traffic has drifted from the reference domain "
        "and its box feedback decides"
    ) + ("; in-sample: the reference set was fine-tuned on" if box_feedback else "")
    return GateCheck(
        "map_reference",
        ok,
        gates,
        says(
            ok,
            "worse than the parent on the version's reference set",
            f"mAP@[.5:.95] on {reference[0]} reference images {candidate.map_50_95:.3f} vs "
            f"parent {parent.map_50_95:.3f} (tolerance {tolerance}); mAP@.5 "
            f"{candidate.map_50:.3f} vs {parent.map_50:.3f}",
        )
        + notes,
        {
            "parent": parent.to_dict(),
            "candidate": candidate.to_dict(),
            "images": reference[0],
            "boxes": reference[1],
            "tolerance": tolerance,
            "traffic_drifted": drifted,
            "fine_tuned_on": box_feedback,
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
