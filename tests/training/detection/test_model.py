"""The SSDLite network: output shapes agree with the anchors; a flat graph; bad configs refused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from contract import bn
from training.detection.anchors import AnchorConfig, generate_anchors
from training.detection.model import DetectorConfig, build_detector


@pytest.mark.parametrize(
    "height, width, strides, fpn, shared",
    [
        (64, 64, (8, 16, 32, 64), True, True),
        (96, 64, (16, 32, 64, 128), True, False),
        (64, 96, (8, 16, 32), False, True),
        (100, 75, (8, 16, 32), True, True),  # odd map sizes: the top-down pass trims
    ],
)
def test_outputs_line_up_with_anchors(height, width, strides, fpn, shared):
    cfg = DetectorConfig(
        num_classes=3,
        image_height=height,
        image_width=width,
        alpha=0.35,
        anchors=AnchorConfig(strides=strides),
        fpn=fpn,
        fpn_channels=16,
        head_depth=1,
        shared_head=shared,
    )
    model = build_detector(cfg, seed=0)
    a = len(generate_anchors(cfg.anchors, height, width))
    logits, deltas = model(np.zeros((2, height, width, 3), np.float32), training=False)
    assert logits.shape == (2, a, 3) and deltas.shape == (2, a, 4)
    # Every anchor starts at the focal-loss prior probability 0.01.
    np.testing.assert_allclose(1 / (1 + np.exp(-logits.numpy().mean())), 0.01, atol=0.005)


def test_the_graph_is_flat_and_has_backbone_and_head_bn_layers():
    model = build_detector(DetectorConfig(num_classes=2, image_height=64, image_width=64), seed=0)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    names = [layer.name for layer in bn.bn_layers(model)]
    assert "bn_Conv1" in names and any(n.startswith("head_") for n in names)
    assert any(n.startswith("extra_64") for n in names)
    assert model.get_layer("block_6_expand_relu") is not None


def test_config_round_trips_and_rejects_bad_values():
    cfg = DetectorConfig(num_classes=5, alpha=0.5, anchors=AnchorConfig(strides=(16, 32, 64)))
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        DetectorConfig(num_classes=0)
    with pytest.raises(ValueError):
        DetectorConfig(num_classes=1, anchors=AnchorConfig(strides=(2, 8)))
    with pytest.raises(ValueError):
        DetectorConfig(num_classes=1, image_height=16)
