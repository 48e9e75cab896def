"""Augmentation moves boxes with the pixels; the final step is the shared preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from contract.preprocessing import PreprocessSpec, preprocess_pixels
from training.detection.augment import (
    NO_AUGMENT,
    AugmentConfig,
    augment,
    crop,
    flip_horizontal,
    photometric,
    random_iou_crop,
    scale_jitter,
    to_model_input,
)

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Black image with solid rectangles, one colour per class, not overlapping."""
    h, w = int(rng.integers(80, 160)), int(rng.integers(80, 160))
    img = np.zeros((h, w, 3), np.uint8)
    boxes, classes = [], []
    for k in range(4):
        y0 = int(rng.integers(0, h - 20))
        x0 = int(rng.integers(0, w - 20))
        y1, x1 = y0 + int(rng.integers(10, 20)), x0 + int(rng.integers(10, 20))
        if any(not (y1 <= b[0] or b[2] <= y0 or x1 <= b[1] or b[3] <= x0) for b in boxes):
            continue
        img[y0:y1, x0:x1] = COLOURS[k]
        boxes.append([y0, x0, y1, x1])
        classes.append(k)
    return img, np.array(boxes, np.float32), np.array(classes)


def _assert_boxes_hold_their_class_colour(img: np.ndarray, boxes: np.ndarray, classes: np.ndarray):
    for b, c in zip(boxes, classes, strict=True):
        y0, x0, y1, x1 = np.round(b).astype(int)
        assert y1 > y0 and x1 > x0
        patch = img[y0:y1, x0:x1].reshape(-1, 3).astype(int)
        match = np.abs(patch - COLOURS[c].astype(int)).sum(1) < 60
        assert match.mean() > 0.9, (b, c, match.mean())
        # ...and the box is tight: the colour does not continue just outside it.
        ring = img[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2].reshape(-1, 3).astype(int)
        assert (np.abs(ring - COLOURS[c].astype(int)).sum(1) < 60).sum() <= match.sum() * 1.05 + 2


def test_flip_moves_boxes_with_pixels():
    img, boxes, classes = _scene(np.random.default_rng(0))
    flipped, fboxes = flip_horizontal(img, boxes)
    _assert_boxes_hold_their_class_colour(flipped, fboxes, classes)
    np.testing.assert_array_equal(flip_horizontal(flipped, fboxes)[1], boxes)


def test_crop_clips_and_drops_boxes():
    img = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[10, 10, 30, 30], [40, 40, 60, 60], [90, 90, 99, 99]], np.float32)
    out, b, c = crop(img, boxes, np.array([0, 1, 2]), (20, 20, 70, 70), min_visible=0.3)
    assert out.shape == (50, 50, 3)
    # Box 0 keeps 1/4 of its area (< 0.3): dropped; box 1 inside; box 2 outside.
    np.testing.assert_array_equal(b, [[20, 20, 40, 40]])
    assert c.tolist() == [1]
    _, b, c = crop(img, boxes, np.array([0, 1, 2]), (20, 20, 70, 70), min_visible=0.2)
    np.testing.assert_array_equal(b[0], [0, 0, 10, 10])


@pytest.mark.parametrize("seed", range(6))
def test_full_augmentation_keeps_boxes_on_their_objects(seed):
    rng = np.random.default_rng(seed)
    img, boxes, classes = _scene(rng)
    cfg = AugmentConfig(
        flip_probability=0.5,
        crop_probability=1.0,
        jitter_probability=1.0,
        brightness=0.0,
        contrast=(1.0, 1.0),
        saturation=(1.0, 1.0),
    )
    out, b, c = augment(img, boxes, classes, rng, cfg)
    assert len(b) >= 1
    _assert_boxes_hold_their_class_colour(out, b, c)


def test_iou_crop_respects_the_constraint_and_scale_jitter_both_ways():
    rng = np.random.default_rng(1)
    img, boxes, classes = _scene(rng)
    cfg = AugmentConfig(crop_min_ious=(0.5,), crop_scale=(0.2, 1.0))
    for _ in range(10):
        out, b, c = random_iou_crop(img, boxes, classes, rng, cfg)
        assert len(b) >= 1
        if out.shape != img.shape:
            h, w = out.shape[:2]
            full = np.array([0, 0, h, w], np.float32)
            inter = np.prod(
                np.clip(np.minimum(b[:, 2:], full[2:]) - np.maximum(b[:, :2], 0), 0, None), 1
            )
            iou = inter / ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + h * w - inter)
            assert iou.max() >= 0.5 - 1e-6
    out, b, c = scale_jitter(img, boxes, classes, rng, AugmentConfig(scale_jitter=(0.5, 0.5)))
    assert out.shape[0] == round(img.shape[0] / 0.5) and len(b) == len(boxes)
    _assert_boxes_hold_their_class_colour(out, b, c)
    out, b, c = scale_jitter(img, boxes, classes, rng, AugmentConfig(scale_jitter=(1.5, 1.5)))
    assert out.shape[0] == round(img.shape[0] / 1.5)
    _assert_boxes_hold_their_class_colour(out, b, c)


def test_photometric_changes_values_not_geometry():
    img, _, _ = _scene(np.random.default_rng(2))
    img = img // 2 + 60
    out = photometric(img, np.random.default_rng(3), AugmentConfig(brightness=0.2))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)


@pytest.mark.parametrize("geometry", ["stretch", "letterbox"])
def test_final_step_is_the_shared_preprocessing(geometry):
    img, boxes, classes = _scene(np.random.default_rng(4))
    spec = PreprocessSpec(height=64, width=64, geometry=geometry)
    x, norm, geom = to_model_input(img, boxes, spec)
    ref, ref_geom = preprocess_pixels(img, spec)
    np.testing.assert_array_equal(x, ref)
    assert geom == ref_geom
    assert norm.min() >= 0 and norm.max() <= 1
    np.testing.assert_allclose(geom.boxes_to_original(norm), boxes, atol=1e-3)
    unchanged = augment(img, boxes, classes, np.random.default_rng(0), NO_AUGMENT)
    np.testing.assert_array_equal(unchanged[0], img)
    np.testing.assert_array_equal(unchanged[1], boxes)


def test_augment_config_rejects_bad_values():
    with pytest.raises(ValueError):
        AugmentConfig(flip_probability=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        AugmentConfig(scale_jitter=(1.2, 0.8))
