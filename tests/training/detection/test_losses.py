"""Focal and box losses on hand-made values."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from training.detection.losses import LossConfig, box_loss_sum, detection_loss, focal_loss_sum


def test_focal_loss_reduces_to_weighted_cross_entropy_and_ignores_label_minus_one():
    labels = np.array([[2, 0, -1]], np.int32)
    logits = np.array([[[0.3, -1.0], [0.5, 0.2], [9.0, 9.0]]], np.float32)
    onehot = np.array([[[0, 1], [0, 0]]], np.float32)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=onehot, logits=logits[:, :2]).numpy()
    got = focal_loss_sum(labels, logits, alpha=0.5, gamma=0.0).numpy()
    np.testing.assert_allclose(got, 0.5 * ce.sum(), rtol=1e-5)  # the ignored anchor adds nothing


def test_focal_loss_down_weights_easy_examples():
    labels = np.array([[1, 0]], np.int32)
    easy = np.array([[[6.0], [-6.0]]], np.float32)
    hard = np.array([[[-1.0], [1.0]]], np.float32)
    ratio_focal = focal_loss_sum(labels, easy).numpy() / focal_loss_sum(labels, hard).numpy()
    ratio_ce = (
        focal_loss_sum(labels, easy, gamma=0.0).numpy()
        / focal_loss_sum(labels, hard, gamma=0.0).numpy()
    )
    assert ratio_focal < ratio_ce / 100


def test_box_loss_counts_positive_anchors_only_and_is_huber():
    labels = np.array([[1, 0, -1]], np.int32)
    targets = np.zeros((1, 3, 4), np.float32)
    deltas = np.zeros((1, 3, 4), np.float32)
    deltas[0, 0] = [0.5, -3.0, 0, 0]
    deltas[0, 1:] = 100.0  # not positive: no box loss
    got = box_loss_sum(labels, targets, deltas, delta=1.0).numpy()
    np.testing.assert_allclose(got, 0.5 * 0.25 + (3.0 - 0.5), rtol=1e-6)


def test_detection_loss_is_normalised_by_positives():
    labels = np.array([[1, 1, 0, 0]], np.int32)
    targets = np.ones((1, 4, 4), np.float32) * 0.5
    deltas = np.zeros((1, 4, 4), np.float32)
    logits = np.zeros((1, 4, 3), np.float32)
    out = detection_loss(labels, targets, logits, deltas, LossConfig(box_weight=2.0))
    assert float(out["num_positive"]) == 2.0
    np.testing.assert_allclose(float(out["box_loss"]), 2 * 4 * 0.125 / 2, rtol=1e-6)
    np.testing.assert_allclose(
        float(out["loss"]), float(out["class_loss"]) + 2.0 * float(out["box_loss"]), rtol=1e-6
    )
    empty = detection_loss(np.zeros((1, 4), np.int32), targets, logits, deltas)
    assert np.isfinite(float(empty["loss"])) and float(empty["box_loss"]) == 0.0
