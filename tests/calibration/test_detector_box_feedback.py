"""Box feedback for detector calibration, on arrays: targets, the split, the box checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from calibration.config import CalibrationConfig
from calibration.detector import drift_after_fine_tuning
from calibration.detector_fine_tune import (
    anchor_targets,
    collect_box_feedback,
    why_not_fine_tuned,
)
from calibration.detector_gate import (
    MIN_FEEDBACK_AGREEMENT,
    feedback_agreement_check,
    feedback_class_balance_check,
    map_reference_check,
    map_traffic_check,
)
from calibration.gate import GateCheck
from calibration.traffic import TrafficSplit
from training.detection.anchors import AnchorConfig, generate_anchors
from training.detection.boxes import decode_boxes
from training.detection.evaluate import DetectionMetrics
from training.detection.matching import MatchConfig

LABELS = ["circle", "square", "triangle", "cross"]


@dataclass(frozen=True)
class Box:
    """A box label as the sample set carries it (class name, model-input pixels)."""

    label: str
    box: tuple[float, float, float, float]


def _split(n: int, held: list[int]) -> TrafficSplit:
    holdout = np.zeros(n, bool)
    holdout[held] = True
    return TrafficSplit(np.linspace(0, 1, n, endpoint=False), holdout, ~holdout, holdout)


def _metrics(map_50_95: float, map_50: float, images: int = 20) -> DetectionMetrics:
    return DetectionMetrics(map_50_95, map_50, map_50_95, {}, images, 100)


def test_box_feedback_keeps_labelled_images_in_order_with_their_side_of_the_split():
    objects = [
        (Box("square", (10, 20, 50, 60)),),
        None,
        (),  # labelled: no objects in this image
        (Box("cross", (0, 0, 30, 30)), Box("unicorn", (5, 5, 9, 9))),
    ]
    boxes = collect_box_feedback(objects, LABELS, (128, 128), _split(4, [2]))
    assert boxes.index.tolist() == [0, 2, 3]
    assert boxes.fit.tolist() == [True, False, True] and boxes.held.tolist() == [False, True, False]
    assert boxes.unknown_labels == 1
    assert [s.classes.tolist() for s in boxes.dataset.samples] == [[1], [], [3]]
    np.testing.assert_allclose(boxes.dataset.samples[0].boxes, [[10, 20, 50, 60]])
    index, held = boxes.part(boxes.held)
    assert index.tolist() == [2] and len(held) == 1 and held.num_boxes() == 0


def test_anchor_targets_decode_back_to_the_feedback_box():
    anchors = generate_anchors(AnchorConfig(), 128, 128)
    box = (16.0, 32.0, 80.0, 96.0)  # model-input pixels
    boxes = collect_box_feedback([(Box("triangle", box),), ()], LABELS, (128, 128), _split(2, []))
    labels, codes = anchor_targets(boxes.dataset, anchors, MatchConfig())
    assert labels.shape == (2, len(anchors)) and codes.shape == (2, len(anchors), 4)
    positive = labels[0] > 0
    assert positive.any() and set(labels[0][positive].tolist()) == {3}  # class 2 -> label 3
    decoded = decode_boxes(codes[0][positive], anchors[positive]).numpy() * 128
    np.testing.assert_allclose(decoded, np.tile(box, (positive.sum(), 1)), atol=1e-3)
    # An image labelled as empty is all background: it teaches "nothing here".
    assert (labels[1] == 0).all()


def test_fine_tuning_needs_enough_box_labels_on_both_sides_of_the_split():
    config = CalibrationConfig(name="d", samples_dir="s", min_fine_tune_labels=20)
    objects = [(Box("circle", (1, 1, 20, 20)),)] * 40
    enough = collect_box_feedback(objects, LABELS, (128, 128), _split(40, list(range(10))))
    assert why_not_fine_tuned(config, enough) is None
    few = collect_box_feedback(objects[:19], LABELS, (128, 128), _split(19, [0, 1, 2, 3]))
    assert "19 box-labelled samples (< 20)" in why_not_fine_tuned(config, few)
    unjudged = collect_box_feedback(objects, LABELS, (128, 128), _split(40, [0, 1]))
    assert "need 8 on each side" in why_not_fine_tuned(config, unjudged)
    none = collect_box_feedback([None] * 40, LABELS, (128, 128), _split(40, [0]))
    assert why_not_fine_tuned(config, none) == "no box feedback"
    off = CalibrationConfig(name="d", samples_dir="s", fine_tune_epochs=0)
    assert "disabled" in why_not_fine_tuned(off, enough)


def test_feedback_of_one_class_fails_its_balance_check():
    one = feedback_class_balance_check(np.full(50, 2), LABELS, 0.75)
    assert one.gating and not one.passed and "triangle" in one.reason
    mixed = feedback_class_balance_check(np.arange(48) % 4, LABELS, 0.75)
    assert mixed.passed and mixed.details["largest_share"] == 0.25


def test_feedback_the_parent_cannot_find_fails_the_agreement_check():
    reference = _metrics(0.74, 0.95)
    shifted = feedback_agreement_check(_metrics(0.3, 0.5), reference, 300)
    assert shifted.gating and shifted.passed
    floor = MIN_FEEDBACK_AGREEMENT * 0.95
    garbage = feedback_agreement_check(_metrics(0.01, floor - 0.01), reference, 300)
    assert garbage.gating and not garbage.passed and "finds almost none" in garbage.reason


def test_traffic_map_must_improve_strictly():
    parent = _metrics(0.32, 0.5)
    assert map_traffic_check(parent, _metrics(0.45, 0.68), 80).passed
    same = map_traffic_check(parent, _metrics(0.32, 0.55), 80)
    assert same.gating and not same.passed


@pytest.mark.parametrize(
    ("box_feedback", "drifted", "gates"),
    [(False, False, True), (False, True, True), (True, False, True), (True, True, False)],
)
def test_reference_map_gates_unless_drifted_traffic_with_boxes_decides(
    box_feedback, drifted, gates
):
    check = map_reference_check(
        _metrics(0.74, 0.95),
        _metrics(0.60, 0.9),
        (200, 800),
        0.02,
        drifted,
        box_feedback=box_feedback,
    )
    assert not check.passed and check.gating is gates


def test_after_fine_tuning_only_the_drift_check_stops_gating():
    drift = GateCheck("drift", False, True, "held-out traffic still drifts", {"images": 20})
    reported = drift_after_fine_tuning(drift)
    assert not reported.passed and not reported.gating
    assert (
        reported.reason.startswith("held-out traffic still drifts")
        and "parent's" in reported.reason
    )
    other = GateCheck("parity", False, True, "modes disagree")
    assert drift_after_fine_tuning(other) is other


@pytest.mark.parametrize("mix", [1.0, 0.5])
def test_fine_tuned_weights_keep_the_weight_mix_of_their_change_then_statistics_follow(mix):
    from calibration.detector_fine_tune import fine_tune_detector
    from contract import bn
    from training.detection.model import DetectorConfig, build_detector

    cfg = DetectorConfig(num_classes=2, image_height=64, image_width=64)
    model = build_detector(cfg, seed=0)
    anchors = generate_anchors(cfg.anchors, 64, 64)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32)
    labels = np.zeros((8, len(anchors)), np.int32)
    labels[:, :5] = 1
    targets = (labels, rng.normal(0, 1, (8, len(anchors), 4)).astype(np.float32))
    parent = [v.numpy() for v in model.trainable_variables if "kernel" in v.path]
    seen = []  # the kernels each time the statistics are collected again

    def reestimate():
        assert not any(layer.trainable for layer in bn.bn_layers(model))
        seen.append([v.numpy() for v in model.trainable_variables if "kernel" in v.path])

    run = fine_tune_detector(
        model, x, targets, epochs=2, learning_rate=1e-2, reestimate=reestimate, weight_mix=mix
    )
    assert run["weight_mix"] == mix and len(run["loss_by_epoch"]) == 2
    assert len(seen) == (2 if mix == 1.0 else 3)  # after each epoch, and after mixing
    tuned, final = seen[1], seen[-1]
    assert any(np.abs(t - p).max() > 1e-4 for t, p in zip(tuned, parent, strict=True))
    for p, t, f in zip(parent, tuned, final, strict=True):
        np.testing.assert_allclose(f, p + mix * (t - p), rtol=1e-5, atol=1e-6)
    assert all(layer.trainable for layer in bn.bn_layers(model))  # flags restored
    with pytest.raises(ValueError, match="weight_mix"):
        fine_tune_detector(
            model, x, targets, epochs=1, learning_rate=1e-3, reestimate=lambda: None, weight_mix=0.0
        )
