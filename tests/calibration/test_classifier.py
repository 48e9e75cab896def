"""Online calibration end to end: captured shifted traffic -> gated, published, rolled back.

The served model is the session's really trained ``tiny_classifier`` (v1,
stable). Traffic comes from a shifted domain (contrast x0.5 around the image
mean plus Gaussian noise of 0.1 in model-input units), goes through the real
capture store with feedback for half of it, and is calibrated; quality is
measured through the exported SavedModels on a separate shifted test set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from calibration.capture_store import SampleStore
from calibration.cli import (
    EXIT_ERROR,
    EXIT_NOT_ENOUGH_SAMPLES,
    EXIT_REJECTED,
    add_calibrate_arguments,
    add_promote_arguments,
    add_rollback_arguments,
    run_calibrate,
    run_promote,
    run_rollback,
)
from calibration.config import CalibrationConfig
from calibration.dispatch import calibrate
from calibration.errors import LabelError
from calibration.feedback import record_feedback
from calibration.labels import promote, read_label_history, rollback
from calibration.reestimate import AUTO_SOURCE_WEIGHTS
from calibration.temperature import expected_calibration_error, nll, softmax
from contract import bn
from contract.model_card import KERAS_MODEL_RELPATH, load_model_card
from contract.preprocessing import PreprocessSpec, normalize
from contract.repository import ModelRepository
from tests.helpers.photos import write_photo_crops
from training.data import load_directory

pytestmark = pytest.mark.slow

NAME = "tiny_classifier"


def shift(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast x0.5 around each image's mean, plus noise of sigma 12.75 (0.1 after normalising)."""
    p = pixels.astype(np.float32)
    mean = p.mean(axis=(1, 2, 3), keepdims=True)
    p = (p - mean) * 0.5 + mean + rng.normal(0.0, 12.75, p.shape)
    return np.clip(np.rint(p), 0, 255).astype(np.uint8)


def capture(store_dir: Path, spec: PreprocessSpec, pixels, labels=None, names=None) -> list[str]:
    """Send images through the capture store as one-image requests; label some."""
    store = SampleStore(store_dir, rate=1.0)
    ids = []
    for i in range(len(pixels)):
        rid = str(uuid.uuid4())
        store.capture(NAME, 1, rid, normalize(pixels[i : i + 1], spec), predictions=[0])
        if labels is not None and labels[i] is not None:
            record_feedback(store_dir, rid, [names[labels[i]] if names else int(labels[i])])
        ids.append(rid)
    return ids


