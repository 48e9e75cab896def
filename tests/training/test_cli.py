"""The command line: transfer learning from a local weights file, the export gate, datasets."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from contract.model_card import KERAS_MODEL_RELPATH, load_model_card
from tests.helpers.photos import write_photo_crops
from training.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return write_photo_crops(tmp_path_factory.mktemp("crops"), 100)


def _backbone_weights_file(model_repo, path):
    """A backbone weights file made from the trained tiny classifier (no download)."""
    trained = keras.models.load_model(
        model_repo / "tiny_classifier" / "1" / KERAS_MODEL_RELPATH, compile=False
    )
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    for layer in backbone.layers:
        if layer.weights:
            layer.set_weights(trained.get_layer(layer.name).get_weights())
    backbone.save_weights(path)
    return backbone


def test_transfer_learning_freezes_then_fine_tunes_the_top_layers(
    model_repo, crops, tmp_path, capsys
):
    source = _backbone_weights_file(model_repo, tmp_path / "backbone.weights.h5")
    base = tmp_path / "models"
    k = 12
    rc = main(
        [
            "classifier",
            "--data",
            str(crops),
            "--model-base",
            str(base),
            "--name",
            "transfer",
            "--preset",
            "tiny",
            "--weights",
            str(tmp_path / "backbone.weights.h5"),
            "--head-epochs",
            "2",
            "--epochs",
            "2",
            "--fine-tune-layers",
            str(k),
            # The subject here is freezing and fine-tuning, not the export gate: on the
            # tiny held-out set (57 images) one image is 1.75 points, and a 2+2-epoch run
            # once stopped at the export gate in CI (exit 3; stderr was not kept, most
            # likely the default 2-point parity limit). A gap above 10 points (6 images)
            # still stops the export. Since the training-mode pass reads i.i.d. batches (not
            # class-sorted ones, which scored training mode low and hid any gap), a 2+2-epoch
            # model's real gap on 48 test images was 10.4 points once: 0.2 here.
            "--max-parity-gap",
            "0.2",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "held-out accuracy (inference mode)" in out and "per-class accuracy" in out
    assert "augmentation: rotate,zoom,contrast" in out  # shown before training starts
    assert out.index("augmentation:") < out.index("== summary ==")
    model = keras.models.load_model(base / "transfer" / "1" / KERAS_MODEL_RELPATH, compile=False)
    frozen, tuned = source.layers[: len(source.layers) - k], source.layers[len(source.layers) - k :]
    frozen = [layer for layer in frozen if layer.weights]
    tuned = [layer for layer in tuned if layer.weights]
    for layer in frozen:
        for a, b in zip(
            layer.get_weights(), model.get_layer(layer.name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(a, b)  # loaded from the file, never changed
    changed = [
        layer.name
        for layer in tuned
        if any(
            not np.array_equal(a, b)
            for a, b in zip(
                layer.get_weights(), model.get_layer(layer.name).get_weights(), strict=True
            )
        )
    ]
    assert changed, "fine-tuning must update the unfrozen top layers"
    card = load_model_card(base / "transfer" / "1")
    assert card["lineage"]["parameters"]["weights"].endswith("backbone.weights.h5")
    assert card["lineage"]["parameters"]["fine_tune_layers"] == k


def test_a_refused_export_exits_3_exports_nothing_and_prints_the_run(stale_run):
    # Stale statistics fail the parity check or, when the noisy parity estimate on a
    # tiny held-out set passes, the staleness check; either way nothing is exported.
    assert stale_run.rc == 3, stale_run.stderr
    err = stale_run.stderr
    assert "parity check failed" in err or "staleness limits" in err, err
    assert stale_run.versions == []
    # The figures the gate judged are printed all the same, without a version.
    assert set(stale_run.summary["per_class_accuracy"]) == {"astronaut", "chelsea", "coffee"}
    assert "parity" in stale_run.summary and "version" not in stale_run.summary


def test_force_flag_reaches_the_run_configuration():
    from training.classifier import PRESETS, ClassifierConfig
    from training.cli import _config_from, build_parser

    args = build_parser().parse_args(["classifier", "--name", "x", "--preset", "tiny"])
    assert _config_from(args, ClassifierConfig, PRESETS).force is False
    args = build_parser().parse_args(["classifier", "--name", "x", "--preset", "tiny", "--force"])
    assert _config_from(args, ClassifierConfig, PRESETS).force is True


def test_make_dataset_writes_class_folders(tmp_path):
    assert main(["make-dataset", "--out", str(tmp_path), "--images", "12", "--seed", "1"]) == 0
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) >= 2 and all(any((tmp_path / f).iterdir()) for f in folders)
    assert sum(1 for _ in tmp_path.rglob("*.png")) == 12
