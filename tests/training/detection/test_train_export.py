"""Training end to end at a tiny size: the loss falls, BN parity, export -> reload -> same
outputs; then the exported detector's calibration on captured traffic (published, rejected)."""

from __future__ import annotations

import argparse
import json
import shutil
import uuid

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from calibration.capture_store import SampleStore
from calibration.cli import add_calibrate_arguments, run_calibrate
from calibration.config import CalibrationConfig
from calibration.dispatch import calibrate
from contract.model_card import load_model_card
from contract.preprocessing import PreprocessSpec, preprocess_pixels
from contract.repository import ModelRepository
from serving.app import create_app
from tests.helpers.gateway import settings_for
from tests.helpers.photo_coco import write_photo_coco
from tests.helpers.photos import photo_sized_image_bytes
from tests.helpers.problems import Capture
from training.detection import cli as cli_module
from training.detection.anchors import AnchorConfig, generate_anchors, num_anchors
from training.detection.augment import NO_AUGMENT, to_model_input
from training.detection.cli import add_detector_arguments, run_detector
from training.detection.config import PRESETS, DetectorTrainConfig
from training.detection.data import SyntheticConfig, load_coco, write_synthetic_coco
from training.detection.evaluate import predict, preprocess_images
from training.detection.pipeline import encode_example
from training.detection.postprocess import OUTPUT_KEYS
from training.detection.train import ParityError, train_detector

pytestmark = pytest.mark.slow


