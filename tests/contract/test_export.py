"""Export contract: signature, probe statistics, model card, versions, configs, warmup."""

from __future__ import annotations

import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from contract import bn
from contract.export import export_model
from contract.model_card import (
    KERAS_MODEL_RELPATH,
    MODEL_CARD_RELPATH,
    WARMUP_RELPATH,
    ModelCardError,
    load_model_card,
    model_card_text,
    read_model_card,
    validate_model_card,
)
from contract.preprocessing import PreprocessSpec, normalize
from contract.repository import ModelRepository
from tests.deploy import tfserving_protos
from tests.deploy.tools import REPO_ROOT
from tests.helpers.photos import PHOTO_CLASSES
from training.classifier import REFERENCE_SET, classifier_postprocess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(model_repo):
    version_dir = model_repo / "tiny_classifier" / "1"
    card = load_model_card(version_dir)
    model = keras.models.load_model(version_dir / KERAS_MODEL_RELPATH, compile=False)
    loaded = tf.saved_model.load(str(version_dir))
    ref = np.load(version_dir / "assets.extra" / REFERENCE_SET)
    x = normalize(ref["pixels"][:16], PreprocessSpec.from_dict(card["preprocessing"]))
    return version_dir, card, model, loaded, x


def test_signature_outputs_equal_the_in_memory_model(exported):
    _, card, model, loaded, x = exported
    sig = loaded.signatures["serving_default"]
    assert list(sig.structured_input_signature[1]) == ["images"]
    out = sig(images=tf.constant(x))
    assert set(out) == {"logits", "probabilities", "bn_input_mean", "bn_input_sqmean"}
    logits = model(x, training=False).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        out["probabilities"].numpy(), tf.nn.softmax(logits).numpy(), atol=1e-5
    )
    assert out["logits"].shape[1] == len(card["labels"])


def test_probe_outputs_equal_direct_probe_statistics(exported):
    _, card, model, loaded, x = exported
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    names = [p["name"] for p in card["bn_reference"]["probes"]]
    inputs = bn.bn_input_model(model, bn.probe_layers(model, names))(x, training=False)
    for probe, t in zip(card["bn_reference"]["probes"], inputs, strict=True):
        t = t.numpy().astype(np.float64)
        sl = slice(probe["offset"], probe["offset"] + probe["channels"])
        np.testing.assert_allclose(
            out["bn_input_mean"].numpy()[:, sl], t.mean((1, 2)), rtol=1e-3, atol=1e-4
        )
        np.testing.assert_allclose(
            out["bn_input_sqmean"].numpy()[:, sl], (t**2).mean((1, 2)), rtol=1e-3, atol=1e-4
        )
    assert out["bn_input_mean"].shape[1] == card["bn_reference"]["total_channels"]


def test_model_card_matches_the_model(exported):
    version_dir, card, model, _, _ = exported
    assert card["name"] == "tiny_classifier" and card["version"] == 1
    assert card["task"] == "classification"
    assert card["labels"] == [name.split(".")[0] for name in sorted(PHOTO_CLASSES)]
    assert card["input"] == {
        "height": 32,
        "width": 32,
        "channels": 3,
        "dtype": "float32",
        "tensor": "images",
    }
    assert PreprocessSpec.from_dict(card["preprocessing"]).height == 32
    for probe in card["bn_reference"]["probes"]:
        layer = bn.probe_layers(model, [probe["name"]])[0]
        np.testing.assert_allclose(probe["moving_mean"], layer.moving_mean.numpy(), rtol=1e-6)
        np.testing.assert_allclose(
            probe["moving_variance"], layer.moving_variance.numpy(), rtol=1e-6
        )
        assert probe["epsilon"] == pytest.approx(layer.epsilon)
    assert card["metrics"]["parity"]["passed"] is True
    assert card["lineage"]["dataset"]["fingerprint"]
    assert card["calibration"]["temperature"] == 1.0
    assert len(card["bn_reference"]["pixel_stats"]["mean"]) == 3
    assert set(card["signature"]["outputs"]) == {
        "logits",
        "probabilities",
        "bn_input_mean",
        "bn_input_sqmean",
    }
    with pytest.raises(ModelCardError):
        validate_model_card({k: v for k, v in card.items() if k != "preprocessing"})
    on_disk = json.loads((version_dir / MODEL_CARD_RELPATH).read_text())
    assert on_disk == card


def test_the_typed_card_reads_the_exported_card_back_exactly(exported):
    version_dir, card, model, _, _ = exported
    typed = read_model_card(version_dir)
    assert typed.to_json() == card
    assert model_card_text(typed) == (version_dir / MODEL_CARD_RELPATH).read_text()
    assert typed.bn_reference.probe_names == [p["name"] for p in card["bn_reference"]["probes"]]
    assert typed.input.height == model.input_shape[1]


def test_warmup_records_parse_as_prediction_logs(exported):
    version_dir, card, _, loaded, _ = exported
    records = list(tf.data.TFRecordDataset(str(version_dir / WARMUP_RELPATH)).as_numpy_iterator())
    assert len(records) == 2
    for rec in records:
        log = prediction_log_pb2.PredictionLog.FromString(rec)
        req = log.predict_log.request
        assert req.model_spec.name == "tiny_classifier"
        assert req.model_spec.signature_name == "serving_default"
        x = tf.make_ndarray(req.inputs["images"])
        assert x.shape[1:] == (32, 32, 3)
        loaded.signatures["serving_default"](images=tf.constant(x))  # replayable