def served(version_dir: Path, pixels: np.ndarray, spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """Outputs of the exported SavedModel's serving signature."""
    sig = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    out = sig(images=tf.constant(normalize(pixels, spec)))
    return {k: v.numpy() for k, v in out.items()}


def fresh_repo(model_repo: Path, root: Path) -> Path:
    base = root / "models"
    shutil.copytree(model_repo, base)  # the session's repository is shared: never mutate it
    return base


@pytest.fixture(scope="module")
def calibrated(model_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    base = fresh_repo(model_repo, root)
    card = load_model_card(base / NAME / "1")
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    traffic = load_directory(write_photo_crops(root / "traffic", 100, seed=7), spec)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(traffic))  # arrival order mixes the classes
    pixels, labels = shift(traffic.pixels[order], rng), traffic.labels[order]
    feedback = [int(y) if i % 2 == 0 else None for i, y in enumerate(labels)]
    capture(root / "samples", spec, pixels, feedback, traffic.class_names)
    config_before = (base / "models.config").read_text()
    result = calibrate(
        CalibrationConfig(
            model_base=base,
            name=NAME,
            samples_dir=root / "samples",
            prior_strength=0.0,
            min_samples=64,
            min_labelled=32,
            accuracy_tolerance=0.02,
            promote="canary",
            min_fine_tune_labels=64,  # 300 tiny samples: fine-tune on the ~90 labelled fit ones
        )
    )
    test = load_directory(write_photo_crops(root / "test", 50, seed=11), spec)
    return SimpleNamespace(
        base=base,
        root=root,
        spec=spec,
        result=result,
        config_before=config_before,
        test=test,
        test_shifted=shift(test.pixels, np.random.default_rng(5)),
    )


def test_calibration_on_shifted_traffic_recovers_accuracy(calibrated):
    c = calibrated
    assert c.result.status == "published", c.result.reasons
    v1, v2 = c.base / NAME / "1", c.base / NAME / str(c.result.version)
    y = c.test.labels
    clean1 = served(v1, c.test.pixels, c.spec)["probabilities"]
    shifted1 = served(v1, c.test_shifted, c.spec)["probabilities"]
    shifted2 = served(v2, c.test_shifted, c.spec)["probabilities"]
    acc_clean1 = float(np.mean(clean1.argmax(1) == y))
    acc_shift1 = float(np.mean(shifted1.argmax(1) == y))
    acc_shift2 = float(np.mean(shifted2.argmax(1) == y))
    lost = acc_clean1 - acc_shift1
    # The session's tiny model is trained anew each run (CPU threads: not bit-reproducible);
    # its loss to this shift was above 0.15 in earlier CI runs and 0.107 in one.
    assert lost > 0.08, "the shift must hurt the served model for this test to mean anything"
    # Accuracy lost to the shift comes back. (The target, at least half of it,
    # is met by some of these tiny models and not others: see the README.)
    assert acc_shift2 > acc_shift1, (acc_clean1, acc_shift1, acc_shift2)
    # Served probabilities on the shifted domain are better too, by log loss: the proper
    # score the temperature is fitted by. (ECE over 150 images is too coarse to order
    # two models: one CI run measured 0.107 -> 0.135 while accuracy rose; three local
    # runs measured log loss 1.04 -> 0.72, 1.44 -> 0.56, 1.42 -> 0.69.)
    log_loss1, log_loss2 = (nll(np.log(np.clip(p, 1e-12, None)), y) for p in (shifted1, shifted2))
    ece = (expected_calibration_error(shifted1, y), expected_calibration_error(shifted2, y))
    assert log_loss2 < log_loss1, (log_loss1, log_loss2, "ECE", ece)
    # Traffic accuracy measured by the gate does not tell another story. It is judged
    # on the ~20 labelled images the fine-tuning did not learn from, where one fresh-clone
    # run's tiny model tied (15 of 19 each): not worse, and the 50 test images above decide.
    traffic = c.result.accuracy["traffic"]
    assert traffic["candidate"] >= traffic["parent"]
    assert traffic["fine_tuned_on"] > 64 and traffic["images"] + traffic["fine_tuned_on"] == 150


def test_automatic_prior_keeps_the_best_weight_the_reference_set_allows(model_repo, tmp_path):
    """``prior_strength="auto"``: every source weight is tried on one collection of
    statistics and the chosen one is the most accurate on labelled traffic among those
    within tolerance on the reference set."""
    base = fresh_repo(model_repo, tmp_path)
    card = load_model_card(base / NAME / "1")
    spec = PreprocessSpec.from_dict(card["preprocessing"])
    traffic = load_directory(write_photo_crops(tmp_path / "traffic", 60, seed=8), spec)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(traffic))
    pixels, labels = shift(traffic.pixels[order], rng), traffic.labels[order]
    capture(tmp_path / "samples", spec, pixels, list(labels), traffic.class_names)
    # Without fine-tuning, so that the exported candidate is the one the search measured.
    result = calibrate(
        CalibrationConfig(
            model_base=base,
            name=NAME,
            samples_dir=tmp_path / "samples",
            prior_strength="auto",
            min_samples=64,
            fine_tune_epochs=0,
        )
    )
    search = result.prior_search
    assert [t["source_weight"] for t in search] == list(AUTO_SOURCE_WEIGHTS)
    chosen = [t for t in search if t["prior_strength"] == result.prior_strength]
    assert len(chosen) == 1
    parent_ref = result.accuracy["reference_set"]["parent"]
    within = [t for t in search if t["reference_accuracy"] >= parent_ref - 0.02]
    pool = [t for t in within if not t["traffic_drifts"]] or within or search
    assert chosen[0] in pool
    assert chosen[0]["labelled_accuracy"] == max(t["labelled_accuracy"] for t in pool)
    lineage = load_model_card(result.path)["lineage"]
    assert lineage["prior_strength"] == result.prior_strength
    assert lineage["prior_search"] == search
    # The candidate that was exported is the chosen one: its reference-set accuracy is
    # the one measured for that weight.
    assert result.accuracy["reference_set"]["candidate"] == pytest.approx(
        chosen[0]["reference_accuracy"]
    )
    assert lineage["fine_tune"] == {"ran": False, "why_not": "disabled (fine_tune_epochs=0)"}
    assert lineage["method"] == "adabn-precise-bn"
    m1 = keras.models.load_model(base / NAME / "1" / KERAS_MODEL_RELPATH, compile=False)
    m2 = keras.models.load_model(result.path / KERAS_MODEL_RELPATH, compile=False)
    for a, b in zip(m1.weights, m2.weights, strict=True):  # AdaBN alone: only statistics change
        if "moving" not in a.path:
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_published_version_has_lineage_temperature_and_label(calibrated):
    c = calibrated
    r = c.result
    assert r.version == 2 and r.parent_version == 1 and r.labels_moved == {"canary": 2}
    repo = ModelRepository(c.base)
    assert repo.labels(NAME) == {"stable": 1, "canary": 2}
    assert 1 in repo.served_versions(NAME) and 2 in repo.served_versions(NAME)
    card = load_model_card(c.base / NAME / "2")
    assert card["version"] == 2
    lineage = card["lineage"]
    assert lineage["parent_version"] == 1 and lineage["prior_strength"] == 0.0
    assert lineage["samples"]["used"] == 300 and lineage["samples"]["labelled"] == 150
    assert lineage["samples"]["fit"] + lineage["samples"]["held_out"] == 300
    assert lineage["gate"]["passed"] is True
    assert {ch["name"] for ch in lineage["gate"]["checks"]} >= {
        "class_balance",
        "accuracy_traffic",
        "above_chance",
        "accuracy_reference",
        "parity",
        "drift",
        "statistics_converged",
    }
    # The temperature was fitted on labelled feedback and is applied in the graph.
    t = card["calibration"]["temperature"]
    assert card["calibration"]["method"] == "temperature_scaling"
    assert t == lineage["temperature"] == r.temperature and t != 1.0
    # The fit itself is tested exactly in test_temperature.py; here it must have
    # run on the labelled traffic and produced a sane temperature.
    fit = r.temperature_fit
    assert fit is not None and fit.fitted_on > 0 and 0.05 < fit.temperature < 20
    out = served(c.base / NAME / "2", c.test_shifted[:16], c.spec)
    np.testing.assert_allclose(out["probabilities"], softmax(out["logits"], t), atol=1e-5)
    # Drift reference and the reference set travel with the new version.
    assert (
        card["bn_reference"]["drift"]["layers"]
        and (c.base / NAME / "2" / "assets.extra" / "reference_set.npz").exists()
    )
    assert (
        json.loads((c.base / NAME / "2" / "assets.extra" / "model_card.json").read_text())[
            "version"
        ]
        == 2
    )


