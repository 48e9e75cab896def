"""Model outputs -> labels and scores, or boxes in original image pixels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from serving.catalog import ModelVersion
from serving.errors import BackendError
from serving.service.types import Detection, ImageDetections, LabelScore, PredictOptions

DEFAULT_TOP_K = 5
DEFAULT_MAX_DETECTIONS = 100


def classifications(
    mv: ModelVersion, outputs: Mapping[str, np.ndarray], options: PredictOptions
) -> list[list[LabelScore]]:
    """Top-k labels and scores per image, at or above the request's score threshold."""
    probs = _output(outputs, "probabilities", mv)
    labels = mv.class_labels
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise BackendError(
            f"{mv.name}/{mv.version}: probabilities shape {probs.shape} does not match "
            f"{len(labels)} labels in the model card"
        )
    k = min(options.top_k or DEFAULT_TOP_K, len(labels))
    threshold = options.score_threshold or 0.0
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append(
            [LabelScore(labels[i], int(i), float(row[i])) for i in order if row[i] >= threshold]
        )
    return out


def detections(
    mv: ModelVersion,
    outputs: Mapping[str, np.ndarray],
    geometries: list[Any],
    options: PredictOptions,
    default_threshold: float,
) -> list[ImageDetections]:
    """Detections per image above the threshold, boxes in original image pixels."""
    boxes = _output(outputs, "detection_boxes", mv)
    scores = _output(outputs, "detection_scores", mv)
    classes = _output(outputs, "detection_classes", mv)
    counts = _output(outputs, "num_detections", mv)
    labels = mv.class_labels
    detection = mv.card.detection
    card_limit = (
        (detection.max_detections or detection.nms.get("max_detections"))
        if detection is not None
        else None
    )
    limit = options.max_detections or card_limit or DEFAULT_MAX_DETECTIONS
    threshold = (
        options.score_threshold if options.score_threshold is not None else default_threshold
    )
    out = []
    for i, geometry in enumerate(geometries):
        n = min(int(counts[i]), boxes.shape[1])
        s = scores[i, :n]
        keep = [j for j in np.argsort(-s, kind="stable") if s[j] >= threshold][:limit]
        pixel = geometry.boxes_to_original(boxes[i, keep]) if keep else np.zeros((0, 4))
        found = []
        for j, box in zip(keep, pixel, strict=True):
            index = int(round(float(classes[i, j])))
            name = labels[index] if 0 <= index < len(labels) else str(index)
            found.append(Detection(name, index, float(s[j]), tuple(float(c) for c in box)))
        out.append(ImageDetections(geometry.original_width, geometry.original_height, found))
    return out


def _output(outputs: Mapping[str, np.ndarray], key: str, mv: ModelVersion) -> np.ndarray:
    try:
        return np.asarray(outputs[key])
    except KeyError:
        raise BackendError(
            f"{mv.name}/{mv.version} did not return {key!r} (got {sorted(outputs)})"
        ) from None
