"""Box geometry: IoU, corner/centre conversions and the centre-size box code.

Boxes are ``(ymin, xmin, ymax, xmax)`` throughout (the TF Object Detection API
order, which the serving signature also uses), normalised to the model input
unless a function says pixels.

The box code is SSD's: a box relative to an anchor is
``((cy - acy) / ah / v0, (cx - acx) / aw / v1, log(h / ah) / v2, log(w / aw) / v3)``
with variances ``v`` (default 0.1, 0.1, 0.2, 0.2) that bring the regression
targets to roughly unit scale. :func:`encode_boxes` runs in NumPy (target
assignment happens in the input pipeline); :func:`decode_boxes` runs in
TensorFlow (it is part of the exported graph).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from contract.preprocessing import ImageGeometry

#: SSD's variances for (cy, cx, h, w).
DEFAULT_VARIANCES: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)

# exp() of a log-scale delta above this would make a box 1000x its anchor:
# clipping keeps a wild prediction finite (torchvision's bbox_xform_clip).
_MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {b.shape}")
    return b


def area(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``[N, 4]`` corner boxes (0 for degenerate boxes)."""
    b = _as_boxes(boxes, "boxes")
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` corner boxes -> ``[N, M]``."""
    a = _as_boxes(a, "a")
    b = _as_boxes(b, "b")
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / union, 0.0)
    return out


def corners_to_centers(boxes: np.ndarray) -> np.ndarray:
    """``(ymin, xmin, ymax, xmax)`` -> ``(cy, cx, h, w)``."""
    b = _as_boxes(boxes, "boxes")
    h = b[:, 2] - b[:, 0]
    w = b[:, 3] - b[:, 1]
    return np.stack([b[:, 0] + h / 2, b[:, 1] + w / 2, h, w], axis=1)


def centers_to_corners(boxes: np.ndarray) -> np.ndarray:
    """``(cy, cx, h, w)`` -> ``(ymin, xmin, ymax, xmax)``."""
    c = _as_boxes(boxes, "boxes")
    return np.stack(
        [
            c[:, 0] - c[:, 2] / 2,
            c[:, 1] - c[:, 3] / 2,
            c[:, 0] + c[:, 2] / 2,
            c[:, 1] + c[:, 3] / 2,
        ],
        axis=1,
    )


def encode_boxes(
    boxes: np.ndarray, anchors: np.ndarray, variances: Sequence[float] = DEFAULT_VARIANCES
) -> np.ndarray:
    """Encode ``[N, 4]`` corner boxes against ``[N, 4]`` corner anchors (row by row).

    Boxes must have positive height and width (a log is taken).
    """
    b = corners_to_centers(boxes)
    a = corners_to_centers(anchors)
    if b.shape != a.shape:
        raise ValueError(f"boxes {b.shape} and anchors {a.shape} must have the same shape")
    if len(b) and (np.any(b[:, 2:] <= 0) or np.any(a[:, 2:] <= 0)):
        raise ValueError("boxes and anchors must have positive height and width")
    v = np.asarray(variances, dtype=np.float64)
    out = np.stack(
        [
            (b[:, 0] - a[:, 0]) / a[:, 2] / v[0],
            (b[:, 1] - a[:, 1]) / a[:, 3] / v[1],
            np.log(b[:, 2] / a[:, 2]) / v[2],
            np.log(b[:, 3] / a[:, 3]) / v[3],
        ],
        axis=1,
    )
    return out.astype(np.float32)


def decode_boxes(
    deltas: tf.Tensor,
    anchors: tf.Tensor | np.ndarray,
    variances: Sequence[float] = DEFAULT_VARIANCES,
) -> tf.Tensor:
    """Decode ``[..., A, 4]`` box codes against ``[A, 4]`` corner anchors -> corner boxes.

    The inverse of :func:`encode_boxes`; broadcasts over leading (batch) axes.
    """
    deltas = tf.convert_to_tensor(deltas, tf.float32)
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    v = tf.constant(variances, tf.float32)
    ah = anchors[:, 2] - anchors[:, 0]
    aw = anchors[:, 3] - anchors[:, 1]
    acy = anchors[:, 0] + ah / 2
    acx = anchors[:, 1] + aw / 2
    cy = deltas[..., 0] * v[0] * ah + acy
    cx = deltas[..., 1] * v[1] * aw + acx
    h = tf.exp(tf.minimum(deltas[..., 2] * v[2], _MAX_LOG_SCALE)) * ah
    w = tf.exp(tf.minimum(deltas[..., 3] * v[3], _MAX_LOG_SCALE)) * aw
    return tf.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


def pixel_boxes_to_input(boxes: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Original-pixel corner boxes -> normalised model-input boxes (not clipped).

    The inverse of :meth:`contract.preprocessing.ImageGeometry.boxes_to_original`.
    """
    b = _as_boxes(boxes, "boxes")
    y = (b[:, [0, 2]] * geometry.scale_y + geometry.pad_y) / geometry.input_height
    x = (b[:, [1, 3]] * geometry.scale_x + geometry.pad_x) / geometry.input_width
    return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1).astype(np.float32)


def yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Corner boxes ``(ymin, xmin, ymax, xmax)`` -> COCO ``(x, y, width, height)``."""
    b = _as_boxes(boxes, "boxes")
    return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], axis=1)


def xywh_to_yxyx(boxes: np.ndarray) -> np.ndarray:
    """COCO ``(x, y, width, height)`` -> corner boxes ``(ymin, xmin, ymax, xmax)``."""
    b = _as_boxes(boxes, "boxes")
    return np.stack([b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], axis=1)
