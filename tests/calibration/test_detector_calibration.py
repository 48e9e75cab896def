"""Calibration of the kept demo detector on shifted traffic with box feedback, end to end.

Traffic goes through the real capture store with its geometry, box feedback
through ``record_box_feedback`` (original pixels, as a client sends it); the
calibration publishes or rejects through ``calibration.dispatch.calibrate``.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from calibration.capture_store import SampleStore
from calibration.config import CalibrationConfig
from calibration.dispatch import calibrate
from calibration.feedback import record_box_feedback
from contract.model_card import load_model_card
from contract.preprocessing import PreprocessSpec, preprocess_pixels
from contract.repository import ModelRepository
from training.detection.data import load_coco, write_synthetic_coco
from training.synthetic import corrupt

pytestmark = pytest.mark.slow

MODELS = Path(__file__).resolve().parents[2] / "models"
NAME = "demo_detector"
SHIFT = "contrast*0.5+noise_sigma0.1"
BOX_CHECKS = {"feedback_class_balance", "feedback_agreement", "map_traffic"}


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """80 shifted synthetic images and their ground truth (original pixels)."""
    drawn = load_coco(write_synthetic_coco(tmp_path_factory.mktemp("traffic"), 80, seed=11))
    rng = np.random.default_rng(5)
    return drawn, [corrupt(SHIFT, p, rng) for p in drawn.load_images()]


def _repository(tmp_path: Path) -> Path:
    base = tmp_path / "models"
    shutil.copytree(MODELS, base, ignore=shutil.ignore_patterns("rejected", ".*"))
    return base


def _capture(base: Path, samples: Path, traffic, boxed: int, garbage: bool = False) -> None:
    """One-image detect requests; box feedback on the first ``boxed`` of them."""
    drawn, images = traffic
    spec = PreprocessSpec.from_dict(load_model_card(base / NAME / "1")["preprocessing"])
    store = SampleStore(samples, rate=1.0)
    labels = drawn.labels
    rng = np.random.default_rng(0)
    for i, (sample, pixels) in enumerate(zip(drawn.samples, images, strict=True)):
        x, geom = preprocess_pixels(pixels, spec)
        rid = str(uuid.uuid4())
        store.capture(NAME, 1, rid, x[None], None, force=True, geometry=[geom], task="detection")
        if i >= boxed:
            continue
        if garbage:  # random boxes, one class everywhere
            h, w = pixels.shape[:2]
            y, x0 = rng.uniform(0, 0.6, 2) * (h, w)
            objects = [{"label": labels[0], "box": [y, x0, y + 0.3 * h, x0 + 0.3 * w]}]
        else:
            objects = [
                {"label": labels[int(c)], "box": [float(v) for v in b]}
                for b, c in zip(sample.boxes, sample.classes, strict=True)
            ]
        record_box_feedback(samples, rid, [objects], model=NAME, allowed=labels)


def _config(base: Path, samples: Path, **kw) -> CalibrationConfig:
    options = {"prior_strength": 0.0, "fine_tune_epochs": 2, "fine_tune_learning_rate": 1e-3}
    return CalibrationConfig(
        model_base=base,
        name=NAME,
        samples_dir=samples,
        min_fine_tune_labels=32,
        **{**options, **kw},
    )


def test_box_feedback_fine_tunes_and_publishes_a_better_detector_on_the_traffic(traffic, tmp_path):
    base, samples = _repository(tmp_path), tmp_path / "samples"
    _capture(base, samples, traffic, boxed=80)
    result = calibrate(_config(base, samples, prior_strength="auto"))
    checks = {c.name: c for c in result.checks}
    assert result.status == "published", result.reasons
    # The weights learn the traffic: the statistics are those that serve the source best.
    best = max(result.prior_search, key=lambda t: (t["reference_map_50_95"], -t["source_weight"]))
    assert result.prior_strength == best["prior_strength"] and best["source_weight"] > 0
    assert ModelRepository(base).labels(NAME) == {"stable": 1, "canary": 2}
    assert set(checks) >= BOX_CHECKS and all(checks[n].gating for n in BOX_CHECKS)
    held = checks["map_traffic"].details
    assert held["candidate"]["map_50_95"] > held["parent"]["map_50_95"]
    assert result.accuracy["traffic"]["candidate"] == held["candidate"]
    lineage = load_model_card(base / NAME / "2")["lineage"]
    assert lineage["method"] == "adabn-precise-bn+box-feedback-fine-tune"
    fine_tune = lineage["fine_tune"]
    assert fine_tune["ran"] and fine_tune["epochs"] == 2 and len(fine_tune["loss_by_epoch"]) == 2
    assert fine_tune["weight_mix"] == CalibrationConfig.fine_tune_weight_mix < 1
    assert fine_tune["feedback_images"] + fine_tune["held_out_images"] == 80
    assert fine_tune["held_out_images"] == held["images"] == result.samples["held_out"]
    assert fine_tune["held_out_map_50_95"]["candidate"] == held["candidate"]["map_50_95"]
    assert fine_tune["reference_images"] == 200 and fine_tune["positive_anchors"] > 0
    assert lineage["samples"]["box_labelled"] == 80


def test_garbage_box_feedback_is_rejected_and_nothing_is_published(traffic, tmp_path):
    base, samples = _repository(tmp_path), tmp_path / "samples"
    _capture(base, samples, traffic, boxed=80, garbage=True)
    config = (base / "models.config").read_bytes()
    result = calibrate(_config(base, samples))
    failed = {c.name for c in result.checks if c.gating and not c.passed}
    assert result.status == "rejected"
    assert {"feedback_class_balance", "feedback_agreement"} <= failed, result.reasons
    assert (base / "models.config").read_bytes() == config
    assert ModelRepository(base).versions(NAME) == [1]
    assert ModelRepository(base).labels(NAME) == {"stable": 1}


def test_too_few_box_labels_keep_the_statistics_only_path(traffic, tmp_path):
    base, samples = _repository(tmp_path), tmp_path / "samples"
    _capture(base, samples, traffic, boxed=10)
    result = calibrate(_config(base, samples))
    names = [c.name for c in result.checks]
    assert not BOX_CHECKS & set(names)
    assert names[:2] == ["class_balance", "map_reference"]
    assert next(c for c in result.checks if c.name == "map_reference").gating
    assert "traffic" not in result.accuracy and result.samples["box_labelled"] == 10
    card_dir = result.path
    lineage = load_model_card(card_dir)["lineage"]
    assert lineage["method"] == "adabn-precise-bn"
    assert lineage["fine_tune"] == {"ran": False, "why_not": "10 box-labelled samples (< 32)"}
