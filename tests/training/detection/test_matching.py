"""Target assignment on hand-made boxes."""

from __future__ import annotations

import numpy as np
import pytest

from training.detection.boxes import decode_boxes
from training.detection.matching import BACKGROUND, IGNORE, MatchConfig, match_anchors

ANCHORS = np.array(
    [
        [0.0, 0.0, 0.2, 0.2],  # 0: equals box A
        [0.0, 0.05, 0.2, 0.25],  # 1: IoU 0.6 with A -> positive
        [0.0, 0.09, 0.2, 0.29],  # 2: IoU 0.38 with A -> background (< 0.4)
        [0.0, 0.07, 0.2, 0.27],  # 3: IoU 0.48 with A -> ignore
        [0.5, 0.5, 0.9, 0.9],  # 4: best (IoU 0.25) for the small box B -> forced
        [0.5, 0.5, 0.7, 0.7],  # 5: IoU 0.14 with B -> background
    ],
    np.float32,
)


def test_positive_negative_ignore_and_forced_match():
    gt = np.array([[0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 0.8, 0.8]], np.float32)
    res = match_anchors(ANCHORS, gt, np.array([2, 0]))
    assert res.labels[0] == 3 and res.labels[1] == 3  # class 2 -> label 3
    assert res.labels[2] == BACKGROUND
    assert res.labels[3] == IGNORE
    assert res.labels[4] == 1  # B (class 0) claims its best anchor despite IoU 0.25
    assert res.labels[5] == BACKGROUND
    assert res.matched_gt[0] == 0 and res.matched_gt[4] == 1
    assert res.num_positive == 3
    # Positive targets decode back to their ground-truth boxes.
    decoded = decode_boxes(res.box_targets[None], ANCHORS).numpy()[0]
    for i in np.flatnonzero(res.labels > 0):
        np.testing.assert_allclose(decoded[i], gt[res.matched_gt[i]], atol=1e-5)
    assert np.all(res.box_targets[res.labels <= 0] == 0)


def test_without_forced_match_a_poorly_covered_box_gets_nothing():
    gt = np.array([[0.6, 0.6, 0.8, 0.8]], np.float32)
    res = match_anchors(ANCHORS, gt, np.array([0]), MatchConfig(force_best_match=False))
    assert res.num_positive == 0
    res = match_anchors(ANCHORS, gt, np.array([0]), MatchConfig(force_best_match=True))
    assert res.num_positive == 1


def test_two_boxes_wanting_one_anchor_both_keep_a_positive():
    anchors = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.6, 0.6]], np.float32)
    gt = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.1, 0.1]], np.float32)
    res = match_anchors(anchors, gt, np.array([0, 1]))
    # The small box's best anchor is 0 (IoU 0.04); the big box still has anchor 1 (IoU 0.69).
    assert set(res.matched_gt[res.labels > 0].tolist()) == {0, 1}


def test_no_boxes_means_all_background_and_bad_input_is_refused():
    res = match_anchors(ANCHORS, np.zeros((0, 4)), np.zeros((0,)))
    assert np.all(res.labels == BACKGROUND) and res.num_positive == 0
    degenerate = match_anchors(ANCHORS, np.array([[0.1, 0.1, 0.1, 0.3]]), np.array([0]))
    assert degenerate.num_positive == 0
    with pytest.raises(ValueError):
        match_anchors(ANCHORS, np.zeros((2, 4)), np.zeros((1,)))
    with pytest.raises(ValueError):
        MatchConfig(positive_iou=0.3, negative_iou=0.5)