def test_configs_parse_with_the_tf_serving_protos(model_repo):
    config = ModelRepository(model_repo).read_config()
    entry = config.model_config_list.config[0]
    assert entry.name == "tiny_classifier" and entry.base_path == "/models/tiny_classifier"
    assert dict(entry.version_labels) == {"stable": 1}
    assert list(entry.model_version_policy.specific.versions) == [1]
    for name, proto in [
        ("models.config", model_server_config_pb2.ModelServerConfig()),
        ("monitoring.config", tfserving_protos.MonitoringConfig()),
        ("batching.config", tfserving_protos.BatchingParameters()),
    ]:
        text_format.Parse((REPO_ROOT / "models" / name).read_text(), proto)
    assert proto.max_batch_size.value > 0
    monitoring = text_format.Parse(
        (REPO_ROOT / "models" / "monitoring.config").read_text(),
        tfserving_protos.MonitoringConfig(),
    )
    assert monitoring.prometheus_config.enable and monitoring.prometheus_config.path
    with pytest.raises(text_format.ParseError):
        text_format.Parse("bogus_field: 1", tfserving_protos.BatchingParameters())


def test_second_export_is_version_2_and_leaves_version_1_untouched(model_repo, tmp_path, exported):
    version_dir, card, model, _, x = exported
    import shutil

    base = tmp_path / "repo"
    shutil.copytree(model_repo, base)
    v1 = base / "tiny_classifier" / "1"
    before = {p.relative_to(v1): p.read_bytes() for p in v1.rglob("*") if p.is_file()}
    result = export_model(
        model,
        model_base=base,
        name="tiny_classifier",
        task="classification",
        spec=PreprocessSpec.from_dict(card["preprocessing"]),
        labels=card["labels"],
        postprocess=classifier_postprocess(2.0),
        probe_layers=[p["name"] for p in card["bn_reference"]["probes"]],
        card_fields={"calibration": {"temperature": 2.0, "method": "test"}},
        warmup_images=x[:2],
        version_labels=("canary",),
    )
    assert result.version == 2 and result.path == base / "tiny_classifier" / "2"
    after = {p.relative_to(v1): p.read_bytes() for p in v1.rglob("*") if p.is_file()}
    assert after == before
    repo = ModelRepository(base)
    assert repo.labels("tiny_classifier") == {"stable": 1, "canary": 2}
    assert repo.served_versions("tiny_classifier") == [1, 2]
    assert not [p for p in (base / "tiny_classifier").iterdir() if p.name.startswith(".staging")]
    # Temperature is applied inside the graph: TF Serving clients get it too.
    out = tf.saved_model.load(str(result.path)).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(
        out["probabilities"].numpy(), tf.nn.softmax(out["logits"] / 2.0).numpy(), atol=1e-5
    )


def test_reference_set_ships_with_the_version(exported):
    version_dir, card, _, _, _ = exported
    ref = np.load(io.BytesIO((version_dir / "assets.extra" / REFERENCE_SET).read_bytes()))
    assert ref["pixels"].dtype == np.uint8 and ref["pixels"].shape[1:] == (32, 32, 3)
    assert len(ref["labels"]) == card["reference_set"]["images"]


def test_drift_reference_is_stored_and_staleness_checked(exported):
    _, card, _, _, _ = exported
    ref = card["bn_reference"]["drift"]
    probes = [p["name"] for p in card["bn_reference"]["probes"]]
    assert sorted(ref["layers"]) == sorted(probes)
    for by_score in ref["layers"].values():
        for score in ("mean_shift", "sym_kl"):
            q = by_score[score]["quantiles"]
            assert 0 < q["0.5"] <= q["0.99"] <= by_score[score]["threshold"]
    assert card["metrics"]["staleness"]["passed"] is True


def test_export_refuses_unconverged_moving_statistics(exported, tmp_path):
    """The seeds' bug at export time: fresh moving statistics (0, 1) are stale."""
    from contract.export import StalenessError

    _, card, model, _, x = exported
    stale = keras.models.clone_model(model)
    stale.set_weights(model.get_weights())
    for layer in bn.bn_layers(stale):
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    kwargs = dict(
        model_base=tmp_path,
        name="stale",
        task="classification",
        spec=PreprocessSpec.from_dict(card["preprocessing"]),
        labels=card["labels"],
        postprocess=classifier_postprocess(1.0),
        probe_layers=[p["name"] for p in card["bn_reference"]["probes"]],
        card_fields={},
        warmup_images=x[:2],
        drift_images=x,
        staleness_images=x,
        drift_window=8,
    )
    with pytest.raises(StalenessError, match="staleness"):
        export_model(stale, **kwargs)
    assert ModelRepository(tmp_path).versions("stale") == []
    # force (--force): exported all the same, with the failed check in the model card.
    result = export_model(stale, **kwargs, force=True)
    assert result.version == 1 and ModelRepository(tmp_path).versions("stale") == [1]
    assert load_model_card(result.path)["metrics"]["staleness"]["passed"] is False