def test_every_bn_layer_was_re_estimated_and_the_rest_fine_tuned(calibrated):
    c = calibrated
    m1 = keras.models.load_model(c.base / NAME / "1" / KERAS_MODEL_RELPATH, compile=False)
    m2 = keras.models.load_model(c.base / NAME / "2" / KERAS_MODEL_RELPATH, compile=False)
    l1, l2 = bn.bn_layers(m1), bn.bn_layers(m2)
    card = load_model_card(c.base / NAME / "2")
    lineage = card["lineage"]
    assert lineage["bn_layers_reestimated"] == len(l2) == len(l1) > 30
    assert lineage["method"] == "adabn-precise-bn+feedback-fine-tune"
    ft = lineage["fine_tune"]
    assert ft["ran"] and ft["feedback_images"] == c.result.accuracy["traffic"]["fine_tuned_on"]
    assert ft["reference_images"] == card["reference_set"]["images"]
    assert (
        len(ft["loss_by_epoch"]) == ft["epochs"]
        and ft["loss_by_epoch"][-1] < ft["loss_by_epoch"][0]
    )
    for a, b in zip(l1, l2, strict=True):
        assert not np.allclose(a.moving_variance.numpy(), b.moving_variance.numpy()), a.name
        assert a.trainable == b.trainable  # the saved model keeps its training-time flags
        # Fine-tuning ran under the new statistics with BN frozen: the affine is the parent's.
        np.testing.assert_array_equal(a.gamma.numpy(), b.gamma.numpy())
        np.testing.assert_array_equal(a.beta.numpy(), b.beta.numpy())
    changed = 0
    for a, b in zip(m1.layers, m2.layers, strict=True):
        if isinstance(a, keras.layers.BatchNormalization) or not a.weights:
            continue
        same = all(
            np.array_equal(u.numpy(), v.numpy()) for u, v in zip(a.weights, b.weights, strict=True)
        )
        assert same or a.trainable, f"{a.name} is frozen in the parent and changed"
        changed += not same
    assert changed > 10  # the trainable convolutions and the head learned from feedback


