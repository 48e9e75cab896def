"""Detection losses: sigmoid focal loss for classes, smooth L1 for box codes.

Almost every anchor is background. The focal loss (Lin et al. 2017) scales each
anchor's cross-entropy by ``(1 - p_t) ** gamma`` so the many easy negatives stop
dominating, and weights positives by ``alpha``. Both losses are summed over
anchors and divided by the number of positive anchors in the batch (at least 1).
Ignored anchors (label -1) contribute nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import tensorflow as tf


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and shapes; recorded in the model card's training parameters."""

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # On variance-scaled codes (x10 for centres, x5 for sizes) 1.0 is about
    # RetinaNet's beta = 0.1 on raw codes.
    huber_delta: float = 1.0
    box_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.focal_alpha <= 1.0 or self.focal_gamma < 0:
            raise ValueError("focal_alpha must be in [0, 1] and focal_gamma >= 0")
        if self.huber_delta <= 0 or self.box_weight < 0:
            raise ValueError("huber_delta must be > 0 and box_weight >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def focal_loss_sum(
    labels: tf.Tensor, logits: tf.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> tf.Tensor:
    """Summed sigmoid focal loss. ``labels`` [B, A] (-1/0/k+1), ``logits`` [B, A, C]."""
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    # Background (0) and ignore (-1) both one-hot to all zeros; ignore is masked below.
    onehot = tf.one_hot(labels - 1, num_classes, dtype=tf.float32)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=onehot, logits=logits)
    p = tf.sigmoid(logits)
    p_t = onehot * p + (1.0 - onehot) * (1.0 - p)
    alpha_t = onehot * alpha + (1.0 - onehot) * (1.0 - alpha)
    loss = alpha_t * tf.pow(1.0 - p_t, gamma) * ce
    valid = tf.cast(labels >= 0, tf.float32)[..., None]
    return tf.reduce_sum(loss * valid)


def box_loss_sum(
    labels: tf.Tensor, box_targets: tf.Tensor, box_deltas: tf.Tensor, *, delta: float = 1.0
) -> tf.Tensor:
    """Summed smooth L1 (Huber) over the 4 codes of positive anchors."""
    positive = tf.cast(tf.cast(labels, tf.int32) > 0, tf.float32)[..., None]
    diff = tf.abs(tf.cast(box_deltas, tf.float32) - tf.cast(box_targets, tf.float32))
    huber = tf.where(diff < delta, 0.5 * tf.square(diff) / delta, diff - 0.5 * delta)
    return tf.reduce_sum(huber * positive)


def detection_loss(
    labels: tf.Tensor,
    box_targets: tf.Tensor,
    class_logits: tf.Tensor,
    box_deltas: tf.Tensor,
    config: LossConfig = LossConfig(),
) -> dict[str, tf.Tensor]:
    """``{"loss", "class_loss", "box_loss", "num_positive"}`` for one batch."""
    num_pos = tf.reduce_sum(tf.cast(tf.cast(labels, tf.int32) > 0, tf.float32))
    norm = tf.maximum(num_pos, 1.0)
    cls = focal_loss_sum(labels, class_logits, alpha=config.focal_alpha, gamma=config.focal_gamma)
    box = box_loss_sum(labels, box_targets, box_deltas, delta=config.huber_delta)
    cls = cls / norm
    box = box / norm
    return {
        "loss": cls + config.box_weight * box,
        "class_loss": cls,
        "box_loss": box,
        "num_positive": num_pos,
    }
