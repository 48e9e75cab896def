"""The demo versions kept in the repository still match today's contract.

`make serve` answers from `models/demo_classifier/1` and `models/demo_detector/1` as
committed, without training. They were built by an earlier commit, so this file checks
them against the contract as the code reads it now: the typed card reads them back
exactly, the signature has the contract's inputs and outputs, the warmup records replay,
a real photo goes through the one preprocessing to a sound answer, the Keras copy that
calibration loads still loads, and the reference set matches its card entry. When this
fails after a contract change, rebuild them: `make demo-versions` (about 25 minutes).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from contract import bn
from contract.model_card import (
    KERAS_MODEL_RELPATH,
    MODEL_CARD_RELPATH,
    WARMUP_RELPATH,
    read_model_card,
    validate_model_card,
)
from contract.preprocessing import preprocess_bytes
from tests.helpers.photos import sample_image_bytes

pytestmark = pytest.mark.slow

MODELS = Path(__file__).resolve().parents[2] / "models"
KEPT = {"demo_classifier": "classification", "demo_detector": "detection"}
OUTPUTS = {
    "classification": {"logits", "probabilities", "bn_input_mean", "bn_input_sqmean"},
    "detection": {
        "detection_boxes",
        "detection_scores",
        "detection_classes",
        "num_detections",
        "bn_input_mean",
        "bn_input_sqmean",
    },
}
#: What "small" means for a version kept in git: SavedModel, Keras copy, warmup and
#: reference set together. The demo versions are a few megabytes each.
MAX_VERSION_BYTES = 24 * 1024 * 1024


@pytest.fixture(scope="module", params=sorted(KEPT))
def kept(request):
    version_dir = MODELS / request.param / "1"
    assert (version_dir / "saved_model.pb").is_file(), (
        f"{version_dir} is missing: the demo versions are kept in the repository"
    )
    loaded = tf.saved_model.load(str(version_dir))
    return request.param, version_dir, loaded


def test_the_typed_card_reads_the_kept_card_back_exactly(kept):
    name, version_dir, _ = kept
    raw = json.loads((version_dir / MODEL_CARD_RELPATH).read_text())
    validate_model_card(raw)
    card = read_model_card(version_dir)
    assert card.to_json() == raw  # no field today's card drops or cannot read
    assert (card.name, card.version, card.task) == (name, 1, KEPT[name])
    assert card.metrics.parity.passed


def test_models_config_serves_the_kept_versions():
    config = text_format.Parse(
        (MODELS / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    entries = {e.name: e for e in config.model_config_list.config}
    for name in KEPT:
        assert 1 in entries[name].model_version_policy.specific.versions
        assert entries[name].version_labels["stable"] == 1


def test_signature_has_the_contracts_inputs_and_outputs(kept):
    name, version_dir, loaded = kept
    card = read_model_card(version_dir)
    fn = loaded.signatures["serving_default"]
    (spec,) = fn.structured_input_signature[1].values()
    assert spec.name == "images" and spec.dtype == tf.float32
    assert spec.shape.as_list() == [None, card.input.height, card.input.width, 3]
    assert set(fn.structured_outputs) == OUTPUTS[KEPT[name]]


def test_warmup_records_replay(kept):
    name, version_dir, loaded = kept
    records = list(tf.data.TFRecordDataset(str(version_dir / WARMUP_RELPATH)).as_numpy_iterator())
    assert records
    for rec in records:
        request = prediction_log_pb2.PredictionLog.FromString(rec).predict_log.request
        assert request.model_spec.name == name
        loaded.signatures["serving_default"](
            images=tf.constant(tf.make_ndarray(request.inputs["images"]))
        )


def test_a_real_photo_goes_through_the_one_preprocessing(kept):
    name, version_dir, loaded = kept
    card = read_model_card(version_dir)
    spec = card.preprocess_spec
    photos = sample_image_bytes()
    x = np.stack([preprocess_bytes(data, spec)[0] for data in photos.values()])
    out = {
        k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(x)).items()
    }
    channels = sum(p.channels for p in card.bn_reference.probes)
    assert out["bn_input_mean"].shape == (len(x), channels)
    assert np.all(out["bn_input_sqmean"] >= out["bn_input_mean"] ** 2 - 1e-4)
    if KEPT[name] == "classification":
        probabilities = out["probabilities"]
        assert probabilities.shape == (len(x), len(card.labels))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    else:
        boxes, scores = out["detection_boxes"], out["detection_scores"]
        assert boxes.shape[0] == len(x) and boxes.shape[-1] == 4
        assert np.all((boxes >= 0) & (boxes <= 1)) and np.all((scores >= 0) & (scores <= 1))


def test_calibration_can_load_the_keras_copy(kept):
    _, version_dir, _ = kept
    card = read_model_card(version_dir)
    model = keras.models.load_model(version_dir / KERAS_MODEL_RELPATH, compile=False)
    assert model.input_shape[1:3] == (card.input.height, card.input.width)
    for probe in card.bn_reference.probes:
        layer = bn.probe_layers(model, [probe.name])[0]
        np.testing.assert_allclose(probe.moving_mean, layer.moving_mean.numpy(), rtol=1e-6)


def test_reference_set_matches_its_card_entry_and_the_version_is_small(kept):
    _, version_dir, _ = kept
    card = read_model_card(version_dir)
    ref = np.load(io.BytesIO((version_dir / "assets.extra" / card.reference_set.file).read_bytes()))
    assert ref["pixels"].dtype == np.uint8
    assert ref["pixels"].shape[1:] == (card.input.height, card.input.width, 3)
    assert len(ref["pixels"]) == card.reference_set.images
    size = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file())
    assert size <= MAX_VERSION_BYTES, f"{version_dir} is {size / 2**20:.1f} MiB"
