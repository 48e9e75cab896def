"""Box geometry: IoU, the centre-size code (round trip), and mapping to original pixels."""

from __future__ import annotations

import numpy as np
import pytest

from contract.preprocessing import PreprocessSpec, preprocess_pixels
from training.detection.augment import to_model_input
from training.detection.boxes import (
    decode_boxes,
    encode_boxes,
    iou_matrix,
    pixel_boxes_to_input,
    xywh_to_yxyx,
    yxyx_to_xywh,
)


def test_iou_of_hand_made_boxes():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [0, 5, 10, 15], [20, 20, 30, 30], [5, 5, 5, 5]], float)
    iou = iou_matrix(a, b)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.0])
    with pytest.raises(ValueError):
        iou_matrix(np.zeros((3,)), b)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    anchors = np.concatenate([rng.uniform(0, 0.5, (200, 2)), rng.uniform(0.55, 1.0, (200, 2))], 1)
    anchors = anchors[:, [0, 1, 2, 3]]
    boxes = np.concatenate([rng.uniform(-0.1, 0.5, (200, 2)), rng.uniform(0.52, 1.2, (200, 2))], 1)
    codes = encode_boxes(boxes, anchors)
    decoded = decode_boxes(codes[None], anchors).numpy()[0]
    np.testing.assert_allclose(decoded, boxes, atol=1e-5)


def test_a_box_equal_to_its_anchor_encodes_to_zero_and_variances_scale_codes():
    anchors = np.array([[0.2, 0.2, 0.6, 0.4]])
    np.testing.assert_allclose(encode_boxes(anchors, anchors), 0.0, atol=1e-7)
    shifted = anchors + np.array([0.04, 0.0, 0.04, 0.0])  # centre down by 0.1 anchor heights
    np.testing.assert_allclose(encode_boxes(shifted, anchors), [[1.0, 0, 0, 0]], atol=1e-5)
    np.testing.assert_allclose(
        encode_boxes(shifted, anchors, (1.0, 1.0, 1.0, 1.0)), [[0.1, 0, 0, 0]], atol=1e-6
    )
    with pytest.raises(ValueError):
        encode_boxes(np.array([[0.2, 0.2, 0.2, 0.4]]), anchors)


def test_decode_clips_absurd_size_codes():
    anchors = np.array([[0.4, 0.4, 0.6, 0.6]], np.float32)
    out = decode_boxes(np.array([[[0, 0, 1e4, 1e4]]], np.float32), anchors).numpy()
    assert np.all(np.isfinite(out))


def test_xywh_conversions_are_inverse():
    b = np.array([[1.0, 2.0, 11.0, 32.0]])
    np.testing.assert_allclose(yxyx_to_xywh(b), [[2, 1, 30, 10]])
    np.testing.assert_allclose(xywh_to_yxyx(yxyx_to_xywh(b)), b)


def _image_with_rectangle(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    y0, x0, y1, x1 = box
    img[y0:y1, x0:x1] = 255
    return img


def _found_box(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Normalised box of the bright region in a model input."""
    bright = x[..., 0] > (128 * spec.scale + spec.offset)
    rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    return np.array(
        [
            rows[0] / spec.height,
            cols[0] / spec.width,
            (rows[-1] + 1) / spec.height,
            (cols[-1] + 1) / spec.width,
        ]
    )


@pytest.mark.parametrize("geometry", ["stretch", "letterbox"])
@pytest.mark.parametrize("size", [(90, 200), (240, 120), (100, 100)])
def test_boxes_map_back_to_original_pixels(geometry, size):
    """A rectangle found in the model input maps back onto the rectangle in the original."""
    h, w = size
    box = (h // 4, w // 5, h // 4 + h // 3, w // 5 + w // 2)
    spec = PreprocessSpec(height=64, width=64, geometry=geometry, resize_method="nearest")
    x, geometry_ = preprocess_pixels(_image_with_rectangle(h, w, box), spec)
    back = geometry_.boxes_to_original(_found_box(x, spec)[None])[0]
    # One model-input pixel is up to max(h, w) / 64 original pixels.
    np.testing.assert_allclose(back, box, atol=max(h, w) / 64 + 1e-6)
    # The training-side mapping (original -> input) is the exact inverse.
    x2, norm, g2 = to_model_input(_image_with_rectangle(h, w, box), np.array([box], float), spec)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_allclose(g2.boxes_to_original(norm)[0], box, atol=1e-3)
    np.testing.assert_allclose(norm[0], pixel_boxes_to_input(np.array([box], float), g2)[0])
    np.testing.assert_allclose(norm[0], _found_box(x, spec), atol=1.0 / 64 + 1e-6)


def test_letterbox_padding_is_not_part_of_the_mapped_box():
    spec = PreprocessSpec(height=64, width=64, geometry="letterbox")
    _, geometry = preprocess_pixels(np.zeros((50, 200, 3), np.uint8), spec)
    assert geometry.pad_y > 0 and geometry.pad_x == 0
    full_input = np.array([[0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(geometry.boxes_to_original(full_input)[0], [0, 0, 50, 200])
