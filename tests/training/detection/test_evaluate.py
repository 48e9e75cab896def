"""COCO evaluation is wired correctly: perfect predictions score 1, shifted ones less."""

from __future__ import annotations

import numpy as np
import pytest

from contract.preprocessing import PreprocessSpec, preprocess_pixels
from training.detection.data import load_coco, write_synthetic_coco
from training.detection.evaluate import coco_metrics, detections_to_coco, top_detection_hits


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_coco(write_synthetic_coco(tmp_path_factory.mktemp("coco"), 12, seed=3))


def _as_detections(gt: dict, shift: float = 0.0, score: float = 1.0) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]],
            "score": score,
        }
        for a in gt["annotations"]
    ]


def test_ground_truth_as_predictions_scores_one(dataset):
    gt = dataset.to_coco()
    m = coco_metrics(gt, _as_detections(gt), dataset.labels)
    assert m.map_50_95 == pytest.approx(1.0)
    assert m.map_50 == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for ap in m.per_class_ap.values())
    assert m.detections == len(gt["annotations"]) and m.images == 12


def test_shifted_boxes_score_less(dataset):
    gt = dataset.to_coco()
    slight = coco_metrics(gt, _as_detections(gt, shift=0.15), dataset.labels)
    assert slight.map_50 == pytest.approx(1.0)  # IoU 0.74: still a match at 0.5
    assert 0.2 < slight.map_50_95 < 0.9  # but not at 0.75 and above
    far = coco_metrics(gt, _as_detections(gt, shift=1.5), dataset.labels)
    assert far.map_50_95 == 0.0 and far.map_50 == 0.0


def test_wrong_classes_and_no_detections_score_zero(dataset):
    gt = dataset.to_coco()
    n = len(dataset.labels)
    wrong = [
        {
            **d,
            "category_id": dataset.category_ids[
                (dataset.category_ids.index(d["category_id"]) + 1) % n
            ],
        }
        for d in _as_detections(gt)
    ]
    assert coco_metrics(gt, wrong, dataset.labels).map_50 < 0.05
    empty = coco_metrics(gt, [], dataset.labels)
    assert empty.map_50_95 == 0.0 and set(empty.per_class_ap) == set(dataset.labels)


@pytest.mark.parametrize("geometry", ["stretch", "letterbox"])
def test_signature_style_outputs_map_to_original_pixels(dataset, geometry):
    """Normalised model-input boxes -> COCO boxes on the original image: exact for GT boxes."""
    spec = PreprocessSpec(height=64, width=64, geometry=geometry)
    samples = dataset.samples[:3]
    geoms = [preprocess_pixels(s.load_pixels(), spec)[1] for s in samples]
    n = max(len(s.boxes) for s in samples)
    boxes = np.zeros((3, n, 4), np.float32)
    classes = np.zeros((3, n), np.float32)
    for i, (s, g) in enumerate(zip(samples, geoms, strict=True)):
        y = (s.boxes[:, [0, 2]] * g.scale_y + g.pad_y) / g.input_height
        x = (s.boxes[:, [1, 3]] * g.scale_x + g.pad_x) / g.input_width
        boxes[i, : len(s.boxes)] = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1)
        classes[i, : len(s.boxes)] = s.classes
    outputs = {
        "detection_boxes": boxes,
        "detection_scores": np.where(classes >= 0, 0.9, 0).astype(np.float32),
        "detection_classes": classes,
        "num_detections": np.array([len(s.boxes) for s in samples], np.float32),
    }
    dets = detections_to_coco([s.image_id for s in samples], outputs, geoms, dataset.category_ids)
    gt = {a["id"]: a for a in dataset.subset([0, 1, 2]).to_coco()["annotations"]}
    assert len(dets) == len(gt)
    for d, a in zip(dets, gt.values(), strict=True):
        assert d["image_id"] == a["image_id"] and d["category_id"] == a["category_id"]
        np.testing.assert_allclose(d["bbox"], a["bbox"], atol=2e-3)


def _gt_outputs(samples, geoms, *, shift=0.0, class_offset=0, n_classes=4):
    """Signature-style outputs whose detections are the images' ground-truth boxes, the
    first one scored highest (optionally shifted by ``shift`` box widths, or relabelled)."""
    n = max(len(s.boxes) for s in samples)
    boxes = np.zeros((len(samples), n, 4), np.float32)
    classes = np.zeros((len(samples), n), np.float32)
    scores = np.zeros((len(samples), n), np.float32)
    for i, (s, g) in enumerate(zip(samples, geoms, strict=True)):
        b = s.boxes.copy()
        b[:, [1, 3]] += shift * (b[:, 3] - b[:, 1])[:, None]
        y = (b[:, [0, 2]] * g.scale_y + g.pad_y) / g.input_height
        x = (b[:, [1, 3]] * g.scale_x + g.pad_x) / g.input_width
        boxes[i, : len(b)] = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1)
        classes[i, : len(b)] = (s.classes + class_offset) % n_classes
        scores[i, : len(b)] = np.linspace(0.9, 0.5, len(b))
    counts = np.array([len(s.boxes) for s in samples], np.float32)
    return {
        "detection_boxes": boxes,
        "detection_scores": scores,
        "detection_classes": classes,
        "num_detections": counts,
    }


def test_top_detection_hits_pair_one_outcome_per_image(dataset):
    """The parity gate's per-image outcome: the top detection on an object of its class."""
    spec = PreprocessSpec(height=64, width=64, geometry="letterbox")
    geoms = [preprocess_pixels(s.load_pixels(), spec)[1] for s in dataset.samples]
    n_classes = len(dataset.labels)
    right = top_detection_hits(_gt_outputs(dataset.samples, geoms), dataset, geoms)
    assert right.shape == (len(dataset),) and right.all()
    slight = _gt_outputs(dataset.samples, geoms, shift=0.15)  # IoU 0.74
    assert top_detection_hits(slight, dataset, geoms).all()
    far = _gt_outputs(dataset.samples, geoms, shift=1.5)
    assert not top_detection_hits(far, dataset, geoms).any()
    relabelled = _gt_outputs(dataset.samples, geoms, class_offset=1, n_classes=n_classes)
    assert not top_detection_hits(relabelled, dataset, geoms).any()
    # No detections on the first image: a miss there, hits elsewhere.
    outputs = _gt_outputs(dataset.samples, geoms)
    outputs["num_detections"][0] = 0
    hits = top_detection_hits(outputs, dataset, geoms)
    assert not hits[0] and hits[1:].all()
