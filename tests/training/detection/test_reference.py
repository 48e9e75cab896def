"""The detector's shipped reference set: boxes mapped into model-input pixels, scored by COCO."""

from __future__ import annotations

import io

import numpy as np
import pytest

from calibration.detector_gate import _as_ground_truth, confident_score
from contract.preprocessing import PreprocessSpec, preprocess_pixels
from training.detection.data import load_coco, write_synthetic_coco
from training.detection.reference import (
    describe,
    load_reference_set,
    reference_set_bytes,
    score_outputs,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = load_coco(write_synthetic_coco(tmp_path_factory.mktemp("coco"), 10, seed=5))
    return ds, ds.load_images()


def _perfect_outputs(ref, max_det: int = 10, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Signature-style outputs that reproduce the reference set's own boxes."""
    h, w = ref.x.shape[1:3]
    n = len(ref)
    out = {
        "detection_boxes": np.zeros((n, max_det, 4), np.float32),
        "detection_scores": np.zeros((n, max_det), np.float32),
        "detection_classes": np.zeros((n, max_det), np.float32),
        "num_detections": np.zeros(n, np.float32),
    }
    for i, s in enumerate(ref.dataset.samples):
        k = len(s.boxes)
        boxes = s.boxes / np.array([h, w, h, w], np.float32)
        boxes[:, [1, 3]] += shift * (boxes[:, 3:4] - boxes[:, 1:2])
        out["detection_boxes"][i, :k] = boxes
        out["detection_scores"][i, :k] = 0.9
        out["detection_classes"][i, :k] = s.classes
        out["num_detections"][i] = k
    return out


@pytest.mark.parametrize("geometry", ["letterbox", "stretch"])
def test_boxes_map_into_the_input_and_back(dataset, geometry):
    ds, images = dataset
    spec = PreprocessSpec(height=64, width=48, geometry=geometry)
    for sample, pixels in zip(ds.samples[:4], images[:4], strict=True):
        _, geom = preprocess_pixels(pixels, spec)
        inside = geom.boxes_to_input(sample.boxes)
        assert (inside >= -1e-6).all() and (inside[:, [0, 2]] <= 64 + 1e-6).all()
        normalised = inside / np.array([64, 48, 64, 48])
        np.testing.assert_allclose(geom.boxes_to_original(normalised), sample.boxes, atol=1e-4)


def test_a_written_reference_set_reads_back_and_scores_its_own_boxes_as_one(tmp_path, dataset):
    ds, images = dataset
    spec = PreprocessSpec(height=64, width=64, geometry="letterbox")
    blob = reference_set_bytes(ds, images, spec, count=6, seed=1)
    path = tmp_path / "reference_set.npz"
    path.write_bytes(blob)
    ref = load_reference_set(path, spec, ds.labels)
    assert ref.x.shape == (6, 64, 64, 3) and ref.x.dtype == np.float32
    # The pixels are what serving feeds the model: the spec's preprocessing of the image.
    with np.load(io.BytesIO(blob)) as arrays:
        chosen = sorted(np.random.default_rng(1).permutation(len(ds))[:6])
        served, _ = preprocess_pixels(images[chosen[0]], spec)
        np.testing.assert_array_equal(ref.x[0], served)
        assert len(arrays["boxes"]) == sum(len(ds.samples[i].boxes) for i in chosen)
    card = describe(blob)
    assert card["images"] == 6 and card["boxes"] == ref.dataset.num_boxes() > 0
    perfect = score_outputs(_perfect_outputs(ref), ref.dataset)
    assert perfect.map_50_95 == pytest.approx(1.0) and perfect.images == 6
    shifted = score_outputs(_perfect_outputs(ref, shift=0.15), ref.dataset)
    assert shifted.map_50 == pytest.approx(1.0) and shifted.map_50_95 < 0.9
    with pytest.raises(ValueError, match="categories"):
        load_reference_set(path, spec, ds.labels[:-1])


def test_confident_detections_become_the_parity_checks_ground_truth(tmp_path, dataset):
    ds, images = dataset
    spec = PreprocessSpec(height=64, width=64)
    path = tmp_path / "reference_set.npz"
    path.write_bytes(reference_set_bytes(ds, images, spec, count=5))
    ref = load_reference_set(path, spec, ds.labels)
    outputs = _perfect_outputs(ref)
    outputs["detection_scores"][:, 0] = 0.2  # each image's first box is not confident
    truth = _as_ground_truth(outputs, (64, 64), ds.labels, min_score=0.5)
    assert truth.num_boxes() == ref.dataset.num_boxes() - 5
    # Inference-mode outputs equal to training mode's agree fully; dropping them does not.
    assert score_outputs(outputs, truth).map_50 == pytest.approx(1.0)
    nothing = {**outputs, "num_detections": np.zeros(5, np.float32)}
    assert score_outputs(nothing, truth).map_50 == 0.0


def test_confident_means_half_or_what_a_weak_detector_reaches():
    def outputs(best):
        return {"detection_scores": np.array([[b, 0.01] for b in best], np.float32)}

    assert confident_score(outputs([0.9, 0.95, 0.7])) == 0.5
    assert confident_score(outputs([0.3, 0.2, 0.9])) == pytest.approx(0.3)
