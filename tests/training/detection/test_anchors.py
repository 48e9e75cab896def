"""Anchor layout: counts, order, centres and sizes per level."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.detection.anchors import (
    AnchorConfig,
    feature_map_sizes,
    generate_anchors,
    num_anchors,
)


def test_anchor_count_and_shape_for_a_non_square_input():
    cfg = AnchorConfig(strides=(8, 16, 32, 64), scales=(1.0, 2.0), aspect_ratios=(1.0, 2.0, 0.5))
    anchors = generate_anchors(cfg, 96, 64)
    sizes = feature_map_sizes(cfg, 96, 64)
    assert sizes == [(12, 8), (6, 4), (3, 2), (2, 1)]
    expected = sum(r * c for r, c in sizes) * 6
    assert anchors.shape == (expected, 4)
    assert anchors.dtype == np.float32
    assert num_anchors(cfg, 96, 64) == expected


def test_anchor_order_is_level_row_column_then_anchor():
    cfg = AnchorConfig(strides=(16, 32), size_factor=1.0, scales=(1.0,), aspect_ratios=(1.0, 4.0))
    anchors = generate_anchors(cfg, 64, 64) * 64  # back to pixels
    # Level 16: 4x4 cells, 2 anchors each; cell (row 0, col 1) is anchors 2 and 3.
    cy = (anchors[:, 0] + anchors[:, 2]) / 2
    cx = (anchors[:, 1] + anchors[:, 3]) / 2
    np.testing.assert_allclose([cy[2], cx[2]], [8, 24])
    np.testing.assert_allclose([cy[8], cx[8]], [24, 8])  # row 1, col 0
    h = anchors[:, 2] - anchors[:, 0]
    w = anchors[:, 3] - anchors[:, 1]
    np.testing.assert_allclose([h[0], w[0]], [16, 16], rtol=1e-6)
    np.testing.assert_allclose([h[1], w[1]], [8, 32], rtol=1e-6)  # ratio w/h = 4, same area
    # The second level starts after 4*4*2 anchors, with 32-pixel anchors at (16, 16).
    np.testing.assert_allclose(anchors[32], [0, 0, 32, 32], atol=1e-4)
    assert len(anchors) == 4 * 4 * 2 + 2 * 2 * 2


def test_anchor_sizes_follow_stride_scale_and_ratio():
    cfg = AnchorConfig(
        strides=(8,), size_factor=1.5, scales=(1.0, math.sqrt(2)), aspect_ratios=(2.0,)
    )
    a = generate_anchors(cfg, 32, 32) * 32
    h = a[:, 2] - a[:, 0]
    w = a[:, 3] - a[:, 1]
    np.testing.assert_allclose(np.sqrt(h[:2] * w[:2]), [12, 12 * math.sqrt(2)], rtol=1e-5)
    np.testing.assert_allclose(w[:2] / h[:2], [2, 2], rtol=1e-5)


def test_anchor_config_round_trips_and_rejects_bad_values():
    cfg = AnchorConfig(
        strides=(16, 32, 64), size_factor=2.0, scales=(1.0,), aspect_ratios=(1.0, 3.0)
    )
    assert AnchorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        AnchorConfig(strides=(16, 8))
    with pytest.raises(ValueError):
        AnchorConfig(strides=(12,))
    with pytest.raises(ValueError):
        AnchorConfig(aspect_ratios=(0.0,))
    with pytest.raises(ValueError):
        feature_map_sizes(AnchorConfig(), 0, 10)