def test_promote_and_rollback_move_the_stable_label(calibrated, tmp_path):
    base = tmp_path / "models"
    shutil.copytree(calibrated.base, base)
    repo = ModelRepository(base)
    assert promote(base, NAME, 2, "stable") == 1
    assert repo.labels(NAME) == {"stable": 2, "canary": 2}
    assert rollback(base, NAME) == (2, 1)
    assert repo.labels(NAME)["stable"] == 1 and 1 in repo.served_versions(NAME)
    history = read_label_history(base, NAME)
    assert [(h["action"], h["label"], h["version"], h["previous"]) for h in history] == [
        ("calibrate", "canary", 2, None),
        ("promote", "stable", 2, 1),
        ("rollback", "stable", 1, 2),
    ]
    with pytest.raises(LabelError, match="no earlier"):
        rollback(base, NAME)  # v1 was the first stable version
    # The command line: promote again, roll back, then nothing left to roll back.
    p = argparse.ArgumentParser()
    add_promote_arguments(p)
    assert (
        run_promote(p.parse_args(["--model-base", str(base), "--name", NAME, "--version", "2"]))
        == 0
    )
    assert repo.labels(NAME)["stable"] == 2
    assert (
        run_promote(p.parse_args(["--model-base", str(base), "--name", NAME, "--version", "7"]))
        == EXIT_ERROR
    )
    r = argparse.ArgumentParser()
    add_rollback_arguments(r)
    assert run_rollback(r.parse_args(["--model-base", str(base), "--name", NAME])) == 0
    assert repo.labels(NAME)["stable"] == 1
    assert run_rollback(r.parse_args(["--model-base", str(base), "--name", NAME])) == EXIT_ERROR


def test_gate_rejects_noise_images_and_changes_nothing(model_repo, tmp_path):
    base = fresh_repo(model_repo, tmp_path)
    spec = PreprocessSpec.from_dict(load_model_card(base / NAME / "1")["preprocessing"])
    noise = np.random.default_rng(3).integers(
        0, 256, (96, spec.height, spec.width, 3), dtype=np.uint8
    )
    capture(tmp_path / "samples", spec, noise)
    config = (base / "models.config").read_bytes()
    result = calibrate(
        CalibrationConfig(
            model_base=base,
            name=NAME,
            samples_dir=tmp_path / "samples",
            prior_strength=0.0,
            min_samples=64,
        )
    )
    assert result.status == "rejected" and result.reasons
    failed = {c.name for c in result.checks if c.gating and not c.passed}
    assert "accuracy_reference" in failed
    assert (base / "models.config").read_bytes() == config
    repo = ModelRepository(base)
    assert repo.versions(NAME) == [1] and repo.labels(NAME) == {"stable": 1}
    kept = base / NAME / "rejected" / "2"
    assert result.path == kept and (kept / "saved_model.pb").exists()
    rejection = json.loads((kept / "assets.extra" / "rejection.json").read_text())
    assert rejection["reasons"] == result.reasons
    assert load_model_card(kept)["lineage"]["gate"]["passed"] is False
    assert not read_label_history(base, NAME)
    # The rejected number is never reused for a published version.
    assert repo.next_version(NAME) == 3


def test_gate_rejects_one_class_samples_from_the_command_line(model_repo, tmp_path, capsys):
    base = fresh_repo(model_repo, tmp_path)
    spec = PreprocessSpec.from_dict(load_model_card(base / NAME / "1")["preprocessing"])
    crops = load_directory(write_photo_crops(tmp_path / "crops", 80, seed=3), spec)
    coffee = crops.class_names.index("coffee")
    one_class = crops.pixels[crops.labels == coffee]
    capture(tmp_path / "samples", spec, one_class, [coffee] * len(one_class))
    config = (base / "models.config").read_bytes()
    p = argparse.ArgumentParser()
    add_calibrate_arguments(p)
    args = p.parse_args(
        [
            "--model-base",
            str(base),
            "--name",
            NAME,
            "--samples",
            str(tmp_path / "samples"),
            "--min-samples",
            "64",
            "--promote",
            "stable",
        ]
    )
    assert run_calibrate(args) == EXIT_REJECTED
    out = json.loads(capsys.readouterr().out)
    failed = {c["name"] for c in out["gate"] if c["gating"] and not c["passed"]}
    assert "class_balance" in failed and out["status"] == "rejected"
    assert (base / "models.config").read_bytes() == config
    assert ModelRepository(base).versions(NAME) == [1]


def test_too_few_samples_is_its_own_exit_code(model_repo, tmp_path, capsys):
    base = fresh_repo(model_repo, tmp_path)
    spec = PreprocessSpec.from_dict(load_model_card(base / NAME / "1")["preprocessing"])
    p = argparse.ArgumentParser()
    add_calibrate_arguments(p)
    argv = ["--model-base", str(base), "--name", NAME, "--samples", str(tmp_path / "samples")]
    assert run_calibrate(p.parse_args(argv)) == EXIT_NOT_ENOUGH_SAMPLES  # nothing captured yet
    capture(tmp_path / "samples", spec, np.zeros((10, spec.height, spec.width, 3), np.uint8))
    assert run_calibrate(p.parse_args(argv + ["--min-samples", "11"])) == EXIT_NOT_ENOUGH_SAMPLES
    assert "10 usable samples" in capsys.readouterr().err
    assert (
        run_calibrate(
            p.parse_args(["--model-base", str(base), "--name", "missing", "--samples", "x"])
        )
        == EXIT_ERROR
    )
    assert ModelRepository(base).versions(NAME) == [1]
