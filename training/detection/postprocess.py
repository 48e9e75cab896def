"""Decoding and class-wise NMS inside the TensorFlow graph.

The exported signature runs :func:`postprocess` after the network, so serving
returns final detections: ``detection_boxes`` ``[B, N, 4]`` (normalised ymin,
xmin, ymax, xmax, clipped to the input), ``detection_scores`` ``[B, N]``,
``detection_classes`` ``[B, N]`` (0-based label index, as float32 the way TF
Object Detection API users expect), ``num_detections`` ``[B]`` float32. ``N`` is
``max_detections``; rows past ``num_detections`` are zero padding. Any batch
size works (``tf.image.combined_non_max_suppression`` is batched), unlike the
Object Detection API's batch-1 exports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from training.detection.boxes import DEFAULT_VARIANCES, decode_boxes

OUTPUT_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


@dataclass(frozen=True)
class NmsConfig:
    """Post-processing thresholds; recorded in the model card under ``detection.nms``."""

    iou_threshold: float = 0.5
    score_threshold: float = 0.05
    max_detections: int = 100
    max_detections_per_class: int = 100

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {self.score_threshold}")
        if self.max_detections < 1 or self.max_detections_per_class < 1:
            raise ValueError("max_detections and max_detections_per_class must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def postprocess(
    class_logits: tf.Tensor,
    box_deltas: tf.Tensor,
    anchors: np.ndarray | tf.Tensor,
    nms: NmsConfig = NmsConfig(),
    variances: Sequence[float] = DEFAULT_VARIANCES,
) -> dict[str, tf.Tensor]:
    """Raw head outputs ``[B, A, C]`` logits and ``[B, A, 4]`` codes -> final detections."""
    scores = tf.sigmoid(tf.cast(class_logits, tf.float32))
    boxes = decode_boxes(box_deltas, anchors, variances)
    nmsed = tf.image.combined_non_max_suppression(
        boxes=boxes[:, :, None, :],  # one box per anchor, shared by all classes
        scores=scores,
        max_output_size_per_class=nms.max_detections_per_class,
        max_total_size=nms.max_detections,
        iou_threshold=nms.iou_threshold,
        score_threshold=nms.score_threshold,
        pad_per_class=False,
        clip_boxes=True,
    )
    return {
        "detection_boxes": nmsed.nmsed_boxes,
        "detection_scores": nmsed.nmsed_scores,
        "detection_classes": nmsed.nmsed_classes,
        "num_detections": tf.cast(nmsed.valid_detections, tf.float32),
    }


def make_postprocess(
    anchors: np.ndarray,
    nms: NmsConfig = NmsConfig(),
    variances: Sequence[float] = DEFAULT_VARIANCES,
) -> Callable[[list[tf.Tensor]], dict[str, tf.Tensor]]:
    """The ``postprocess`` hook for :func:`contract.export.export_model`.

    It takes the detector's raw outputs ``[class_logits, box_deltas]``.
    """
    anchors = np.asarray(anchors, dtype=np.float32)

    def run(outputs: list[tf.Tensor]) -> dict[str, tf.Tensor]:
        class_logits, box_deltas = outputs
        return postprocess(class_logits, box_deltas, anchors, nms, variances)

    return run