#: Large shapes, one or two an image, no clutter: a detector that learns them in a
#: test's time scores well enough (mAP@.5 about 0.25) for calibration's mAP gate to mean
#: something; the default synthetic set needs the demo preset's 2000 steps.
EASY = SyntheticConfig(min_objects=1, max_objects=2, min_radius=0.15, max_radius=0.3, max_clutter=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    data = tmp_path_factory.mktemp("data")
    train_json = write_synthetic_coco(data / "train", 160, seed=0, config=EASY)
    # Held out, split into validation (early stopping) and test (card, parity, reference set).
    val_json = write_synthetic_coco(data / "val", 96, seed=1, config=EASY)
    cfg = DetectorTrainConfig(
        **{
            **PRESETS["tiny"],
            "data": str(train_json),
            "val_data": str(val_json),
            "epochs": 25,
            "batch_size": 16,
            "learning_rate": 5e-3,
            "augment": False,  # a fixed tiny set: the loss must fall fast
            "model_base": str(base),
            "name": "tiny_detector",
            # A barely trained model scores low: keep its detections so outputs can be compared.
            "score_threshold": 0.001,
            "max_detections": 20,
            "verbose": False,
        }
    )
    summary = train_detector(cfg)
    return cfg, summary, base, data


def test_loss_falls_on_a_tiny_set(trained):
    _, summary, _, _ = trained
    losses = [row["loss"] for row in summary["history"]]
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(later < earlier for earlier, later in zip(losses[::3], losses[3::3], strict=False))
    assert summary["parity"]["passed"]


def test_exported_signature_equals_the_in_memory_model(trained):
    cfg, summary, base, data = trained
    version_dir = base / "tiny_detector" / "1"
    card = load_model_card(version_dir)
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    val = load_coco(data / "val" / "annotations.json")
    x, _ = preprocess_images(val.load_images()[:5], spec)  # batch > 1
    loaded = tf.saved_model.load(str(version_dir))
    sig = loaded.signatures["serving_default"]
    out = {k: v.numpy() for k, v in sig(images=tf.constant(x)).items()}
    assert set(out) == {*OUTPUT_KEYS, "bn_input_mean", "bn_input_sqmean"}
    ref = predict(summary["model"], summary["postprocess"], x, batch_size=5)
    assert out["detection_boxes"].shape == (5, 20, 4)
    assert out["num_detections"].sum() > 0
    np.testing.assert_array_equal(out["num_detections"], ref["num_detections"])
    np.testing.assert_array_equal(out["detection_classes"], ref["detection_classes"])
    np.testing.assert_allclose(out["detection_scores"], ref["detection_scores"], atol=1e-5)
    np.testing.assert_allclose(out["detection_boxes"], ref["detection_boxes"], atol=1e-5)
    # One image alone gives the same detections as inside the batch.
    single = {k: v.numpy() for k, v in sig(images=tf.constant(x[2:3])).items()}
    np.testing.assert_allclose(single["detection_boxes"][0], out["detection_boxes"][2], atol=1e-5)
    assert out["bn_input_mean"].shape == (5, card["bn_reference"]["total_channels"])


def test_training_mode_outputs_come_back_in_input_order_when_batches_are_shuffled(trained):
    """The parity pass shuffles images into i.i.d. batches; its outputs must line up
    with the input images again. One batch of all images has the same batch statistics
    in any order, so shuffled and plain outputs must match image by image."""
    cfg, summary, base, data = trained
    spec = PreprocessSpec.from_dict(load_model_card(base / "tiny_detector" / "1")["preprocessing"])
    x, _ = preprocess_images(load_coco(data / "val" / "annotations.json").load_images()[:8], spec)
    model, post = summary["model"], summary["postprocess"]
    plain = predict(model, post, x, training=True, batch_size=8)
    shuffled = predict(model, post, x, training=True, batch_size=8, shuffle_seed=3)
    assert shuffled["num_detections"].sum() > 0
    np.testing.assert_array_equal(shuffled["num_detections"], plain["num_detections"])
    np.testing.assert_allclose(shuffled["detection_scores"], plain["detection_scores"], atol=1e-4)


def test_parity_pairs_per_image_top_detections_and_refuses_stale_statistics(trained):
    """The gate pairs each held-out image's top detection in both BN modes; with the
    moving statistics of an untrained network (Keras's initial 0 / 1) the same model
    is refused."""
    from contract import bn
    from training.detection.evaluate import PAIRED_ON, detection_parity

    cfg, summary, base, data = trained
    p = summary["parity"]
    assert p["paired_on"] == PAIRED_ON and p["images"] == summary["test_images"] > 0
    assert p["discordant"]["training_only"] + p["discordant"]["inference_only"] <= p["images"]
    assert p["interval"][0] <= p["gap"] <= p["interval"][1] and p["decision"] == "pass"
    card = load_model_card(base / "tiny_detector" / "1")
    assert card["metrics"]["parity"]["p_value"] == p["p_value"]
    assert card["metrics"]["splits"]["map_50"] == card["metrics"]["splits"]["parity"] == "test"
    assert card["metrics"]["test_images"] == summary["test_images"]
    model, post = summary["model"], summary["postprocess"]
    val = load_coco(data / "val" / "annotations.json")
    layers = bn.bn_layers(model)
    saved = [(lyr.moving_mean.numpy(), lyr.moving_variance.numpy()) for lyr in layers]
    try:
        for lyr in layers:
            lyr.moving_mean.assign(np.zeros_like(lyr.moving_mean.numpy()))
            lyr.moving_variance.assign(np.ones_like(lyr.moving_variance.numpy()))
        stale, _, _ = detection_parity(
            model, post, val, cfg.spec, images=val.load_images(), tolerance=cfg.max_parity_gap
        )
    finally:
        for lyr, (mean, var) in zip(layers, saved, strict=True):
            lyr.moving_mean.assign(mean)
            lyr.moving_variance.assign(var)
    assert not stale.passed and stale.decision == "refused: gap", stale.to_dict()
    assert stale.training_metric == pytest.approx(p["training_mode"], abs=0.15)


def test_model_card_and_models_config(trained):
    cfg, summary, base, _ = trained
    card = load_model_card(base / "tiny_detector" / "1")
    assert card["task"] == "detection"
    assert card["labels"] == ["circle", "square", "triangle", "cross"]
    det = card["detection"]
    assert det["anchors"]["strides"] == [8, 16, 32]
    anchors = AnchorConfig.from_dict(det["anchors"])
    assert det["anchors"]["count"] == num_anchors(
        anchors, card["input"]["height"], card["input"]["width"]
    )
    assert det["nms"]["iou_threshold"] == cfg.nms_iou and det["nms"]["score_threshold"] == 0.001
    assert det["nms"]["max_detections"] == 20
    assert det["box_variances"] == [0.1, 0.1, 0.2, 0.2]
    m = card["metrics"]
    assert m["map_50_95"] == pytest.approx(summary["map_50_95"])
    assert set(m["per_class_ap"]) == set(card["labels"])
    assert m["parity"]["passed"] is True
    assert card["preprocessing"]["geometry"] == "letterbox"
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((base / "models.config").read_text(), config)
    entry = {c.name: c for c in config.model_config_list.config}["tiny_detector"]
    assert entry.version_labels["stable"] == 1
    json.dumps(card, allow_nan=False)


def test_the_gateway_serves_the_training_input_path_for_photo_sized_images(trained, tmp_path):
    """The exported card decodes photo-sized; the real gateway, configured from it, feeds the
    model the tensors the training input path made (12 MP EXIF JPEG, 1920x1080 PNG, 16-bit
    TIFF) and maps the model's boxes back by the geometry training mapped the ground truth in."""
    cfg, _, base, _ = trained
    spec = PreprocessSpec.from_dict(load_model_card(base / "tiny_detector" / "1")["preprocessing"])
    assert spec == cfg.spec and spec.decode_oversample == 2.0
    photos = photo_sized_image_bytes()
    dataset, images = load_coco(write_photo_coco(tmp_path, photos)).decode_usable(spec)
    anchors = generate_anchors(cfg.anchor_config, spec.height, spec.width)
    app = create_app(settings_for("embedded", base))
    service = app.extensions["imgserve"]
    capture = Capture()
    service.add_observer(capture)
    client = app.test_client()
    try:
        for image, sample, data in zip(images, dataset.samples, photos.values(), strict=True):
            response = client.post(
                "/v1/detect?model=tiny_detector&score_threshold=0",
                data=data,
                content_type="application/octet-stream",
            )
            assert response.status_code == 200, response.get_json()
            served = capture.events[-1]
            example = encode_example(
                image,
                sample.boxes,
                sample.classes,
                spec=spec,
                anchors=anchors,
                match=cfg.match_config,
                augment_config=NO_AUGMENT,
                rng=np.random.default_rng(0),
            )
            assert np.array_equal(served.inputs[0], example.x), sample.path.name
            _, _, geometry = to_model_input(image, sample.boxes, spec)
            prediction = response.get_json()["predictions"][0]
            assert (prediction["width"], prediction["height"]) == (sample.width, sample.height)
            n = int(served.outputs["num_detections"][0])
            scores = served.outputs["detection_scores"][0, :n]
            order = np.argsort(-scores, kind="stable")
            want = geometry.boxes_to_original(served.outputs["detection_boxes"][0, :n][order])
            got = [
                [d["box"][k] for k in ("ymin", "xmin", "ymax", "xmax")]
                for d in prediction["detections"]
            ]
            assert len(got) == n > 0
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    finally:
        service.remove_observer(capture)
        service.close()
    assert len(capture.events) == len(photos)


def test_a_refused_export_prints_the_run_and_exits_3(trained, tmp_path, monkeypatch, capsys):
    """The command line shows the figures the gate judged before it exits 3.

    The refusal is raised in place of a second training (80 s), with the real run's
    summary on it, as ``train_detector`` attaches it.
    """
    _, summary, _, _ = trained
    judged = {
        k: v
        for k, v in summary.items()
        if k not in ("model", "postprocess", "exported", "version", "saved_model_bytes")
    }

    def refuse(cfg):
        exc = ParityError("parity check failed: inference-mode mAP@.5 0.100 vs training-mode 0.400")
        exc.summary = judged
        raise exc

    monkeypatch.setattr(cli_module, "train_detector", refuse)
    parser = argparse.ArgumentParser()
    add_detector_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        run_detector(parser.parse_args(["--name", "d", "--model-base", str(tmp_path)]))
    assert exc.value.code == 3
    out, err = capsys.readouterr()
    assert "== summary ==" in out
    assert f"mAP@.5 {summary['map_50']:.4f}" in out and "exported:" not in out
    assert "parity check failed" in err
    assert not any(tmp_path.iterdir())


# -- calibration of the exported detector ---------------------------------------


def _capture_traffic(store_dir, spec: PreprocessSpec, images) -> None:
    """One-image detect requests through the capture store (detections carry no class)."""
    store = SampleStore(store_dir, rate=1.0)
    for pixels in images:
        x, _ = preprocess_pixels(pixels, spec)
        store.capture("tiny_detector", 1, str(uuid.uuid4()), x[None], None, force=True)


def _fresh(base, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(base, copy)  # the module's repository is shared: never mutate it
    return copy


def test_calibration_on_its_own_domain_publishes_a_detector_with_a_reference_set(trained, tmp_path):
    _, _, base, _ = trained
    base = _fresh(base, tmp_path)
    card = load_model_card(base / "tiny_detector" / "1")
    test_images = card["metrics"]["test_images"]
    assert card["reference_set"]["images"] == test_images > 30
    assert card["reference_set"]["boxes"] > test_images
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    traffic = load_coco(write_synthetic_coco(tmp_path / "traffic", 128, seed=7, config=EASY))
    _capture_traffic(tmp_path / "samples", spec, traffic.load_images())
    result = calibrate(
        CalibrationConfig(
            model_base=base,
            name="tiny_detector",
            samples_dir=tmp_path / "samples",
            prior_strength="auto",
        )
    )
    checks = {c.name: c for c in result.checks}
    assert result.status == "published", result.reasons
    assert result.version == 2 and result.labels_moved == {"canary": 2}
    assert ModelRepository(base).labels("tiny_detector") == {"stable": 1, "canary": 2}
    ref = checks["map_reference"]
    assert ref.gating and ref.passed
    parent_map = ref.details["parent"]["map_50_95"]
    assert parent_map == pytest.approx(card["metrics"]["map_50_95"], abs=0.05) and parent_map > 0.05
    assert ref.details["candidate"]["map_50_95"] >= parent_map - 0.02
    parity = checks["parity"]
    # This small model is rarely sure of a box: parity is judged when 10 are >= 0.5.
    assert parity.gating == (parity.details["training_mode_boxes"] >= 10)
    assert parity.passed and parity.details["confident_score"] == 0.5
    assert {"class_balance", "detects_objects", "drift", "statistics_converged"} <= set(checks)
    assert all(c.passed for c in result.checks if c.gating)
    # The new version ships the same reference set and serves detections.
    new = base / "tiny_detector" / "2"
    assert (new / "assets.extra" / "reference_set.npz").read_bytes() == (
        base / "tiny_detector" / "1" / "assets.extra" / "reference_set.npz"
    ).read_bytes()
    new_card = load_model_card(new)
    assert new_card["task"] == "detection" and new_card["detection"] == card["detection"]
    assert new_card["lineage"]["parent_version"] == 1
    assert new_card["lineage"]["method"] == "adabn-precise-bn"
    assert new_card["lineage"]["gate"]["passed"] is True
    assert new_card["metrics"]["map_50_95"] == ref.details["candidate"]["map_50_95"]
    x, _ = preprocess_images(traffic.load_images()[:4], spec)
    out = tf.saved_model.load(str(new)).signatures["serving_default"](images=tf.constant(x))
    assert int(out["num_detections"].numpy().sum()) > 0


def test_calibration_of_a_detector_on_noise_images_is_rejected(trained, tmp_path):
    _, _, base, _ = trained
    base = _fresh(base, tmp_path)
    spec = PreprocessSpec.from_dict(load_model_card(base / "tiny_detector" / "1")["preprocessing"])
    rng = np.random.default_rng(3)
    _capture_traffic(
        tmp_path / "samples", spec, rng.integers(0, 256, (96, 120, 130, 3), dtype=np.uint8)
    )
    config = (base / "models.config").read_bytes()
    result = calibrate(
        CalibrationConfig(
            model_base=base,
            name="tiny_detector",
            samples_dir=tmp_path / "samples",
            prior_strength="auto",
        )
    )
    assert result.status == "rejected" and result.reasons
    failed = {c.name for c in result.checks if c.gating and not c.passed}
    # The mix that keeps the reference mAP finds no objects in noise; a mix that
    # finds some has lost the reference mAP, or (one fresh-clone run: this tiny model
    # "found" objects in noise under a mix within tolerance) leaves the noise above the
    # drift alarm. Which fails depends on the mix chosen; this small model, trained
    # anew each run, does not decide it reliably.
    assert failed & {"detects_objects", "map_reference", "drift"}, [
        c.to_dict() for c in result.checks
    ]
    assert (base / "models.config").read_bytes() == config
    assert ModelRepository(base).versions("tiny_detector") == [1]
    kept = base / "tiny_detector" / "rejected" / "2"
    assert result.path == kept and (kept / "assets.extra" / "rejection.json").exists()


def test_a_detector_without_a_reference_set_is_refused_from_the_command_line(
    trained, tmp_path, capsys
):
    """Versions exported before detectors shipped one: a usage error (exit 5), nothing written."""
    _, _, base, _ = trained
    base = _fresh(base, tmp_path)
    (base / "tiny_detector" / "1" / "assets.extra" / "reference_set.npz").unlink()
    config = (base / "models.config").read_bytes()
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    args = parser.parse_args(
        ["--model-base", str(base), "--name", "tiny_detector", "--samples", str(tmp_path / "s")]
    )
    assert run_calibrate(args) == 5
    assert "ships no reference set" in capsys.readouterr().err
    assert (base / "models.config").read_bytes() == config
    assert sorted(p.name for p in (base / "tiny_detector").iterdir()) == ["1"]
