"""Decode + class-wise NMS in the graph: suppression, classes, thresholds, padding, batches."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from training.detection.postprocess import NmsConfig, make_postprocess, postprocess

ANCHORS = np.array(
    [
        [0.10, 0.10, 0.50, 0.50],  # 0
        [0.12, 0.12, 0.52, 0.52],  # 1: IoU ~0.83 with 0
        [0.60, 0.60, 0.90, 0.90],  # 2: apart
        [0.90, 0.90, 1.20, 1.20],  # 3: crosses the image edge
    ],
    np.float32,
)


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p)).astype(np.float32)


DEFAULT_NMS = NmsConfig(score_threshold=0.1, max_detections=5)


def _run(scores, nms=DEFAULT_NMS):
    scores = np.asarray(scores, np.float64)
    deltas = np.zeros((*scores.shape[:2], 4), np.float32)
    out = postprocess(tf.constant(_logit(scores)), tf.constant(deltas), ANCHORS, nms)
    return {k: v.numpy() for k, v in out.items()}


def test_overlapping_boxes_of_one_class_are_suppressed_but_not_across_classes():
    # Class 0 fires on anchors 0 and 1 (overlapping); class 1 fires on anchor 1 too.
    scores = [[[0.9, 0.01], [0.8, 0.7], [0.01, 0.01], [0.01, 0.01]]]
    out = _run(scores)
    assert out["num_detections"].tolist() == [2.0]
    np.testing.assert_allclose(out["detection_scores"][0, :2], [0.9, 0.7], rtol=1e-5)
    assert out["detection_classes"][0, :2].tolist() == [0.0, 1.0]
    np.testing.assert_allclose(out["detection_boxes"][0, 0], ANCHORS[0], atol=1e-6)
    np.testing.assert_allclose(out["detection_boxes"][0, 1], ANCHORS[1], atol=1e-6)
    # Padding after num_detections is zeros; shapes are fixed by max_detections.
    assert out["detection_boxes"].shape == (1, 5, 4)
    assert np.all(out["detection_scores"][0, 2:] == 0) and np.all(
        out["detection_boxes"][0, 2:] == 0
    )


def test_iou_threshold_decides_suppression():
    scores = [[[0.9], [0.8], [0.01], [0.01]]]
    assert _run(scores, NmsConfig(iou_threshold=0.5, score_threshold=0.1))["num_detections"][0] == 1
    assert _run(scores, NmsConfig(iou_threshold=0.9, score_threshold=0.1))["num_detections"][0] == 2


def test_score_threshold_max_detections_sorting_and_clipping():
    scores = [[[0.3], [0.05], [0.6], [0.95]]]
    out = _run(scores, NmsConfig(score_threshold=0.1, max_detections=2))
    assert out["num_detections"][0] == 2  # three pass the threshold, two are kept
    np.testing.assert_allclose(out["detection_scores"][0], [0.95, 0.6], rtol=1e-5)
    np.testing.assert_allclose(out["detection_boxes"][0, 0], [0.9, 0.9, 1.0, 1.0], atol=1e-6)


def test_a_batch_of_different_images_is_processed_per_image():
    scores = np.full((3, 4, 2), 0.01)
    scores[0, 2, 1] = 0.9  # one detection
    scores[1, 0, 0] = 0.8
    scores[1, 2, 0] = 0.7  # two detections
    out = _run(scores)  # image 2: none
    assert out["num_detections"].tolist() == [1.0, 2.0, 0.0]
    assert out["detection_classes"][0, 0] == 1.0
    assert out["detection_boxes"].shape == (3, 5, 4)
    assert (
        out["num_detections"].dtype == np.float32 and out["detection_classes"].dtype == np.float32
    )


def test_make_postprocess_decodes_box_codes():
    codes = np.zeros((1, 4, 4), np.float32)
    codes[0, 2] = [1.0, 0.0, 0.0, 0.0]  # centre down by 0.1 * 1.0 anchor heights
    logits = _logit(np.array([[[0.01], [0.01], [0.9], [0.01]]]))
    out = make_postprocess(ANCHORS, NmsConfig(score_threshold=0.1))(
        [tf.constant(logits), tf.constant(codes)]
    )
    np.testing.assert_allclose(
        out["detection_boxes"].numpy()[0, 0], ANCHORS[2] + [0.03, 0, 0.03, 0], atol=1e-6
    )


def test_nms_config_rejects_bad_values():
    with pytest.raises(ValueError):
        NmsConfig(iou_threshold=0.0)
    with pytest.raises(ValueError):
        NmsConfig(score_threshold=1.0)
    with pytest.raises(ValueError):
        NmsConfig(max_detections=0)
